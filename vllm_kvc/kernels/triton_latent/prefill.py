"""The generic kernel (any group size, float or integer latents, prefill, chunked prefill and decode) and the
split-KV reduce, with their launchers.

One program serves (a tile of BLOCK_Q queries, one head group, one KV split). For each tile of BLOCK_T cached
tokens it loads the group's key latents ``c_k [BLOCK_T, rank_k]`` once (through the block table), rebuilds the
keys of the group's KV heads with one tensor-core dot against ``B_k``, adds ``bias_k``, applies RoPE at the
cached positions and scores them against all query heads of the group, so that latent bytes are read once per
group. Values stay latent: the program accumulates ``c_v^T p`` with an online softmax (exp2) and ``B_v`` (and
``bias_v``) is applied once to the normalised weighted sum, in the epilogue or, with split-KV (flash decoding),
in :func:`_latent_reduce`. Scores are ``[BLOCK_T, rows]`` (the rebuilt keys are the register A operand).

int8 latents (layout.py's original int8 layout): values are read as int8, cast exactly to the compute dtype for
the tensor cores, and the per-token fp16 scales multiply the rebuilt keys (rows) and the softmax weights before
``c_v^T p``; the scales of the next tile are loaded one tile ahead, like the block ids. Every other integer
layout (int4, int2, mixed K/V widths, per-32-value scales; ``QUANT``) is dequantized in registers per tile
(:func:`~.tiles.load_dequant`) and then takes the float path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .config import level_tables, next_pow2, quant_kwargs, segment_pieces, segment_runs
from .tiles import (find_request, load_dequant, load_piece, load_scale, load_tile, phase_tiles, row_offsets,
                    tile_blocks, tile_rows)

LOG2E = 1.4426950408889634
RANK_CHUNK = 128  # key latents per rebuild dot (larger ranks take several)


@triton.jit
def _bv_epilogue(u, g, tok, head, kvj, row_ok, bv_ptr, biasv_ptr, out_ptr, stride_ot, stride_oh,
                 GS: tl.constexpr, HD: tl.constexpr, RV: tl.constexpr, RV_P: tl.constexpr,
                 DCH: tl.constexpr, HAS_BV: tl.constexpr, SINK: tl.constexpr = False, w0=None, v0_base=None):
    """out[tok, head, :] = u @ B_v[g, :, kv head slice] (+ bias_v); u [M_P, RV_P] in the factor dtype.
    SINK: plus ``w0 [M_P]`` (each row's softmax weight of the exact first token) times (v0 - bias_v), v0 the exact
    value of the row's KV head at ``v0_base + j * HD`` (KV head j of the group): the bias joins B_v once per unit of
    latent weight, so the sink's share of it is replaced by its own value."""
    cv = tl.arange(0, RV_P)
    dd = tl.arange(0, DCH)
    out_row = out_ptr + tok.to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
    for j in tl.static_range(GS):
        ok = row_ok & (kvj == j)
        for dc in tl.static_range(HD // DCH):
            bvt = tl.load(bv_ptr + (g * RV + cv[:, None]) * (GS * HD) + (j * HD + dc * DCH) + dd[None, :],
                          mask=(cv < RV)[:, None], other=0.0)
            o = tl.dot(u, bvt)
            if HAS_BV:
                bvb = tl.load(biasv_ptr + (g * GS + j) * HD + dc * DCH + dd)
                o += bvb[None, :]
            if SINK:
                v0 = tl.load(v0_base + j * HD + dc * DCH + dd).to(tl.float32)
                if HAS_BV:
                    v0 = v0 - bvb
                o += w0[:, None] * v0[None, :]
            tl.store(out_row[:, None] + dc * DCH + dd[None, :], o.to(out_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def seg_bk(bk_ptr, row0, col0, HD: tl.constexpr, NCOL: tl.constexpr, C0: tl.constexpr, W: tl.constexpr,
           BITS: tl.constexpr, BYTE0: tl.constexpr, GBYTES: tl.constexpr, SIDX: tl.constexpr, P: tl.constexpr):
    """The rows of B_k that a key piece (the last 7 arguments, ``*piece`` of ``config.segment_pieces``) multiplies:
    ``[P, NCOL]``, rows ``row0 + C0 + i`` (0 from i = W on), columns ``col0 ..`` of the head dim."""
    i = tl.arange(0, P)
    cc = tl.arange(0, NCOL)
    return tl.load(bk_ptr + (row0 + C0 + i[:, None]) * HD + col0 + cc[None, :], mask=(i < W)[:, None], other=0.0)


@triton.jit
def seg_acc(M_P: tl.constexpr, C0: tl.constexpr, W: tl.constexpr, BITS: tl.constexpr, BYTE0: tl.constexpr,
            GBYTES: tl.constexpr, SIDX: tl.constexpr, P: tl.constexpr):
    """A value piece's accumulator ``[P, M_P]`` (zeros; the piece: ``*piece``)."""
    return tl.zeros([P, M_P], tl.float32)


@triton.jit
def seg_store(pacc_ptr, base, row_ok, sa, RV_P: tl.constexpr, C0: tl.constexpr, W: tl.constexpr,
              BITS: tl.constexpr, BYTE0: tl.constexpr, GBYTES: tl.constexpr, SIDX: tl.constexpr, P: tl.constexpr):
    """A value piece's accumulator ``[P, rows]`` into its columns ``C0 ..`` of the split partials (the piece:
    ``*piece``)."""
    i = tl.arange(0, P)
    tl.store(pacc_ptr + base[:, None] * RV_P + C0 + i[None, :], tl.trans(sa), mask=row_ok[:, None] & (i < W)[None, :])


@triton.jit(do_not_specialize=["num_reqs", "num_splits"])
def _latent_attn_fwd(
    q_ptr, stride_qt, stride_qh,
    cache_ptr, stride_cb, stride_cs,
    bt_ptr, stride_bt,
    seq_lens_ptr, qsl_ptr, tile_start_ptr, num_reqs,
    bk_ptr, bias1_ptr, bias2_ptr,
    cos_ptr, sin_ptr, stride_cos,
    bv_ptr, biasv_ptr,
    out_ptr, stride_ot, stride_oh,
    pm_ptr, pl_ptr, pacc_ptr,
    qk_scale, num_splits, lut_ptr, sink_on_ptr,
    G: tl.constexpr, GS: tl.constexpr, QPK: tl.constexpr, HD: tl.constexpr,
    RK: tl.constexpr, RV: tl.constexpr, RCH: tl.constexpr, RV_P: tl.constexpr, WIDTH: tl.constexpr,
    BS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr, M_P: tl.constexpr,
    SPLIT: tl.constexpr, DCH: tl.constexpr,
    INT8: tl.constexpr, HAS_BK: tl.constexpr, HAS_BV: tl.constexpr, DIRECT: tl.constexpr,
    OFF64: tl.constexpr, NH: tl.constexpr,
    QUANT: tl.constexpr, SCALE16: tl.constexpr,
    K_OFF: tl.constexpr, K_BITS: tl.constexpr, K_QG: tl.constexpr, K_SOFF: tl.constexpr, K_SPG: tl.constexpr,
    K_LUT: tl.constexpr,
    V_OFF: tl.constexpr, V_BITS: tl.constexpr, V_QG: tl.constexpr, V_SOFF: tl.constexpr, V_SPG: tl.constexpr,
    V_LUT: tl.constexpr, ROPED: tl.constexpr = False, SEG: tl.constexpr = False, SEGK: tl.constexpr = None,
    SEGV: tl.constexpr = None, SINK: tl.constexpr = False, SEG_RUNS: tl.constexpr = False,
):
    """One program: (query tile, head group, KV split). Keys are rebuilt per KV tile by a dot in interleaved
    column order (x1_0, x2_0, x1_1, ...): ``bk_ptr`` holds B_k as [G, gs, rank_k, hd] in that order, so RoPE's
    pairs sit side by side in the accumulator and a reshape/split separates them without data movement; the
    scores are q1.r1 + q2.r2 (two dots; q is read as its x1 and x2 halves). NH = 2 rebuilds the columns in two
    pieces (fewer live registers, more dots). DIRECT: program pid serves request pid, whose single query is
    token pid; otherwise program pid serves query tile pid of the varlen batch (``tile_start``: each request's
    first tile).

    ROPED (roped keys, see reference.latent_attention): q holds each head's latent query ``[.., Hq, RK]``; the
    group's K latent tile (dequantized; int8: its per-token scales multiply the scores' rows) is dotted with the
    latent queries of all rows of the group, in rank chunks of RCH: no B_k, no RoPE, no cos / sin (NH ignored).

    SEG (with QUANT and SPLIT; pre-RoPE keys): transform-coded rows described by ``config.segment_pieces`` (SEGK,
    SEGV: 4 piece slots per part, unused ones of width 0; SEG_RUNS: how 4 / 2-bit codes are loaded). Each K piece is
    one tile (:func:`~.tiles.load_piece`)
    dotted with its rows of B_k; each V piece has its own accumulator, written to its columns of the split
    partials (the reduce applies B_v).
    SINK: the request's position 0 is left out of the tiles where ``sink_on_ptr[r]`` is set; its exact key and
    value join in :func:`_latent_reduce` like one more KV split (the launcher always writes split partials then)."""
    HALF: tl.constexpr = HD // 2
    HG: tl.constexpr = GS * QPK
    NRC: tl.constexpr = (RK + RCH - 1) // RCH
    HOIST_B: tl.constexpr = (GS == 1) & (NRC == 1)
    DT = bk_ptr.dtype.element_ty

    pid = tl.program_id(0)
    g = tl.program_id(1)
    sp = tl.program_id(2)
    if DIRECT:
        r = pid
        q_start = pid
        q_end = pid + 1
        tile = 0
    else:  # the request whose q tiles contain tile pid (largest r with tile_start[r] <= pid)
        total = tl.load(tile_start_ptr + num_reqs)
        if pid >= total:
            return
        r = find_request(tile_start_ptr, num_reqs, pid)
        tile = pid - tl.load(tile_start_ptr + r)
        q_start = tl.load(qsl_ptr + r)
        q_end = tl.load(qsl_ptr + r + 1)
    seq_len = tl.load(seq_lens_ptr + r)
    q0 = q_start + tile * BLOCK_Q
    nq = tl.minimum(q_end - q0, BLOCK_Q)
    if nq <= 0:
        return
    pos0 = seq_len - (q_end - q_start) + (q0 - q_start)  # position of the tile's first query
    kv_end = pos0 + nq  # causal: keys < kv_end
    n_tiles = tl.cdiv(kv_end, BLOCK_T)
    per_split = tl.cdiv(n_tiles, num_splits)
    t_begin = sp * per_split * BLOCK_T
    t_stop = tl.minimum(kv_end, t_begin + per_split * BLOCK_T)
    # tiles wholly below t_stop and below every query's position need no masks
    t_mid = tl.maximum(t_begin, t_begin + ((tl.minimum(t_stop, pos0 + 1) - t_begin) // BLOCK_T) * BLOCK_T)

    rows = tl.arange(0, M_P)
    qi = rows // HG
    hh = rows % HG
    kvj = hh // QPK
    row_ok = (rows < BLOCK_Q * HG) & (qi < nq)
    row_pos = pos0 + qi
    tok = q0 + qi
    head = g * HG + hh
    q_row = q_ptr + tok.to(tl.int64) * stride_qt + head.to(tl.int64) * stride_qh
    PW: tl.constexpr = HALF // NH  # RoPE pairs per piece (the rebuild runs in NH column pieces)
    dp = tl.arange(0, PW)
    dc = tl.arange(0, 2 * PW)
    cr = tl.arange(0, RCH)
    cv = tl.arange(0, RV_P)
    tt = tl.arange(0, BLOCK_T)
    bt_row = bt_ptr + r.to(tl.int64) * stride_bt
    if SINK:
        sink_on = tl.load(sink_on_ptr + r) != 0

    # loop invariants (named per piece: Triton has no lists of tensors)
    if ROPED:
        if NRC == 1:  # the latent queries of every row [RCH, M_P]
            qk_t = tl.trans(tl.load(q_row[:, None] + cr[None, :], mask=row_ok[:, None] & (cr < RK)[None, :],
                                    other=0.0).to(DT))
    elif GS == 1:
        q1t_a = tl.trans(tl.load(q_row[:, None] + dp[None, :], mask=row_ok[:, None], other=0.0).to(DT))
        q2t_a = tl.trans(tl.load(q_row[:, None] + HALF + dp[None, :], mask=row_ok[:, None], other=0.0).to(DT))
        if NH == 2:
            q1t_b = tl.trans(tl.load(q_row[:, None] + PW + dp[None, :], mask=row_ok[:, None], other=0.0).to(DT))
            q2t_b = tl.trans(tl.load(q_row[:, None] + HALF + PW + dp[None, :], mask=row_ok[:, None],
                                     other=0.0).to(DT))
    HOIST_SEG: tl.constexpr = SEG and (GS == 1) and (NH == 1)
    if HOIST_SEG:  # the B_k rows of each key piece, loaded once
        bs0 = seg_bk(bk_ptr, g * RK, 0, HD, 2 * PW, *SEGK[0])
        if SEGK[1][1] > 0:
            bs1 = seg_bk(bk_ptr, g * RK, 0, HD, 2 * PW, *SEGK[1])
        if SEGK[2][1] > 0:
            bs2 = seg_bk(bk_ptr, g * RK, 0, HD, 2 * PW, *SEGK[2])
        if SEGK[3][1] > 0:
            bs3 = seg_bk(bk_ptr, g * RK, 0, HD, 2 * PW, *SEGK[3])
    elif HOIST_B and not ROPED:
        bmask = (cr < RK)[:, None]
        bih_a = tl.load(bk_ptr + (g * RK + cr[:, None]) * HD + dc[None, :], mask=bmask, other=0.0)
        if NH == 2:
            bih_b = tl.load(bk_ptr + (g * RK + cr[:, None]) * HD + 2 * PW + dc[None, :], mask=bmask, other=0.0)

    m_i = tl.full([M_P], -1.0e30, tl.float32)
    l_i = tl.zeros([M_P], tl.float32)
    acc = tl.zeros([RV_P, M_P], tl.float32)
    if SEG:  # one accumulator per value piece
        sa0 = seg_acc(M_P, *SEGV[0])
        sa1 = seg_acc(M_P, *SEGV[1])
        sa2 = seg_acc(M_P, *SEGV[2])
        sa3 = seg_acc(M_P, *SEGV[3])

    for phase in tl.static_range(2):
        # block ids (and int8 scales) one tile ahead: their load latency leaves the critical path
        lo_t, hi_t, blk_nxt = phase_tiles(phase, t_begin, t_mid, t_stop, bt_row, tt, BS, BLOCK_T)
        if INT8:
            ro_nxt = row_offsets(blk_nxt, lo_t, tt, stride_cb, stride_cs, True, BS, BLOCK_T)
            sk_nxt = load_scale(cache_ptr, ro_nxt, g, lo_t + tt < hi_t, WIDTH)
            sv_nxt = load_scale(cache_ptr, ro_nxt, G + g, lo_t + tt < hi_t, WIDTH)
        for t0 in range(lo_t, hi_t, BLOCK_T):
            t = t0 + tt
            blk = blk_nxt
            blk_nxt = tile_blocks(bt_row, t0 + BLOCK_T, tt, hi_t, BS, BLOCK_T)
            if INT8:
                sk = sk_nxt
                sv = sv_nxt
                ro_nxt = row_offsets(blk_nxt, t0 + BLOCK_T, tt, stride_cb, stride_cs, True, BS, BLOCK_T)
                sk_nxt = load_scale(cache_ptr, ro_nxt, g, t + BLOCK_T < hi_t, WIDTH)
                sv_nxt = load_scale(cache_ptr, ro_nxt, G + g, t + BLOCK_T < hi_t, WIDTH)
            t_ok, row_off = tile_rows(blk, t0, tt, t_stop, stride_cb, stride_cs, phase == 1, OFF64, BS, BLOCK_T)
            if SEG:  # the key latents of this tile, piece by piece, shared by all heads of the group
                ks0 = load_piece(cache_ptr, row_off, t_ok, g, K_SOFF, SCALE16, phase == 1, BLOCK_T, SEG_RUNS,
                                     *SEGK[0]).to(DT)
                if SEGK[1][1] > 0:
                    ks1 = load_piece(cache_ptr, row_off, t_ok, g, K_SOFF, SCALE16, phase == 1, BLOCK_T, SEG_RUNS,
                                     *SEGK[1]).to(DT)
                if SEGK[2][1] > 0:
                    ks2 = load_piece(cache_ptr, row_off, t_ok, g, K_SOFF, SCALE16, phase == 1, BLOCK_T, SEG_RUNS,
                                     *SEGK[2]).to(DT)
                if SEGK[3][1] > 0:
                    ks3 = load_piece(cache_ptr, row_off, t_ok, g, K_SOFF, SCALE16, phase == 1, BLOCK_T, SEG_RUNS,
                                     *SEGK[3]).to(DT)
            elif NRC == 1:  # the key latents of this tile, shared by all pieces and heads of the group
                if QUANT:
                    ck1 = load_dequant(cache_ptr, row_off, t_ok, lut_ptr, g * RK, RK, g * K_SPG, K_SPG, 1, RCH, RK,
                                       K_OFF, K_BITS, K_QG, K_SOFF, K_LUT, SCALE16, phase == 1,
                                       BLOCK_T).to(DT)
                else:
                    ck1 = load_tile(cache_ptr + row_off[:, None] + g * RK + cr[None, :], t_ok, cr < RK,
                                    (phase == 1) or (RK != RCH), INT8).to(DT)

            s = tl.zeros([BLOCK_T, M_P], tl.float32)
            if ROPED:  # scores straight from the key latents, rank chunk by rank chunk
                for c in tl.static_range(NRC):
                    if NRC == 1:
                        s = tl.dot(ck1, qk_t, s)
                    else:
                        if QUANT:
                            ck = load_dequant(cache_ptr, row_off, t_ok, lut_ptr, g * RK + c * RCH, RK,
                                              g * K_SPG + (0 if K_QG == 0 else (c * RCH) // K_QG), K_SPG, 1, RCH,
                                              (RK - c * RCH) if (RK - c * RCH) < RCH else RCH, K_OFF, K_BITS,
                                              K_QG, K_SOFF, K_LUT, SCALE16, True, BLOCK_T).to(DT)
                        else:
                            ck = load_tile(cache_ptr + row_off[:, None] + (g * RK + c * RCH) + cr[None, :], t_ok,
                                           (c * RCH + cr) < RK, True, INT8).to(DT)
                        qc = tl.trans(tl.load(q_row[:, None] + c * RCH + cr[None, :],
                                              mask=row_ok[:, None] & ((c * RCH + cr) < RK)[None, :],
                                              other=0.0).to(DT))
                        s = tl.dot(ck, qc, s)
                if INT8:
                    s = s * sk[:, None]
            else:
                for j in tl.static_range(GS):
                    for hp in tl.static_range(NH):
                        # rebuild columns [hp * 2PW, (hp + 1) * 2PW) of kv head j: RoPE pairs hp*PW .. (hp+1)*PW - 1
                        kk = tl.zeros([BLOCK_T, 2 * PW], tl.float32)
                        if HOIST_SEG:
                            kk = tl.dot(ks0, bs0, kk)
                            if SEGK[1][1] > 0:
                                kk = tl.dot(ks1, bs1, kk)
                            if SEGK[2][1] > 0:
                                kk = tl.dot(ks2, bs2, kk)
                            if SEGK[3][1] > 0:
                                kk = tl.dot(ks3, bs3, kk)
                        elif SEG:
                            kk = tl.dot(ks0, seg_bk(bk_ptr, (g * GS + j) * RK, hp * 2 * PW, HD, 2 * PW,
                                                        *SEGK[0]), kk)
                            if SEGK[1][1] > 0:
                                kk = tl.dot(ks1, seg_bk(bk_ptr, (g * GS + j) * RK, hp * 2 * PW, HD, 2 * PW,
                                                        *SEGK[1]),
                                            kk)
                            if SEGK[2][1] > 0:
                                kk = tl.dot(ks2, seg_bk(bk_ptr, (g * GS + j) * RK, hp * 2 * PW, HD, 2 * PW,
                                                        *SEGK[2]),
                                            kk)
                            if SEGK[3][1] > 0:
                                kk = tl.dot(ks3, seg_bk(bk_ptr, (g * GS + j) * RK, hp * 2 * PW, HD, 2 * PW,
                                                        *SEGK[3]),
                                            kk)
                        for c in tl.static_range(0 if SEG else NRC):
                            if NRC == 1:
                                ck = ck1
                            elif QUANT:  # chunk c: values c*RCH .. of the group (scales from that value on)
                                ck = load_dequant(cache_ptr, row_off, t_ok, lut_ptr, g * RK + c * RCH, RK,
                                                  g * K_SPG + (0 if K_QG == 0 else (c * RCH) // K_QG), K_SPG, 1, RCH,
                                                  (RK - c * RCH) if (RK - c * RCH) < RCH else RCH, K_OFF, K_BITS,
                                                  K_QG, K_SOFF, K_LUT, SCALE16, True, BLOCK_T).to(DT)
                            else:
                                ck = load_tile(cache_ptr + row_off[:, None] + (g * RK + c * RCH) + cr[None, :], t_ok,
                                               (c * RCH + cr) < RK, True, INT8).to(DT)
                            if HOIST_B:
                                if hp == 0:
                                    bi = bih_a
                                else:
                                    bi = bih_b
                            else:
                                bi = tl.load(bk_ptr + ((g * GS + j) * RK + c * RCH + cr[:, None]) * HD + hp * 2 * PW
                                             + dc[None, :], mask=((c * RCH + cr) < RK)[:, None], other=0.0)
                            kk = tl.dot(ck, bi, kk)
                        if INT8:
                            kk = kk * sk[:, None]
                        k1, k2 = tl.split(tl.reshape(kk, [BLOCK_T, PW, 2]))
                        if HAS_BK:
                            k1 += tl.load(bias1_ptr + (g * GS + j) * HALF + hp * PW + dp)[None, :]
                            k2 += tl.load(bias2_ptr + (g * GS + j) * HALF + hp * PW + dp)[None, :]
                        cptrs = t[:, None] * stride_cos + hp * PW + dp[None, :]
                        if phase == 1:
                            cosv = tl.load(cos_ptr + cptrs, mask=t_ok[:, None], other=0.0).to(tl.float32)
                            sinv = tl.load(sin_ptr + cptrs, mask=t_ok[:, None], other=0.0).to(tl.float32)
                        else:
                            cosv = tl.load(cos_ptr + cptrs).to(tl.float32)
                            sinv = tl.load(sin_ptr + cptrs).to(tl.float32)
                        r1 = (k1 * cosv - k2 * sinv).to(DT)
                        r2 = (k2 * cosv + k1 * sinv).to(DT)
                        if GS == 1:
                            if hp == 0:
                                q1t = q1t_a
                                q2t = q2t_a
                            else:
                                q1t = q1t_b
                                q2t = q2t_b
                        else:
                            qm = (row_ok & (kvj == j))[:, None]
                            q1 = tl.load(q_row[:, None] + hp * PW + dp[None, :], mask=qm, other=0.0).to(tl.float32)
                            q2 = tl.load(q_row[:, None] + HALF + hp * PW + dp[None, :], mask=qm, other=0.0).to(tl.float32)
                            q1t = tl.trans(q1.to(DT))
                            q2t = tl.trans(q2.to(DT))
                        s = tl.dot(r1, q1t, s)
                        s = tl.dot(r2, q2t, s)

            s = s * qk_scale
            if SEG:  # the value latents, piece by piece
                vs0 = load_piece(cache_ptr, row_off, t_ok, g, V_SOFF, SCALE16, phase == 1, BLOCK_T, SEG_RUNS,
                                     *SEGV[0]).to(DT)
                if SEGV[1][1] > 0:
                    vs1 = load_piece(cache_ptr, row_off, t_ok, g, V_SOFF, SCALE16, phase == 1, BLOCK_T, SEG_RUNS,
                                     *SEGV[1]).to(DT)
                if SEGV[2][1] > 0:
                    vs2 = load_piece(cache_ptr, row_off, t_ok, g, V_SOFF, SCALE16, phase == 1, BLOCK_T, SEG_RUNS,
                                     *SEGV[2]).to(DT)
                if SEGV[3][1] > 0:
                    vs3 = load_piece(cache_ptr, row_off, t_ok, g, V_SOFF, SCALE16, phase == 1, BLOCK_T, SEG_RUNS,
                                     *SEGV[3]).to(DT)
            elif QUANT:
                vv = load_dequant(cache_ptr, row_off, t_ok, lut_ptr, g * RV, RV, g * V_SPG, V_SPG, 1, RV_P, RV,
                                  V_OFF, V_BITS, V_QG, V_SOFF, V_LUT, SCALE16, phase == 1, BLOCK_T).to(DT)
            else:
                vv = load_tile(cache_ptr + row_off[:, None] + (G * RK + g * RV) + cv[None, :], t_ok, cv < RV,
                               (phase == 1) or (RV_P != RV), INT8).to(DT)
            if phase == 1:
                valid = row_ok[None, :] & (t[:, None] <= row_pos[None, :]) & t_ok[:, None]
                s = tl.where(valid, s, float("-inf"))
            if SINK:  # the exact first token joins in the reduce
                s = tl.where(((t == 0) & sink_on)[:, None], float("-inf"), s)
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[None, :])
            l_i = l_i * alpha + tl.sum(p, 0)
            if INT8:
                p = p * sv[:, None]
            if SEG:
                pd = p.to(DT)
                sa0 = tl.dot(tl.trans(vs0), pd, sa0 * alpha[None, :])
                if SEGV[1][1] > 0:
                    sa1 = tl.dot(tl.trans(vs1), pd, sa1 * alpha[None, :])
                if SEGV[2][1] > 0:
                    sa2 = tl.dot(tl.trans(vs2), pd, sa2 * alpha[None, :])
                if SEGV[3][1] > 0:
                    sa3 = tl.dot(tl.trans(vs3), pd, sa3 * alpha[None, :])
            else:
                acc = acc * alpha[None, :]
                acc = tl.dot(tl.trans(vv), p.to(DT), acc)
            m_i = m_new

    acc = tl.trans(acc)
    if SPLIT:
        base = (tok.to(tl.int64) * (G * HG) + head) * num_splits + sp
        tl.store(pm_ptr + base, m_i, mask=row_ok)
        tl.store(pl_ptr + base, l_i, mask=row_ok)
        if SEG:  # each value piece into its columns
            seg_store(pacc_ptr, base, row_ok, sa0, RV_P, *SEGV[0])
            if SEGV[1][1] > 0:
                seg_store(pacc_ptr, base, row_ok, sa1, RV_P, *SEGV[1])
            if SEGV[2][1] > 0:
                seg_store(pacc_ptr, base, row_ok, sa2, RV_P, *SEGV[2])
            if SEGV[3][1] > 0:
                seg_store(pacc_ptr, base, row_ok, sa3, RV_P, *SEGV[3])
        else:
            tl.store(pacc_ptr + base[:, None] * RV_P + cv[None, :], acc, mask=row_ok[:, None])
    else:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        u = (acc / l_safe[:, None]).to(DT)
        _bv_epilogue(u, g, tok, head, kvj, row_ok, bv_ptr, biasv_ptr, out_ptr, stride_ot, stride_oh,
                     GS, HD, RV, RV_P, DCH, HAS_BV)


@triton.jit(do_not_specialize=["num_splits", "num_reqs"])
def _latent_reduce(
    pm_ptr, pl_ptr, pacc_ptr, bv_ptr, biasv_ptr, out_ptr, stride_ot, stride_oh, num_splits,
    q_ptr, stride_qt, stride_qh, k0_ptr, v0_ptr, on_ptr, qsl_ptr, num_reqs, qk_scale,
    G: tl.constexpr, GS: tl.constexpr, QPK: tl.constexpr, HD: tl.constexpr,
    RV: tl.constexpr, RV_P: tl.constexpr, M_P: tl.constexpr, DCH: tl.constexpr,
    HAS_BV: tl.constexpr, SINK: tl.constexpr = False, DIRECT: tl.constexpr = False,
):
    """Combine the split-KV partials of one (token, group) and apply B_v once.

    SINK: the exact first token of the token's request (``on_ptr[r]`` set; r = the token if DIRECT, else found in
    ``qsl_ptr``) joins as one more split: its score ``q . k0`` (``k0_ptr [R, G * GS, HD]``, q in the factors'
    head-dim order; position 0 rotates by nothing) and weight enter the softmax, and its exact value
    (``v0_ptr [R, G * GS, HD]``) is added in the epilogue (:func:`_bv_epilogue`). Nothing is read on the host."""
    HG: tl.constexpr = GS * QPK
    tok = tl.program_id(0)
    g = tl.program_id(1)
    DT = bv_ptr.dtype.element_ty
    rows = tl.arange(0, M_P)
    row_ok = rows < HG
    kvj = rows // QPK
    head = g * HG + rows
    cv = tl.arange(0, RV_P)
    base = (tok.to(tl.int64) * (G * HG) + head) * num_splits
    m_max = tl.full([M_P], -1.0e30, tl.float32)
    for s in range(num_splits):
        m_max = tl.maximum(m_max, tl.load(pm_ptr + base + s, mask=row_ok, other=-1.0e30))
    if SINK:
        if DIRECT:
            r = tok
        else:
            r = find_request(qsl_ptr, num_reqs, tok)
        on = tl.load(on_ptr + r) != 0
        dd = tl.arange(0, HD)
        qv = tl.load(q_ptr + tok.to(tl.int64) * stride_qt + head.to(tl.int64)[:, None] * stride_qh + dd[None, :],
                     mask=row_ok[:, None], other=0.0).to(tl.float32)
        k0 = tl.load(k0_ptr + (r.to(tl.int64) * (G * GS) + g * GS + kvj)[:, None] * HD + dd[None, :],
                     mask=row_ok[:, None], other=0.0).to(tl.float32)
        s0 = tl.where(on & row_ok, tl.sum(qv * k0, 1) * qk_scale, float("-inf"))
        m_max = tl.maximum(m_max, s0)
    l_sum = tl.zeros([M_P], tl.float32)
    acc = tl.zeros([M_P, RV_P], tl.float32)
    for s in range(num_splits):
        w = tl.exp2(tl.load(pm_ptr + base + s, mask=row_ok, other=-1.0e30) - m_max)
        l_sum += w * tl.load(pl_ptr + base + s, mask=row_ok, other=0.0)
        acc += w[:, None] * tl.load(pacc_ptr + (base + s)[:, None] * RV_P + cv[None, :],
                                    mask=row_ok[:, None] & (cv < RV)[None, :], other=0.0)  # (seg: pieces end at RV)
    if SINK:
        p0 = tl.exp2(s0 - m_max)
        l_sum += p0
    l_sum = tl.where(l_sum > 0, l_sum, 1.0)
    u = (acc / l_sum[:, None]).to(DT)
    if SINK:
        _bv_epilogue(u, g, tok + rows * 0, head, kvj, row_ok, bv_ptr, biasv_ptr, out_ptr, stride_ot, stride_oh,
                     GS, HD, RV, RV_P, DCH, HAS_BV, True, p0 / l_sum, v0_ptr + (r.to(tl.int64) * G + g) * GS * HD)
    else:
        _bv_epilogue(u, g, tok + rows * 0, head, kvj, row_ok, bv_ptr, biasv_ptr, out_ptr, stride_ot, stride_oh,
                     GS, HD, RV, RV_P, DCH, HAS_BV)


# ------------------------------------------------------------------------------------------------ host side
def prepare_io(q, kv_cache, f, out, roped: bool = False):
    """q in the factors' head-dim order with unit last stride, and the output buffer (allocated if None).
    Roped keys: q holds latent queries (no head-dim order to follow); the output is ``[n, Hq, head_dim]``."""
    if f.perm is not None and not roped:
        q = q.index_select(-1, f.perm)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        shape = (q.shape[0], q.shape[1], f.layout.head_dim) if roped else q.shape
        out = torch.empty(shape, dtype=q.dtype, device=q.device)
    assert out.stride(-1) == 1
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache rows must be contiguous")
    return q, out


def split_partials(q, num_splits: int, rv_p: int, dummy, force: bool = False):
    """Split-KV partials (running max, denominator, latent accumulator per split), or placeholders (one split,
    unless ``force``: a sink joins in the reduce)."""
    if num_splits == 1 and not force:
        return dummy, dummy, dummy
    pm = torch.empty(q.shape[0], q.shape[1], num_splits, dtype=torch.float32, device=q.device)
    pacc = torch.empty(q.shape[0], q.shape[1], num_splits, rv_p, dtype=torch.float32, device=q.device)
    return pm, torch.empty_like(pm), pacc


def needs_off64(kv_cache) -> bool:
    """Whether cache offsets can exceed int32."""
    return kv_cache.shape[0] * kv_cache.stride(0) >= 2 ** 31


def launch_reduce(pm, pl, pacc, f, out, num_splits: int, gs: int, qpk: int, dummy, sink=None):
    """Combine the split-KV partials of every (token, group) and apply B_v (both kernels' partials). ``sink``:
    None or ``(q, k0, v0, on, qsl, direct, qk_scale)`` as :func:`_latent_reduce` reads them (the generic kernel's)."""
    layout = f.layout
    if sink is None:
        sq, k0, v0, on, qsl, direct, qks = out, dummy, dummy, dummy, dummy, False, 0.0
    else:
        sq, k0, v0, on, qsl, direct, qks = sink
    hd = out.shape[-1]
    rv_p = max(16, next_pow2(layout.rank_v))
    dch = hd
    while rv_p * dch > 128 * 128 and dch > 16:
        dch //= 2
    _latent_reduce[(out.shape[0], layout.groups)](
        pm, pl, pacc, f.bv, f.bias_v if f.bias_v is not None else dummy, out, out.stride(0), out.stride(1),
        num_splits, sq, sq.stride(0), sq.stride(1), k0, v0, on, qsl, qsl.shape[0] - 1, qks, G=layout.groups, GS=gs, QPK=qpk, HD=hd, RV=layout.rank_v, RV_P=rv_p,
        M_P=max(16, next_pow2(gs * qpk)), DCH=dch, HAS_BV=f.bias_v is not None, num_warps=4,
        **({"SINK": True, "DIRECT": bool(direct)} if sink is not None else {}),
    )


def launch_generic(q, kv_cache, f, block_table, seq_lens, qsl, tile_start, n_grid0: int, block_q: int,
                   direct: bool, scale: float, out, cfg, roped: bool = False, sink=None):
    """Launch :func:`_latent_attn_fwd` (and the reduce for split-KV) with the resolved config ``cfg``.
    ``roped``: roped keys (``q`` holds the latent queries ``[n, Hq, rank_k]``; no B_k, RoPE or cos / sin).
    ``sink``: None or ``(k0 [R, Hkv, hd], v0 [R, Hkv, hd], on [R])`` on the device (the exact first token of each
    request where ``on``; see reference.latent_attention): then the partials always go through the reduce, which
    merges it (no host synchronisation)."""
    layout = f.layout
    n_tok, hq = q.shape[:2]
    hd = layout.head_dim
    G, gs = layout.groups, layout.group_size
    if hq % layout.num_kv_heads:
        raise ValueError(f"{hq} query heads, {layout.num_kv_heads} KV heads")
    qpk = hq // layout.num_kv_heads
    q, out = prepare_io(q, kv_cache, f, out, roped)
    rk_p = max(16, next_pow2(layout.rank_k))
    rv_p = max(16, next_pow2(layout.rank_v))
    dch = hd
    while rv_p * dch > 128 * 128 and dch > 16:
        dch //= 2
    pieces = cfg.pieces if hd // 2 // cfg.pieces >= 16 else 1  # tl.dot needs K >= 16 (hd / 2 / pieces)
    if n_tok == 0:
        return out
    if roped:  # no key factors, no RoPE: B_v stands in for the unused pointers (and gives the operand dtype)
        dummy = bk = cos = sin = f.bv
        stride_cos, bias1, bias2, pieces = 0, None, None, 1
    else:
        dummy, bk, cos, sin, stride_cos, bias1, bias2 = f.bk, f.bk, f.cos, f.sin, f.cos.stride(0), f.bias1, f.bias2
    split = cfg.num_splits > 1 or sink is not None or layout.segmented  # seg: rows: B_v applied in the reduce
    pm, pl, pacc = split_partials(q, cfg.num_splits, rv_p, dummy, force=split)
    qkw = quant_kwargs(layout, kv_cache)
    lut = level_tables(q.device) if qkw["QUANT"] else dummy
    extra = {}
    if layout.segmented:
        segk, segv = segment_pieces(layout)
        extra = dict(SEG=True, SEGK=segk, SEGV=segv, SEG_RUNS=segment_runs(layout))
    on = dummy
    if sink is not None:
        k0, v0, on = sink
        if f.perm is not None:  # the exact keys in q's head-dim order
            k0 = k0.index_select(-1, f.perm)
        k0, v0 = k0.contiguous(), v0.contiguous()
        on = on.to(torch.int32)
        extra["SINK"] = True
    num_stages = cfg.num_stages
    while True:  # packed integer tiles need more shared memory: fewer stages where they do not fit
        try:
            _latent_attn_fwd[(n_grid0, G, cfg.num_splits)](
                q, q.stride(0), q.stride(1),
                kv_cache, kv_cache.stride(0), kv_cache.stride(1),
                block_table, block_table.stride(0),
                seq_lens, qsl, tile_start, seq_lens.shape[0],
                bk, bias1 if bias1 is not None else dummy, bias2 if bias2 is not None else dummy,
                cos, sin, stride_cos,
                f.bv, f.bias_v if f.bias_v is not None else dummy,
                out, out.stride(0), out.stride(1),
                pm, pl, pacc,
                float(scale) * LOG2E, cfg.num_splits, lut, on,
                G=G, GS=gs, QPK=qpk, HD=hd, RK=layout.rank_k, RV=layout.rank_v, RCH=min(rk_p, RANK_CHUNK),
                RV_P=rv_p,
                WIDTH=layout.width, BS=kv_cache.shape[1], BLOCK_T=cfg.block_t, BLOCK_Q=block_q,
                M_P=max(16, next_pow2(block_q * gs * qpk)), SPLIT=split, DCH=dch,
                INT8=layout.is_int8,
                HAS_BK=bias1 is not None, HAS_BV=f.bias_v is not None, DIRECT=direct,
                OFF64=needs_off64(kv_cache),
                NH=pieces, num_warps=cfg.num_warps, num_stages=num_stages, **qkw,
                **({"ROPED": True} if roped else {}), **extra,
            )
            break
        except OutOfResources:  # raised when compiling, before anything runs
            if not qkw["QUANT"] or num_stages <= 1:
                raise
            num_stages -= 1
    if split:
        launch_reduce(pm, pl, pacc, f, out, cfg.num_splits, gs, qpk, dummy,
                      None if sink is None else (q, k0, v0, on, qsl, direct, float(scale) * LOG2E))
    return out
