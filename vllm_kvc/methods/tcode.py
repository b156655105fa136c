"""Method ``tcode`` (transform coding): lowrank's whitened latents at full rank, every latent coordinate given its
own width (8 / 4 / 2 bits or dropped) by reverse water-filling on Fisher-weighted variances, stored as a few
segments per layer's K and V row part (one fp16 scale per segment), and the first token of every sequence kept
exact. The quality-per-byte format below 25% of the bf16 KV bytes (benchmarks/RESULTS.md, "Below 15%").

Where its parts live: settings and plan here; statistics, allocation, factors and emulation vllm_kvc/tcode.py
(+ bitalloc.py); row bytes layout.py (``seg:`` specs); attention glue/latent.py (``sink``) on the CPU reference
path (kernels/reference.py). The Triton kernels do not read segment rows yet: on GPUs it is refused at start-up.

Deployments list the segments per layer (``vllm-kvc allocate --method tcode --memory 0.15`` writes them)::

    compression:
      method: tcode
      group_size: 3
      tcode:
        sink: true
        segments:
          k: ["64x4+96x2", ...]   # one entry per layer: width x bits, '+'-joined, bits 8/4/2 non-increasing
          v: ["72x4+112x2", ...]
"""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field, model_validator

from vllm_kvc.methods.base import Method, register
from vllm_kvc.methods.lowrank import LatentPlan, check_groups
from vllm_kvc.plan import ModelShape, dense_bytes_per_token, latent_row_bytes, parse_segments, segment_spec
from vllm_kvc.settings import ConfigError, Strict


class LayerSegments(Strict):
    """Segments of every layer's K and V row part, one string per decoder layer."""

    k: list[str]
    v: list[str]

    @model_validator(mode="after")
    def _same_len(self):
        if len(self.k) != len(self.v):
            raise ValueError(f"k has {len(self.k)} entries and v has {len(self.v)}: expected one per layer in both")
        return self


class TcodeConfig(Strict):
    """Settings under ``compression.tcode``."""

    segments: LayerSegments | None = Field(None, description="per layer, K and V segments 'width x bits' joined "
                                                             "by '+' (written by vllm-kvc allocate --method tcode); "
                                                             "none: every coordinate at 4 bits")
    sink: bool = Field(True, description="keep the first token of every sequence exact (bf16, outside the paged "
                                         "bytes); the statistics leave it out either way")


@dataclass(frozen=True)
class TcodePlan(LatentPlan):
    """``ranks_k`` / ``ranks_v``: coordinates kept per head group; ``layer_specs``: each layer's row spec
    (``seg:<K>/<V>``, layout.py)."""

    layer_specs: tuple[str, ...] = ()
    sink: bool = True

    method = "tcode"

    def layer_bytes_per_token(self, layer: int, tp_size: int = 1) -> int:
        return latent_row_bytes(self.groups_per_rank(tp_size), self.ranks_k[layer], self.ranks_v[layer],
                                self.layer_specs[layer])

    @property
    def quantized(self) -> bool:
        return True

    @property
    def rotate(self) -> bool:  # segment rotations are inside the factors
        return False


