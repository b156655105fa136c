"""Latent self-attention for Llama-family decoder layers, and its vLLM attention layer.

``LatentSelfAttention`` replaces a decoder layer's ``self_attn``. It loads the checkpoint's q/k/v/o weights
exactly as vLLM's own module does (same parameter names, same tensor-parallel sharding of heads), then, once
the weights are in, swaps K and V for the layer's latent projections ``A_k, A_v`` of its own head groups,
fused with Q into one matmul. Per token it emits ``q`` (RoPE applied) and the latent row; ``LatentAttention``
(a vLLM ``Attention`` with its own backend and KV spec) caches the latents and rebuilds K, V at attention time.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.utils import extract_layer_index
from vllm.utils.torch_utils import _encode_layer_name
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_kvc.calibrate import load_layer_factors
from vllm_kvc.glue.backend import LatentAttentionBackend
from vllm_kvc.layout import LatentLayout


def _rope_inv_freq(rotary_emb, dev: torch.device) -> torch.Tensor | None:
    """The rotary embedding's fp32 inverse frequencies, for the GPU decode kernel's in-kernel cos / sin (None on
    CPU or where the embedding does not expose them). The kernels use them only where they reproduce
    ``cos_sin_cache`` (``triton_latent.angles_match``): scaled variants (YaRN, linear) keep reading the table."""
    if dev.type != "cuda" or not hasattr(rotary_emb, "_compute_inv_freq"):
        return None
    try:
        return rotary_emb._compute_inv_freq(rotary_emb.base).float().to(dev)
    except Exception:  # noqa: BLE001 (a variant with another signature: the table path is always correct)
        return None


class RowAttention(Attention):
    """A vLLM attention layer whose KV cache holds one row of ``row_bytes`` per token (any codec), computed by
    the latent backend. Subclasses of other methods define ``kvc_attend`` (see backend.py)."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, row_bytes: int,
                 row_dtype: torch.dtype, cache_config=None, prefix: str = ""):
        super().__init__(num_heads, head_size, scale, num_kv_heads=num_kv_heads, cache_config=cache_config,
                         quant_config=None, prefix=prefix, attn_backend=LatentAttentionBackend)
        self.row_bytes, self.row_dtype = row_bytes, row_dtype
        self.scale = float(scale)

    def get_kv_cache_spec(self, vllm_config):
        # one "head slot" per token whose content is the whole row: the page costs exactly
        # block_size * row_bytes, this layer's own ranks and dtype (scales included)
        return FullAttentionSpec(
            block_size=vllm_config.cache_config.block_size,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            dtype=self.row_dtype,
            num_head_slots=1,
            state_content_bytes=self.row_bytes,
        )

    def forward(self, query: torch.Tensor, key: torch.Tensor,  # type: ignore[override]
                value: torch.Tensor | None = None) -> torch.Tensor:
        n = query.shape[0]
        value = key if value is None else value
        output = torch.empty(n, self.num_heads * self.head_size, dtype=query.dtype, device=query.device)
        q = query.view(-1, self.num_heads, self.head_size)
        out = output.view(-1, self.num_heads, self.head_size)
        if self.use_direct_call:
            from vllm.model_executor.layers.attention.attention import unified_attention_with_output
            unified_attention_with_output(q, key, value, out, self.layer_name)
        else:
            torch.ops.vllm.unified_attention_with_output(q, key, value, out, _encode_layer_name(self.layer_name))
        return output


