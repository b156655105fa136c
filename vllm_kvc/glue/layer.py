"""Self-attention of Llama-family decoder layers with a compressed KV cache (any method).

``LatentSelfAttention`` replaces a decoder layer's ``self_attn``. It loads the checkpoint's q/k/v/o weights
exactly as vLLM's own module does (same parameter names, same tensor-parallel sharding of heads) and holds
the rotary embedding; the deployment's method (vllm_kvc/methods/) builds its vLLM attention layer
(a ``glue.attention.RowAttention``), which finishes the projections after weight loading (``kvc_finalize``)
and runs the projections, RoPE and attention (``kvc_forward``).
"""
from __future__ import annotations

import torch
from torch import nn

from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.utils import extract_layer_index

from vllm_kvc.methods import get_method


class LatentSelfAttention(nn.Module):
    """Drop-in for LlamaAttention / MistralAttention / Qwen2Attention with a compressed KV cache."""

    def __init__(self, config, hidden_size: int, num_heads: int, num_kv_heads: int,
                 max_position_embeddings: int = 8192, quant_config=None, bias: bool = False,
                 bias_o_proj: bool = False, cache_config=None, prefix: str = "", attn_type=None,
                 kvc_setup=None, rope_parameters=None, **unused):
        super().__init__()
        if quant_config is not None:
            raise NotImplementedError("vllm_kvc latent KV does not support quantized checkpoints yet")
        self.layer_idx = extract_layer_index(prefix)
        tp_size = get_tensor_model_parallel_world_size()
        tp_rank = get_tensor_model_parallel_rank()
        self.total_num_heads = num_heads
        self.num_heads = num_heads // tp_size
        self.total_num_kv_heads = num_kv_heads
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.head_dim = getattr(config, "head_dim", None) or hidden_size // num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim ** -0.5

        plan = kvc_setup.plan
        gs = getattr(plan, "group_size", 1)
        if num_kv_heads >= tp_size:
            kv_head0 = tp_rank * self.num_kv_heads
        else:  # replicated KV heads: rank r holds head r // (tp / kv)
            kv_head0 = tp_rank // (tp_size // num_kv_heads)
        # this rank's head groups (of the plan's group_size KV heads)
        self.groups = slice(kv_head0 // gs, kv_head0 // gs + max(1, self.num_kv_heads // gs))

        self.qkv_proj = QKVParallelLinear(hidden_size, self.head_dim, num_heads, num_kv_heads, bias=bias,
                                          quant_config=None, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, hidden_size, bias=bias_o_proj,
                                        quant_config=None, prefix=f"{prefix}.o_proj")
        if rope_parameters is None:
            rope_parameters = getattr(config, "rope_parameters", None)
        self.rotary_emb = get_rope(self.head_dim, max_position=max_position_embeddings,
                                   rope_parameters=rope_parameters, is_neox_style=True)
        self.fused_weight = None
        self.fused_bias = None
        method = get_method(kvc_setup.config.method)
        self.attn = method.attention(self, plan, kvc_setup.config, kvc_setup.artifact, cache_config,
                                     f"{prefix}.attn")

    def project_qkv(self, hidden_states: torch.Tensor):
        """The checkpoint's own q, k, v projections (before RoPE)."""
        qkv, _ = self.qkv_proj(hidden_states)
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)

    def finalize(self) -> None:
        """After weight loading: the method finishes its projections (see RowAttention.kvc_finalize)."""
        self.attn.kvc_finalize(self)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        output, _ = self.o_proj(self.attn.kvc_forward(self, positions, hidden_states))
        return output
