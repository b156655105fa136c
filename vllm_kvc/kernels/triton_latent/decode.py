"""The multi-head decode kernel (one query per program, group size 1, float or packed integer latents) and its
launcher.

Several KV heads per program fill the 16 rows of the score dots (instead of padding each head's query heads to
16). ``B_k`` comes in blocks of 8 RoPE pairs (:func:`~.tiles.split_pairs`), so the rebuilt keys split into their
RoPE halves without shuffles, and the rotated halves join back into the query's order for one score dot.
What this kernel does, each measured best on an H100 (benchmarks/RESULTS.md, GPU kernels, rounds 2-5):
the softmax denominators are summed per token and reduced once after the loop; RoPE either reads the cos / sin
table once per tile for all heads of the program, or (``tile_rotation``) turns the keys by their offset in the
tile and the queries back by the tile's start, with cos / sin computed in the kernel; packed bf16x2 RoPE math on
GPUs; ``lazy_max``: the first tile's max as the softmax reference, plus an exact pass for flagged programs
launched as a programmatic dependent launch (sm_90+).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .config import device_props, interpreting, level_tables, next_pow2, pick_heads, quant_kwargs, row_format
from .prefill import LOG2E, launch_reduce, needs_off64, prepare_io, split_partials
from .tiles import (GROUP_ASM_OK, cos_sin_of, find_request, group_perm, join_pairs, load_cos_sin, load_dequant,
                    load_nibbles, load_nibbles_grouped, load_tile, nibble_value, part_scales, phase_tiles,
                    rope_bf16x2, row_offsets, split_pairs, tile_blocks, tile_rows)

try:  # programmatic dependent launch (triton >= 3.4)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAS_GDC = True
except ImportError:  # pragma: no cover
    _HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


@triton.jit(do_not_specialize=["num_reqs", "num_splits"])
def _latent_decode_heads(
    q_ptr, stride_qt, stride_qh,
    cache_ptr, stride_cb, stride_cs,
    bt_ptr, stride_bt,
    seq_lens_ptr, qsl_ptr, num_reqs,
    bk_ptr, bias1_ptr, bias2_ptr,
    cos_ptr, sin_ptr, stride_cos, invf_ptr,
    bv_ptr, biasv_ptr,
    out_ptr, stride_ot, stride_oh,
    pm_ptr, pl_ptr, pacc_ptr,
    qk_scale, num_splits, flag_ptr, lut_ptr,
    G: tl.constexpr, QPK: tl.constexpr, HD: tl.constexpr,
    RK: tl.constexpr, RK_P: tl.constexpr, RV: tl.constexpr, RV_P: tl.constexpr,
    NKV: tl.constexpr, M_P: tl.constexpr, BS: tl.constexpr, BLOCK_T: tl.constexpr,
    SPLIT: tl.constexpr, DCH: tl.constexpr, HAS_BK: tl.constexpr, HAS_BV: tl.constexpr,
    DIRECT: tl.constexpr, OFF64: tl.constexpr, PACKED: tl.constexpr, TILE_ROT: tl.constexpr,
    LAZY: tl.constexpr, PDL: tl.constexpr,
    QUANT: tl.constexpr, SCALE16: tl.constexpr,
    K_OFF: tl.constexpr, K_BITS: tl.constexpr, K_QG: tl.constexpr, K_SOFF: tl.constexpr, K_SPG: tl.constexpr,
    K_LUT: tl.constexpr,
    V_OFF: tl.constexpr, V_BITS: tl.constexpr, V_QG: tl.constexpr, V_SOFF: tl.constexpr, V_SPG: tl.constexpr,
    V_LUT: tl.constexpr, K_SPLIT: tl.constexpr, V_SPLIT: tl.constexpr, K_OVER: tl.constexpr, V_OVER: tl.constexpr,
    ROPED: tl.constexpr = False, AHEAD: tl.constexpr = False, KGRP: tl.constexpr = False,
):
    """Single-query attention (decode) at group size 1 for NKV KV heads per program.

    The NKV * QPK query heads of the program fill the rows of the score tile ``s [BLOCK_T, M_P]``: each KV head's
    rebuilt, RoPE'd keys are scored against all M_P query rows with one dot, and ``tl.where`` keeps the columns
    of that head's own query heads. The cos/sin rows and the block ids of a tile are read once for the NKV
    heads; the value latents of the NKV heads (contiguous in the row) are one ``[BLOCK_T, NKV * RV_P]`` load, and
    ``acc [NKV * RV_P, M_P] += c_v^T p`` accumulates all (head, row) pairs, of which the epilogue keeps the
    diagonal blocks (a masked ``u @ B_v`` over the stacked B_v of the NKV heads). DIRECT: program pid serves
    request pid, whose single query is token pid; otherwise program pid serves query token pid (one query per
    program: varlen batches of decode-like requests), causal over keys <= its position.

    PACKED: cos / sin in bf16 and packed bf16x2 rotation (GPU, bf16). TILE_ROT: RoPE as R(t0 + i) = R(t0) R(i).
    LAZY: 0 running max; 1 the first tile's max as the reference, flagging programs that could overflow; 2 the
    exact pass (running max) of the flagged programs only.
    QUANT: packed integer latents (config.row_format: K_* / V_* describe each part), dequantized in registers
    per tile (:func:`~.tiles.load_dequant`) before the same dots as float latents. K_SPLIT / V_SPLIT: that part
    is 4-bit with byte-aligned head groups: :func:`~.tiles.load_nibbles` gives its even and odd values as two
    tiles, each multiplied with the matching rows of B_k (two dots into the same keys); for V both nibbles of a
    byte go into one tile, 8 columns apart (JOIN; ``acc`` rows in that order, B_v's rows picked to match in the
    epilogue and in the split-KV partials), so the value sum is one dot with 64 or more rows.

    ROPED (roped keys, see reference.latent_attention): q holds each head's latent query ``[.., Hq, RK]`` and the
    scores are the dequantized K latent tile dotted with it: no B_k, no RoPE, no cos / sin (TILE_ROT must be off).
    K_SPLIT then dots the even / odd nibble tiles with the even / odd entries of the latent query.

    AHEAD (QUANT, NKV == 1): the fp16 scales of the full tiles are loaded one tile ahead (from the block ids that
    are already read ahead) and carried through the loop: the scale loads left the tile's dependency chain
    (round 5: they were ~20% of the stall samples of the roped int4 kernel, waiting on global memory each tile).
    KGRP (ROPED, K_SPLIT, RK_P 128, 32 values per scale): the K nibble tiles come from
    :func:`~.tiles.load_nibbles_grouped` (16 consecutive bytes, one scale group, per thread and token; the latent
    query's entries gathered in the same column order, :func:`~.tiles.group_perm`).
    """
    HALF: tl.constexpr = HD // 2
    NV: tl.constexpr = NKV * RV_P
    NVA: tl.constexpr = NKV * RV_P  # accumulator rows
    DT = bk_ptr.dtype.element_ty

    pid = tl.program_id(0)
    g0 = tl.program_id(1) * NKV
    sp = tl.program_id(2)
    fid = (pid * tl.num_programs(1) + tl.program_id(1)) * num_splits + sp
    if LAZY == 2:  # the exact pass runs only the programs whose lazy pass flagged an overflow risk
        if PDL:  # launched while the lazy pass still runs (programmatic dependent launch): wait for its flags
            gdc_wait()
        if tl.load(flag_ptr + fid) == 0:
            return
    if (LAZY == 1) and PDL:  # the exact pass may be launched now (it waits for this grid before reading)
        gdc_launch_dependents()
    if DIRECT:
        r = pid
        seq_len = tl.load(seq_lens_ptr + r)
        kv_end = seq_len
    else:  # the request of token pid: largest r with qsl[r] <= pid
        r = find_request(qsl_ptr, num_reqs, pid)
        seq_len = tl.load(seq_lens_ptr + r)
        kv_end = seq_len - tl.load(qsl_ptr + r + 1) + pid + 1  # causal: keys up to the query's position
    tok = pid
    n_tiles = tl.cdiv(kv_end, BLOCK_T)
    per_split = tl.cdiv(n_tiles, num_splits)
    t_begin = sp * per_split * BLOCK_T
    t_stop = tl.minimum(kv_end, t_begin + per_split * BLOCK_T)
    t_mid = t_begin + (tl.maximum(t_stop - t_begin, 0) // BLOCK_T) * BLOCK_T  # full tiles: no masks

    rows = tl.arange(0, M_P)
    hrow = rows // QPK  # KV head (within the program) of each query row
    row_ok = rows < NKV * QPK
    head = g0 * QPK + rows
    q_row = q_ptr + tok.to(tl.int64) * stride_qt + head.to(tl.int64) * stride_qh
    dp = tl.arange(0, HALF)
    dc = tl.arange(0, HD)
    cr = tl.arange(0, RK_P)
    cr2 = tl.arange(0, RK_P // 2)
    cvv = tl.arange(0, NV)
    cva = tl.arange(0, NVA)
    tt = tl.arange(0, BLOCK_T)
    bt_row = bt_ptr + r.to(tl.int64) * stride_bt
    v_col = G * RK + (g0 + cvv // RV_P) * RV + cvv % RV_P  # value latents of the NKV heads
    v_ok = (cvv % RV_P) < RV

    # q in B_k's block order (x1 of 8 pairs, x2 of the same 8 pairs, ...): one score dot per head
    qd = (dc // 16) * 8 + dc % 8 + (dc % 16 >= 8).to(tl.int32) * HALF
    if ROPED:  # latent queries [RK_P, M_P] (K_SPLIT: their even and odd entries, [RK_P / 2, M_P] each)
        if KGRP:  # the even / odd entries in the grouped tiles' column order
            pk = group_perm(cr2)
            q_e = tl.trans(tl.load(q_row[:, None] + 2 * pk[None, :], mask=row_ok[:, None] & (2 * pk < RK)[None, :],
                                   other=0.0).to(DT))
            q_o = tl.trans(tl.load(q_row[:, None] + 2 * pk[None, :] + 1,
                                   mask=row_ok[:, None] & (2 * pk + 1 < RK)[None, :], other=0.0).to(DT))
        elif K_SPLIT:
            q_e = tl.trans(tl.load(q_row[:, None] + 2 * cr2[None, :], mask=row_ok[:, None] & (2 * cr2 < RK)[None, :],
                                   other=0.0).to(DT))
            q_o = tl.trans(tl.load(q_row[:, None] + 2 * cr2[None, :] + 1,
                                   mask=row_ok[:, None] & (2 * cr2 + 1 < RK)[None, :], other=0.0).to(DT))
        else:
            q_t = tl.trans(tl.load(q_row[:, None] + cr[None, :], mask=row_ok[:, None] & (cr < RK)[None, :],
                                   other=0.0).to(DT))
    elif TILE_ROT:  # keys turn by their offset i in the tile (cos / sin computed once), the queries by -t0 once per
        # tile (q . R(t0) R(i) k = (R(-t0) q) . (R(i) k)); each query element's pair partner, signed: the rotated
        # query is q * cos + q_partner * sin elementwise
        cos_k, sin_k = cos_sin_of(tt.to(tl.float32)[:, None] * tl.load(invf_ptr + dp)[None, :], PACKED)
        qdp = tl.where(qd >= HALF, qd - HALF, qd + HALF)
        q_own = tl.load(q_row[:, None] + qd[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        q_par = tl.load(q_row[:, None] + qdp[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        q_par = tl.where((qd >= HALF)[None, :], -q_par, q_par)
        invf_q = tl.load(invf_ptr + (qd % HALF)[None, :] + 0 * rows[:, None])  # (2-D: no layout conversions)
    else:
        q_t = tl.trans(tl.load(q_row[:, None] + qd[None, :], mask=row_ok[:, None], other=0.0).to(DT))

    m_i = tl.full([M_P], -1.0e30, tl.float32)
    l_t = tl.zeros([BLOCK_T, M_P], tl.float32)  # per-token partial sums, reduced once after the loop
    acc = tl.zeros([NVA, M_P], tl.float32)

    t_all = tt < BLOCK_T
    for phase in tl.static_range(2):
        lo_t, hi_t, blk_nxt = phase_tiles(phase, t_begin, t_mid, t_stop, bt_row, tt, BS, BLOCK_T)
        if AHEAD and phase == 0:  # scales of the first full tile (block 0's rows if there is none: never used)
            row_n = row_offsets(blk_nxt, lo_t, tt, stride_cb, stride_cs, OFF64, BS, BLOCK_T)
            sk_n = part_scales(cache_ptr, row_n, t_all, g0 * K_SPG, K_SPG, 1, RK_P, RK, K_QG, K_SOFF, SCALE16)
            sv_n = part_scales(cache_ptr, row_n, t_all, g0 * V_SPG, V_SPG, NKV, RV_P, RV, V_QG, V_SOFF, SCALE16)
        for t0 in range(lo_t, hi_t, BLOCK_T):
            t = t0 + tt
            blk = blk_nxt
            blk_nxt = tile_blocks(bt_row, t0 + BLOCK_T, tt, hi_t, BS, BLOCK_T)
            t_ok, row_off = tile_rows(blk, t0, tt, t_stop, stride_cb, stride_cs, phase == 1, OFF64, BS, BLOCK_T)
            sk = None
            sv = None
            if AHEAD and phase == 0:  # this tile's scales, loaded a tile ago; the next tile's now
                sk = sk_n
                sv = sv_n
                row_n = row_offsets(blk_nxt, t0 + BLOCK_T, tt, stride_cb, stride_cs, OFF64, BS, BLOCK_T)
                sk_n = part_scales(cache_ptr, row_n, t_all, g0 * K_SPG, K_SPG, 1, RK_P, RK, K_QG, K_SOFF, SCALE16)
                sv_n = part_scales(cache_ptr, row_n, t_all, g0 * V_SPG, V_SPG, NKV, RV_P, RV, V_QG, V_SOFF,
                                   SCALE16)
            if (not TILE_ROT) and (not ROPED):  # cos / sin of the tile's positions, shared by the NKV heads
                cos_k, sin_k = load_cos_sin(cos_ptr, sin_ptr, t[:, None] * stride_cos + dp[None, :], t_ok,
                                            phase == 1, not PACKED)
            s = tl.zeros([BLOCK_T, M_P], tl.float32)
            for h in tl.static_range(NKV):
                if KGRP:
                    if not (AHEAD and phase == 0):
                        sk = part_scales(cache_ptr, row_off, t_ok, (g0 + h) * K_SPG, K_SPG, 1, RK_P, RK, K_QG, K_SOFF,
                                         SCALE16)
                    ke, ko = load_nibbles_grouped(cache_ptr, row_off, t_ok, K_OFF + (g0 + h) * (RK // 2), sk, RK,
                                                  phase == 1, BLOCK_T, DT, PACKED, K_OVER)
                    sc = tl.dot(ko, q_o, tl.dot(ke, q_e))
                elif K_SPLIT:
                    ke, ko = load_nibbles(cache_ptr, row_off, t_ok, g0 + h, RK, (g0 + h) * K_SPG, K_SPG, 1,
                                          RK_P, RK, K_OFF, K_QG, K_SOFF, SCALE16, phase == 1, BLOCK_T, DT,
                                          PACKED, K_OVER, s_in=sk)
                    if ROPED:
                        sc = tl.dot(ko, q_o, tl.dot(ke, q_e))
                    else:
                        b_e = tl.load(bk_ptr + ((g0 + h) * RK + 2 * cr2[:, None]) * HD + dc[None, :],
                                      mask=(2 * cr2 < RK)[:, None], other=0.0)
                        b_o = tl.load(bk_ptr + ((g0 + h) * RK + 2 * cr2[:, None] + 1) * HD + dc[None, :],
                                      mask=(2 * cr2 + 1 < RK)[:, None], other=0.0)
                        kk = tl.dot(ko, b_o, tl.dot(ke, b_e))
                elif QUANT:
                    ck = load_dequant(cache_ptr, row_off, t_ok, lut_ptr, (g0 + h) * RK, RK, (g0 + h) * K_SPG, K_SPG,
                                      1, RK_P, RK, K_OFF, K_BITS, K_QG, K_SOFF, K_LUT, SCALE16, phase == 1,
                                      BLOCK_T, s_in=sk).to(DT)
                else:
                    ck = load_tile(cache_ptr + row_off[:, None] + (g0 + h) * RK + cr[None, :], t_ok, cr < RK,
                                   (phase == 1) or (RK != RK_P), False).to(DT)
                if ROPED:  # the latent tile scored as it is: no B_k, no RoPE
                    if not K_SPLIT:
                        sc = tl.dot(ck, q_t)
                    s = tl.where((hrow == h)[None, :], sc, s)
                else:
                    if not K_SPLIT:
                        bi = tl.load(bk_ptr + ((g0 + h) * RK + cr[:, None]) * HD + dc[None, :],
                                     mask=(cr < RK)[:, None], other=0.0)
                        kk = tl.dot(ck, bi)
                    k1, k2 = split_pairs(kk, BLOCK_T, HALF)
                    if HAS_BK:
                        k1 += tl.load(bias1_ptr + (g0 + h) * HALF + dp)[None, :]
                        k2 += tl.load(bias2_ptr + (g0 + h) * HALF + dp)[None, :]
                    if TILE_ROT:
                        if h == 0:  # this tile's queries, turned back by the tile's first position. Computed after the
                            # first rebuild: Triton 3.6 fences the shared-memory copy right before the dot, and the
                            # barrier that must follow that fence is only inserted when no earlier barrier (the
                            # rebuild's) sits between the copy and the dot. (t0 * 1.0: fp32, and a plain int in the
                            # interpreter)
                            c0, s0 = cos_sin_of((t0 * 1.0) * invf_q, PACKED, True)
                            q_t = tl.trans((q_own * c0 + q_par * s0).to(DT))
                    if PACKED:  # packed bf16x2 math (cos / sin stay bf16)
                        r1, r2 = rope_bf16x2(k1.to(DT), k2.to(DT), cos_k, sin_k)
                    else:
                        r1 = (k1 * cos_k - k2 * sin_k).to(DT)
                        r2 = (k2 * cos_k + k1 * sin_k).to(DT)
                    s = tl.where((hrow == h)[None, :], tl.dot(join_pairs(r1, r2, BLOCK_T, HALF), q_t), s)

            if V_SPLIT:
                vv = load_nibbles(cache_ptr, row_off, t_ok, g0, RV, g0 * V_SPG, V_SPG, NKV, RV_P, RV,
                                  V_OFF, V_QG, V_SOFF, SCALE16, phase == 1, BLOCK_T, DT, PACKED,
                                  V_OVER, True, s_in=sv)
            elif QUANT:
                vv = load_dequant(cache_ptr, row_off, t_ok, lut_ptr, g0 * RV, RV, g0 * V_SPG, V_SPG, NKV, RV_P, RV,
                                  V_OFF, V_BITS, V_QG, V_SOFF, V_LUT, SCALE16, phase == 1, BLOCK_T,
                                  s_in=sv).to(DT)
            else:
                vv = load_tile(cache_ptr + row_off[:, None] + v_col[None, :], t_ok, v_ok,
                               (phase == 1) or (RV_P != RV), False).to(DT)
            if phase == 1:
                s = tl.where(t_ok[:, None], s, float("-inf"))
            if LAZY == 1:
                # The softmax reference is the first tile's max: no cross-warp max on later tiles, and no
                # rescaling at all (the sums are still zero when the reference is set), so the P.c_v products
                # accumulate straight into acc.
                if t0 == t_begin:
                    m_i = tl.max(s, 0) * qk_scale
                p = tl.exp2(s * qk_scale - m_i[None, :])
                l_t += p
            else:
                m_new = tl.maximum(m_i, tl.max(s, 0) * qk_scale)
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s * qk_scale - m_new[None, :])
                l_t = l_t * alpha[None, :] + p
                acc = acc * alpha[None, :]
                m_i = m_new
            acc = tl.dot(tl.trans(vv), p.to(DT), acc)

    l_i = tl.sum(l_t, 0)
    if LAZY == 1:  # a weight above 2^64 could have overflowed (each weight <= its row's sum): flag the program
        tl.store(flag_ptr + fid, (tl.max(l_i, 0) > 1.8446744e19).to(tl.int32))  # for the exact pass
    # acc rows: head cva // RV_P, value cva % RV_P (V_SPLIT: the joined nibble tile's order, nibble_value)
    vh = cva // RV_P
    if V_SPLIT:
        vi = nibble_value(cva % RV_P)
    else:
        vi = cva % RV_P
    diag = (vh[None, :] == hrow[:, None]) & row_ok[:, None]  # row i's own values: its KV head's columns
    if SPLIT:
        base = (tok.to(tl.int64) * (G * QPK) + head) * num_splits + sp
        tl.store(pm_ptr + base, m_i, mask=row_ok)
        tl.store(pl_ptr + base, l_i, mask=row_ok)
        tl.store(pacc_ptr + base[:, None] * RV_P + vi[None, :], tl.trans(acc), mask=diag)
    else:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        u = tl.where(diag, tl.trans(acc) / l_safe[:, None], 0.0).to(DT)
        dd = tl.arange(0, DCH)
        out_row = out_ptr + tok.to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
        bv_row = bv_ptr + ((g0 + vh) * RV + vi) * HD
        for dch in tl.static_range(HD // DCH):
            bvt = tl.load(bv_row[:, None] + dch * DCH + dd[None, :], mask=(vi < RV)[:, None], other=0.0)
            o = tl.dot(u, bvt)
            if HAS_BV:
                o += tl.load(biasv_ptr + (g0 + hrow)[:, None] * HD + dch * DCH + dd[None, :],
                             mask=row_ok[:, None], other=0.0)
            tl.store(out_row[:, None] + dch * DCH + dd[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None])


# ------------------------------------------------------------------------------------------------ host side
def packed_rope_ok(f, tile_rotation: bool, roped: bool = False) -> bool:
    """The packed bf16 RoPE (inline PTX) needs bf16 operands, a GPU (the interpreter cannot run inline assembly)
    and bf16 cos / sin (the table's, or computed: tile rotation). Roped keys (no RoPE in the kernel): the flag
    only selects the bf16 inline-PTX 4-bit decoding, which needs bf16 operands and a GPU."""
    if roped:
        return not interpreting() and f.dtype == torch.bfloat16
    return (not interpreting() and f.dtype == torch.bfloat16
            and (tile_rotation or f.cos.dtype == torch.bfloat16))


def nibble_split(layout, rk_p: int, rv_p: int) -> tuple[bool, bool]:
    """Which parts the decode kernel reads as even / odd 4-bit tiles (:func:`~.tiles.load_nibbles`): 4-bit parts
    of packed layouts whose head groups start on whole bytes, with at least 16 columns per half tile (a dot's
    minimum inner size)."""
    if not layout.quantized or layout.is_int8:
        return False, False
    k, v = row_format(layout)
    return (k.bits == 4 and k.aligned and rk_p >= 32), (v.bits == 4 and v.aligned and rv_p >= 32)


def nibble_overread(layout, rk_p: int, rv_p: int) -> tuple[bool, bool]:
    """Whether the padding columns of each 4-bit part's tile (rank < its power of two) can be read from the row's
    bytes after the part (its last head group's tile ends inside the row), so the loads need no column mask."""
    if not layout.quantized or layout.is_int8:
        return False, False
    k, v = row_format(layout)
    g = layout.groups
    return (k.off + (g - 1) * layout.rank_k // 2 + rk_p // 2 <= layout.row_bytes,
            v.off + (g - 1) * layout.rank_v // 2 + rv_p // 2 <= layout.row_bytes)


def _pdl_ok(device: torch.device) -> bool:
    """Programmatic dependent launch (the lazy_max exact pass starts while the lazy pass finishes): sm_90+."""
    return _HAS_GDC and device.type == "cuda" and not interpreting() and device_props(device).major >= 9


def launch_decode(q, kv_cache, f, block_table, seq_lens, qsl, direct: bool, scale: float, out, cfg,
                  tile_rotation: bool, roped: bool = False):
    """Launch :func:`_latent_decode_heads` (one query per program, ``cfg.heads`` KV heads; gs == 1, float
    latents) with the resolved config ``cfg``, and the reduce for split-KV.

    ``cfg.lazy_max``: two launches. The first takes each program's first-tile max as its softmax reference (no
    per-tile max reduction, and no rescaling: the P.c_v products accumulate straight into acc) and flags the
    programs where a weight could exceed 2^64 (a softmax row sum above it); the second runs only the flagged
    programs again with the running max (the others return at once). On sm_90+ the second is a programmatic
    dependent launch: it starts while the first finishes and waits for it in the kernel (``gdc_wait``).
    Compiling for too few resources retries with fewer stages, then fewer heads per program.
    ``roped``: roped keys (``q`` holds the latent queries ``[n, Hq, rank_k]``; no B_k, RoPE or cos / sin)."""
    layout = f.layout
    n_tok, hq = q.shape[:2]
    hd = layout.head_dim
    G = layout.groups
    qpk = hq // layout.num_kv_heads
    nkv = pick_heads(layout, cfg.heads)
    q, out = prepare_io(q, kv_cache, f, out, roped)
    if n_tok == 0:
        return out
    rk_p = max(16, next_pow2(layout.rank_k))
    rv_p = max(16, next_pow2(layout.rank_v))
    num_splits, num_stages = cfg.num_splits, cfg.num_stages
    if roped:  # no key factors, no RoPE: B_v stands in for the unused pointers (and gives the operand dtype)
        tile_rotation = False
        dummy = bk = f.bv
        cos = sin = f.bv
        stride_cos = 0
    else:
        dummy, bk = f.bk, f.bk_blk
        cos, sin, stride_cos = f.cos, f.sin, f.cos.stride(0)
    pm, pl, pacc = split_partials(q, num_splits, rv_p, dummy)
    packed = packed_rope_ok(f, tile_rotation, roped)
    pdl = cfg.lazy_max and _pdl_ok(q.device)
    qkw = quant_kwargs(layout, kv_cache)
    lut = level_tables(q.device) if qkw["QUANT"] else dummy
    k_split, v_split = nibble_split(layout, rk_p, rv_p)
    k_over, v_over = nibble_overread(layout, rk_p, rv_p)
    # scales one tile ahead: measured on the roped kernels (round 5); the pre-RoPE kernels keep their measured code
    ahead = qkw["QUANT"] and (cfg.scale_ahead if cfg.scale_ahead is not None else roped)
    kgrp = (roped and k_split and rk_p == 128 and layout.quant_group == 32 and GROUP_ASM_OK
            and (cfg.k_grouped if cfg.k_grouped is not None else True))
    while True:
        try:
            flags = torch.empty(n_tok * (G // nkv) * num_splits, dtype=torch.int32, device=q.device) \
                if cfg.lazy_max else dummy
            dch = hd
            while nkv * rv_p * dch > 128 * 128 and dch > 16:
                dch //= 2
            for lazy in (1, 2) if cfg.lazy_max else (0,):
                _latent_decode_heads[(n_tok, G // nkv, num_splits)](
                    q, q.stride(0), q.stride(1),
                    kv_cache, kv_cache.stride(0), kv_cache.stride(1),
                    block_table, block_table.stride(0),
                    seq_lens, qsl, seq_lens.shape[0],
                    bk, f.bias1 if f.bias1 is not None and not roped else dummy,
                    f.bias2 if f.bias2 is not None and not roped else dummy,
                    cos, sin, stride_cos, f.inv_freq if tile_rotation else dummy,
                    f.bv, f.bias_v if f.bias_v is not None else dummy,
                    out, out.stride(0), out.stride(1),
                    pm, pl, pacc,
                    float(scale) * LOG2E, num_splits, flags, lut,
                    G=G, QPK=qpk, HD=hd, RK=layout.rank_k, RK_P=rk_p, RV=layout.rank_v, RV_P=rv_p, NKV=nkv,
                    M_P=max(16, next_pow2(nkv * qpk)), BS=kv_cache.shape[1], BLOCK_T=cfg.block_t,
                    SPLIT=num_splits > 1, DCH=dch, HAS_BK=f.bias1 is not None and not roped,
                    HAS_BV=f.bias_v is not None,
                    DIRECT=direct, OFF64=needs_off64(kv_cache), PACKED=packed, TILE_ROT=tile_rotation, LAZY=lazy,
                    PDL=pdl, launch_pdl=pdl and lazy == 2, num_warps=cfg.num_warps, num_stages=num_stages, **qkw,
                    K_SPLIT=k_split, V_SPLIT=v_split, K_OVER=k_over, V_OVER=v_over,
                    **({"ROPED": True} if roped else {}),
                    **({"AHEAD": True} if ahead and nkv == 1 else {}),
                    **({"KGRP": True} if kgrp else {}),
                    **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
                )
            break
        except OutOfResources:  # raised when compiling, before anything runs
            if num_stages > 2:
                num_stages -= 1
            elif nkv > 1:
                nkv //= 2
            else:
                raise
    if num_splits > 1:
        launch_reduce(pm, pl, pacc, f, out, num_splits, 1, qpk, dummy)
    return out