class LatentAttention(RowAttention):
    """A vLLM attention layer whose KV cache holds one latent row per token (see layout.py)."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, layout: LatentLayout,
                 cache_config=None, prefix: str = ""):
        super().__init__(num_heads, head_size, scale, num_kv_heads, layout.row_bytes, layout.cache_dtype,
                         cache_config=cache_config, prefix=prefix)
        self.layout = layout
        # filled by LatentSelfAttention.finalize() once weights are loaded
        self.b_k = self.b_v = self.bias_k = self.bias_v = self.cos_sin_cache = self.inv_freq = None
        self.is_neox = True


class LatentSelfAttention(nn.Module):
    """Drop-in for LlamaAttention / MistralAttention / Qwen2Attention with latent KV."""

    def __init__(self, config, hidden_size: int, num_heads: int, num_kv_heads: int,
                 max_position_embeddings: int = 8192, quant_config=None, bias: bool = False,
                 bias_o_proj: bool = False, cache_config=None, prefix: str = "", attn_type=None,
                 kvc_plan=None, kvc_factors=None, kvc_config=None, rope_parameters=None, **unused):
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

        plan = kvc_plan
        gs = plan.group_size
        if num_kv_heads >= tp_size:
            kv_head0 = tp_rank * self.num_kv_heads
        else:  # replicated KV heads: rank r holds head r // (tp / kv)
            kv_head0 = tp_rank // (tp_size // num_kv_heads)
        self.groups = slice(kv_head0 // gs, kv_head0 // gs + max(1, self.num_kv_heads // gs))
        self.method = plan.method
        self.factors_path = kvc_factors

        self.qkv_proj = QKVParallelLinear(hidden_size, self.head_dim, num_heads, num_kv_heads, bias=bias,
                                          quant_config=None, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, hidden_size, bias=bias_o_proj,
                                        quant_config=None, prefix=f"{prefix}.o_proj")
        if rope_parameters is None:
            rope_parameters = getattr(config, "rope_parameters", None)
        self.rotary_emb = get_rope(self.head_dim, max_position=max_position_embeddings,
                                   rope_parameters=rope_parameters, is_neox_style=True)
        self.attn = self._make_attn(plan, kvc_config, cache_config, prefix)
        self.fused_weight = None
        self.fused_bias = None

    def _make_attn(self, plan, cfg, cache_config, prefix: str) -> RowAttention:
        """This layer's attention: latents (lowrank, quant), sparse codes (lexico) or shared scores (pod)."""
        i = self.layer_idx
        args = (self.num_heads, self.head_dim, self.scaling, self.num_kv_heads)
        if self.method == "lexico":
            from vllm_kvc.glue.lexico import SparseAttention
            from vllm_kvc.lexico import SparseLayout

            layout = SparseLayout(self.num_kv_heads, self.head_dim, plan.ranks_k[i], plan.ranks_v[i])
            return SparseAttention(*args, layout, recent_window=cfg.lexico.recent_window,
                                   cache_config=cache_config, prefix=f"{prefix}.attn")
        if self.method == "pod":
            from vllm_kvc.glue.pod import PodAttention
            from vllm_kvc.plan import pod_groups_of

            lead = next(g[0] for g in pod_groups_of(plan) if i in g)
            lead_name = None
            if lead != i:  # the lead's attention layer: same prefix with the lead's layer index
                parts = prefix.split(".")
                parts[len(parts) - 1 - parts[::-1].index(str(i))] = str(lead)
                lead_name = ".".join(parts) + ".attn"
            dtype = torch.get_default_dtype() if plan.latent_dtype == "auto" else getattr(torch, plan.latent_dtype)
            return PodAttention(*args, dtype, lead_name, cfg.pod.window, cfg.pod.sinks,
                                cache_config=cache_config, prefix=f"{prefix}.attn")
        self.layout = LatentLayout(
            groups=self.groups.stop - self.groups.start, group_size=plan.group_size, head_dim=self.head_dim,
            rank_k=plan.ranks_k[i], rank_v=plan.ranks_v[i], dtype=plan.latent_dtype)
        return LatentAttention(*args, self.layout, cache_config=cache_config, prefix=f"{prefix}.attn")

    @torch.no_grad()
    def finalize(self) -> None:
        """After weight loading: replace K/V projections by this rank's latent projections (lowrank, quant),
        or load this layer's dictionaries (lexico); pod keeps the checkpoint's projections."""
        if self.method == "pod":
            return
        if self.method == "lexico":
            from vllm_kvc.lexico import load_dictionaries

            dev = self.qkv_proj.weight.device
            d_k, d_v = load_dictionaries(self.factors_path, self.layer_idx)
            self.attn.d_k, self.attn.d_v = d_k.float().to(dev), d_v.float().to(dev)
            self.attn.cos_sin_cache = self.rotary_emb.cos_sin_cache.float().to(dev)
            self.attn.is_neox = bool(getattr(self.rotary_emb, "is_neox_style", True))
            return
        w = self.qkv_proj.weight.data
        dt, dev = w.dtype, w.device
        a_k, b_k, a_v, b_v = load_layer_factors(self.factors_path, self.layer_idx, self.groups)
        self.fused_weight = nn.Parameter(
            torch.cat([w[: self.q_size].float().cpu(), a_k.t(), a_v.t()]).to(dt).to(dev), requires_grad=False)
        bias = self.qkv_proj.bias
        attn = self.attn
        if bias is not None:
            b = bias.data
            self.fused_bias = nn.Parameter(
                torch.cat([b[: self.q_size], torch.zeros(self.layout.width, dtype=b.dtype, device=dev)]),
                requires_grad=False)
            attn.bias_k = b[self.q_size: self.q_size + self.kv_size].float().clone()
            attn.bias_v = b[self.q_size + self.kv_size:].float().clone()
        # rebuild factors are kept in float32 on CPU (reference path) and in the model dtype on GPUs
        fdt = torch.float32 if dev.type == "cpu" else dt
        attn.b_k = b_k.to(fdt).to(dev).contiguous()
        attn.b_v = b_v.to(fdt).to(dev).contiguous()
        cs = self.rotary_emb.cos_sin_cache
        attn.cos_sin_cache = cs.float().to(dev) if dev.type == "cpu" else cs.to(dev)
        attn.is_neox = bool(getattr(self.rotary_emb, "is_neox_style", True))
        attn.inv_freq = _rope_inv_freq(self.rotary_emb, dev)
        del self.qkv_proj

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.method in ("lexico", "pod"):
            qkv, _ = self.qkv_proj(hidden_states)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            if self.method == "lexico":  # keys are coded before RoPE and rotated when rebuilt
                q, _ = self.rotary_emb(positions, q.contiguous(), None)
            else:
                q, k = self.rotary_emb(positions, q.contiguous(), k.contiguous())
            output, _ = self.o_proj(self.attn(q, k, v.contiguous()))
            return output
        out = F.linear(hidden_states, self.fused_weight, self.fused_bias)
        q, lat = out.split([self.q_size, self.layout.width], dim=-1)
        q, _ = self.rotary_emb(positions, q.contiguous(), None)
        attn_output = self.attn(q, lat.contiguous())
        output, _ = self.o_proj(attn_output)
        return output
