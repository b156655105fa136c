"""Method ``pod`` in vLLM: groups of adjacent layers share the distant tokens' attention scores.

A group's lead layer caches, per token, its roped keys and its values (one row ``[K | V]`` in the model dtype).
A follower caches only its values (``[V]``: half the bytes, which is what vLLM's capacity shows). It scores
sink tokens (positions < ``sinks``) and recent ones (within ``window`` of the query) with its own query and
exact keys (kept in a side pool, glue/window.py), and every other token with the lead's query and cached keys;
one softmax over both, then its own values (vllm_kvc/pod.py has the same math for one sequence and the
calibration that chooses the groups). The lead runs first in every forward pass and leaves its queries for its
followers in ``_LEAD_QUERIES``.
"""
from __future__ import annotations

import torch

from vllm_kvc.glue.attention import RowAttention
from vllm_kvc.glue.window import RecentPool, exact_mask, keep_positions, window_positions
from vllm_kvc.kernels import reference

# lead layer name -> (its queries of the current forward pass [n, Hq, d], its cache [blocks, block_size, row])
_LEAD_QUERIES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


class PodAttention(RowAttention):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, dtype: torch.dtype,
                 lead_name: str | None, window: int, sinks: int, cache_config=None, prefix: str = ""):
        self.is_follower = lead_name is not None
        elems = num_kv_heads * head_size * (1 if self.is_follower else 2)
        super().__init__(num_heads, head_size, scale, num_kv_heads, elems * dtype.itemsize, dtype,
                         cache_config=cache_config, prefix=prefix)
        self.lead_name = lead_name
        self.window, self.sinks = window, sinks
        self.pool: RecentPool | None = None

    def _split(self, rows: torch.Tensor):
        """Lead rows [B, S, 2*H*d] -> keys, values [B, S, H, d] float32."""
        k, v = rows.float().view(*rows.shape[:2], 2, self.num_kv_heads, self.head_size).unbind(2)
        return k, v

    def kvc_attend(self, query, key, value, cache, md, output) -> None:
        n = md.num_actual_tokens
        h, d = self.num_kv_heads, self.head_size
        k, v = key[:n].reshape(n, h * d), value[:n].reshape(n, h * d)
        q = query[:n].view(n, self.num_heads, d)
        out = output[:n].view(n, self.num_heads, d)
        slots = md.slot_mapping[:n]
        if not self.is_follower:
            reference.write_rows(cache, slots, torch.cat([k, v], dim=-1).to(cache.dtype))
            # a copy: under torch.compile the query buffer is dead to the graph after this op and gets reused
            _LEAD_QUERIES[self.layer_name] = (q.clone(), cache)
            reference.rows_attention(q, cache, md.block_table, md.seq_lens_cpu, md.query_start_loc_cpu,
                                     self._split, self.scale, out)
            return
        reference.write_rows(cache, slots, v.to(cache.dtype))
        q_lead, lead_cache = _LEAD_QUERIES[self.lead_name]
        if self.pool is None:
            self.pool = RecentPool(cache.shape[1], (h, d), q.dtype, q.device)
        pool = self.pool
        pool.begin_step()
        k = k.view(n, h, d)
        qsl, sls = md.query_start_loc_cpu.tolist(), md.seq_lens_cpu.tolist()
        reqs = [r for r in range(len(sls)) if qsl[r + 1] > qsl[r]]
        # read every request's window before any write, so no write recycles a page another request needs now
        got = {r: pool.read(md.block_table[r], window_positions(sls[r], qsl[r + 1] - qsl[r], self.window,
                                                                self.sinks)) for r in reqs}
        for r in reqs:
            keep = keep_positions(sls[r], qsl[r + 1] - qsl[r], self.window, self.sinks) + qsl[r]
            pool.write(slots[keep], k[keep])
        for r in reqs:
            qs, qe, s = qsl[r], qsl[r + 1], sls[r]
            nq = qe - qs
            block_row = md.block_table[r]
            k_lead, _ = self._split(reference.gather_rows(lead_cache, block_row, s)[None])
            v_own = reference.gather_rows(cache, block_row, s).float().view(s, h, d)
            # own exact keys: this chunk's tokens, and the sink / window positions before it from the pool
            k_own = torch.zeros(s, h, d, dtype=torch.float32, device=q.device)
            have = torch.zeros(s, dtype=torch.bool)
            k_own[s - nq:], have[s - nq:] = k[qs:qe].float(), True
            before = window_positions(s, nq, self.window, self.sinks)
            if before.numel():
                vals, found = got[r]
                k_own[before], have[before] = vals.float(), found.cpu()
            pos = torch.arange(s - nq, s)
            use = exact_mask(pos, s, self.window, self.sinks) & have[None]
            visible = torch.arange(s)[None, :] <= pos[:, None]
            o = reference.attend_two_source(q[qs:qe].float(), k_own, v_own, q_lead[qs:qe].float(), k_lead[0],
                                            v_own, use.to(q.device), visible.to(q.device), self.scale)
            out[qs:qe] = o.to(out.dtype)
