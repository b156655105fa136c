"""vLLM plugin entry point (group ``vllm.general_plugins``; loaded in every vLLM process).

Registers the latent attention backend and the latent-capable model classes. Those classes build vLLM's own
models unchanged unless the engine's ``additional_config`` carries ``kv_compression``.
"""
from __future__ import annotations

_done = False


def register() -> None:
    global _done
    if _done:
        return
    _done = True
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, "vllm_kvc.glue.backend.LatentAttentionBackend")
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        ModelRegistry.register_model(arch, f"vllm_kvc.glue.models:Kvc{arch}")
