"""The vLLM attention layer every method's cache goes through: one row of ``row_bytes`` per token, computed by
the latent backend (glue/backend.py). Each method subclasses :class:`RowAttention` (glue/latent.py,
glue/lexico.py, glue/pod.py) and defines three hooks:

- ``kvc_finalize(layer)``: after the checkpoint's weights are loaded into ``layer`` (the decoder layer's
  ``LatentSelfAttention``): fuse projections, load factors or dictionaries;
- ``kvc_forward(layer, positions, hidden_states)``: projections and RoPE, then ``self(q, k[, v])`` (vLLM's
  attention op); returns the attention output before ``o_proj``;
- ``kvc_attend(query, key, value, cache, metadata, output)``: called by the backend's impl inside vLLM's op:
  write this step's rows at ``slot_mapping`` and compute attention from the paged cache.
"""
from __future__ import annotations

import torch

from vllm.model_executor.layers.attention import Attention
from vllm.utils.torch_utils import _encode_layer_name
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_kvc.glue.backend import LatentAttentionBackend


class RowAttention(Attention):
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

    # ----- the method hooks -----
    def kvc_finalize(self, layer) -> None:
        """After weight loading (default: the checkpoint's projections are used as they are)."""

    def kvc_forward(self, layer, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Default: the checkpoint's q / k / v projections, RoPE on q and k, then this attention."""
        q, k, v = layer.project_qkv(hidden_states)
        q, k = layer.rotary_emb(positions, q.contiguous(), k.contiguous())
        return self(q, k, v.contiguous())

    def kvc_attend(self, query, key, value, cache, md, output) -> None:
        raise NotImplementedError

    # ----- vLLM's attention op -----
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
