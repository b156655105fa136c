"""Writing this step's cache rows into the paged cache on GPUs, without reading anything on the host.

The plain-torch writer (``reference.write_rows``) drops padding slots (< 0) with a boolean index, which reads the
mask on the host; under CUDA graphs (padded decode batches) that is not allowed. Here one program copies one row
and returns at once for a padding slot.
"""
from __future__ import annotations

import functools

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


# ------------------------------------------------------------------------------------------------ fused encoder
@triton.jit
def _levels_of(y, tab_ptr, LV, L: tl.constexpr):
    """(code, level) of the nearest of the L sorted levels at ``tab_ptr + LV`` (their L - 1 midpoints follow) to
    every y: the code counts the midpoints below y (torch.bucketize), the level is the table's own value."""
    u = tl.zeros(y.shape, tl.int32)
    lev = tl.zeros(y.shape, tl.float32) + tl.load(tab_ptr + LV)
    for m in tl.static_range(L - 1):
        above = y > tl.load(tab_ptr + LV + L + m)
        u += above.to(tl.int32)
        lev = tl.where(above, tl.load(tab_ptr + LV + m + 1), lev)
    return u, lev


@triton.jit
def _round_half_even(x):
    """torch.round: to the nearest integer, halves to even."""
    r = tl.floor(x + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _phase(lat_row, k, c, p, R: tl.constexpr, QGE: tl.constexpr, NSC: tl.constexpr, NK: tl.constexpr,
           PER: tl.constexpr, LR: tl.constexpr):
    """Values ``i = j * QGE + c * PER + p`` of scale group ``k = g * NSC + j`` (0 beyond the rank: the torch encoder
    pads each group with zeros), and which of them belong to a group. Head group g's values start at ``g * LR``."""
    g = k // NSC
    i = (k % NSC)[:, None] * QGE + c[None, :] * PER + p
    in_group = (k < NK)[:, None] & (c[None, :] * PER + p < QGE)
    x = tl.load(lat_row + g[:, None] * LR + i, mask=in_group & (i < R), other=0.0).to(tl.float32)
    return x, in_group


@triton.jit
def _store_scales(row, k, sc, NK: tl.constexpr, SOFF: tl.constexpr):
    """fp16 scales (given as fp32 holding fp16 values) of the scale groups ``k`` as two bytes each."""
    s16 = sc.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    tl.store(row + SOFF + 2 * k, (s16 & 0xFF).to(tl.uint8), mask=k < NK)
    tl.store(row + SOFF + 2 * k + 1, ((s16 >> 8) & 0xFF).to(tl.uint8), mask=k < NK)


@triton.jit
def _encode_part(lat_ptr, stride_l, slot_ptr, cache_ptr, stride_cb, stride_cs, tab_ptr,
                 XOFF: tl.constexpr, G: tl.constexpr, R: tl.constexpr, QGE: tl.constexpr, NSC: tl.constexpr,
                 ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr, SOFF: tl.constexpr,
                 BS: tl.constexpr, NG: tl.constexpr, NU: tl.constexpr, L: tl.constexpr, GL: tl.constexpr,
                 UL: tl.constexpr, FG: tl.constexpr, FU: tl.constexpr, LR: tl.constexpr):
    """layout.pack of one K or V part of one token's latents, written at its slot (padding slots skipped).

    Scale groups of QGE values are tile rows ``k = g * NSC + j``; the PER = 8 / BITS values that share a byte are
    loaded as PER phase tiles (value ``c * PER + p`` of the group in column c of phase p), so the codes of a byte
    meet in one column without reshapes. 8 bits: symmetric absmax int8. 4 / 2 bits: the torch encoder's search:
    scales ``fp16(absmax * f)`` for the Gauss factors, then the uniform ones (sign -1), nearest levels, the least
    squared error over the group (strictly less: the first wins ties), all in fp32 with IEEE division.
    LR: values per head group in ``lat`` (R for a whole part; the part's rank for one segment of a ``seg:`` row, its
    R values from XOFF on in each group)."""
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    row = cache_ptr + (slot // BS) * stride_cb + (slot % BS) * stride_cs
    lat_row = lat_ptr + tok.to(tl.int64) * stride_l + XOFF
    NK: tl.constexpr = G * NSC
    PER: tl.constexpr = 8 // BITS
    k = tl.arange(0, ROWS)
    c = tl.arange(0, COLS)
    x0, in0 = _phase(lat_row, k, c, 0, R, QGE, NSC, NK, PER, LR)
    amax = tl.max(tl.abs(x0), 1)
    if PER >= 2:
        x1, in1 = _phase(lat_row, k, c, 1, R, QGE, NSC, NK, PER, LR)
        amax = tl.maximum(amax, tl.max(tl.abs(x1), 1))
    if PER == 4:
        x2, in2 = _phase(lat_row, k, c, 2, R, QGE, NSC, NK, PER, LR)
        x3, in3 = _phase(lat_row, k, c, 3, R, QGE, NSC, NK, PER, LR)
        amax = tl.maximum(amax, tl.maximum(tl.max(tl.abs(x2), 1), tl.max(tl.abs(x3), 1)))
    g = k // NSC
    i0 = (k % NSC)[:, None] * QGE + c[None, :] * PER  # first value of each byte
    byte_ok = in0 & (i0 < R)
    dst = row + OFF + ((g[:, None] * R + i0) * BITS) // 8
    if BITS == 8:
        sc = tl.maximum(tl.div_rn(amax, 127.0), 1e-6).to(tl.float16).to(tl.float32)
        q = _round_half_even(tl.div_rn(x0, sc[:, None]))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)
        tl.store(dst, q.to(tl.uint8, bitcast=True), mask=byte_ok)
        _store_scales(row, k, sc, NK, SOFF)
    else:
        amax = tl.maximum(amax, 1e-6)
        best = tl.full([ROWS], float("inf"), tl.float32)
        best_s = tl.zeros([ROWS], tl.float32)
        u0b = tl.zeros([ROWS, COLS], tl.int32)
        u1b = tl.zeros([ROWS, COLS], tl.int32)
        u2b = tl.zeros([ROWS, COLS], tl.int32)
        u3b = tl.zeros([ROWS, COLS], tl.int32)
        for cand in tl.static_range(NG + NU):
            if cand < NG:
                lv = GL
                f = tl.load(tab_ptr + FG + cand)
                sign = 1.0
            else:
                lv = UL
                f = tl.load(tab_ptr + FU + cand - NG)
                sign = -1.0
            s = (amax * f).to(tl.float16).to(tl.float32)
            u0, l0 = _levels_of(tl.div_rn(x0, s[:, None]), tab_ptr, lv, L)
            d = l0 * s[:, None] - x0
            err = tl.sum(tl.where(in0, d * d, 0.0), 1)
            if PER >= 2:
                u1, l1 = _levels_of(tl.div_rn(x1, s[:, None]), tab_ptr, lv, L)
                d = l1 * s[:, None] - x1
                err += tl.sum(tl.where(in1, d * d, 0.0), 1)
            if PER == 4:
                u2, l2 = _levels_of(tl.div_rn(x2, s[:, None]), tab_ptr, lv, L)
                d = l2 * s[:, None] - x2
                err += tl.sum(tl.where(in2, d * d, 0.0), 1)
                u3, l3 = _levels_of(tl.div_rn(x3, s[:, None]), tab_ptr, lv, L)
                d = l3 * s[:, None] - x3
                err += tl.sum(tl.where(in3, d * d, 0.0), 1)
            better = err < best
            best = tl.where(better, err, best)
            best_s = tl.where(better, s * sign, best_s)
            u0b = tl.where(better[:, None], u0, u0b)
            if PER >= 2:
                u1b = tl.where(better[:, None], u1, u1b)
            if PER == 4:
                u2b = tl.where(better[:, None], u2, u2b)
                u3b = tl.where(better[:, None], u3, u3b)
        b = u0b | (u1b << BITS)
        if PER == 4:
            b = b | (u2b << 4) | (u3b << 6)
        tl.store(dst, b.to(tl.uint8), mask=byte_ok)
        _store_scales(row, k, best_s, NK, SOFF)


_ENC_TABLES: dict = {}


def _encoder_table(bits: int, device) -> tuple[torch.Tensor, dict]:
    """Gauss levels, their midpoints, uniform levels, midpoints, Gauss factors, uniform factors (fp32, as the
    torch encoder computes them), and the offsets of each."""
    key = (bits, str(device))
    if key not in _ENC_TABLES:
        from vllm_kvc.layout import GAUSS_LEVELS, SCALE_FACTORS, UNIFORM_LEVELS
        parts, offs, n = [], {}, 0
        for name, lv in (("GL", GAUSS_LEVELS[bits]), ("UL", UNIFORM_LEVELS[bits])):
            offs[name] = n
            mids = (lv[1:] + lv[:-1]) / 2
            parts += [lv, mids]
            n += lv.numel() + mids.numel()
        for name, fs in (("FG", SCALE_FACTORS[bits]["gauss"]), ("FU", SCALE_FACTORS[bits]["uniform"])):
            offs[name] = n
            parts.append(torch.tensor(fs, dtype=torch.float32))
            n += len(fs)
        offs.update(NG=len(SCALE_FACTORS[bits]["gauss"]), NU=len(SCALE_FACTORS[bits]["uniform"]),
                    L=GAUSS_LEVELS[bits].numel())
        _ENC_TABLES[key] = (torch.cat(parts).float().to(device), offs)
    return _ENC_TABLES[key]


@functools.lru_cache(maxsize=1024)
def can_encode(layout) -> bool:
    """Packed integer layouts (not the original int8 one) whose every head group and scale group starts on a
    whole byte (transform-coded ``seg:`` rows: every segment, see config.check_supported): :func:`encode_rows` writes
    them; others go through layout.pack and :func:`write_rows`."""
    if not layout.quantized or layout.is_int8:
        return False
    if layout.segmented:
        return all(w * b % 8 == 0 for w, b in layout.segments_k + layout.segments_v)
    qg = layout.quant_group
    return all(r * b % 8 == 0 and (not qg or qg * b % 8 == 0)
               for r, b in ((layout.rank_k, layout.bits_k), (layout.rank_v, layout.bits_v)))


def encode_rows(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, layout, lat: torch.Tensor) -> None:
    """layout.pack(lat) written at slot_mapping (slots < 0 skipped) by one fused kernel per K / V part (the torch
    encoder is ~70 small kernels per part). ``lat [N, width]``: K latents of every group, then V latents. The
    codes equal layout.pack's except where two candidate scales tie within fp32 rounding of the error sums."""
    n = lat.shape[0]
    if n == 0:
        return
    if lat.stride(1) != 1:
        lat = lat.contiguous()
    G, qg = layout.groups, layout.quant_group
    soff = layout.scale_offset
    if layout.segmented:  # one launch per segment: R = its width, one scale per head group (layout._pack_segments)
        parts, off, j = [], 0, 0
        for xbase, rank, segs in ((0, layout.rank_k, layout.segments_k),
                                  (G * layout.rank_k, layout.rank_v, layout.segments_v)):
            start = 0
            for w, b in segs:
                parts.append((xbase + start, w, b, off, soff + 2 * G * j, rank))
                start += w
                off += G * w * b // 8
                j += 1
    else:
        parts = ((0, layout.rank_k, layout.bits_k, 0, soff, layout.rank_k),
                 (G * layout.rank_k, layout.rank_v, layout.bits_v, layout.k_bytes,
                  soff + 2 * G * layout.scales_per_group_k, layout.rank_v))
    for xoff, r, bits, off, so, lr in parts:
        qge = qg or r  # the torch encoder pads a group past the rank with zeros (and counts their error)
        nsc = -(-r // qge)
        tab, o = _encoder_table(bits if bits != 8 else 4, lat.device)
        _encode_part[(n,)](lat, lat.stride(0), slot_mapping, kv_cache, kv_cache.stride(0), kv_cache.stride(1), tab,
                           XOFF=xoff, G=G, R=r, QGE=qge, NSC=nsc, ROWS=next_pow2(G * nsc),
                           COLS=next_pow2(-(-qge // (8 // bits))), BITS=bits, OFF=off, SOFF=so,
                           BS=kv_cache.shape[1], NG=o["NG"], NU=o["NU"], L=o["L"], GL=o["GL"], UL=o["UL"],
                           FG=o["FG"], FU=o["FU"], LR=lr)
