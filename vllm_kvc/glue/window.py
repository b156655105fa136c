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


class RecentPool:
    def __init__(self, block_size: int, shape: tuple[int, ...], dtype: torch.dtype, device, pages: int = 16):
        self.block_size = block_size
        self.data = torch.zeros(pages, block_size, *shape, dtype=dtype, device=device)
        self.valid = torch.zeros(pages, block_size, dtype=torch.bool, device=device)
        self.page_of: dict[int, int] = {}
        self.block_of = [-1] * pages
        self.stamp = [0] * pages
        self.step = 0

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
        free = [p for p, s in enumerate(self.stamp) if s < self.step]
        if not free:
            self._grow()
            free = [p for p, s in enumerate(self.stamp) if s < self.step]
        page = min(free, key=lambda p: self.stamp[p])
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
        blocks = (slots // self.block_size).tolist()
        pages = []
        for b in blocks:
            p = self.page_of.get(b)
            if p is None:
                p = self._take_page(b)
            self.stamp[p] = self.step
            pages.append(p)
        pt = torch.tensor(pages, device=self.data.device)
        off = (slots % self.block_size).to(self.data.device)
        self.data[pt, off] = values.to(self.data.dtype)
        self.valid[pt, off] = True

    def read(self, block_row: torch.Tensor, positions: torch.Tensor):
        """Values at ``positions [P]`` of the request whose block table row is ``block_row``:
        (values [P, *shape], found [P] bool); positions not in the pool come back as zeros with found False."""
        bs = self.block_size
        blocks = block_row[(positions // bs).long()].tolist()
        pages = []
        for b in blocks:
            p = self.page_of.get(int(b), -1)
            if p >= 0:
                self.stamp[p] = self.step
            pages.append(p)
        pt = torch.tensor(pages, device=self.data.device, dtype=torch.long)
        off = (positions % bs).long().to(self.data.device)
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
