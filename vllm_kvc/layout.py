"""Byte layout of one layer's latent KV row (one token), shared by the vLLM glue and the kernels.

Plain Python + torch; importable without vLLM. ``pack`` / ``unpack`` are the single source of truth of the
bytes (the reference attention, the emulation and the kernels' oracle all go through them).

A layer caches, per token, for each of its ``groups`` head groups (``group_size`` KV heads each):
a key latent of ``rank_k`` values and a value latent of ``rank_v`` values. One row is::

    [ k latents: groups x rank_k | v latents: groups x rank_v | scales ]

``dtype`` is a latent spec string (built by ``plan.latent_spec``):

- ``"bfloat16"`` / ``"float16"`` / ``"float32"``: float latents, no scales; the cache tensor has that dtype
  and shape ``[num_blocks, block_size, width]``.
- ``"int8"`` (the original integer layout, unchanged): a uint8 cache of shape ``[num_blocks, block_size,
  row_bytes]``: ``width`` int8 values (two's complement, symmetric absmax, -127..127), then ``2 * groups`` fp16
  scales (key scales of each group, then value scales), one absmax scale per token, group and K/V (the factors
  are rotated so that all latent coordinates share that scale well). ``bits_k == bits_v == 8`` and
  ``quant_group == 0`` identify it; kernels written for int8 only must check exactly that.
- ``"int4"``, ``"int2"``: the same row order, but the K part's ``groups * rank_k`` values are packed 2 (int4)
  or 4 (int2) per byte, little end first (value j of the part sits in byte ``j * bits // 8`` at bit
  ``(j * bits) % 8``), then the V part likewise starting at the next whole byte (the last byte of each part is
  zero-padded). Codes are unsigned ``u`` in ``0 .. 2**bits - 1``; the value is ``table[u] * |scale|`` with one
  of two symmetric level tables (both with outermost level 1, so ``|scale|`` is the outermost level's value),
  picked by the sign of the fp16 scale (its sign bit is otherwise unused; quantizer version ``QUANT_VERSION``):
  ``scale > 0``: ``GAUSS_LEVELS[bits]``, Lloyd-Max levels for ``x / absmax`` of groups of 32 Gaussian values
  (what rotated latents mostly look like); ``scale < 0``: ``UNIFORM_LEVELS[bits]``, the uniform mid-rise grid
  ``(u - 2**(bits-1) + 0.5) / (2**(bits-1) - 0.5)`` (better for the flatter latents that Hadamard rotations of
  some layers give). The encoder tries both tables with a few scales ``absmax * f`` (``SCALE_FACTORS``; f < 1
  clips the largest values) and keeps, per scale group, the candidate of least squared error, so the error
  never exceeds that of the uniform grid with ``|scale| = absmax``: per scale group,
  ``sum err**2 <= n * (absmax / (2**bits - 1))**2`` (n values; fp16 rounding of the scale aside). Decoding is a
  pure function of the code and the stored scale; the bytes per row are the same as before.
- ``"int8/int4"`` etc.: K and V integer parts of different bit widths (K first), same rules per part.
- any integer spec with ``"@g32"`` (``quant_group`` 32): instead of one scale per head group and token, one
  scale per 32 consecutive latent values of each head group (``ceil(rank / 32)`` scales per group; the last
  group of values may be shorter). Scale order: K group 0 scales, K group 1 ..., then V likewise.

- ``"seg:<K>/<V>"`` (transform coding, method ``tcode``; plan.parse_segment_spec): each part is a list of
  segments ``width x bits`` (bits 8 / 4 / 2, non-increasing; ``rank`` = the sum of the widths). Row order:
  K segment 0's ``groups x width`` values packed at its bits (group-major, little end first as above; 8 bits:
  int8 symmetric absmax), K segment 1 ..., then V's segments likewise, then one fp16 scale per segment and head
  group (K segment 0 group 0, group 1 ..., K segment 1 ..., V ...). 4 / 2-bit segments use the level tables
  above (table by the scale's sign). Widths are multiples of 4, so every segment starts on a byte.

``row_bytes`` (values + fp16 scales) is what vLLM's KV spec charges per token (glue/layer.py), and it equals
``plan.latent_row_bytes`` (one formula for both).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvc.plan import (INT_LATENTS, latent_part_bytes, latent_row_bytes, parse_latent_spec,
                           parse_segment_spec, segment_part_bytes)

LATENT_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "int8": torch.int8,
    "int4": torch.uint8,
    "int2": torch.uint8,
}


@dataclass(frozen=True)
class LatentLayout:
    groups: int  # head groups on this rank
    group_size: int  # KV heads per group
    head_dim: int
    rank_k: int
    rank_v: int
    dtype: str = "bfloat16"  # a latent spec (see module docstring)

    def __post_init__(self):
        try:
            parse_latent_spec(self.dtype)
        except ValueError:
            raise ValueError(f"latent dtype {self.dtype!r}: expected one of {sorted(LATENT_DTYPES)}, "
                             "'int8/int4'-style K/V pairs, optionally with '@g<N>'") from None
        if self.segmented:
            wk, wv = (sum(w for w, _ in s) for s in parse_segment_spec(self.dtype))
            if (wk, wv) != (self.rank_k, self.rank_v):
                raise ValueError(f"latent dtype {self.dtype!r}: its segments cover {wk} K and {wv} V coordinates, "
                                 f"expected rank_k={self.rank_k} and rank_v={self.rank_v}")
        if not 0 < self.rank_k <= self.group_size * self.head_dim:
            raise ValueError(f"rank_k={self.rank_k}: expected 1..{self.group_size * self.head_dim}")
        if not 0 < self.rank_v <= self.group_size * self.head_dim:
            raise ValueError(f"rank_v={self.rank_v}: expected 1..{self.group_size * self.head_dim}")

    # ----- dtype spec -----
    @property
    def dtype_k(self) -> str:
        return parse_latent_spec(self.dtype)[0]

    @property
    def dtype_v(self) -> str:
        return parse_latent_spec(self.dtype)[1]

    @property
    def quant_group(self) -> int:
        """Latent values per fp16 scale; 0: one scale per token, head group and K/V."""
        return parse_latent_spec(self.dtype)[2]

    @property
    def segmented(self) -> bool:
        """Transform-coded rows (``"seg:..."``): several widths per part."""
        return self.dtype.startswith("seg:")

    @property
    def segments_k(self) -> tuple[tuple[int, int], ...]:
        """((width, bits), ...) of the K part; one segment of the part's width otherwise."""
        return parse_segment_spec(self.dtype)[0] if self.segmented else ((self.rank_k, self.bits_k),)

    @property
    def segments_v(self) -> tuple[tuple[int, int], ...]:
        return parse_segment_spec(self.dtype)[1] if self.segmented else ((self.rank_v, self.bits_v),)

    @property
    def bits_k(self) -> int:
        """Bits per K value (0: segmented rows, several widths)."""
        if self.segmented:
            return 0
        return INT_LATENTS.get(self.dtype_k, 8 * LATENT_DTYPES[self.dtype_k].itemsize)

    @property
    def bits_v(self) -> int:
        if self.segmented:
            return 0
        return INT_LATENTS.get(self.dtype_v, 8 * LATENT_DTYPES[self.dtype_v].itemsize)

    @property
    def quantized(self) -> bool:
        """Integer latents of any width (uint8 cache with scales)."""
        return self.dtype_k in INT_LATENTS or self.segmented

    @property
    def is_int8(self) -> bool:
        """The original int8 layout (int8 K and V, one scale per token, head group and K/V)."""
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
        """Index of the first V latent value (in values, not bytes)."""
        return self.groups * self.rank_k

    @property
    def k_bytes(self) -> int:
        """Bytes of the packed K values (integer latents) / of the K part (float latents)."""
        if self.segmented:
            return segment_part_bytes(self.groups, self.segments_k)[0]
        return latent_part_bytes(self.groups, self.rank_k, self.dtype_k, self.quant_group)[0]

    @property
    def v_bytes(self) -> int:
        if self.segmented:
            return segment_part_bytes(self.groups, self.segments_v)[0]
        return latent_part_bytes(self.groups, self.rank_v, self.dtype_v, self.quant_group)[0]

    @property
    def scales_per_group_k(self) -> int:
        if self.segmented:
            return len(self.segments_k)
        qg = self.quant_group
        return -(-self.rank_k // qg) if qg else 1

    @property
    def scales_per_group_v(self) -> int:
        if self.segmented:
            return len(self.segments_v)
        qg = self.quant_group
        return -(-self.rank_v // qg) if qg else 1

    @property
    def scale_offset(self) -> int:
        """Byte offset of the fp16 scales (integer latents)."""
        return self.k_bytes + self.v_bytes

    @property
    def cache_dtype(self) -> torch.dtype:
        return torch.uint8 if self.quantized else LATENT_DTYPES[self.dtype]

    @property
    def row_elems(self) -> int:
        """Last dimension of the cache tensor (elements of ``cache_dtype``)."""
        return self.row_bytes if self.quantized else self.width

    @property
    def row_bytes(self) -> int:
        return latent_row_bytes(self.groups, self.rank_k, self.rank_v, self.dtype)

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
        if self.segmented:
            return self._pack_segments(lat_k, lat_v)
        if self.is_int8:  # original layout, byte for byte
            qk, sk = quantize_int8(lat_k)
            qv, sv = quantize_int8(lat_v)
            vals = torch.cat([qk.reshape(n, -1), qv.reshape(n, -1)], dim=1).view(torch.uint8)
            scales = torch.cat([sk, sv], dim=1).to(torch.float16).contiguous().view(torch.uint8)
            return torch.cat([vals, scales.reshape(n, -1)], dim=1)
        qg = self.quant_group
        ck, sk = quantize(lat_k, self.bits_k, qg)
        cv, sv = quantize(lat_v, self.bits_v, qg)
        parts = [pack_codes(ck.reshape(n, -1), self.bits_k), pack_codes(cv.reshape(n, -1), self.bits_v),
                 torch.cat([sk.reshape(n, -1), sv.reshape(n, -1)], 1).to(torch.float16).contiguous()
                 .view(torch.uint8)]
        return torch.cat(parts, dim=1)

    def unpack(self, rows: torch.Tensor, out_dtype: torch.dtype = torch.float32):
        """[..., row_elems] -> ([..., groups, rank_k], [..., groups, rank_v]) in out_dtype."""
        lead = rows.shape[:-1]
        g, rk, rv = self.groups, self.rank_k, self.rank_v
        if not self.quantized:
            k = rows[..., : g * rk].to(out_dtype).reshape(*lead, g, rk)
            v = rows[..., g * rk : self.width].to(out_dtype).reshape(*lead, g, rv)
            return k, v
        if self.is_int8:
            vals = rows[..., : self.width].contiguous().view(torch.int8).to(out_dtype)
            scales = rows[..., self.width : self.row_bytes].contiguous().view(torch.float16).to(out_dtype)
            k = vals[..., : g * rk].reshape(*lead, g, rk) * scales[..., :g, None]
            v = vals[..., g * rk :].reshape(*lead, g, rv) * scales[..., g:, None]
            return k, v
        if self.segmented:
            return self._unpack_segments(rows, out_dtype)
        kb, vb, so = self.k_bytes, self.v_bytes, self.scale_offset
        nsk, nsv = g * self.scales_per_group_k, g * self.scales_per_group_v
        scales = rows[..., so: so + 2 * (nsk + nsv)].contiguous().view(torch.float16).to(out_dtype)
        qg = self.quant_group
        k = decode_packed(rows[..., :kb], scales[..., :nsk].reshape(*lead, g, -1), self.bits_k, qg, g, rk, out_dtype)
        v = decode_packed(rows[..., kb: kb + vb], scales[..., nsk:].reshape(*lead, g, -1), self.bits_v, qg, g, rv,
                          out_dtype)
        return k, v


    def _pack_segments(self, lat_k: torch.Tensor, lat_v: torch.Tensor) -> torch.Tensor:
        n, g = lat_k.shape[0], self.groups
        codes, scales = [], []
        for lat, segs in ((lat_k, self.segments_k), (lat_v, self.segments_v)):
            off = 0
            for w, b in segs:
                c, sc = quantize(lat[..., off:off + w], b, 0)  # [N, G, w], [N, G, 1]
                codes.append(pack_codes(c.reshape(n, g * w), b))
                scales.append(sc.reshape(n, g))
                off += w
        sc = torch.cat(scales, 1).to(torch.float16).contiguous().view(torch.uint8)
        return torch.cat(codes + [sc], dim=1)

    def _unpack_segments(self, rows: torch.Tensor, out_dtype: torch.dtype):
        lead, g = rows.shape[:-1], self.groups
        so = self.scale_offset
        nseg = len(self.segments_k) + len(self.segments_v)
        scales = rows[..., so: so + 2 * g * nseg].contiguous().view(torch.float16).to(out_dtype)
        scales = scales.reshape(*lead, nseg, g)
        parts, byte, j = [], 0, 0
        for segs in (self.segments_k, self.segments_v):
            vals = []
            for w, b in segs:
                nb = g * w * b // 8
                vals.append(decode_packed(rows[..., byte: byte + nb], scales[..., j, :, None], b, 0, g, w, out_dtype))
                byte += nb
                j += 1
            parts.append(torch.cat(vals, -1))
        return parts[0], parts[1]

def quantize_int8(x: torch.Tensor):
    """Symmetric absmax int8 over the last dim. Returns (int8 values, scales with last dim dropped)."""
    xf = x.float()
    # round the scale to its stored fp16 value first, so that dequantization uses exactly it
    scale = (xf.abs().amax(dim=-1) / 127.0).clamp_min(1e-6).to(torch.float16).float()
    q = torch.round(xf / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """[..., r] -> [..., ceil(r/group), group] (zero-padded); group 0: [..., 1, r]."""
    r = x.shape[-1]
    if not group:
        return x.unsqueeze(-2)
    pad = -r % group
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, group)


QUANT_VERSION = 2  # int4 / int2 semantics (1: uniform mid-rise only); part of every cache key that depends on it
# positive halves of the symmetric level tables, outermost level 1 (see the module docstring)
_GAUSS_HALF = {  # Lloyd-Max on x / absmax of groups of 32 N(0, 1) values, divided by its outermost level
    4: (0.0517, 0.1560, 0.2633, 0.3764, 0.4991, 0.6374, 0.7991, 1.0),
    2: (0.2959, 1.0),
}
SCALE_FACTORS = {  # |scale| / absmax tried by the encoder, per table
    4: {"gauss": (0.82, 0.87, 0.92, 0.97, 1.02), "uniform": (0.9, 0.94, 0.97, 1.0)},
    2: {"gauss": (0.55, 0.65, 0.75, 0.9), "uniform": (0.55, 0.65, 0.75, 1.0)},
}


def _symmetric(half) -> torch.Tensor:
    h = torch.tensor(half, dtype=torch.float32)
    return torch.cat([-h.flip(0), h])


GAUSS_LEVELS = {b: _symmetric(h) for b, h in _GAUSS_HALF.items()}
UNIFORM_LEVELS = {b: (torch.arange(2 ** b, dtype=torch.float32) - (2 ** (b - 1) - 0.5)) / (2 ** (b - 1) - 0.5)
                  for b in (4, 2)}


_DEVICE_LEVELS: dict = {}


def levels_on(table: str, bits: int, device) -> torch.Tensor:
    """GAUSS_LEVELS / UNIFORM_LEVELS[bits] on ``device``, copied once per device: the encoder then runs without
    host-to-device copies (it is captured in CUDA graphs on GPUs)."""
    key = (table, bits, str(device))
    t = _DEVICE_LEVELS.get(key)
    if t is None:
        t = _DEVICE_LEVELS[key] = (GAUSS_LEVELS if table == "gauss" else UNIFORM_LEVELS)[bits].to(device)
    return t


def _nearest(y: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (levels sorted ascending) of every element of y."""
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(y, mids.to(y.device))


def quantize(x: torch.Tensor, bits: int, group: int = 0):
    """Quantize the last dim of x [..., r] with one fp16 scale per ``group`` values (0: per vector).

    Returns (codes [..., r], scales [..., nscales] float32 holding exact fp16 values). 8 bits: int8 codes,
    symmetric absmax (value = q * scale). 4 / 2 bits: unsigned codes u (uint8), value = table[u] * |scale|,
    the table picked by the scale's sign (module docstring); per scale group the encoder keeps the least
    squared error over both tables and the scales ``absmax * SCALE_FACTORS``."""
    r = x.shape[-1]
    xg = _grouped(x.float(), group)
    if bits == 8:
        q, s = quantize_int8(xg)
        return q.reshape(*x.shape[:-1], -1)[..., :r], s
    amax = xg.abs().amax(dim=-1).clamp_min(1e-6)
    best_err = best_u = best_s = None
    for sign, table in ((1.0, "gauss"), (-1.0, "uniform")):
        levels, factors = levels_on(table, bits, xg.device), SCALE_FACTORS[bits][table]
        for f in factors:
            s = (amax * f).to(torch.float16).float()  # the stored value, so decoding uses exactly it
            u = _nearest(xg / s[..., None], levels)
            err = ((levels[u] * s[..., None] - xg) ** 2).sum(-1)
            if best_err is None:
                best_err, best_u, best_s = err, u, s * sign
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_u = torch.where(better[..., None], u, best_u)
                best_s = torch.where(better, s * sign, best_s)
    codes = best_u.to(torch.uint8)
    return codes.reshape(*x.shape[:-1], -1)[..., :r], best_s


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, group: int = 0,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``quantize``: codes [..., r], scales [..., nscales] -> [..., r]."""
    r = codes.shape[-1]
    if bits == 8:
        vg = _grouped(codes.to(torch.int8).to(out_dtype), group)
        return (vg * scales.to(out_dtype)[..., None]).reshape(*codes.shape[:-1], -1)[..., :r]
    ug = _grouped(codes.long(), group)  # zero padding decodes to some level; it is cut off below
    s = scales.to(out_dtype)[..., None]
    g_lv = GAUSS_LEVELS[bits].to(device=codes.device, dtype=out_dtype)
    u_lv = UNIFORM_LEVELS[bits].to(device=codes.device, dtype=out_dtype)
    vg = torch.where(s < 0, u_lv[ug], g_lv[ug]) * s.abs()
    return vg.reshape(*codes.shape[:-1], -1)[..., :r]


_BYTE_LEVELS: dict = {}


def _byte_levels(bits: int, device, dtype) -> torch.Tensor:
    """[2 * 256, 8 // bits]: row ``t * 256 + byte`` holds the levels (table t: 0 Gauss, 1 uniform) of the codes
    packed in ``byte``, little end first."""
    key = (bits, str(device), dtype)
    t = _BYTE_LEVELS.get(key)
    if t is None:
        per = 8 // bits
        codes = unpack_codes(torch.arange(256, dtype=torch.uint8)[:, None], bits, per).long()  # [256, per]
        t = torch.cat([GAUSS_LEVELS[bits][codes], UNIFORM_LEVELS[bits][codes]]).to(device=device, dtype=dtype)
        _BYTE_LEVELS[key] = t
    return t


def decode_packed(packed: torch.Tensor, scales: torch.Tensor, bits: int, group: int, groups: int, r: int,
                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dequantize(unpack_codes(packed, bits, groups * r).reshape(..., groups, r), scales, bits, group)`` with
    the same values, faster on CPUs: 4 / 2-bit parts whose scale groups start on bytes are decoded by one
    gather per byte from a 512-row table of byte -> levels (both tables; an embedding lookup, ~3x faster than
    advanced indexing on CPUs), then one multiply by |scale|.
    packed [..., nbytes], scales [..., groups, nscales] -> [..., groups, r]."""
    lead = packed.shape[:-1]
    per = 8 // bits if bits in (2, 4) else 0
    span = group or r  # values per scale
    if not per or r % per or span % per:
        codes = unpack_codes(packed, bits, groups * r).reshape(*lead, groups, r)
        return dequantize(codes, scales, bits, group, out_dtype)
    nb = r // per  # bytes per head group
    by = packed[..., : groups * nb].reshape(*lead, groups, nb).to(torch.int32)
    s = scales.to(out_dtype)
    table = _byte_levels(bits, packed.device, out_dtype)
    rep = span // per  # bytes per scale
    ns = s.shape[-1]
    if ns == 1 or ns * rep == nb:  # whole scale groups: index and scale per group, no per-byte copies of scales
        idx = by.reshape(*lead, groups, ns, nb // ns) | ((s < 0).to(torch.int32) << 8)[..., None]
        vals = torch.nn.functional.embedding(idx, table)  # [..., G, ns, bytes per scale, per]
        return (vals * s.abs()[..., None, None]).reshape(*lead, groups, r)
    sb = s.repeat_interleave(rep, dim=-1)[..., :nb]
    vals = torch.nn.functional.embedding(by | ((sb < 0).to(torch.int32) << 8), table)  # [..., G, nb, per]
    return (vals * sb.abs()[..., None]).reshape(*lead, groups, r)


def roundtrip(x: torch.Tensor, dtype: str, group: int = 0) -> torch.Tensor:
    """What a latent x [..., G, r] reads back as after caching in ``dtype`` (one part of a row)."""
    if dtype in INT_LATENTS:
        c, s = quantize(x, INT_LATENTS[dtype], group)
        return dequantize(c, s, INT_LATENTS[dtype], group)
    return x.to(LATENT_DTYPES[dtype]).float()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, m] codes -> [N, ceil(m*bits/8)] uint8 (int8 codes are reinterpreted, smaller ones packed)."""
    if bits == 8:
        return codes.to(torch.int8).contiguous().view(torch.uint8)
    per = 8 // bits
    n, m = codes.shape
    pad = -m % per
    c = codes.to(torch.uint8)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(n, -1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32, device=c.device) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """[..., nbytes] uint8 -> [..., m] codes (int8 for 8 bits, else unsigned in uint8)."""
    if bits == 8:
        return packed[..., :m].contiguous().view(torch.int8)
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    u = (packed.to(torch.int32)[..., None] >> shifts) & (2 ** bits - 1)
    return u.reshape(*packed.shape[:-1], -1)[..., :m].to(torch.uint8)