@register
class Tcode(Method):
    name = "tcode"
    summary = "tcode: transform-coded latents (bits per coordinate, exact first token)"
    section = TcodeConfig
    rank_meaning = "latent coordinates kept per head group"
    allocatable = True
    modules = ("vllm_kvc.tcode",)

    def plan(self, cfg, shape: ModelShape, tp_size: int = 1) -> TcodePlan:
        check_groups(cfg.group_size, shape, tp_size)
        tc = cfg.tcode
        n, gdim = shape.num_layers, cfg.group_size * shape.head_dim
        if tc.segments is None:  # no allocation: every coordinate at 4 bits (about 26% of the bf16 bytes)
            tc = tc.model_copy(update={"segments": LayerSegments(k=[f"{gdim}x4"] * n, v=[f"{gdim}x4"] * n)})
        if cfg.factorization != "whitened":
            raise ConfigError("compression.factorization", "method tcode codes whitened factors: expected 'whitened'")
        specs, rk, rv = [], [], []
        for kind, lst in (("k", tc.segments.k), ("v", tc.segments.v)):
            if len(lst) != n:
                raise ConfigError(f"compression.tcode.segments.{kind}",
                                  f"has {len(lst)} entries: expected one per layer ({n})")
        for i in range(n):
            parts = []
            for kind, text, ranks in (("k", tc.segments.k[i], rk), ("v", tc.segments.v[i], rv)):
                where = f"compression.tcode.segments.{kind}[{i}]"
                try:
                    segs = parse_segments(text, where)
                except ValueError as e:
                    raise ConfigError(where, str(e).split(": ", 1)[-1]) from None
                kept = sum(w for w, _ in segs)
                if kept > gdim:
                    raise ConfigError(where, f"{text!r} keeps {kept} coordinates: expected at most the head-group "
                                             f"dimension {gdim} (group_size {cfg.group_size} x head_dim "
                                             f"{shape.head_dim})")
                ranks.append(kept)
                parts.append(segs)
            specs.append(segment_spec(*parts))
        return TcodePlan(shape, "tcode-segments", cfg.group_size, tuple(rk), tuple(rv),
                         layer_specs=tuple(specs), sink=tc.sink)

    def prepare(self, model_dir, cfg, shape, tp_size=1, build=True):
        plan = self.plan(cfg, shape, tp_size)
        if not build:
            return plan, None
        from vllm_kvc.tcode import build_factors

        return plan, build_factors(model_dir, cfg, plan)

    def attention(self, layer, plan: TcodePlan, cfg, artifact, cache_config, prefix):
        from vllm_kvc.glue.latent import LatentAttention
        from vllm_kvc.layout import LatentLayout

        i = layer.layer_idx
        layout = LatentLayout(groups=layer.groups.stop - layer.groups.start, group_size=plan.group_size,
                              head_dim=layer.head_dim, rank_k=plan.ranks_k[i], rank_v=plan.ranks_v[i],
                              dtype=plan.layer_specs[i])
        return LatentAttention(layer.num_heads, layer.head_dim, layer.scaling, layer.num_kv_heads, layout,
                               factors_path=artifact, cache_config=cache_config, prefix=prefix, sink=plan.sink)

    def describe(self, plan: TcodePlan) -> dict:
        return {"latent_dtype": plan.latent_dtype, "group_size": plan.group_size, "sink": plan.sink,
                "segments": [s[4:] for s in plan.layer_specs]}

    def emulate(self, model, plan: TcodePlan, artifact, cfg) -> list:
        from vllm_kvc.tcode import install

        return install(model, str(artifact), plan.layer_specs, plan.sink)

    def allocate(self, model_dir, base, baseline_bytes, memory=None, max_rise=None):
        """``base`` plus explicit segments for ``memory`` (fraction of the bf16 KV bytes per token, scales
        included; the exact first token is one bf16 row per sequence, outside them)."""
        from vllm_kvc.plan import format_segments
        from vllm_kvc.tcode import MENU, UNIT, allocate_config, quality_config

        info = {}
        if memory is None:
            sk, sv, used, info = quality_config(model_dir, base, max_rise, baseline_bytes)
        else:
            sk, sv, used = allocate_config(model_dir, base, memory, baseline_bytes)
        d = {k: base.model_dump()[k] for k in ("group_size", "calibration", "factorization")}  # nothing of lowrank's
        d.update(method=self.name, tcode={"sink": base.tcode.sink,
                                          "segments": {"k": [format_segments(s) for s in sk],
                                                       "v": [format_segments(s) for s in sv]}})
        summary = {"method": self.name, "bytes_per_token": used, "memory_fraction": used / baseline_bytes,
                   "menu_bits": list(MENU), "segment_unit": UNIT, "sink": base.tcode.sink, **info}
        return base.model_validate(d), summary

    def bench_points(self, base, shape, model_dir, points, include, **_) -> list[dict]:
        """``kvc-tcode`` at every memory point (ours)."""
        if include is not None and not any("kvc-tcode".startswith(i) for i in include):
            return []
        fresh = base.model_validate({"group_size": base.group_size, "calibration": base.calibration.model_dump(),
                                     "method": self.name})
        base_bytes = dense_bytes_per_token(shape)
        out = []
        for f in points:
            comp, _ = self.allocate(model_dir, fresh, base_bytes, memory=f)
            out.append({"method": "kvc-tcode", "is_baseline": False, "target": f, "compression": comp})
        return out
