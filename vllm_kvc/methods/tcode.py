"""Method ``tcode`` (transform coding): lowrank's whitened latents at full rank, every latent coordinate given its
own width (8 / 4 / 2 bits or dropped) by reverse water-filling on Fisher-weighted variances, stored as a few
segments per layer's K and V row part (one fp16 scale per segment), and the first token of every sequence kept
exact; optionally (``window``) each query's newest tokens exact too, as KIVI's full-precision residual and POD's
recent tokens. The quality-per-byte format below 25% of the bf16 KV bytes (benchmarks/RESULTS.md, "Below 15%",
"Recent tokens exact"). The exact rows (sink + window, model dtype, per running sequence) live beside vLLM's
paged cache: ``TcodePlan.sequence_bytes``; ``--memory`` and ``bench pareto`` count them at ``context`` tokens.

Where its parts live: settings and plan here; statistics, allocation, factors and emulation vllm_kvc/tcode.py
(+ bitalloc.py); row bytes layout.py (``seg:`` specs); attention glue/latent.py (``sink``, ``window``) on the CPU
reference path (kernels/reference.py, glue/window.py) and the Triton kernels on GPUs (segment rows read as
constexpr pieces and the sink, decode captured in CUDA graphs; still slower than dense on GPUs,
benchmarks/RESULTS.md "GPU speed, round 8"; a window > 0 is refused on GPUs at start-up).

Deployments list the segments per layer (``vllm-kvc allocate --method tcode --memory 0.15`` writes them)::

    compression:
      method: tcode
      group_size: 3
      tcode:
        sink: true
        window: 0                 # each query's newest tokens exact (CPU); configs/smollm2-tcode15w16.yaml: 16
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
    window: int = Field(0, ge=0, le=4096, description="newest tokens each query reads exactly (the model dtype, "
                                                      "outside the paged bytes, like the sink; CPU path): recent "
                                                      "tokens carry most of the attention")
    context: int = Field(1024, ge=1, description="sequence length at which the exact rows (sink + window) are "
                                                 "counted against --memory and in the reported memory fraction")


@dataclass(frozen=True)
class TcodePlan(LatentPlan):
    """``ranks_k`` / ``ranks_v``: coordinates kept per head group; ``layer_specs``: each layer's row spec
    (``seg:<K>/<V>``, layout.py)."""

    layer_specs: tuple[str, ...] = ()
    sink: bool = True
    window: int = 0

    def sequence_bytes(self, tp_size: int = 1) -> int:
        """The exact rows each running sequence keeps beside the paged cache: its sink and its window."""
        return (int(self.sink) + self.window) * dense_bytes_per_token(self.shape, tp_size)

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
    # glue/latent.py: latent_step, the sink read by device gathers (glue/sink.py), written in eager steps only
    cuda_graphs = True
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
                         layer_specs=tuple(specs), sink=tc.sink, window=tc.window)

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
                               factors_path=artifact, cache_config=cache_config, prefix=prefix, sink=plan.sink,
                               window=plan.window)

    def describe(self, plan: TcodePlan) -> dict:
        return {"latent_dtype": plan.latent_dtype, "group_size": plan.group_size, "sink": plan.sink,
                "window": plan.window, "sequence_bytes": plan.sequence_bytes(),
                "segments": [s[4:] for s in plan.layer_specs]}

    def emulate(self, model, plan: TcodePlan, artifact, cfg) -> list:
        from vllm_kvc.tcode import install

        return install(model, str(artifact), plan.layer_specs, plan.sink, window=plan.window)

    def allocate(self, model_dir, base, baseline_bytes, memory=None, max_rise=None):
        """``base`` plus explicit segments for ``memory``: the fraction of the bf16 KV bytes per token, scales
        included, and the exact rows of each sequence (sink + window, in the model dtype) spread over
        ``tcode.context`` tokens: the paged rows get what those leave. Quality mode (``max_rise``) measures with
        the same sink and window."""
        from vllm_kvc.plan import format_segments
        from vllm_kvc.settings import ConfigError
        from vllm_kvc.tcode import MENU, UNIT, allocate_config, quality_config

        tc = base.tcode
        side = (int(tc.sink) + tc.window) / tc.context  # of one bf16 token's bytes, per token at the context
        info = {}
        if memory is None:
            sk, sv, used, info = quality_config(model_dir, base, max_rise, baseline_bytes, window=tc.window,
                                                sink=tc.sink)
        else:
            if memory - side < 0.02:
                raise ConfigError("--memory", f"{memory:g} of the bf16 bytes leaves {memory - side:.4f} for the paged "
                                              f"rows after the exact sink and window ({side:.4f} at "
                                              f"compression.tcode.context = {tc.context} tokens): expected more")
            sk, sv, used = allocate_config(model_dir, base, memory - side, baseline_bytes)
        d = {k: base.model_dump()[k] for k in ("group_size", "calibration", "factorization")}  # nothing of lowrank's
        d.update(method=self.name, tcode={"sink": tc.sink, "window": tc.window, "context": tc.context,
                                          "segments": {"k": [format_segments(s) for s in sk],
                                                       "v": [format_segments(s) for s in sv]}})
        summary = {"method": self.name, "bytes_per_token": used, "memory_fraction": used / baseline_bytes + side,
                   "paged_fraction": used / baseline_bytes, "menu_bits": list(MENU), "segment_unit": UNIT,
                   "sink": tc.sink, "window": tc.window, "context": tc.context, **info}
        return base.model_validate(d), summary

    def bench_points(self, base, shape, model_dir, points, include, seq_len: int = 1024, **_) -> list[dict]:
        """``kvc-tcode`` at every memory point (ours), and ``kvc-tcode-w<N>`` with each query's ``N`` newest
        tokens exact (``WINDOW_POINTS`` unless named); memory counted with the exact rows at ``seq_len``."""
        windows = tcode_windows(include)
        base_bytes = dense_bytes_per_token(shape)
        out = []
        for w in windows:
            fresh = base.model_validate({"group_size": base.group_size, "calibration": base.calibration.model_dump(),
                                         "method": self.name, "tcode": {"window": w, "context": seq_len}})
            for f in points:
                comp, _ = self.allocate(model_dir, fresh, base_bytes, memory=f)
                out.append({"method": f"kvc-tcode-w{w}" if w else "kvc-tcode", "is_baseline": False, "target": f,
                            "compression": comp})
        return out


WINDOW_POINTS = (0, 16)  # the windows bench pareto runs when no kvc-tcode-w<N> is named


def tcode_windows(include) -> list[int]:
    """Windows of ``bench pareto``'s tcode points: ``kvc-tcode-w<N>`` names one; a prefix of ``kvc-tcode`` (or no
    list) gives ``WINDOW_POINTS``."""
    import re

    if include is None:
        return list(WINDOW_POINTS)
    named = [int(m.group(1)) for i in include if (m := re.fullmatch(r"kvc-tcode-w(\d+)", i))]
    if any("kvc-tcode".startswith(i) for i in include):
        named += [w for w in WINDOW_POINTS if w not in named]
    return sorted(set(named))
