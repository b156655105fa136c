"""Method ``lexico`` in vLLM: each token's keys (before RoPE) and values cached as sparse codes over the layer's
dictionaries (vllm_kvc/lexico.py), rebuilt (then RoPE) at attention time.

The cache row of a token is ``SparseLayout.row_bytes``: per KV head, ``sparsity_k`` (int16 atom, fp16
coefficient) pairs for K then ``sparsity_v`` for V. With ``recent_window > 0`` each query also sees the exact
K/V of its ``recent_window`` newest tokens (a side pool, glue/window.py), as the paper keeps recent tokens dense.
"""
from __future__ import annotations

import torch

from vllm_kvc.glue.attention import RowAttention
from vllm_kvc.glue.window import RecentPool, attend_windowed
from vllm_kvc.kernels import reference
from vllm_kvc.lexico import SparseLayout, load_dictionaries


class SparseAttention(RowAttention):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, layout: SparseLayout,
                 dictionaries_path=None, recent_window: int = 0, cache_config=None, prefix: str = ""):
        super().__init__(num_heads, head_size, scale, num_kv_heads, layout.row_bytes, layout.cache_dtype,
                         cache_config=cache_config, prefix=prefix)
        self.layout = layout
        self.dictionaries_path = dictionaries_path
        self.recent_window = recent_window
        self.d_k = self.d_v = self.cos_sin_cache = None  # set by finalize()
        self.is_neox = True
        self.pool: RecentPool | None = None

    @torch.no_grad()
    def kvc_finalize(self, layer) -> None:
        dev = layer.qkv_proj.weight.device
        d_k, d_v = load_dictionaries(self.dictionaries_path, layer.layer_idx)
        self.d_k, self.d_v = d_k.float().to(dev), d_v.float().to(dev)
        self.cos_sin_cache = layer.rotary_emb.cos_sin_cache.float().to(dev)
        self.is_neox = bool(getattr(layer.rotary_emb, "is_neox_style", True))

    def kvc_forward(self, layer, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Keys are coded before RoPE (and rotated when rebuilt): RoPE on the queries only."""
        q, k, v = layer.project_qkv(hidden_states)
        q, _ = layer.rotary_emb(positions, q.contiguous(), None)
        return self(q, k, v.contiguous())

    def _rope(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return reference.apply_rope(k, positions, self.cos_sin_cache, self.is_neox)

    def _decode(self, rows: torch.Tensor):
        """rows [B, S, row] -> roped keys and values [B, S, H, d] (positions 0..S-1)."""
        b, s = rows.shape[:2]
        k, v = self.layout.decode(rows, self.d_k, self.d_v)
        pos = torch.arange(s, device=rows.device).repeat(b)
        k = self._rope(k.reshape(b * s, *k.shape[2:]), pos).view(k.shape)
        return k, v

    def kvc_attend(self, query, key, value, cache, md, output) -> None:
        n = md.num_actual_tokens
        h, d = self.num_kv_heads, self.head_size
        k = key[:n].view(n, h, d).float()
        v = value[:n].view(n, h, d).float()
        slots = md.slot_mapping[:n]
        reference.write_rows(cache, slots, self.layout.encode(k, v, self.d_k, self.d_v))
        q = query[:n].view(n, self.num_heads, d)
        out = output[:n].view(n, self.num_heads, d)
        if not self.recent_window:
            reference.rows_attention(q, cache, md.block_table, md.seq_lens_cpu, md.query_start_loc_cpu,
                                     self._decode, self.scale, out)
            return
        self._attend_windowed(q, k, v, slots, cache, md, out)

    def _attend_windowed(self, q, k, v, slots, cache, md, out) -> None:
        if self.pool is None:
            self.pool = RecentPool(cache.shape[1], (2, self.num_kv_heads, self.head_size), q.dtype, q.device)
        qsl, sls = md.query_start_loc_cpu.tolist(), md.seq_lens_cpu.tolist()
        k_new = k.clone()
        for r in range(len(sls)):
            nq = qsl[r + 1] - qsl[r]
            if nq > 0:
                k_new[qsl[r]:qsl[r + 1]] = self._rope(k[qsl[r]:qsl[r + 1]], torch.arange(sls[r] - nq, sls[r],
                                                                                          device=k.device))
        attend_windowed(self.pool, q, k_new, v, slots, cache, md, out, self._decode, self.recent_window, 0,
                        self.scale)
