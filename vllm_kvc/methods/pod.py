"""Method ``pod`` (POD): in each group of adjacent layers the first (lead) caches its keys and values; the others
(followers) cache only their values, score distant tokens with the lead's queries and cached keys, and score
the sink and recent tokens with their own exact keys (a side pool). Groups come from measured inter-layer
attention similarity on calibration text, or are given.

Where its parts live: settings and plan here; similarity, group search and POD attention math vllm_kvc/pod.py;
attention glue/pod.py (+ glue/window.py); emulation emulate.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import Field

from vllm_kvc.methods.base import Method, register
from vllm_kvc.plan import FLOAT_LATENTS, ModelShape, Plan, dtype_bytes, kv_heads_per_rank
from vllm_kvc.settings import ConfigError, Strict


class PodConfig(Strict):
    """Settings under ``compression.pod``."""

    followers: int | None = Field(None, ge=0, description="layers that share the distant keys of their group's "
                                                          "lead (default: half of the layers)")
    max_group: int = Field(2, ge=2, le=16, description="most layers per sharing group (lead included)")
    window: int = Field(64, ge=0, description="recent tokens a follower scores with its own keys")
    sinks: int = Field(4, ge=0, description="first tokens a follower scores with its own keys")
    groups: list[list[int]] | None = Field(
        None, description="explicit sharing groups of adjacent layers (first = lead), covering every layer in "
                          "order; default: chosen from measured inter-layer attention similarity")


@dataclass(frozen=True)
class SharingPlan(Plan):
    """Sharing groups of adjacent layers (first = lead); ``measured``: the groups are the measured (or given)
    ones, not placeholders with the same bytes (before similarity is measured)."""

    groups: tuple[tuple[int, ...], ...]
    measured: bool = True

    method = "pod"

    def lead_of(self, layer: int) -> int:
        return next(g[0] for g in self.groups if layer in g)

    def is_follower(self, layer: int) -> bool:
        return self.lead_of(layer) != layer

    def layer_bytes_per_token(self, layer: int, tp_size: int = 1) -> int:
        row = kv_heads_per_rank(self.shape, tp_size) * self.shape.head_dim * dtype_bytes(self.latent_dtype)
        return row if self.is_follower(layer) else 2 * row

    def layer_ranks(self, layer: int) -> tuple[int, int]:
        hd = self.shape.head_dim
        return (0 if self.is_follower(layer) else hd), hd


def default_groups(num_layers: int, followers: int, max_group: int) -> list[list[int]]:
    """Sharing groups used before similarity is measured (only their byte count matters then): ``followers``
    followers in groups of at most ``max_group`` from the deepest layers up."""
    groups, i, left = [], num_layers - 1, followers
    while i >= 0:
        size = min(max_group, left + 1, i + 1)
        groups.insert(0, list(range(i - size + 1, i + 1)))
        left -= size - 1
        i -= size
    return groups


def num_followers(cfg, num_layers: int) -> int:
    pc = cfg.pod
    most = num_layers - -(-num_layers // pc.max_group)
    f = pc.followers if pc.followers is not None else min(num_layers // 2, most)
    if f > most:
        raise ConfigError("compression.pod.followers",
                          f"{f} followers do not fit {num_layers} layers in groups of at most {pc.max_group} "
                          f"(at most {most})")
    return min(f, most)


def check_groups(groups, num_layers: int, max_group: int, field: str = "compression.pod.groups") -> None:
    flat = [i for g in groups for i in g]
    if flat != list(range(num_layers)) or any(not g for g in groups):
        raise ConfigError(field, f"expected non-empty groups of adjacent layers covering 0..{num_layers - 1} in "
                                 f"order, got {groups}")
    if any(len(g) > max_group for g in groups):
        raise ConfigError(field, f"a group is larger than max_group {max_group}")


@register
class Pod(Method):
    name = "pod"
    summary = "pod: distant-token keys shared across adjacent layers"
    section = PodConfig
    modules = ("vllm_kvc.pod", "vllm_kvc.glue.pod")
    rank_meaning = "rank_k 0: a follower, its distant keys are its group lead's; head_dim: keys cached"

    def plan(self, cfg, shape: ModelShape, tp_size: int = 1, groups=None) -> SharingPlan:
        """``groups``: the measured sharing groups; without them (and without ``pod.groups``) the plan has the
        right bytes but placeholder groups (``measured=False``)."""
        n = shape.num_layers
        measured = True
        given = cfg.pod.groups
        if given is not None:
            check_groups(given, n, cfg.pod.max_group)
            followers = n - len(given)
            if cfg.pod.followers is not None and cfg.pod.followers != followers:
                raise ConfigError("compression.pod.followers",
                                  f"{cfg.pod.followers} disagrees with pod.groups ({followers} followers)")
        groups = groups if groups is not None else given
        if groups is not None:
            check_groups(groups, n, cfg.pod.max_group)
        else:
            groups, measured = default_groups(n, num_followers(cfg, n), cfg.pod.max_group), False
        dt = shape.dtype if shape.dtype in FLOAT_LATENTS else "bfloat16"
        return SharingPlan(shape, dt, tuple(tuple(g) for g in groups), measured)

    def prepare(self, model_dir, cfg, shape, tp_size=1, build=True):
        groups = cfg.pod.groups
        if groups is None:
            from vllm_kvc.pod import build_pod_plan, cached_pod_plan

            self.plan(cfg, shape, tp_size)  # settings errors before any measurement
            try:
                pp = build_pod_plan(model_dir, cfg) if build else cached_pod_plan(model_dir, cfg)
            except ValueError as e:
                raise ConfigError("compression.pod", str(e)) from None
            groups = [list(g) for g in pp.groups] if pp is not None else None
        return self.plan(cfg, shape, tp_size, groups=groups), None

    def artifact_summary(self, plan: SharingPlan, artifact) -> str:
        return json.dumps({"pod_groups": [list(g) for g in plan.groups]})

    def attention(self, layer, plan: SharingPlan, cfg, artifact, cache_config, prefix):
        import torch

        from vllm_kvc.glue.pod import PodAttention

        i = layer.layer_idx
        lead = plan.lead_of(i)
        lead_name = None
        if lead != i:  # the lead's attention layer: same prefix with the lead's layer index
            parts = prefix.split(".")
            parts[len(parts) - 1 - parts[::-1].index(str(i))] = str(lead)
            lead_name = ".".join(parts)
        return PodAttention(layer.num_heads, layer.head_dim, layer.scaling, layer.num_kv_heads,
                            getattr(torch, plan.latent_dtype), lead_name, cfg.pod.window, cfg.pod.sinks,
                            cache_config=cache_config, prefix=prefix)

    def describe(self, plan: SharingPlan) -> dict:
        return {**super().describe(plan), "pod_groups": [list(g) for g in plan.groups]}

    def emulate(self, model, plan: SharingPlan, artifact, cfg) -> list:
        from vllm_kvc.emulate import install_pod

        return install_pod(model, [list(g) for g in plan.groups], cfg.pod.window, cfg.pod.sinks)

    def bench_points(self, base, shape, model_dir, points, include, **_) -> list[dict]:
        """Followers drop their keys: 1 - followers / (2 * layers) of the bf16 bytes."""
        if include is not None and not any(self.name.startswith(i) for i in include):
            return []
        n = shape.num_layers
        common = {"group_size": base.group_size, "calibration": base.calibration.model_dump(), "method": self.name}
        return [{"method": self.name, "is_baseline": False, "target": None,
                 "compression": base.model_validate({**common, "pod": {"followers": f, "max_group": g}})}
                for f, g in ((n // 3, 2), (n // 2, 2), (2 * n // 3, 3))]
