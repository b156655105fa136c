"""Llama-family model classes with latent self-attention, registered over vLLM's own architectures.

Each class subclasses vLLM's and, when the engine's ``additional_config`` holds no ``kv_compression``, builds
exactly vLLM's model (same constructor, same layers): without compression the plugin changes nothing.
With compression it builds the same model through vLLM's public ``layer_type`` hooks with
``LatentSelfAttention`` as each layer's attention, and finishes the latent projections after weight loading.
"""
from __future__ import annotations

import logging
from functools import partial

import torch
from torch import nn

from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from vllm.model_executor.models.mistral import MistralDecoderLayer, MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model

from vllm_kvc.glue.layer import LatentSelfAttention
from vllm_kvc.glue.setup import compression_setup

log = logging.getLogger("vllm_kvc")


def _finalize(model: nn.Module) -> set[str]:
    """Swap K/V projections for latent ones; returns the names of the parameters this creates."""
    created = set()
    for name, m in model.named_modules():
        if isinstance(m, LatentSelfAttention):
            m.finalize()
            created.update(f"{name}.{p}" for p, _ in m.named_parameters(recurse=False))
    log.info("vllm_kvc: attention layers finalized (%d new parameters)", len(created))
    return created


class _LatentMixin:
    kvc_enabled = False

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        if self.kvc_enabled:
            loaded = set(loaded) | _finalize(self)
        return loaded


def _latent_attn(setup):
    return partial(LatentSelfAttention, kvc_setup=setup)


class KvcLlamaForCausalLM(_LatentMixin, LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        setup = compression_setup(vllm_config)
        if setup is None:
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            return
        self.kvc_enabled = True
        layer = partial(LlamaDecoderLayer, attn_layer_type=_latent_attn(setup))
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer)


class KvcMistralForCausalLM(_LatentMixin, MistralForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        setup = compression_setup(vllm_config)
        if setup is None:
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            return
        if getattr(vllm_config.model_config.hf_config, "llama_4_scaling", None):
            raise NotImplementedError("vllm_kvc: Mistral llama_4_scaling attention is not supported")
        self.kvc_enabled = True
        layer = partial(_LatentMistralDecoderLayer, kvc_attn=_latent_attn(setup))
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer)


class _LatentMistralDecoderLayer(MistralDecoderLayer):
    """MistralDecoderLayer (its forward, which takes t_cond) around LatentSelfAttention."""

    def __init__(self, vllm_config, prefix: str = "", config=None, *, kvc_attn):
        config = config or vllm_config.model_config.hf_config
        if getattr(config, "ada_rms_norm_t_cond", False):
            raise NotImplementedError("vllm_kvc: Mistral ada_rms_norm_t_cond is not supported")
        LlamaDecoderLayer.__init__(self, vllm_config=vllm_config, prefix=prefix, config=config,
                                   attn_layer_type=kvc_attn)
        self.layer_idx = int(prefix.split(sep=".")[-1])
        self.ada_rms_norm_t_cond = None


class _LatentQwen2DecoderLayer(Qwen2DecoderLayer):
    """Qwen2DecoderLayer with LatentSelfAttention (same submodule names, so the same weights load)."""

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "", *, kvc_attn):
        nn.Module.__init__(self)
        if getattr(config, "qk_norm", False) or getattr(config, "dual_chunk_attention_config", None):
            raise NotImplementedError("vllm_kvc: Qwen2 qk_norm / dual-chunk attention is not supported")
        self.hidden_size = config.hidden_size
        self.self_attn = kvc_attn(
            config=config, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
            quant_config=quant_config, bias=True, bias_o_proj=False, cache_config=cache_config,
            prefix=f"{prefix}.self_attn", rope_parameters=config.rope_parameters)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            quant_config=quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class KvcQwen2ForCausalLM(_LatentMixin, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        setup = compression_setup(vllm_config)
        if setup is None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            return
        self.kvc_enabled = True
        real_model_cls = Qwen2Model
        layer = partial(_LatentQwen2DecoderLayer, kvc_attn=_latent_attn(setup))

        # Qwen2ForCausalLM builds Qwen2Model without a layer hook: build it with one, then let the parent
        # constructor run around it (it only adds lm_head / logits processor next to self.model).
        def model_factory(*, vllm_config, prefix=""):
            return real_model_cls(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=layer)

        import vllm.model_executor.models.qwen2 as qwen2_mod
        saved = qwen2_mod.Qwen2Model
        qwen2_mod.Qwen2Model = model_factory
        try:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        finally:
            qwen2_mod.Qwen2Model = saved


ARCHITECTURES = {
    "LlamaForCausalLM": KvcLlamaForCausalLM,
    "MistralForCausalLM": KvcMistralForCausalLM,
    "Qwen2ForCausalLM": KvcQwen2ForCausalLM,
}
