"""Method ``vllmfmt`` in vLLM: each token's keys (after RoPE) and values cached in one of vLLM's own KV formats
(vllm_kvc/kv_formats.py), byte for byte what vLLM's page holds for that slot, and attended after decoding.

Default ``kvc_forward`` (q and k roped, as vLLM caches keys). ``kvc_attend`` writes this step's rows at
``slot_mapping``, then attends as vLLM's backend for the format does: every K/V read back from the cache
(Triton / FlashInfer backends), or, with ``exact_chunks`` (vLLM's TurboQuant backend), a request's first prefill
chunk with its own exact K/V, a continuation chunk over 128 tokens with the cached prefix decoded and its own
tokens exact, and shorter chunks and decodes from the cache.
"""
from __future__ import annotations

import torch

from vllm_kvc.glue.attention import RowAttention
from vllm_kvc.kernels import reference
from vllm_kvc.kv_formats import TQ_CONTINUATION_DECODE_THRESHOLD, KVFormat


class FormatAttention(RowAttention):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, kv_dtype: str,
                 exact_chunks: bool = False, model_dtype: torch.dtype | None = None, cache_config=None,
                 prefix: str = ""):
        # vLLM builds the model under its dtype as torch's default: what K/V arrive in
        self.fmt = KVFormat(kv_dtype, num_kv_heads, head_size, model_dtype or torch.get_default_dtype())
        super().__init__(num_heads, head_size, scale, num_kv_heads, self.fmt.row_bytes, torch.uint8,
                         cache_config=cache_config, prefix=prefix)
        self.kv_dtype = kv_dtype
        self.exact_chunks = exact_chunks

    def _decode(self, rows: torch.Tensor):
        return self.fmt.decode(rows)

    def kvc_attend(self, query, key, value, cache, md, output) -> None:
        n = md.num_actual_tokens
        h, d = self.num_kv_heads, self.head_size
        k = key[:n].view(n, h, d)
        v = value[:n].view(n, h, d)
        reference.write_rows(cache, md.slot_mapping[:n], self.fmt.encode(k, v))
        q = query[:n].view(n, self.num_heads, d)
        out = output[:n].view(n, self.num_heads, d)
        if not self.exact_chunks:
            reference.rows_attention(q, cache, md.block_table, md.seq_lens_cpu, md.query_start_loc_cpu,
                                     self._decode, self.scale, out)
            return
        self._attend_exact_chunks(q, k.to(self.fmt.dtype).float(), v.to(self.fmt.dtype).float(), cache, md, out)

    def _attend_exact_chunks(self, q, k, v, cache, md, out) -> None:
        qsl, sls = md.query_start_loc_cpu.tolist(), md.seq_lens_cpu.tolist()
        from_cache = []
        for r in range(len(sls)):
            qs, qe, s = qsl[r], qsl[r + 1], sls[r]
            nq = qe - qs
            if nq <= 0:
                continue
            if nq < s and nq <= TQ_CONTINUATION_DECODE_THRESHOLD:
                from_cache.append(r)
                continue
            kk, vv = k[qs:qe], v[qs:qe]
            if nq < s:  # a long continuation chunk: the cached prefix decoded, this chunk's own K/V exact
                kc, vc = self._decode(reference.gather_rows(cache, md.block_table[r], s - nq))
                kk, vv = torch.cat([kc, kk]), torch.cat([vc, vv])
            o = reference.attend_dense(q[qs:qe].float()[None], kk[None], vv[None], [s], self.scale, causal=True)
            out[qs:qe] = o[0].to(out.dtype)
        if not from_cache:
            return
        tok = torch.cat([torch.arange(qsl[r], qsl[r + 1]) for r in from_cache]).to(q.device)
        lens = torch.tensor([qsl[r + 1] - qsl[r] for r in from_cache])
        qsl_sub = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        idx = torch.tensor(from_cache, device=md.block_table.device)
        sub = torch.empty(len(tok), self.num_heads, self.head_size, dtype=out.dtype, device=out.device)
        reference.rows_attention(q.index_select(0, tok), cache, md.block_table.index_select(0, idx),
                                 md.seq_lens_cpu[from_cache], qsl_sub, self._decode, self.scale, sub)
        out.index_copy_(0, tok, sub)
