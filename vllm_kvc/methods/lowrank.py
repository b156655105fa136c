"""Method ``lowrank`` (LoRC / Palu): each layer caches per-layer low-rank latents ``c = x A`` of its keys and values,
one latent per head group, and attention rebuilds ``K = RoPE(c_k B_k)`` and applies ``B_v`` after the weighted
sum. Factors: SVD of each head group's ``k_proj`` / ``v_proj`` weights whitened by the covariance of their
inputs on calibration text (factorize.py, calibrate.py); integer latents are rotated first (Hadamard).

Where its parts live: settings and plan here; factors calibrate.py (+ factorize.py); bytes layout.py;
attention glue/latent.py (+ kernels/); allocator allocate.py; emulation emulate.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from vllm_kvc.methods.base import Method, register
from vllm_kvc.plan import (FLOAT_LATENTS, INT_LATENTS, ModelShape, Plan, latent_row_bytes, latent_spec,
                           parse_latent_spec, schedule_ranks)
from vllm_kvc.settings import ConfigError, Strict


class LayerRanks(Strict):
    """Explicit ranks per layer (per head group), one entry per decoder layer."""

    k: list[int]
    v: list[int]

    @model_validator(mode="after")
    def _same_len(self):
        if len(self.k) != len(self.v):
            raise ValueError(f"k has {len(self.k)} entries and v has {len(self.v)}: expected one per layer in both")
        if any(r < 1 for r in self.k + self.v):
            raise ValueError("ranks must be >= 1")
        return self


class LowRankFields(Strict):
    """Settings of latent methods, directly under ``compression:``."""

    ratio: float = Field(0.5, gt=0, le=1, description="kept rank / full rank of each head group, K and V")
    ratio_k: float | None = Field(None, gt=0, le=1, description="overrides ratio for keys")
    ratio_v: float | None = Field(None, gt=0, le=1, description="overrides ratio for values")
    ranks: LayerRanks | None = Field(None, description="explicit per-layer ranks (overrides ratio and schedule)")
    schedule: Literal["uniform", "progressive"] = "uniform"
    progressive_spread: float = Field(
        0.4, ge=0, lt=1, description="progressive: layer 0 keeps (1+spread)x the mean rank, the last (1-spread)x")
    group_size: int = Field(1, ge=1, description="KV heads per factorized head group")
    latent_dtype: Literal["auto", "bfloat16", "float16", "float32", "int8", "int4", "int2"] = "auto"
    latent_dtype_k: Literal["int8", "int4", "int2"] | None = Field(None, description="overrides latent_dtype for keys")
    latent_dtype_v: Literal["int8", "int4", "int2"] | None = Field(None, description="overrides latent_dtype for values")
    quant_group: int | None = Field(
        None, ge=0, description="integer latents: values per fp16 scale; 0: one scale per token, head group and "
                                "K/V (default for lowrank); method quant defaults to 32")
    factorization: Literal["whitened", "plain"] = "whitened"
    keys: Literal["pre_rope", "roped"] = Field(
        "pre_rope", description="pre_rope: key latents of the projection input, rebuilt and rotated at every step; "
                                "roped: latents of the roped keys in a query-weighted basis, scored in the latent "
                                "(no key rebuild or RoPE at attention)")

    @property
    def k_ratio(self) -> float:
        return self.ratio_k if self.ratio_k is not None else self.ratio

    @property
    def v_ratio(self) -> float:
        return self.ratio_v if self.ratio_v is not None else self.ratio


@dataclass(frozen=True)
class LatentPlan(Plan):
    """Per layer, the rank of the K and V latent of each head group; ``latent_dtype`` the latent spec
    (plan.latent_spec: bfloat16 / float16 / float32 / int8 / int4 / int8/int4@g32 ...)."""

    group_size: int
    ranks_k: tuple[int, ...]
    ranks_v: tuple[int, ...]
    identity: bool = False  # full-rank identity factors (the latent is K / V itself), no rotation
    roped_keys: bool = False  # the K latent codes the roped key; queries score it (calibrate.py)

    method = "lowrank"

    @property
    def group_dim(self) -> int:
        return self.group_size * self.shape.head_dim

    @property
    def num_groups(self) -> int:
        return self.shape.num_kv_heads // self.group_size

    def groups_per_rank(self, tp_size: int = 1) -> int:
        return max(1, self.num_groups // tp_size) if self.shape.num_kv_heads >= tp_size else 1

    def layer_bytes_per_token(self, layer: int, tp_size: int = 1) -> int:
        return latent_row_bytes(self.groups_per_rank(tp_size), self.ranks_k[layer], self.ranks_v[layer],
                                self.latent_dtype)

    def layer_ranks(self, layer: int) -> tuple[int, int]:
        return self.ranks_k[layer], self.ranks_v[layer]

    @property
    def quantized(self) -> bool:
        return parse_latent_spec(self.latent_dtype)[0] in INT_LATENTS

    @property
    def rotate(self) -> bool:
        """Factors are rotated (Hadamard / random orthogonal) for integer latents, except identity factors."""
        return self.quantized and not self.identity


def check_groups(gs: int, shape: ModelShape, tp_size: int) -> None:
    """Head groups of ``gs`` KV heads never straddle two tensor-parallel ranks."""
    if shape.num_kv_heads % gs:
        raise ConfigError("compression.group_size", f"{gs} does not divide the model's {shape.num_kv_heads} KV heads")
    if tp_size > 1:
        if shape.num_kv_heads >= tp_size:
            per_rank = shape.num_kv_heads // tp_size
            if shape.num_kv_heads % tp_size or per_rank % gs:
                raise ConfigError("compression.group_size",
                                  f"{gs} must divide the {per_rank} KV heads each of {tp_size} tensor-parallel "
                                  f"ranks holds, so no head group straddles two ranks")
        elif gs != 1:
            raise ConfigError("compression.group_size",
                              f"with tensor_parallel_size {tp_size} > {shape.num_kv_heads} KV heads each rank "
                              f"holds one replicated KV head: expected group_size 1")


def layer_ranks(cfg, shape: ModelShape) -> tuple[list[int], list[int]]:
    """(K ranks, V ranks) per layer: explicit ``ranks``, or ``ratio_k`` / ``ratio_v`` through the schedule."""
    full = cfg.group_size * shape.head_dim
    n = shape.num_layers
    if cfg.ranks is None:
        return (schedule_ranks(cfg.k_ratio, n, full, cfg.schedule, cfg.progressive_spread),
                schedule_ranks(cfg.v_ratio, n, full, cfg.schedule, cfg.progressive_spread))
    for kind, lst in (("k", cfg.ranks.k), ("v", cfg.ranks.v)):
        if len(lst) != n:
            raise ConfigError(f"compression.ranks.{kind}", f"has {len(lst)} entries: expected one per layer ({n})")
        for i, r in enumerate(lst):
            if r > full:
                raise ConfigError(f"compression.ranks.{kind}[{i}]",
                                  f"rank {r} is larger than the head-group dimension {full} "
                                  f"(group_size {cfg.group_size} x head_dim {shape.head_dim})")
    return list(cfg.ranks.k), list(cfg.ranks.v)


def make_spec(dtype_k: str, dtype_v: str, quant_group: int) -> str:
    try:
        return latent_spec(dtype_k, dtype_v, quant_group)
    except ValueError as e:
        raise ConfigError("compression.latent_dtype", str(e)) from None


@register
class LowRank(Method):
    name = "lowrank"
    summary = "lowrank: factorized latents"
    fields = LowRankFields
    allocatable = True
    cuda_graphs = True  # glue/latent.py: kernels.triton_latent.latent_step
    modules = ("vllm_kvc.calibrate", "vllm_kvc.factorize", "vllm_kvc.allocate", "vllm_kvc.glue.latent")

    def plan(self, cfg, shape: ModelShape, tp_size: int = 1) -> LatentPlan:
        check_groups(cfg.group_size, shape, tp_size)
        rk, rv = layer_ranks(cfg, shape)
        dt = cfg.latent_dtype
        if dt == "auto":
            dt = shape.dtype if shape.dtype in FLOAT_LATENTS else "bfloat16"
        spec = make_spec(cfg.latent_dtype_k or dt, cfg.latent_dtype_v or dt, cfg.quant_group or 0)
        return LatentPlan(shape, spec, cfg.group_size, tuple(rk), tuple(rv), roped_keys=cfg.keys == "roped")

    def prepare(self, model_dir, cfg, shape, tp_size=1, build=True):
        from vllm_kvc.calibrate import build_factors

        plan = self.plan(cfg, shape, tp_size)
        return plan, build_factors(model_dir, cfg, plan) if build else None

    def attention(self, layer, plan, cfg, artifact, cache_config, prefix):
        from vllm_kvc.glue.latent import LatentAttention
        from vllm_kvc.layout import LatentLayout

        i = layer.layer_idx
        layout = LatentLayout(groups=layer.groups.stop - layer.groups.start, group_size=plan.group_size,
                              head_dim=layer.head_dim, rank_k=plan.ranks_k[i], rank_v=plan.ranks_v[i],
                              dtype=plan.latent_dtype)
        return LatentAttention(layer.num_heads, layer.head_dim, layer.scaling, layer.num_kv_heads, layout,
                               factors_path=artifact, cache_config=cache_config, prefix=prefix,
                               roped_keys=plan.roped_keys)

    def describe(self, plan: LatentPlan) -> dict:
        return {"latent_dtype": plan.latent_dtype, "group_size": plan.group_size,
                "keys": "roped" if plan.roped_keys else "pre_rope"}

    def allocate(self, model_dir, base, baseline_bytes, memory=None, max_rise=None):
        import dataclasses

        from vllm_kvc.allocate import allocate_for_budget, allocate_quality

        if getattr(base, "keys", "pre_rope") != "pre_rope":
            raise ConfigError("compression.keys", f"{base.keys!r}: the allocator prices pre-RoPE key ranks and "
                                                  "widths; expected keys: pre_rope (roped keys are served at full "
                                                  "rank: set latent_dtype_k / latent_dtype_v instead)")
        if memory is not None:
            alloc = allocate_for_budget(model_dir, base, memory, baseline_bytes)
        else:
            alloc = allocate_quality(model_dir, base, max_rise, baseline_bytes)
        summary = {k: v for k, v in dataclasses.asdict(alloc).items() if k not in ("ranks_k", "ranks_v")}
        summary["memory_fraction"] = alloc.bytes_per_token / baseline_bytes
        return alloc.compression(base), summary

    def emulate(self, model, plan: LatentPlan, artifact, cfg) -> list:
        from vllm_kvc.emulate import install_factors

        return install_factors(model, str(artifact), plan.latent_dtype, roped_keys=plan.roped_keys)

    def bench_points(self, base, shape, model_dir, points, include, quality_pct=None,
                     plain_points=(0.50, 0.25), **_) -> list[dict]:
        """Ours: ``kvc-alloc`` (allocate.py at each memory point), ``kvc-alloc-q<X>`` (quality mode) and
        ``kvc-roped-k<b>v<b>`` (keys roped, full rank, ``ROPED_POINTS``: not for ``kvc-alloc``); baselines:
        ``svd-whitened`` / ``svd-plain`` (uniform rank, int8 latents)."""
        import dataclasses

        from vllm_kvc.allocate import allocate_for_budget, allocate_quality

        base_bytes = self.plan(base, shape).baseline_bytes_per_token()
        common = dict(group_size=base.group_size, calibration=base.calibration.model_dump())
        fresh = base.model_validate(common)
        out = []
        if _wanted("kvc-alloc", include):
            for f in points:
                a = allocate_for_budget(model_dir, fresh, f, base_bytes)
                out.append({"method": "kvc-alloc", "is_baseline": False, "target": f,
                            "compression": a.compression(fresh), "allocation": dataclasses.asdict(a)})
            if quality_pct is not None:
                a = allocate_quality(model_dir, fresh, quality_pct, base_bytes, lo_frac=0.1, hi_frac=0.4, iters=4)
                out.append({"method": f"kvc-alloc-q{quality_pct:g}", "is_baseline": False, "target": None,
                            "compression": a.compression(fresh), "allocation": dataclasses.asdict(a)})
        for bk, bv in roped_points(include):  # keys roped at full rank, one uniform width per part (no allocation)
            out.append({"method": f"kvc-roped-k{bk}v{bv}", "is_baseline": False, "target": None,
                        "compression": base.model_validate({**common, "keys": "roped", "ratio": 1.0,
                                                            "latent_dtype_k": f"int{bk}",
                                                            "latent_dtype_v": f"int{bv}", "latent_dtype": "int8",
                                                            "quant_group": 32})})
        groups = shape.num_kv_heads // base.group_size
        plain = [f for f in plain_points if f in points] or list(points)[:1]  # plain SVD: a few points suffice
        for name, fact, pts in (("svd-whitened", "whitened", points), ("svd-plain", "plain", plain)):
            if not _wanted(name, include):
                continue
            for f in pts:
                r = uniform_ranks(groups, base.group_size * shape.head_dim, shape.num_layers, f, base_bytes)
                if r is None:
                    continue
                out.append({"method": name, "is_baseline": True, "target": f,
                            "compression": base.model_validate({**common, "factorization": fact,
                                                                "latent_dtype": "int8", "ranks": {"k": r, "v": r}})})
        return out


# ``kvc-roped-k<K bits>v<V bits>`` points of ``bench pareto``: full-rank roped keys and full-rank values, g32 scales
ROPED_POINTS = ((4, 4), (2, 4), (4, 2))


def roped_points(include) -> list[tuple[int, int]]:
    """The ``(K bits, V bits)`` of the ``kvc-roped`` points asked for: each ``kvc-roped-k<b>v<b>`` in
    ``include`` names one (bits in 2, 4, 8); plain ``kvc-roped`` (or no list) gives ``ROPED_POINTS``."""
    import re

    named, default = [], include is None
    for i in include or ():
        m = re.fullmatch(r"kvc-roped-k(\d)v(\d)", i)
        if m:
            bits = (int(m.group(1)), int(m.group(2)))
            if not set(bits) <= {2, 4, 8}:
                raise ValueError(f"bench method {i!r}: K and V bits must each be 2, 4 or 8")
            named.append(bits)
        elif "kvc-roped".startswith(i) or i == "kvc-roped":
            default = True
    return list(dict.fromkeys(named + (list(ROPED_POINTS) if default else [])))


def _wanted(name: str, include) -> bool:
    return include is None or any(name.startswith(i) for i in include)


def uniform_ranks(plan_groups: int, full: int, n_layers: int, fraction: float, baseline_bytes: int,
                  dtype: str = "int8") -> list[int] | None:
    """Largest uniform rank (K = V) whose int8 rows fit ``fraction`` of the bf16 bytes."""
    best = None
    for r in range(1, full + 1):
        if n_layers * latent_row_bytes(plan_groups, r, r, dtype) <= fraction * baseline_bytes:
            best = r
    return [best] * n_layers if best else None

