"""Method ``vllmfmt``: vLLM 0.32's own KV cache formats (``--kv-cache-dtype int8_per_token_head``,
``int4_per_token_head``, ``fp8``, ``nvfp4``, ``turboquant_*``) emulated byte for byte as this plugin's cache
rows, so ``vllm-kvc bench pareto`` measures them through vLLM beside our methods on machines where vLLM cannot
run them itself (the CPU build runs none of them: fp8 needs AVX-512/AMX, the others are Triton/CUDA paths).

Each token's row of a layer holds exactly what vLLM's page holds for that token's slot (keys after RoPE), so
``layer_bytes_per_token`` is vLLM's own page size per token for that dtype (TurboQuant: its first and last two
layers stay in the model dtype, as vLLM keeps them). Math vllm_kvc/kv_formats.py; attention
glue/vllm_format.py.

Attention, as vLLM's backends do it: per-token-head, fp8 and nvfp4 formats read every key and value (this
step's too) back from the cache. vLLM's TurboQuant backend attends a request's first prefill chunk, and any
continuation chunk over 128 tokens, with that chunk's own exact K/V (``prefill: vllm``); ``prefill: cache``
reads every K/V from the cache (what its decode steps see), which is what ``bench pareto`` uses: a perplexity
from prompt logprobs would otherwise never see TurboQuant's quantization.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from vllm_kvc.methods.base import Method, register
from vllm_kvc.plan import FORMATS, ModelShape, Plan, dtype_bytes, kv_heads_per_rank, vllm_format_head_bytes
from vllm_kvc.settings import ConfigError, Strict

KVDtype = Literal[FORMATS]  # type: ignore[valid-type]


class VllmFormatConfig(Strict):
    """Settings under ``compression.vllmfmt``."""

    dtype: KVDtype = Field("int4_per_token_head", description="the vLLM --kv-cache-dtype emulated")
    prefill: Literal["vllm", "cache"] = Field(
        "vllm", description="TurboQuant only: 'vllm' attends first prefill chunks (and chunks over 128 tokens) "
                            "with their own exact K/V as vLLM's backend does; 'cache': every K/V from the cache")


@dataclass(frozen=True)
class FormatPlan(Plan):
    """``latent_dtype``: the vLLM kv-cache dtype; ``native_layers``: layers cached in the model dtype."""

    native_layers: tuple[int, ...] = ()

    method = "vllmfmt"

    def layer_bytes_per_token(self, layer: int, tp_size: int = 1) -> int:
        h, d = kv_heads_per_rank(self.shape, tp_size), self.shape.head_dim
        if layer in self.native_layers:
            return h * 2 * d * dtype_bytes(self.shape.dtype)
        return h * vllm_format_head_bytes(self.latent_dtype, d)

    def layer_ranks(self, layer: int) -> tuple[int, int]:
        return self.shape.head_dim, self.shape.head_dim


@register
class VllmFormat(Method):
    name = "vllmfmt"
    summary = "vllmfmt: vLLM's own --kv-cache-dtype formats (int8/int4 per token-head, fp8, nvfp4, TurboQuant) " \
              "emulated byte for byte"
    section = VllmFormatConfig
    modules = ("vllm_kvc.kv_formats", "vllm_kvc.glue.vllm_format")
    rank_meaning = "head_dim (K/V stored whole, quantized in vLLM's format)"

    def plan(self, cfg, shape: ModelShape, tp_size: int = 1) -> FormatPlan:
        f, d = cfg.vllmfmt.dtype, shape.head_dim
        if f == "int4_per_token_head" and d % 2:
            raise ConfigError("compression.vllmfmt.dtype", f"int4_per_token_head needs an even head_dim, not {d}")
        if f == "nvfp4" and d % 16:
            raise ConfigError("compression.vllmfmt.dtype", f"nvfp4 needs head_dim a multiple of 16, not {d}")
        native: tuple[int, ...] = ()
        if f.startswith("turboquant_"):
            if d & (d - 1) or d < 8:
                raise ConfigError("compression.vllmfmt.dtype", f"TurboQuant needs a power-of-two head_dim, not {d}")
            n = min(2, shape.num_layers // 2)
            native = tuple(sorted(set(range(n)) | set(range(shape.num_layers - n, shape.num_layers))))
        return FormatPlan(shape, f, native)

    def describe(self, plan: FormatPlan) -> dict:
        return {"latent_dtype": plan.latent_dtype, "group_size": 1, "native_layers": list(plan.native_layers)}

    def attention(self, layer, plan: FormatPlan, cfg, artifact, cache_config, prefix):
        from vllm_kvc.glue.vllm_format import FormatAttention

        i = layer.layer_idx
        kv_dtype = "native" if i in plan.native_layers else plan.latent_dtype
        exact = plan.latent_dtype.startswith("turboquant_") and cfg.vllmfmt.prefill == "vllm"
        return FormatAttention(layer.num_heads, layer.head_dim, layer.scaling, layer.num_kv_heads, kv_dtype,
                               exact_chunks=exact and kv_dtype != "native", cache_config=cache_config,
                               prefix=prefix)

    def emulate(self, model, plan: FormatPlan, artifact, cfg) -> list:
        """Every layer's keys (after RoPE) and values replaced by decode(encode(.)) of its format."""
        from vllm_kvc.kv_formats import install_format

        return install_format(model, plan.latent_dtype, plan.native_layers)

    def bench_points(self, base, shape, model_dir, points, include, **_) -> list[dict]:
        """One baseline per format, ``vllm-<dtype>``; TurboQuant with ``prefill: cache`` (see the module doc)."""
        out = []
        for f in FORMATS:
            name = f"vllm-{f}"
            if include is not None and not any(name.startswith(i) for i in include):
                continue
            if shape.head_dim % 16 and f == "nvfp4":
                continue
            comp = base.model_validate({"group_size": base.group_size, "calibration": base.calibration.model_dump(),
                                        "method": self.name, self.name: {"dtype": f, "prefill": "cache"}})
            out.append({"method": name, "is_baseline": True, "target": None, "compression": comp})
        return out
