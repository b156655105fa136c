"""Triton helpers shared by the kernels: finding a program's request, addressing KV tiles through the block
table, loading latent tiles and int8 scales, and RoPE on the rebuilt keys.

A KV tile is BLOCK_T consecutive cached tokens of one request (``t0`` a multiple of BLOCK_T). The tile loop of
each kernel runs in two phases: the full tiles without masks, then the partial last tile (:func:`phase_tiles`).
Block ids are loaded one tile ahead (their latency leaves the critical path); where each block holds whole tiles
(block size a multiple of BLOCK_T, e.g. the latent backend's 64-token blocks on GPUs) a tile has one block id.
"""
from __future__ import annotations

import triton
import triton.language as tl


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
def load_dequant(cache_ptr, row_off, t_ok, lut_ptr, v0, vstride, s0, sstride,
                 NH: tl.constexpr, RP: tl.constexpr, NVAL: tl.constexpr,
                 OFF: tl.constexpr, BITS: tl.constexpr, QG: tl.constexpr, SOFF: tl.constexpr, LUT: tl.constexpr,
                 SCALE16: tl.constexpr, MASKED: tl.constexpr, BLOCK_T: tl.constexpr):
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
    # scales [BLOCK_T, NS]
    sc = tl.arange(0, NS)
    sj = sc % NSC
    sidx = s0 + (sc // NSC) * sstride + sj
    s_ok = t_ok[:, None] & (sj * SG < NVAL)[None, :]
    s = load_scales(cache_ptr, row_off, sidx, s_ok, SOFF, SCALE16)
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
