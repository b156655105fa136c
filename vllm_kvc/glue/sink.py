"""The exact first token (sink) of each sequence next to a compressed paged cache on GPUs (method tcode).

The CPU path keeps it in glue/window.py's ``RecentPool`` (host-side page lookups). On CUDA, attention must read it
without host synchronisation (decode steps are captured in CUDA graphs): :class:`SinkTable` maps block ids to pages
in a device tensor, so a read is a few gathers of fixed shapes, and the Triton kernels merge the result in their
split-KV reduce (kernels/triton_latent, ``sink``).
"""
from __future__ import annotations

import torch


class SinkTable:
    """The exact first token of each sequence on GPUs, read without host synchronisation (CUDA-graph capturable).

    Pages hold one token's exact values ``[*shape]`` (method tcode: K and V of every KV head, bf16), keyed as in
    :class:`RecentPool` by the sequence's first vLLM block; ``page_of [num_blocks]`` (int32, on the device) maps a
    block id to its page (-1: none), so :meth:`read` is a gather of the block table's first column, page ids and
    values on the device. :meth:`write` (steps where a sequence starts, i.e. prefills, which vLLM runs eagerly) takes
    pages on the host: it reads the batch's first block ids once (one device-to-host copy in such steps only) and
    recycles the least recently written page among those no request of the batch holds. The tensors are allocated
    once (``pages``: at least the requests of a step, e.g. vLLM's max_num_seqs), so captured reads stay valid; when
    every page is held by the step's requests, a new sequence's first token is not kept (read from its latent row:
    quality, never correctness). A recycled page's old block maps to -1 (also read from the latent row)."""

    def __init__(self, num_blocks: int, shape: tuple[int, ...], dtype: torch.dtype, device, pages: int = 256):
        self.data = torch.zeros(pages, *shape, dtype=dtype, device=device)
        self.page_of = torch.full((num_blocks,), -1, dtype=torch.int32, device=device)
        self.block_of = [-1] * pages
        self.stamp = [0] * pages
        self.host_page: dict[int, int] = {}
        self.step = 0

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.page_of.numel() * 4

    def write(self, first_blocks: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
        """Store ``values [len(rows), *shape]`` as the first tokens of the requests ``rows`` of a batch whose block
        tables' first column is ``first_blocks [R]`` (the other requests' pages are kept)."""
        self.step += 1
        blocks = [int(b) for b in first_blocks.tolist()]
        held = {self.host_page[b] for b in blocks if b in self.host_page}
        for p in held:
            self.stamp[p] = self.step
        take, keep = [], []
        for i, r in enumerate(rows):
            b = blocks[r]
            p = self.host_page.get(b)
            if p is None:
                free = [q for q in range(len(self.stamp)) if self.stamp[q] < self.step]
                if not free:
                    continue
                p = min(free, key=lambda q: self.stamp[q])
                old = self.block_of[p]
                if old >= 0:
                    del self.host_page[old]
                    self.page_of[old] = -1
                self.block_of[p] = b
                self.host_page[b] = p
            self.stamp[p] = self.step
            take.append(p)
            keep.append(i)
        if not take:
            return
        dev = self.data.device
        pt = torch.tensor(take, device=dev)
        self.data[pt] = values[torch.tensor(keep, device=values.device)].to(self.data.dtype)
        self.page_of[torch.tensor([self.block_of[p] for p in take], device=dev)] = pt.to(torch.int32)

    def read(self, first_blocks: torch.Tensor):
        """(values [R, *shape], found [R] bool) of the requests whose block tables start with ``first_blocks [R]``;
        device ops of fixed shapes only."""
        page = self.page_of[first_blocks.long()]
        found = page >= 0
        return self.data[page.clamp(min=0).long()], found
