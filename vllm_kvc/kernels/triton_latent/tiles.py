"""Triton helpers shared by the kernels: finding a program's request, addressing KV tiles through the block
table, loading latent tiles and int8 scales, and RoPE on the rebuilt keys.

A KV tile is BLOCK_T consecutive cached tokens of one request (``t0`` a multiple of BLOCK_T). The tile loop of
each kernel runs in two phases: the full tiles without masks, then the partial last tile (:func:`phase_tiles`).
Block ids are loaded one tile ahead (their latency leaves the critical path); where each block holds whole tiles
(block size a multiple of BLOCK_T, e.g. the latent backend's 64-token blocks on GPUs) a tile has one block id.
"""
from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

from vllm_kvc.layout import GAUSS_LEVELS, UNIFORM_LEVELS


@triton.jit
def find_request(starts_ptr, num_reqs, pid):
    """The largest r with starts[r] <= pid (binary search over a request's start offsets)."""
    lo = num_reqs * 0
    hi = num_reqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ok = tl.load(starts_ptr + mid) <= pid
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit
def tile_blocks(bt_row, t0, tt, hi_t, BS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Block ids of the KV tile that starts at ``t0`` (0 from ``hi_t`` on): one per token, or a single id when
    each block holds whole tiles (BS a multiple of BLOCK_T)."""
    if BS % BLOCK_T == 0:
        blk = tl.load(bt_row + t0 // BS, mask=t0 < hi_t, other=0)
    else:
        tn = t0 + tt
        blk = tl.load(bt_row + tn // BS, mask=tn < hi_t, other=0)
    return blk


@triton.jit
def phase_tiles(phase: tl.constexpr, t_begin, t_mid, t_stop, bt_row, tt, BS: tl.constexpr, BLOCK_T: tl.constexpr):
    """KV range of a loop phase (0: the full tiles, no masks; 1: the partial last tile) and the block ids of its
    first tile."""
    if phase == 1:
        lo_t = t_mid
        hi_t = t_stop
    else:
        lo_t = t_begin
        hi_t = t_mid
    return lo_t, hi_t, tile_blocks(bt_row, lo_t, tt, hi_t, BS, BLOCK_T)


@triton.jit
def row_offsets(blk, t0, tt, stride_cb, stride_cs, OFF64: tl.constexpr, BS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Cache row offsets of the tokens ``t0 + tt`` of a tile, from its block ids (see :func:`tile_blocks`)."""
    if BS % BLOCK_T == 0:
        within = t0 % BS + tt
    else:
        within = (t0 + tt) % BS
    if OFF64:
        row_off = blk.to(tl.int64) * stride_cb + within.to(tl.int64) * stride_cs
    else:
        row_off = blk * stride_cb + within * stride_cs
    return row_off


@triton.jit
def tile_rows(blk, t0, tt, t_stop, stride_cb, stride_cs, MASKED: tl.constexpr, OFF64: tl.constexpr,
              BS: tl.constexpr, BLOCK_T: tl.constexpr):
    """(which tokens ``t0 + tt`` of a KV tile exist, their cache row offsets) from the tile's block ids; MASKED
    for the partial last tile."""
    t_ok = tt < BLOCK_T
    if MASKED:
        t_ok = t0 + tt < t_stop
    return t_ok, row_offsets(blk, t0, tt, stride_cb, stride_cs, OFF64, BS, BLOCK_T)


@triton.jit
def load_tile(ptr, t_ok, col_ok, MASKED: tl.constexpr, INT8: tl.constexpr):
    """One [tokens, columns] tile of latents (masked rows / columns read as 0; int8 bytes reinterpreted)."""
    if MASKED:
        x = tl.load(ptr, mask=t_ok[:, None] & col_ok[None, :], other=0)
    else:
        x = tl.load(ptr)
    if INT8:
        x = x.to(tl.int8, bitcast=True)
    return x


@triton.jit
def load_scale(cache_ptr, row_off, idx, t_ok, WIDTH: tl.constexpr):
    """fp16 scale number ``idx`` of int8 rows (byte offsets ``row_off``), read as two bytes (no alignment needed)."""
    p = cache_ptr + row_off + WIDTH + 2 * idx
    lo = tl.load(p, mask=t_ok, other=0).to(tl.uint16)
    hi = tl.load(p + 1, mask=t_ok, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


# ------------------------------------------------------------------------------------------------ RoPE
@triton.jit
def split_pairs(kk, BLOCK_T: tl.constexpr, PW: tl.constexpr):
    """Rebuilt key columns -> (x1, x2) halves of the RoPE pairs, each [BLOCK_T, PW].

    B_k's columns come in blocks of 16: (x1_8b .. x1_8b+7, x2_8b .. x2_8b+7) for pair block b. A thread of the
    wgmma accumulator holds columns 8j + 2a + {0, 1}: x1 and x2 of pairs 8(j // 2) + 2a + {0, 1}, which is where
    the A operand of the score dot (k-index 16c + 8h + 2a + {0, 1}) wants them, so the split needs no shuffles."""
    k = tl.permute(tl.reshape(kk, [BLOCK_T, PW // 8, 2, 8]), (0, 1, 3, 2))
    return tl.split(tl.reshape(k, [BLOCK_T, PW, 2]))


@triton.jit
def join_pairs(r1, r2, BLOCK_T: tl.constexpr, PW: tl.constexpr):
    """Inverse of :func:`split_pairs`: (x1, x2) halves [BLOCK_T, PW] -> [BLOCK_T, 2 PW] in B_k's block order."""
    k = tl.reshape(tl.join(r1, r2), [BLOCK_T, PW // 8, 8, 2])
    return tl.reshape(tl.permute(k, (0, 1, 3, 2)), [BLOCK_T, 2 * PW])


@triton.jit
def rope_bf16x2(k1, k2, c, s):
    """(k1 c - k2 s, k2 c + k1 s) on bf16 pairs: two packed bf16x2 FMAs per output register (sm_90)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 n, t, z;
        mov.b32 z, 0x80008000;
        xor.b32 n, $3, 0x80008000;
        fma.rn.bf16x2 t, n, $5, z;
        fma.rn.bf16x2 $0, $2, $4, t;
        fma.rn.bf16x2 t, $2, $5, z;
        fma.rn.bf16x2 $1, $3, $4, t;
        }""",
        "=r,=r,r,r,r,r", [k1, k2, c, s], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)


@triton.jit
def cos_sin_approx(x):
    """(cos x, sin x) in fp32 with the special function unit (``cos/sin.approx``, sm_90; absolute error ~1e-6 in
    -pi..pi, growing as ~|x| * 6e-8 beyond: below the bf16 rounding of the cos/sin table up to |x| ~ 1e5)."""
    return tl.inline_asm_elementwise("cos.approx.ftz.f32 $0, $2;\n\tsin.approx.ftz.f32 $1, $2;", "=r,=r,r", [x],
                                     dtype=(tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def cos_sin_of(ang, PACKED: tl.constexpr, F32: tl.constexpr = False):
    """cos / sin of fp32 angles: the special-function approximations if PACKED (rounded to bf16 for the packed
    rotation unless F32), else fp32."""
    if PACKED:
        c, s = cos_sin_approx(ang)
        if not F32:
            c = c.to(tl.bfloat16)
            s = s.to(tl.bfloat16)
    else:
        c = tl.cos(ang)
        s = tl.sin(ang)
    return c, s


@triton.jit
def load_cos_sin(cos_ptr, sin_ptr, cp, t_ok, MASKED: tl.constexpr, F32: tl.constexpr):
    """cos / sin table rows of a tile (offsets ``cp``; fp32, or the table's dtype if not F32)."""
    if MASKED:
        c = tl.load(cos_ptr + cp, mask=t_ok[:, None], other=0.0)
        s = tl.load(sin_ptr + cp, mask=t_ok[:, None], other=0.0)
    else:
        c = tl.load(cos_ptr + cp)
        s = tl.load(sin_ptr + cp)
    if F32:
        c = c.to(tl.float32)
        s = s.to(tl.float32)
    return c, s


# ------------------------------------------------------------------------------------------------ packed integers
@triton.jit
def load_scales(cache_ptr, row_off, sidx, s_ok, SOFF: tl.constexpr, SCALE16: tl.constexpr):
    """fp16 scales ``[BLOCK_T, n]`` (fp32, sign kept) of the rows at byte offsets ``row_off``, scale numbers
    ``sidx [n]`` counted from byte ``SOFF``; ``s_ok`` masks them (0 where masked). SCALE16: every scale sits on
    an even address, so it is one fp16 load; else two byte loads."""
    if SCALE16:
        p = (cache_ptr + row_off + SOFF).to(tl.pointer_type(tl.float16))
        s = tl.load(p[:, None] + sidx[None, :], mask=s_ok, other=0.0).to(tl.float32)
    else:
        p = cache_ptr + row_off[:, None] + SOFF + 2 * sidx[None, :]
        lo = tl.load(p, mask=s_ok, other=0).to(tl.uint16)
        hi = tl.load(p + 1, mask=s_ok, other=0).to(tl.uint16)
        s = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
    return s


@triton.jit
def part_scales(cache_ptr, row_off, t_ok, s0, sstride, NH: tl.constexpr, RP: tl.constexpr, NVAL: tl.constexpr,
                QG: tl.constexpr, SOFF: tl.constexpr, SCALE16: tl.constexpr):
    """The fp16 scales ``[BLOCK_T, NH * (RP / SG)]`` (fp32, sign kept) that :func:`load_dequant` and
    :func:`load_nibbles` apply to a tile of one part (the same arguments): column ``h * NSC + j`` is scale number
    ``s0 + h * sstride + j`` (0 where ``t_ok`` is false or the scale group holds no value). The decode kernel
    loads them one tile ahead and passes them in (``s_in``), so their latency leaves the tile's critical path."""
    SG: tl.constexpr = RP if (QG == 0 or QG >= RP) else QG
    NSC: tl.constexpr = RP // SG
    NS: tl.constexpr = NH * NSC
    sc = tl.arange(0, NS)
    sj = sc % NSC
    s_ok = t_ok[:, None] & (sj * SG < NVAL)[None, :]
    return load_scales(cache_ptr, row_off, s0 + (sc // NSC) * sstride + sj, s_ok, SOFF, SCALE16)


@triton.jit
def load_dequant(cache_ptr, row_off, t_ok, lut_ptr, v0, vstride, s0, sstride,
                 NH: tl.constexpr, RP: tl.constexpr, NVAL: tl.constexpr,
                 OFF: tl.constexpr, BITS: tl.constexpr, QG: tl.constexpr, SOFF: tl.constexpr, LUT: tl.constexpr,
                 SCALE16: tl.constexpr, MASKED: tl.constexpr, BLOCK_T: tl.constexpr, s_in=None):
    """A tile of integer latents of one K or V part (config.PartFormat), dequantized in registers to fp32.

    Returns ``[BLOCK_T, NH * RP]``: column ``h * RP + i`` holds value ``v0 + h * vstride + i`` of the part
    (i < NVAL; 0 beyond), i.e. NH head groups of ``vstride`` values each, padded to RP columns. Its scale is
    number ``s0 + h * sstride + i // QG`` (QG 0: ``s0 + h * sstride``). 8 bits: code * scale; 4 / 2 bits:
    ``table[code] * |scale|`` with the part's Gauss table (``lut_ptr + LUT``) where the scale is positive and the
    uniform table right after it where it is negative (layout.py). Each value reads its own byte and shifts (any
    rank, also head groups that start on a half byte). A variant that loaded a tile of bytes and split it into
    codes with ``tl.join`` / ``tl.reshape`` gave wrong results on the H200 with triton 3.6 for small tiles
    (16 tokens x <= 16 bytes; right in the interpreter and at 64-token tiles): removed."""
    NC: tl.constexpr = NH * RP
    SG: tl.constexpr = RP if QG == 0 else (RP if QG >= RP else QG)  # columns per scale within the tile
    NSC: tl.constexpr = RP // SG
    NS: tl.constexpr = NH * NSC
    FULL: tl.constexpr = NVAL >= RP  # every column holds a value
    # scales [BLOCK_T, NS] (s_in: loaded by the caller, see part_scales)
    if s_in is None:
        s = part_scales(cache_ptr, row_off, t_ok, s0, sstride, NH, RP, NVAL, QG, SOFF, SCALE16)
    else:
        s = s_in
    # codes [BLOCK_T, NC]
    c = tl.arange(0, NC)
    ci = c % RP
    e = v0 + (c // RP) * vstride + ci
    if BITS == 8:
        ptr = cache_ptr + row_off[:, None] + (OFF + e)[None, :]
    else:
        bit = OFF * 8 + e * BITS
        ptr = cache_ptr + row_off[:, None] + (bit >> 3)[None, :]
    if MASKED:
        x = tl.load(ptr, mask=t_ok[:, None] & (ci < NVAL)[None, :], other=0)
    elif FULL:
        x = tl.load(ptr)
    else:
        x = tl.load(ptr, mask=(ci < NVAL)[None, :], other=0)
    if BITS == 8:
        u = x.to(tl.int8, bitcast=True).to(tl.float32)
    else:
        u = (x.to(tl.int32) >> (bit & 7)[None, :]) & ((1 << BITS) - 1)
    if BITS == 8:
        v3 = tl.reshape(u, [BLOCK_T, NS, SG]) * s[:, :, None]
    else:
        tab = (s < 0).to(tl.int32) * (1 << BITS) + LUT
        v3 = tl.load(lut_ptr + tl.reshape(u, [BLOCK_T, NS, SG]) + tab[:, :, None]) * tl.abs(s)[:, :, None]
    v = tl.reshape(v3, [BLOCK_T, NC])
    if not FULL:
        v = tl.where((ci < NVAL)[None, :], v, 0.0)
    return v


@triton.jit
def load_piece(cache_ptr, row_off, t_ok, g, SOFF: tl.constexpr, SCALE16: tl.constexpr, MASKED: tl.constexpr,
               BLOCK_T: tl.constexpr, RUNS: tl.constexpr, C0: tl.constexpr, W: tl.constexpr, BITS: tl.constexpr, BYTE0: tl.constexpr,
               GBYTES: tl.constexpr, SIDX: tl.constexpr, P: tl.constexpr):
    """One piece of a transform-coded (``seg:``) row (the last 7 arguments: a piece of ``config.segment_pieces``,
    passed as ``*piece``) of head group ``g``, dequantized in registers to fp32: ``[BLOCK_T, P]``, column i < W holding
    coordinate C0 + i of the part, 0 beyond. One fp16 scale per token (number SIDX + g); 8-bit codes are
    ``code * scale``, 4 / 2-bit ones ``level(code) * |scale|`` with the level computed, not gathered (Gauss where
    the scale is positive, uniform where negative; layout.py): 4 bits by :func:`gauss_poly4`'s polynomial (within
    1e-4 of the table) or ``(u - 7.5) / 7.5``, 2 bits exactly (+-1 outside, +-G2_IN / +-1/3 inside). Every piece
    field is a constexpr, so addresses and shifts are constant per column. 4 / 2-bit codes are read with one byte
    load each, or (RUNS) as each token's run of bytes with an axis of stride 0 over the codes of a byte: vector
    loads, but each byte staged once per code (``config.segment_runs`` chooses, as measured)."""
    i = tl.arange(0, P)
    ok = i < W
    s = load_scales(cache_ptr, row_off, tl.full([1], SIDX, tl.int32) + g, t_ok[:, None], SOFF, SCALE16)
    if BITS == 8 or not RUNS:  # one byte load per code
        ptr = cache_ptr + row_off[:, None] + (BYTE0 + g * GBYTES + ((i * BITS) >> 3))[None, :]
        m2 = ok[None, :]
        if MASKED:
            m2 = t_ok[:, None] & ok[None, :]
        if W >= P and not MASKED:
            x = tl.load(ptr)
        else:
            x = tl.load(ptr, mask=m2, other=0)
        if BITS == 8:
            v = x.to(tl.int8, bitcast=True).to(tl.float32) * s
        else:
            u = (x.to(tl.int32) >> ((i * BITS) & 7)[None, :]) & ((1 << BITS) - 1)
    else:  # RUNS: the piece's bytes as one contiguous run per token, read once per code they hold: [T, bytes, codes]
        NB: tl.constexpr = 8 // BITS
        jb = tl.arange(0, P // NB)
        kb = tl.arange(0, NB)
        ptr = cache_ptr + row_off[:, None, None] + (BYTE0 + g * GBYTES + jb)[None, :, None] + 0 * kb[None, None, :]
        m3 = (jb < W // NB)[None, :, None] & (kb < NB)[None, None, :]
        if MASKED:
            m3 = m3 & t_ok[:, None, None]
        if W >= P and not MASKED:
            x = tl.load(ptr)
        else:
            x = tl.load(ptr, mask=m3, other=0)
        u = tl.reshape((x.to(tl.int32) >> (kb * BITS)[None, None, :]) & ((1 << BITS) - 1), [BLOCK_T, P])
    if BITS < 8:
        neg = s < 0
        if BITS == 4:
            xc = u.to(tl.float32) - 7.5
            x2 = xc * xc
            lv = tl.where(neg, xc / 7.5, xc * (G4_1 + x2 * (G4_3 + x2 * (G4_5 + x2 * (G4_7 + x2 * G4_9)))))
        else:
            m2v = tl.where((u == 0) | (u == 3), 1.0, tl.where(neg, 1.0 / 3.0, G2_IN))
            lv = tl.where(u >= 2, m2v, -m2v)
        v = lv * tl.abs(s)
    if W < P:
        v = tl.where(ok[None, :], v, 0.0)
    return v


# ------------------------------------------------------------------------------------------------ 4-bit levels
def gauss_poly4() -> tuple[float, ...]:
    """Odd polynomial (x, x^3, .., x^9 coefficients) of the centred 4-bit code x = u - 7.5 that reproduces
    layout.py's 16 Gauss levels to within 1.0e-4 (least squares; the levels' step is ~0.1): the decode kernel
    computes levels with five FMAs instead of gathering them from a table (the gather made L1 the bottleneck:
    ncu, benchmarks/RESULTS.md)."""
    x = np.arange(16, dtype=np.float64) - 7.5
    a = np.stack([x ** p for p in (1, 3, 5, 7, 9)], 1)
    c, *_ = np.linalg.lstsq(a, GAUSS_LEVELS[4].double().numpy(), rcond=None)
    return tuple(float(v) for v in c)


_G4 = gauss_poly4()
G4_1, G4_3, G4_5, G4_7, G4_9 = (tl.constexpr(v) for v in _G4)
G2_IN = tl.constexpr(float(GAUSS_LEVELS[2][2]))  # the inner 2-bit Gauss level (the outer one is 1)


@triton.jit
def nibble_levels(u2, c1, c3, c5, c7, c9):
    """Values of 4-bit codes given as ``2 u`` (int32): ``x (c1 + x^2 (c3 + ..))`` with x = u - 7.5, computed
    exactly as a float by placing 2u + 1 in the mantissa of 2^22 (no int-to-float conversion)."""
    x = (u2 | 0x4A800001).to(tl.float32, bitcast=True) - 4194312.0
    x2 = x * x
    return x * (c1 + x2 * (c3 + x2 * (c5 + x2 * (c7 + x2 * c9))))


def _byte_planes(levels) -> tuple[str, str, str, str]:
    """The 8 positive levels (entries 8..15 of a symmetric 16-level table) in bf16, as the four 32-bit words that
    ``prmt`` indexes: low bytes of levels 0..3, of 4..7, then the high bytes likewise (PTX hex immediates)."""
    import torch
    bits = [int(v) & 0xFFFF for v in levels[8:].to(torch.bfloat16).view(torch.int16).tolist()]
    word = lambda vals: "0x%08X" % sum(v << (8 * i) for i, v in enumerate(vals))  # noqa: E731
    lo, hi = [b & 0xFF for b in bits], [b >> 8 for b in bits]
    return word(lo[:4]), word(lo[4:]), word(hi[:4]), word(hi[4:])


# the magnitude-index selectors of 8 nibbles ($4: 4 code bytes): m (bytes 0, 1), sb (bytes 2, 3); xs the codes
# shifted for the sign permute (see _nibble_asm)
_NIBBLE_INDEX = ("\nand.b32 b, $4, 0x88888888;\nshr.u32 t, b, 3;\nsub.u32 t, b, t;"
                 "\nlop3.b32 m, $4, t, 0x77777777, 0x82;\nshr.u32 sb, m, 16;\nshl.b32 xs, $4, 4;")


def _nibble_signed_out(pmsel: str, oe: str, oo: str, sa: str, by_byte: bool = False) -> str:
    """PTX: the sign of each level from its code (byte mask by prmt's sign mode), then the values of the 4 nibbles
    (levels lb / hb interleaved) times the bf16 |scale| ``sa``: ``oe`` / ``oo`` the low / high nibbles of the two
    bytes, or with ``by_byte`` the (low, high) nibbles of the first / of the second byte."""
    se, so = ("0x5140", "0x7362") if by_byte else ("0x6240", "0x7351")
    return f"""
prmt.b32 pm, xs, $4, {pmsel};
lop3.b32 hb, hb, pm, 0x80808080, 0xD2;
prmt.b32 e, lb, hb, {se};
mul.rn.bf16x2 {oe}, e, {sa};
prmt.b32 e, lb, hb, {so};
mul.rn.bf16x2 {oo}, e, {sa};"""


def _nibble_asm() -> str:
    """PTX for 4 code bytes ($4) and their 4 signed bf16 scales ($5, $6) -> bf16 values of the low nibbles ($0, $1)
    and of the high nibbles ($2, $3), element by element: level (Gauss table where the scale is positive, uniform
    where negative; layout.py) times |scale|. A level is looked up by byte permutes (``prmt``) in the 8 positive
    levels' bf16 bytes, by its magnitude index, with the sign set after.

    All 8 nibbles at once: the magnitude index of code u is u - 8 where u >= 8, else 7 - u (the tables are
    symmetric), i.e. u's low 3 bits flipped where its bit 3 is clear (one ``lop3`` against a per-nibble 7/0 mask),
    so the word itself, with bit 3 of every nibble cleared, is two ``prmt`` selectors: bits 0..15 give the levels of
    (low, high nibble of byte 0, low, high of byte 1), bits 16..31 those of bytes 2 and 3. The sign (code < 8) is
    a byte mask by ``prmt``'s sign-replicating mode; the high bytes of the levels are looked up once where both
    tables share them."""
    from vllm_kvc.layout import UNIFORM_LEVELS
    g0, g1, g2, g3 = _byte_planes(GAUSS_LEVELS[4])
    u0, u1, u2, u3 = _byte_planes(UNIFORM_LEVELS[4])
    same_hi = (g2, g3) == (u2, u3)

    def half(sel: str, msk: str, pmsel: str, oe: str, oo: str, sa: str) -> str:
        hi = (f"prmt.b32 hb, {g2}, {g3}, {sel};" if same_hi else
              f"prmt.b32 hb, {g2}, {g3}, {sel};\nprmt.b32 hb2, {u2}, {u3}, {sel};\nlop3.b32 hb, hb, hb2, {msk}, 0xD8;")
        return f"""
prmt.b32 lb, {g0}, {g1}, {sel};
prmt.b32 lb2, {u0}, {u1}, {sel};
lop3.b32 lb, lb, lb2, {msk}, 0xD8;
{hi}""" + _nibble_signed_out(pmsel, oe, oo, sa)

    return ("{\n.reg .b32 b, t, m, sb, xs, lb, lb2, hb, hb2, pm, ma, mb, sa01, sa23, e;" + _NIBBLE_INDEX +
            "\nand.b32 sa01, $5, 0x7FFF7FFF;\nand.b32 sa23, $6, 0x7FFF7FFF;"
            "\nprmt.b32 ma, $5, $6, 0xBB99;\nprmt.b32 mb, $5, $6, 0xFFDD;"
            + half("m", "ma", "0xD9C8", "$0", "$2", "sa01") + half("sb", "mb", "0xFBEA", "$1", "$3", "sa23") + "\n}")


NIBBLE_ASM = tl.constexpr(_nibble_asm())


@triton.jit
def nibble_lut(x, s):
    """(low-nibble values, high-nibble values) of code bytes ``x`` (uint8) under signed bf16 scales ``s`` (same
    shape), as bf16: :func:`_nibble_asm` (sm_90: packed bf16 multiplies), 4 bytes per instance."""
    return tl.inline_asm_elementwise(NIBBLE_ASM, "=r,=r,=r,=r,r,r,r", [x, s], dtype=(tl.bfloat16, tl.bfloat16),
                                     is_pure=True, pack=4)


def _signed(word: str) -> int:
    """A 32-bit PTX hex word as a signed int32 (what Triton's int32 constants hold)."""
    v = int(word, 16)
    return v - (1 << 32) if v >= 1 << 31 else v


def _nibble_asm_group(by_byte: bool = False) -> str | None:
    """:func:`_nibble_asm` for 4 code bytes of which bytes 0, 1 share one scale and bytes 2, 3 share one (each pair
    from one scale group of one token), the table chosen before the call: $4 the 4 code bytes; per byte (pack=4
    operands) $5..$8 and $9..$12 the low bytes of the 8 positive levels of its scale's table (Gauss where the
    scale is positive, uniform where negative; selected once per scale group, see :func:`load_nibbles_grouped`),
    $13, $14 the bf16 |scale| of bytes 0, 1 and of bytes 2, 3; bytes 0 and 2 give the table and scale of their
    pair. Outputs as :func:`_nibble_asm`'s. The high bytes of the levels are immediates, shared by both tables
    (None where they are not: no such decoder). 22 PTX instructions per 8 values instead of 30, and the table
    words come in registers (no per-use moves). Pairs, not quadruples: where Triton runs the decode in the wgmma
    operand layout, a thread's 4 consecutive bytes are 2 of one token, then 2 of a token 8 rows on.

    ``by_byte``: each output register holds the (low, high) nibble values of one byte (bytes 0, 2, 1, 3 in $0 ..
    $3), the pairs a tensor-core operand takes where a byte's two values are consecutive in its k dimension (the
    explicit kernel's keys): no re-pairing after. As elements of the two pack=4 outputs: the first holds (low,
    high) of bytes 0 and 2, the second of bytes 1 and 3."""
    g2, g3 = _byte_planes(GAUSS_LEVELS[4])[2:]
    if (g2, g3) != _byte_planes(UNIFORM_LEVELS[4])[2:]:
        return None

    def half(sel: str, pmsel: str, oe: str, oo: str, t0: str, t1: str, sa: str) -> str:
        return f"""
prmt.b32 lb, {t0}, {t1}, {sel};
prmt.b32 hb, {g2}, {g3}, {sel};""" + _nibble_signed_out(pmsel, oe, oo, sa, by_byte)

    return ("{\n.reg .b32 b, t, m, sb, xs, lb, hb, pm, e;" + _NIBBLE_INDEX
            + half("m", "0xD9C8", "$0", "$2", "$5", "$9", "$13") + half("sb", "0xFBEA", "$1", "$3", "$7", "$11", "$14")
            + "\n}")


_GW = _byte_planes(GAUSS_LEVELS[4])
_UW = _byte_planes(UNIFORM_LEVELS[4])
NIBBLE_ASM_GROUP = tl.constexpr(_nibble_asm_group() or "")
NIBBLE_ASM_BYTES = tl.constexpr(_nibble_asm_group(by_byte=True) or "")
GROUP_ASM_OK = _nibble_asm_group() is not None  # (host side: whether load_nibbles_grouped can run on GPUs)
G_LO0, G_LO1, U_LO0, U_LO1 = (tl.constexpr(_signed(w)) for w in (_GW[0], _GW[1], _UW[0], _UW[1]))


@triton.jit
def nibble_lut_group(x, t0, t1, sa):
    """(low-nibble values, high-nibble values) of code bytes ``x`` (uint8) whose pairs of consecutive elements
    (in a thread's registers) share a scale: ``t0`` / ``t1`` the low-byte words of the scale's table (int32),
    ``sa`` its |scale| (bf16), all of x's shape (broadcast): :func:`_nibble_asm_group`, 4 bytes per instance."""
    return tl.inline_asm_elementwise(NIBBLE_ASM_GROUP, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r", [x, t0, t1, sa],
                                     dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def group_perm(kk):
    """Byte (within the head group's 64 code bytes) whose nibbles sit in column ``kk`` of the tiles of
    :func:`load_nibbles_grouped`: column 16 c + 8 h + 2 a + e holds byte 16 a + 4 c + 2 h + e."""
    return ((kk // 2) % 4) * 16 + (kk // 16) * 4 + ((kk // 8) % 2) * 2 + kk % 2


@triton.jit
def load_nibbles_grouped(cache_ptr, row_off, t_ok, byte0, s, NVAL: tl.constexpr, MASKED: tl.constexpr,
                         BLOCK_T: tl.constexpr, OUT: tl.constexpr, LUT_ASM: tl.constexpr, OVERREAD: tl.constexpr):
    """:func:`load_nibbles` for one head group of 128 4-bit values (64 bytes from ``byte0``) with one scale per
    32 values, as (even, odd) ``[BLOCK_T, 64]`` tiles whose columns are in :func:`group_perm`'s order (the caller
    gathers the other dot operand in the same order): the A operand of a wgmma gives each thread columns
    16 c + 8 h + 2 a + e (c, h, e varying), which are here the 16 consecutive bytes 16 a .. 16 a + 15 of a token,
    one scale group: one 16-byte shared load per token instead of eight 2-byte ones (4-way bank conflicts, and
    byte packing after), one scale per thread and token, and the table picked once per scale group
    (:func:`nibble_lut_group`). ``s [BLOCK_T, 4]``: the 4 scales (:func:`part_scales`). Values from byte NVAL / 2
    on are 0 (OVERREAD: read, then zeroed)."""
    a = tl.arange(0, 4)
    w = tl.arange(0, 16)
    byte = a[:, None] * 16 + w[None, :]  # [4, 16]
    ok = 2 * byte < NVAL
    ptr = cache_ptr + row_off[:, None, None] + (byte0 + byte)[None, :, :]
    if MASKED:
        if NVAL >= 128 or OVERREAD:
            x = tl.load(ptr, mask=t_ok[:, None, None], other=0)
        else:
            x = tl.load(ptr, mask=t_ok[:, None, None] & ok[None, :, :], other=0)
    elif NVAL >= 128 or OVERREAD:
        x = tl.load(ptr)
    else:
        x = tl.load(ptr, mask=ok[None, :, :], other=0)
    if LUT_ASM:
        neg = s < 0
        t0 = tl.broadcast_to(tl.where(neg, U_LO0, G_LO0)[:, :, None], [BLOCK_T, 4, 16])
        t1 = tl.broadcast_to(tl.where(neg, U_LO1, G_LO1)[:, :, None], [BLOCK_T, 4, 16])
        sa = tl.broadcast_to(tl.abs(s).to(tl.bfloat16)[:, :, None], [BLOCK_T, 4, 16])
        ve, vo = nibble_lut_group(x, t0, t1, sa)
    else:
        ve, vo = _poly_nibbles(x.to(tl.int32), s)
    if NVAL < 128:
        ve = tl.where(ok[None, :, :], ve, 0.0)
        vo = tl.where(ok[None, :, :], vo, 0.0)
    # [t, a, w = 4 c + 2 h + e] -> column 16 c + 8 h + 2 a + e
    ve = tl.reshape(tl.permute(tl.reshape(ve.to(OUT), [BLOCK_T, 4, 4, 2, 2]), (0, 2, 3, 1, 4)), [BLOCK_T, 64])
    vo = tl.reshape(tl.permute(tl.reshape(vo.to(OUT), [BLOCK_T, 4, 4, 2, 2]), (0, 2, 3, 1, 4)), [BLOCK_T, 64])
    return ve, vo


@triton.jit
def load_nibbles(cache_ptr, row_off, t_ok, g0, VSTRIDE: tl.constexpr, s0, sstride,
                 NH: tl.constexpr, RP: tl.constexpr, NVAL: tl.constexpr,
                 OFF: tl.constexpr, QG: tl.constexpr, SOFF: tl.constexpr,
                 SCALE16: tl.constexpr, MASKED: tl.constexpr, BLOCK_T: tl.constexpr, OUT: tl.constexpr,
                 LUT_ASM: tl.constexpr = False, OVERREAD: tl.constexpr = False, JOIN: tl.constexpr = False,
                 s_in=None):
    """A tile of 4-bit latents of one K or V part whose head groups start on whole bytes, as two fp32 tiles
    ``(even, odd) [BLOCK_T, NH * RP // 2]`` of dtype OUT: column ``h * RP // 2 + j`` of ``even`` holds value ``2 j`` of head
    group ``g0 + h`` (the low nibble of its byte), ``odd`` value ``2 j + 1`` (the high nibble);
    0 beyond NVAL (head group ``g0 + h`` holds ``VSTRIDE`` values of the part). The caller multiplies them with the even and odd rows of the factor (two dots instead of one):
    bytes are loaded as contiguous tiles and nothing is interleaved. Scales as in :func:`load_dequant`: number
    ``s0 + h * sstride + value // QG``; the level is Gauss (:func:`gauss_poly4`) where the fp16 scale is positive,
    uniform ``x / 7.5`` where negative, times ``|scale|`` (folded into the polynomial's coefficients per scale).
    LUT_ASM (GPUs, sm_90): the exact table levels by byte permutes instead (:func:`nibble_lut`; bf16 math, the
    values come back as bf16). OVERREAD: the padding columns (NVAL < RP) may read the bytes after the part (still
    inside the row): the loads stay unmasked vectors, and those columns are zeroed after decoding.
    JOIN: one tile ``[BLOCK_T, NH * RP]`` instead, the two nibbles of a byte 8 columns apart (:func:`nibble_value`
    gives each column's value): a value sum over it fills 64-row dots without decoding bytes twice.
    s_in: the tile's scales as :func:`part_scales` gives them (None: loaded here)."""
    SG: tl.constexpr = RP if (QG == 0 or QG >= RP) else QG  # values per scale within the tile
    SGH: tl.constexpr = SG // 2
    NSC: tl.constexpr = RP // SG
    NS: tl.constexpr = NH * NSC
    FULL: tl.constexpr = NVAL >= RP
    k = tl.arange(0, NS)
    hh = k // NSC
    sj = k % NSC
    jj = tl.arange(0, SGH)
    j = sj[:, None] * SGH + jj[None, :]  # [NS, SGH] pair index within the head group
    ok = 2 * j < NVAL
    # bytes of head group g0 + hh: OFF + (g0 + hh) * VSTRIDE / 2 (whole bytes; constant multiples, so Triton sees
    # 16-byte aligned runs and loads them as vectors)
    byte = OFF + (g0 + hh[:, None]) * (VSTRIDE // 2) + j
    ptr = cache_ptr + row_off[:, None, None] + byte[None, :, :]
    if MASKED:
        if FULL or OVERREAD:
            x = tl.load(ptr, mask=t_ok[:, None, None], other=0)
        else:
            x = tl.load(ptr, mask=t_ok[:, None, None] & ok[None, :, :], other=0)
    elif FULL or OVERREAD:
        x = tl.load(ptr)
    else:
        x = tl.load(ptr, mask=ok[None, :, :], other=0)
    xi = x.to(tl.int32)
    if s_in is None:  # [BLOCK_T, NS]
        s = part_scales(cache_ptr, row_off, t_ok, s0, sstride, NH, RP, NVAL, QG, SOFF, SCALE16)
    else:  # loaded by the caller (one tile ahead)
        s = s_in
    NC2: tl.constexpr = NH * (RP // 2)
    if LUT_ASM:
        sb = tl.broadcast_to(s.to(tl.bfloat16)[:, :, None], [BLOCK_T, NS, SGH])
        ve, vo = nibble_lut(x, sb)
    else:
        ve, vo = _poly_nibbles(xi, s)
    if not FULL:
        ve = tl.where(ok[None, :, :], ve, 0.0)
        vo = tl.where(ok[None, :, :], vo, 0.0)
    if JOIN:  # [.., pair j, nibble p] -> column (j // 8) * 16 + p * 8 + j % 8 of the head group (nibble_value)
        w = tl.reshape(tl.join(ve.to(OUT), vo.to(OUT)), [BLOCK_T, NC2 // 8, 8, 2])
        res = tl.reshape(tl.permute(w, (0, 1, 3, 2)), [BLOCK_T, 2 * NC2])
    else:
        res = (tl.reshape(ve.to(OUT), [BLOCK_T, NC2]), tl.reshape(vo.to(OUT), [BLOCK_T, NC2]))
    return res


@triton.jit
def nibble_value(c):
    """The value (within its head group) in column ``c`` (within the head group) of a joined nibble tile
    (:func:`load_nibbles` with JOIN): column (j // 8) * 16 + p * 8 + j % 8 holds value 2 j + p."""
    return 2 * ((c // 16) * 8 + c % 8) + (c // 8) % 2


@triton.jit
def _poly_nibbles(xi, s):
    """:func:`load_nibbles` without inline assembly: levels by :func:`nibble_levels` (fp32)."""
    a = tl.abs(s)
    gauss = s > 0
    c1 = tl.where(gauss, a * G4_1, a * (1.0 / 7.5))[:, :, None]
    c3 = tl.where(gauss, a * G4_3, 0.0)[:, :, None]
    c5 = tl.where(gauss, a * G4_5, 0.0)[:, :, None]
    c7 = tl.where(gauss, a * G4_7, 0.0)[:, :, None]
    c9 = tl.where(gauss, a * G4_9, 0.0)[:, :, None]
    return nibble_levels((xi << 1) & 30, c1, c3, c5, c7, c9), nibble_levels((xi >> 3) & 30, c1, c3, c5, c7, c9)
