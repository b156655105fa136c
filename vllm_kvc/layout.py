"""Byte layout of one layer's latent KV row (one token), shared by the vLLM glue and the kernels.

Plain Python + torch; importable without vLLM.

A layer caches, per token, for each of its ``groups`` head groups (``group_size`` KV heads each):
a key latent of ``rank_k`` values and a value latent of ``rank_v`` values. One row is::

    [ k latents: groups x rank_k | v latents: groups x rank_v | scales ]

Float latents (bf16/fp16/fp32) have no scales; the cache tensor has that dtype and shape
``[num_blocks, block_size, width]``. int8 latents are stored in a uint8 cache of shape
``[num_blocks, block_size, row_bytes]``: ``width`` int8 values, then ``2 * groups`` fp16 scales
(key scales of each group, then value scales), one absmax scale per token, group and K/V
(the factors are rotated so that all latent coordinates share that scale well).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LATENT_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "int8": torch.int8,
}


@dataclass(frozen=True)
class LatentLayout:
    groups: int  # head groups on this rank
    group_size: int  # KV heads per group
    head_dim: int
    rank_k: int
    rank_v: int
    dtype: str = "bfloat16"  # one of LATENT_DTYPES

    def __post_init__(self):
        if self.dtype not in LATENT_DTYPES:
            raise ValueError(f"latent dtype {self.dtype!r}: expected one of {sorted(LATENT_DTYPES)}")
        if not 0 < self.rank_k <= self.group_size * self.head_dim:
            raise ValueError(f"rank_k={self.rank_k}: expected 1..{self.group_size * self.head_dim}")
        if not 0 < self.rank_v <= self.group_size * self.head_dim:
            raise ValueError(f"rank_v={self.rank_v}: expected 1..{self.group_size * self.head_dim}")

    @property
    def quantized(self) -> bool:
        return self.dtype == "int8"

    @property
    def num_kv_heads(self) -> int:
        return self.groups * self.group_size

    @property
    def width(self) -> int:
        """Latent values per token (K and V, all groups)."""
        return self.groups * (self.rank_k + self.rank_v)

    @property
    def v_offset(self) -> int:
        return self.groups * self.rank_k

    @property
    def cache_dtype(self) -> torch.dtype:
        return torch.uint8 if self.quantized else LATENT_DTYPES[self.dtype]

    @property
    def row_elems(self) -> int:
        """Last dimension of the cache tensor (elements of ``cache_dtype``)."""
        return self.row_bytes if self.quantized else self.width

    @property
    def row_bytes(self) -> int:
        if self.quantized:
            return self.width + 2 * 2 * self.groups
        return self.width * LATENT_DTYPES[self.dtype].itemsize

    def dense_row_bytes(self, dtype_bytes: int = 2) -> int:
        """Bytes per token of the uncompressed K and V of the same heads."""
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    # ----- packing / unpacking (reference path; kernels read the same bytes) -----
    def pack(self, lat_k: torch.Tensor, lat_v: torch.Tensor) -> torch.Tensor:
        """[N, groups, rank_k], [N, groups, rank_v] float -> [N, row_elems] rows of cache_dtype."""
        n = lat_k.shape[0]
        if not self.quantized:
            dt = self.cache_dtype
            return torch.cat([lat_k.reshape(n, -1), lat_v.reshape(n, -1)], dim=1).to(dt)
        qk, sk = quantize_int8(lat_k)
        qv, sv = quantize_int8(lat_v)
        vals = torch.cat([qk.reshape(n, -1), qv.reshape(n, -1)], dim=1).view(torch.uint8)
        scales = torch.cat([sk, sv], dim=1).to(torch.float16).contiguous().view(torch.uint8)
        return torch.cat([vals, scales.reshape(n, -1)], dim=1)

    def unpack(self, rows: torch.Tensor, out_dtype: torch.dtype = torch.float32):
        """[..., row_elems] -> ([..., groups, rank_k], [..., groups, rank_v]) in out_dtype."""
        lead = rows.shape[:-1]
        g, rk, rv = self.groups, self.rank_k, self.rank_v
        if not self.quantized:
            k = rows[..., : g * rk].to(out_dtype).reshape(*lead, g, rk)
            v = rows[..., g * rk : self.width].to(out_dtype).reshape(*lead, g, rv)
            return k, v
        vals = rows[..., : self.width].contiguous().view(torch.int8).to(out_dtype)
        scales = rows[..., self.width : self.row_bytes].contiguous().view(torch.float16).to(out_dtype)
        k = vals[..., : g * rk].reshape(*lead, g, rk) * scales[..., :g, None]
        v = vals[..., g * rk :].reshape(*lead, g, rv) * scales[..., g:, None]
        return k, v


def quantize_int8(x: torch.Tensor):
    """Symmetric absmax int8 over the last dim. Returns (int8 values, scales with last dim dropped)."""
    xf = x.float()
    # round the scale to its stored fp16 value first, so that dequantization uses exactly it
    scale = (xf.abs().amax(dim=-1) / 127.0).clamp_min(1e-6).to(torch.float16).float()
    q = torch.round(xf / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale
