"""Method ``kivi``: KIVI as published (keys per channel, values per token, asymmetric 2/4/8-bit with fp16 zero
point and scale per group of ``group_size``, the most recent tokens in full precision), a ``vllm-kvc bench pareto``
peer (``kivi-2``, ``kivi-4``: group 32, residual 128, the paper's defaults). Math vllm_kvc/kivi.py; attention
glue/kivi.py.

An emulation, and what it counts. KIVI's cache is not one row per token: a key's codes and its group's scales
exist only once ``residual`` tokens have arrived, and the full-precision tail is a separate buffer. So this
method's paged cache keeps every token's K (after RoPE) and V in the model's dtype, and quantizes at attention
time, exactly as KIVI's cache would hold them at each query's position (groups aligned to the request's first
token, key tail flushed ``residual`` at a time, value tail sliding). The memory it reports is KIVI's, not the
emulation's: ``layer_bytes_per_token`` is the format's true bytes per token at ``context`` tokens (codes, fp16
zero points and scales, and the full-precision tail while the last token attends), counted analytically
(``kivi.bytes_at``). vLLM's capacity for this method is the full-precision cache's (its rows are K/V in the model
dtype): the capacity column of ``bench pareto`` does not show KIVI's saving; its ``memory_fraction`` does.

Attention (``prefill``): ``kivi`` (default) as the authors' code: a prefill chunk (more than one new token)
attends with full-precision K/V, decode steps see the quantized cache; ``cache``: every query sees the cache as
KIVI holds it at that query's own decode step, which is what ``bench pareto`` uses (a perplexity from prompt
logprobs would otherwise never see KIVI's quantization), the same choice as vllmfmt's TurboQuant points.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from vllm_kvc.methods.base import Method, register
from vllm_kvc.plan import ModelShape, Plan, dtype_bytes, kv_heads_per_rank
from vllm_kvc.settings import ConfigError, Strict

# tokens of one engine step: the emulation's attention is plain torch over every cached K/V (long prompts on a
# CPU would otherwise near vLLM's execute-model timeout); results do not depend on how prefill is chunked
STEP_TOKENS = 2048


class KiviConfig(Strict):
    """Settings under ``compression.kivi``."""

    bits: Literal[2, 4, 8] = Field(2, description="bits per quantized key / value")
    group_size: int = Field(32, ge=1, description="values per quantization group: tokens per key group (per "
                                                  "channel), channels per value group (per token)")
    residual: int = Field(128, ge=1, description="full-precision recent tokens (keys flushed this many at a "
                                                 "time, a multiple of group_size)")
    context: int = Field(1024, ge=1, description="sequence length at which bytes per token are counted "
                                                 "(bench pareto sets its --seq-len)")
    prefill: Literal["kivi", "cache"] = Field(
        "kivi", description="'kivi': prefill chunks attend with full-precision K/V as KIVI's code does; 'cache': "
                            "every query sees KIVI's cache state at its own decode step")


@dataclass(frozen=True)
class KiviPlan(Plan):
    """``latent_dtype``: ``kivi-<bits>``; bytes per token at ``context`` tokens (vllm_kvc/kivi.py ``bytes_at``)."""

    bits: int = 2
    group_size: int = 32
    residual: int = 128
    context: int = 1024

    method = "kivi"

    def layer_bytes_per_token(self, layer: int, tp_size: int = 1) -> int:
        from vllm_kvc.kivi import layer_bytes

        return layer_bytes(self.context, kv_heads_per_rank(self.shape, tp_size), self.shape.head_dim, self.bits,
                           self.group_size, self.residual, dtype_bytes(self.shape.dtype))

    def exact_bytes_per_token(self, tp_size: int = 1) -> float:
        """Whole-model bytes per token before rounding each layer up to whole bytes."""
        from vllm_kvc.kivi import bytes_at

        return self.shape.num_layers * bytes_at(self.context, kv_heads_per_rank(self.shape, tp_size),
                                                self.shape.head_dim, self.bits, self.group_size, self.residual,
                                                dtype_bytes(self.shape.dtype))

    def layer_ranks(self, layer: int) -> tuple[int, int]:
        return self.shape.head_dim, self.shape.head_dim


@register
class Kivi(Method):
    name = "kivi"
    summary = "kivi: KIVI as published (keys per channel, values per token, 2/4/8-bit, full-precision residual), " \
              "emulated; bytes counted analytically"
    section = KiviConfig
    modules = ("vllm_kvc.kivi", "vllm_kvc.glue.kivi")
    rank_meaning = "head_dim (K/V stored whole, KIVI-quantized at attention time)"

    def plan(self, cfg, shape: ModelShape, tp_size: int = 1) -> KiviPlan:
        k = cfg.kivi
        d = shape.head_dim
        if d % k.group_size:
            raise ConfigError("compression.kivi.group_size",
                              f"{k.group_size} must divide head_dim {d} (values are grouped along channels)")
        if (k.group_size * k.bits) % 8 or (d * k.bits) % 8:
            raise ConfigError("compression.kivi.group_size",
                              f"{k.group_size} x {k.bits} bits is not a whole number of bytes")
        if k.residual % k.group_size:
            raise ConfigError("compression.kivi.residual",
                              f"{k.residual} must be a multiple of group_size {k.group_size} (keys are flushed "
                              "in whole groups)")
        return KiviPlan(shape, f"kivi-{k.bits}", k.bits, k.group_size, k.residual, k.context)

    def describe(self, plan: KiviPlan) -> dict:
        return {"latent_dtype": plan.latent_dtype, "group_size": 1, "quant_group": plan.group_size,
                "residual": plan.residual, "bytes_counted_at_context": plan.context,
                "emulated": "cache rows hold full-precision K/V; bytes per token are KIVI's, counted"}

    def engine_defaults(self, cfg) -> dict:
        return {"max_num_batched_tokens": STEP_TOKENS, "enable_chunked_prefill": True}

    def attention(self, layer, plan: KiviPlan, cfg, artifact, cache_config, prefix):
        from vllm_kvc.glue.kivi import KiviAttention

        return KiviAttention(layer.num_heads, layer.head_dim, layer.scaling, layer.num_kv_heads, plan.bits,
                             plan.group_size, plan.residual, exact_prefill=cfg.kivi.prefill == "kivi",
                             cache_config=cache_config, prefix=prefix)

    def emulate(self, model, plan: KiviPlan, artifact, cfg) -> list:
        """Every layer's attention replaced by KIVI's (vllm_kvc/kivi.py ``install_kivi``), each query with the
        cache state of its own decode step (``prefill: cache``) or, with ``prefill: kivi``, the whole sequence
        as one prefill (full precision)."""
        from vllm_kvc.kivi import install_kivi

        return install_kivi(model, plan.bits, plan.group_size, plan.residual,
                            exact_prefill=cfg.kivi.prefill == "kivi")

    def bench_points(self, base, shape, model_dir, points, include, seq_len: int = 1024, **_) -> list[dict]:
        """``kivi-2`` and ``kivi-4`` (the paper's group 32 and residual 128), ``prefill: cache``, bytes counted at
        the benchmark's sequence length."""
        out = []
        for bits in (2, 4):
            name = f"kivi-{bits}"
            if include is not None and not any(name.startswith(i) for i in include):
                continue
            comp = base.model_validate({"group_size": base.group_size, "calibration": base.calibration.model_dump(),
                                        "method": self.name,
                                        self.name: {"bits": bits, "group_size": 32, "residual": 128,
                                                    "context": seq_len, "prefill": "cache"}})
            out.append({"method": name, "is_baseline": True, "target": None, "compression": comp})
        return out
