"""Method ``kivi`` in vLLM: each token's keys (after RoPE) and values cached whole in the model's dtype (one row
``[K heads | V heads]`` per token), quantized at attention time as KIVI's cache holds them at each query's
position (vllm_kvc/kivi.py ``attend``). The row is the emulation's storage, not KIVI's bytes: the plan counts
those (methods/kivi.py).

Default ``kvc_forward`` (q and k roped). ``kvc_attend`` writes this step's rows at ``slot_mapping``, then per
request: with ``exact_prefill`` (KIVI's own code) a chunk of more than one new token attends with full-precision
K/V and a decode step with KIVI's quantized state; without it, every query with the state of its own decode step.
"""
from __future__ import annotations

import torch

from vllm_kvc.glue.attention import RowAttention
from vllm_kvc.kernels import reference
from vllm_kvc.kivi import attend


class KiviAttention(RowAttention):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, bits: int, group_size: int,
                 residual: int, exact_prefill: bool = True, model_dtype: torch.dtype | None = None,
                 cache_config=None, prefix: str = ""):
        # vLLM builds the model under its dtype as torch's default: what K/V arrive in
        dtype = model_dtype or torch.get_default_dtype()
        elems = 2 * num_kv_heads * head_size
        super().__init__(num_heads, head_size, scale, num_kv_heads, elems * dtype.itemsize, dtype,
                         cache_config=cache_config, prefix=prefix)
        self.bits, self.group, self.residual = bits, group_size, residual
        self.exact_prefill = exact_prefill
        self.kv_dtype = dtype

    def kvc_attend(self, query, key, value, cache, md, output) -> None:
        n = md.num_actual_tokens
        h, d = self.num_kv_heads, self.head_size
        rows = torch.cat([key[:n].reshape(n, h * d), value[:n].reshape(n, h * d)], -1).to(self.kv_dtype)
        reference.write_rows(cache, md.slot_mapping[:n], rows.view(cache.dtype) if rows.dtype != cache.dtype
                             else rows)
        q = query[:n].view(n, self.num_heads, d)
        out = output[:n].view(n, self.num_heads, d)
        qsl, sls = md.query_start_loc_cpu.tolist(), md.seq_lens_cpu.tolist()
        for r in range(len(sls)):
            qs, qe, s = qsl[r], qsl[r + 1], sls[r]
            nq = qe - qs
            if nq <= 0:
                continue
            kv = reference.gather_rows(cache, md.block_table[r], s)
            if kv.dtype != self.kv_dtype:
                kv = kv.contiguous().view(self.kv_dtype)
            k, v = kv[:, : h * d].reshape(s, h, d), kv[:, h * d:].reshape(s, h, d)
            pos = torch.arange(s - nq, s, device=q.device)
            o = attend(q[qs:qe], k, v, pos, self.bits, self.group, self.residual, self.scale,
                       exact=self.exact_prefill and nq > 1)
            out[qs:qe] = o.to(out.dtype)
