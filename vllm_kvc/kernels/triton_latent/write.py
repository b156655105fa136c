"""Writing this step's cache rows into the paged cache on GPUs, without reading anything on the host.

The plain-torch writer (``reference.write_rows``) drops padding slots (< 0) with a boolean index, which reads the
mask on the host; under CUDA graphs (padded decode batches) that is not allowed. Here one program copies one row
and returns at once for a padding slot.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import next_pow2


@triton.jit(do_not_specialize=["n_cols"])
def _write_rows(rows_ptr, stride_r, slot_ptr, cache_ptr, stride_cb, stride_cs, stride_cc, n_cols,
                BS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    if slot >= 0:
        dst = cache_ptr + (slot // BS) * stride_cb + (slot % BS) * stride_cs
        src = rows_ptr + i.to(tl.int64) * stride_r
        c = tl.arange(0, BLOCK)
        for c0 in range(0, n_cols, BLOCK):
            m = c0 + c < n_cols
            tl.store(dst + (c0 + c) * stride_cc, tl.load(src + c0 + c, mask=m), mask=m)


def write_rows(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, rows: torch.Tensor) -> None:
    """Store cache rows ``[N, row_elems]`` (the cache's dtype) at ``slot_mapping [N]``; slots < 0 are skipped.
    ``kv_cache`` is ``[num_blocks, block_size, row_elems]`` with any strides. Same result as
    ``reference.write_rows``; no host synchronisation."""
    n, cols = rows.shape
    if n == 0:
        return
    if rows.dtype != kv_cache.dtype:
        raise ValueError(f"rows of {rows.dtype} for a cache of {kv_cache.dtype}")
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    _write_rows[(n,)](rows, rows.stride(0), slot_mapping, kv_cache, kv_cache.stride(0), kv_cache.stride(1),
                      kv_cache.stride(2), cols, BS=kv_cache.shape[1], BLOCK=min(1024, next_pow2(cols)))
