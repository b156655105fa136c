"""Exact K/V of each sequence's sink and recent tokens, next to a compressed paged cache (plain torch).

Lexico (``recent_window``) and POD (``window``, ``sinks``) attend to a few tokens of every sequence with exact
keys (and values) while the paged cache holds only the compressed form. vLLM's paged blocks charge every token
the same row bytes, so these exact copies live in a side pool: pages of ``block_size`` tokens keyed by the
*physical vLLM block* that holds the tokens. Because every cached token is written through the attention op,
a pool page keyed by block ``b`` holds what the latest writer of ``b`` wrote; a request only ever reads
positions it wrote itself or got from a prefix-cache hit (same tokens at the same positions, so the same
tensors), so a page that outlived its request (vLLM recycled the block) is never read stale.

Pages are recycled least-recently-used, only among pages neither written nor read in the current step; when
all are in use the pool doubles, so a live window is never dropped. A token whose page was recycled (its request
sat idle while others needed pages) is read from the compressed cache instead: it costs quality, never
correctness. The pool's size is reported by ``nbytes``.
"""
from __future__ import annotations

import torch

from vllm_kvc.kernels import reference


class RecentPool:
    def __init__(self, block_size: int, shape: tuple[int, ...], dtype: torch.dtype, device, pages: int = 16,
                 page_rows: int | None = None):
        """``block_size``: vLLM's; ``page_rows``: tokens per page (a divisor of it; default the block: a page
        per block), keyed by the cache slots it covers."""
        self.block_size = block_size
        self.page_rows = page_rows = page_rows or block_size
        if block_size % page_rows:
            raise ValueError(f"page_rows {page_rows} must divide the block size {block_size}")
        self.data = torch.zeros(pages, page_rows, *shape, dtype=dtype, device=device)
        self.valid = torch.zeros(pages, page_rows, dtype=torch.bool, device=device)
        self.page_of: dict[int, int] = {}
        self.block_of = [-1] * pages
        self.stamp = [0] * pages
        self.step = 0
        self._free: list[int] = []  # this step's candidate pages (see _take_page)
        self._free_step = -1

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def begin_step(self) -> None:
        self.step += 1

    def _grow(self) -> None:
        n = self.data.shape[0]
        self.data = torch.cat([self.data, torch.zeros_like(self.data)])
        self.valid = torch.cat([self.valid, torch.zeros_like(self.valid)])
        self.block_of += [-1] * n
        self.stamp += [0] * n

    def _take_page(self, block: int) -> int:
        # candidates: pages not used this step, least recently used first, listed once per step (a page used
        # since the list was made is skipped when popped)
        if self._free_step != self.step or not self._free:
            self._free = sorted((p for p, s in enumerate(self.stamp) if s < self.step),
                                key=lambda p: self.stamp[p], reverse=True)
            self._free_step = self.step
        while self._free and self.stamp[self._free[-1]] >= self.step:
            self._free.pop()
        if not self._free:
            n = self.data.shape[0]
            self._grow()
            self._free = list(range(2 * n - 1, n - 1, -1))
        page = self._free.pop()
        old = self.block_of[page]
        if old >= 0:
            del self.page_of[old]
        self.block_of[page] = block
        self.page_of[block] = page
        self.valid[page] = False
        return page

    def write(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``values [N, *shape]`` of the tokens at flat cache ``slots [N]`` (slots < 0 skipped)."""
        keep = slots >= 0
        if not bool(keep.all()):
            slots, values = slots[keep], values[keep]
        if slots.numel() == 0:
            return
        slots = slots.long()
        blocks = (slots // self.page_rows).tolist()
        pages = []
        for b in blocks:
            p = self.page_of.get(b)
            if p is None:
                p = self._take_page(b)
            self.stamp[p] = self.step
            pages.append(p)
        pt = torch.tensor(pages, device=self.data.device)
        off = (slots % self.page_rows).to(self.data.device)
        self.data[pt, off] = values.to(self.data.dtype)
        self.valid[pt, off] = True

    def read(self, block_row: torch.Tensor, positions: torch.Tensor):
        """Values at ``positions [P]`` of the request whose block table row is ``block_row``:
        (values [P, *shape], found [P] bool); positions not in the pool come back as zeros with found False."""
        bs, pr = self.block_size, self.page_rows
        slots = block_row[(positions // bs).long()].long().cpu() * bs + positions % bs
        blocks = (slots // pr).tolist()
        pages = []
        for b in blocks:
            p = self.page_of.get(int(b), -1)
            if p >= 0:
                self.stamp[p] = self.step
            pages.append(p)
        pt = torch.tensor(pages, device=self.data.device, dtype=torch.long)
        off = (slots % pr).long().to(self.data.device)
        have = pt >= 0
        ptc = pt.clamp(min=0)
        found = have & self.valid[ptc, off]
        vals = self.data[ptc, off]
        vals = torch.where(found.view(-1, *([1] * (vals.dim() - 1))), vals, torch.zeros((), dtype=vals.dtype))
        return vals, found


def window_positions(seq_len: int, num_new: int, window: int, sinks: int) -> torch.Tensor:
    """Positions before the current chunk that its queries see exactly: the sinks and the last ``window - 1``
    tokens before the chunk (a query at position i sees keys i - window < j <= i exactly)."""
    start = seq_len - num_new
    lo = max(0, start - window + 1)
    pos = list(range(min(sinks, lo))) + list(range(lo, start))
    return torch.tensor(pos, dtype=torch.long)


def keep_positions(seq_len: int, num_new: int, window: int, sinks: int) -> torch.Tensor:
    """Offsets (within the current chunk) of the new tokens later queries may see exactly: sinks and the last
    ``window`` positions."""
    start = seq_len - num_new
    pos = torch.arange(start, seq_len)
    keep = (pos < sinks) | (pos >= seq_len - window)
    return keep.nonzero().flatten()


def exact_mask(q_pos: torch.Tensor, s: int, window: int, sinks: int) -> torch.Tensor:
    """[nq, S] True where query at position q_pos[i] sees key j exactly (sink or within the window), causal."""
    j = torch.arange(s)[None, :]
    qp = q_pos[:, None]
    return (j <= qp) & ((j < sinks) | (qp - j < window))


def attend_windowed(pool: RecentPool, q, k_new, v_new, slots, cache, md, out, decode, window: int, sinks: int,
                    scale: float) -> None:
    """Varlen causal attention where each query reads its ``sinks`` first and ``window`` newest keys/values
    exactly and the rest from the compressed paged rows (Lexico's recent window, tcode's sink and window).

    ``q [N, Hq, d]``; ``k_new`` (roped) / ``v_new [N, Hkv, d]``: this step's tokens exact; ``decode(rows [1, S,
    row]) -> (k roped, v) [1, S, Hkv, d]`` float32 of positions 0..S-1. The exact rows later queries need are
    kept in ``pool`` (keyed by the physical cache slot's page); every request's window is read before any write
    so no write recycles a page another request needs now. Writes ``out [N, Hq, d]``."""
    pool.begin_step()
    qsl, sls = md.query_start_loc_cpu.tolist(), md.seq_lens_cpu.tolist()
    reqs = [r for r in range(len(sls)) if qsl[r + 1] > qsl[r]]
    got = {r: pool.read(md.block_table[r], window_positions(sls[r], qsl[r + 1] - qsl[r], window, sinks))
           for r in reqs}
    for r in reqs:
        keep = keep_positions(sls[r], qsl[r + 1] - qsl[r], window, sinks)
        qs, qe = qsl[r], qsl[r + 1]
        pool.write(slots[qs:qe][keep], torch.stack([k_new[qs:qe][keep], v_new[qs:qe][keep]], 1))
    for r in reqs:
        qs, qe, s = qsl[r], qsl[r + 1], sls[r]
        nq = qe - qs
        pos_new = torch.arange(s - nq, s)
        kc, vc = decode(reference.gather_rows(cache, md.block_table[r], s)[None])
        kc, vc = kc[0], vc[0]
        # exact K/V: this chunk's own tokens, then the sink / window positions before it from the pool
        k_ex, v_ex = torch.zeros_like(kc), torch.zeros_like(vc)
        have = torch.zeros(s, dtype=torch.bool)
        k_ex[s - nq:], v_ex[s - nq:], have[s - nq:] = k_new[qs:qe].float(), v_new[qs:qe].float(), True
        before = window_positions(s, nq, window, sinks)
        if before.numel():
            vals, found = got[r]
            k_ex[before], v_ex[before] = vals[:, 0].float(), vals[:, 1].float()
            have[before] = found.cpu()
        use = exact_mask(pos_new, s, window, sinks) & have[None]
        visible = torch.arange(s)[None, :] <= pos_new[:, None]
        qq = q[qs:qe].float()
        o = reference.attend_two_source(qq, k_ex, v_ex, qq, kc, vc, use.to(q.device), visible.to(q.device), scale)
        out[qs:qe] = o.to(out.dtype)
