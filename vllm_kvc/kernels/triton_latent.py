"""Triton kernels for attention over latent paged KV (the CUDA path of the latent backend).

Same semantics as :func:`vllm_kvc.kernels.reference.latent_attention` (read its docstring for the conventions).
One program serves (a tile of queries, one head group, one KV split). For each tile of BLOCK_T cached tokens it
loads the group's key latents ``c_k [BLOCK_T, rank_k]`` once (through the block table), rebuilds the keys of the
group's KV heads with one tensor-core dot against ``B_k`` (loaded once per program), adds ``bias_k``, applies RoPE
at the cached positions and scores them against all query heads of the group, so that latent bytes are read
once per group. Values stay latent: the program accumulates ``p @ c_v`` with an online softmax (exp2) and
``B_v`` (and ``bias_v``) is applied once to the normalised weighted sum, in the epilogue or, with split-KV
(flash decoding), in the reduce kernel.

RoPE without shuffles: ``B_k``'s columns are stored with each RoPE pair side by side (x1_0, x2_0, x1_1, ...), so
the rebuilt tile splits into its x1 and x2 halves with a register-local reshape; the kernel rotates
``(k1 cos - k2 sin, k2 cos + k1 sin)`` elementwise and scores ``q1.r1 + q2.r2`` with two dots (q is read as its
two halves). GPT-J (interleaved) style and partial rotary are handled by permuting the head dims of ``B_k``,
``bias_k`` and ``q`` the same way (a dot product does not change under a common permutation) and padding cos/sin
with 1/0 for dims that are not rotated.

int8 latents (layout.py's original int8 layout): values are read as int8, cast exactly to bf16 for the tensor
cores, and the per-token fp16 scales multiply the rebuilt keys (rows) and the softmax weights (columns) before
``p @ c_v``. Other integer layouts (int4, int2, grouped scales) and layouts whose factors do not fit on chip
raise NotImplementedError (:func:`check_supported`): callers use the reference for them.

Decode at group size 1 with float latents uses :func:`_latent_decode_heads` instead (several KV heads per
program fill the 16 rows of the score dots; B_k in blocks of 8 RoPE pairs, see :func:`_split_pairs`); the
generic kernel serves the rest (gs > 1, int8, prefill, rope_tau, TRANS=False).

Launch options (measured on an H100, benchmarks/RESULTS.md, GPU kernels): ``trans`` (scores as [BLOCK_T, rows], keys as
the register A operand), ``pieces=2`` (rebuild in two column halves: fewer live registers), ``prefetch`` (block
ids and int8 scales loaded one tile ahead), split-KV for small batches. Blocks that hold whole tiles (block size
a multiple of BLOCK_T, e.g. the latent backend's 64-token blocks on GPUs) give each tile one block id.
``rope_tau`` is experimental (wrong results with triton 3.6 on the GPU; interpreter-only tests).

Importable without vLLM; runs on CPU tensors under ``TRITON_INTERPRET=1`` (bf16 is then computed in fp32, see
``_compute_dtype``).
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

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

from vllm_kvc.kernels import reference
from vllm_kvc.layout import LatentLayout

LOG2E = 1.4426950408889634
# requests with at least this many query tokens and query x key pairs take the rebuild-then-flash path (see
# latent_attention; measured on an H100: benchmarks/RESULTS.md, GPU kernels, "Long prompts")
REBUILD_MIN_QUERIES = 256
REBUILD_MIN_WORK = 1 << 24
# ... and at most this many cached tokens: the dense keys and values exist only while the request's attention
# runs, and vLLM's memory profiling does not see them (~12 KB per token for a Llama-3-8B layer: 400 MB here)
REBUILD_MAX_TOKENS = 32768


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _bv_epilogue(u, g, tok, head, kvj, row_ok, bv_ptr, biasv_ptr, out_ptr, stride_ot, stride_oh,
                 GS: tl.constexpr, HD: tl.constexpr, RV: tl.constexpr, RV_P: tl.constexpr,
                 DCH: tl.constexpr, HAS_BV: tl.constexpr):
    """out[tok, head, :] = u @ B_v[g, :, kv head slice] (+ bias_v); u [M_P, RV_P] in the factor dtype."""
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
                o += tl.load(biasv_ptr + (g * GS + j) * HD + dc * DCH + dd)[None, :]
            tl.store(out_row[:, None] + dc * DCH + dd[None, :], o.to(out_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _split_pairs(kk, BLOCK_T: tl.constexpr, PW: tl.constexpr):
    """Rebuilt key columns -> (x1, x2) halves of the RoPE pairs, each [BLOCK_T, PW].

    B_k's columns come in blocks of 16: (x1_8b .. x1_8b+7, x2_8b .. x2_8b+7) for pair block b. A thread of the
    wgmma accumulator holds columns 8j + 2a + {0, 1}: x1 and x2 of pairs 8(j // 2) + 2a + {0, 1}, which is where
    the A operand of the score dot (k-index 16c + 8h + 2a + {0, 1}) wants them, so the split needs no shuffles."""
    k = tl.permute(tl.reshape(kk, [BLOCK_T, PW // 8, 2, 8]), (0, 1, 3, 2))
    return tl.split(tl.reshape(k, [BLOCK_T, PW, 2]))


@triton.jit
def _rope_bf16x2(k1, k2, c, s):
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
def _find_request(starts_ptr, num_reqs, pid):
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
def _tile_blocks(bt_row, t0, tt, hi_t, BS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Block ids of the KV tile that starts at ``t0`` (a multiple of BLOCK_T; 0 from ``hi_t`` on): one per token,
    or a single id when each block holds whole tiles (BS a multiple of BLOCK_T)."""
    if BS % BLOCK_T == 0:
        blk = tl.load(bt_row + t0 // BS, mask=t0 < hi_t, other=0)
    else:
        tn = t0 + tt
        blk = tl.load(bt_row + tn // BS, mask=tn < hi_t, other=0)
    return blk


@triton.jit
def _phase_tiles(phase: tl.constexpr, t_begin, t_mid, t_stop, bt_row, tt, BS: tl.constexpr, PREFETCH: tl.constexpr,
                 BLOCK_T: tl.constexpr):
    """KV range of a loop phase (0: the full tiles, no masks; 1: the partial last tile) and, with PREFETCH, the
    block ids of its first tile (else a placeholder)."""
    if phase == 1:
        lo_t = t_mid
        hi_t = t_stop
    else:
        lo_t = t_begin
        hi_t = t_mid
    blk = lo_t + tt
    if PREFETCH:
        blk = _tile_blocks(bt_row, lo_t, tt, hi_t, BS, BLOCK_T)
    return lo_t, hi_t, blk


@triton.jit
def _load_tile(ptr, t_ok, col_ok, MASKED: tl.constexpr, INT8: tl.constexpr):
    """One [tokens, columns] tile of latents (masked rows / columns read as 0; int8 bytes reinterpreted)."""
    if MASKED:
        x = tl.load(ptr, mask=t_ok[:, None] & col_ok[None, :], other=0)
    else:
        x = tl.load(ptr)
    if INT8:
        x = x.to(tl.int8, bitcast=True)
    return x


@triton.jit
def _tile_rows(bt_row, blk, t0, tt, t_stop, stride_cb, stride_cs, MASKED: tl.constexpr, PREFETCH: tl.constexpr,
               OFF64: tl.constexpr, BS: tl.constexpr, BLOCK_T: tl.constexpr):
    """(which tokens ``t0 + tt`` of a KV tile exist, their cache row offsets): through the block ids ``blk``
    already loaded (PREFETCH) or read here from the request's block-table row; MASKED for the partial last tile.
    Where each block holds whole tiles, ``blk`` is the tile's single block id and the rows are t0 % BS + tt."""
    t = t0 + tt
    t_ok = tt < BLOCK_T
    if MASKED:
        t_ok = t < t_stop
    if not PREFETCH:
        blk = _tile_blocks(bt_row, t0, tt, t_stop if MASKED else t0 + BLOCK_T, BS, BLOCK_T)
    return t_ok, _row_offsets(blk, t0, tt, stride_cb, stride_cs, OFF64, BS, BLOCK_T)


@triton.jit
def _row_offsets(blk, t0, tt, stride_cb, stride_cs, OFF64: tl.constexpr, BS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Cache row offsets of the tokens ``t0 + tt`` of a tile, from its block ids (see :func:`_tile_blocks`)."""
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
def _load_scale(cache_ptr, row_off, idx, t_ok, WIDTH: tl.constexpr):
    """fp16 scale number ``idx`` of int8 rows (byte offsets ``row_off``), read as two bytes (no alignment needed)."""
    p = cache_ptr + row_off + WIDTH + 2 * idx
    lo = tl.load(p, mask=t_ok, other=0).to(tl.uint16)
    hi = tl.load(p + 1, mask=t_ok, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


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
    qk_scale, num_splits,
    G: tl.constexpr, GS: tl.constexpr, QPK: tl.constexpr, HD: tl.constexpr,
    RK: tl.constexpr, RV: tl.constexpr, RCH: tl.constexpr, RV_P: tl.constexpr, WIDTH: tl.constexpr,
    BS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr, M_P: tl.constexpr,
    SPLIT: tl.constexpr, DCH: tl.constexpr,
    INT8: tl.constexpr, HAS_BK: tl.constexpr, HAS_BV: tl.constexpr, DIRECT: tl.constexpr,
    TRANS: tl.constexpr, ROPE_TAU: tl.constexpr, OFF64: tl.constexpr, FAST_TILES: tl.constexpr,
    NH: tl.constexpr, GROUP_FAST: tl.constexpr, PREFETCH: tl.constexpr,
):
    """One program: (query tile, head group, KV split). Keys are rebuilt per KV tile by a dot in interleaved
    column order (x1_0, x2_0, x1_1, ...): ``bk_ptr`` holds B_k as [G, gs, rank_k, hd] in that order, so RoPE's
    pairs sit side by side in the accumulator and a reshape/split separates them without data movement; the
    scores are q1.r1 + q2.r2 (two dots; q is read as its x1 and x2 halves). NH = 2 rebuilds the columns in two
    pieces (fewer live registers, more dots).

    ROPE_TAU: rotate by R_tau (tau = t - t0 < BLOCK_T, table rows 0..BLOCK_T-1 held in registers) and rotate q by
    R_t0^T once per tile instead of reading cos/sin rows of every position of every tile (q.R_t0 R_tau k ==
    q.R_(t0+tau) k; the composition matches the table to within the table's own rounding).
    """
    HALF: tl.constexpr = HD // 2
    HG: tl.constexpr = GS * QPK
    NRC: tl.constexpr = (RK + RCH - 1) // RCH
    HOIST_B: tl.constexpr = (GS == 1) & (NRC == 1)
    DT = bk_ptr.dtype.element_ty

    if GROUP_FAST:  # the G programs of one request run side by side (they read the same latent rows)
        g = tl.program_id(0)
        pid = tl.program_id(1)
    else:
        pid = tl.program_id(0)
        g = tl.program_id(1)
    sp = tl.program_id(2)
    if DIRECT:  # decode: program pid serves request pid, whose single query is token pid
        r = pid
        q_start = pid
        q_end = pid + 1
        tile = 0
    else:  # varlen: find the request whose q tiles contain tile pid (largest r with tile_start[r] <= pid)
        total = tl.load(tile_start_ptr + num_reqs)
        if pid >= total:
            return
        r = _find_request(tile_start_ptr, num_reqs, pid)
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
    if FAST_TILES:
        t_mid = tl.maximum(t_begin, t_begin + ((tl.minimum(t_stop, pos0 + 1) - t_begin) // BLOCK_T) * BLOCK_T)
    else:
        t_mid = t_begin

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

    # loop invariants (named per piece: Triton has no lists of tensors)
    if GS == 1:
        if not ROPE_TAU:
            q1t_a = tl.trans(tl.load(q_row[:, None] + dp[None, :], mask=row_ok[:, None], other=0.0).to(DT))
            q2t_a = tl.trans(tl.load(q_row[:, None] + HALF + dp[None, :], mask=row_ok[:, None], other=0.0).to(DT))
            if NH == 2:
                q1t_b = tl.trans(tl.load(q_row[:, None] + PW + dp[None, :], mask=row_ok[:, None], other=0.0).to(DT))
                q2t_b = tl.trans(tl.load(q_row[:, None] + HALF + PW + dp[None, :], mask=row_ok[:, None],
                                         other=0.0).to(DT))
    if HOIST_B:
        bmask = (cr < RK)[:, None]
        bih_a = tl.load(bk_ptr + (g * RK + cr[:, None]) * HD + dc[None, :], mask=bmask, other=0.0)
        if NH == 2:
            bih_b = tl.load(bk_ptr + (g * RK + cr[:, None]) * HD + 2 * PW + dc[None, :], mask=bmask, other=0.0)
    if ROPE_TAU:
        ctau_a = tl.load(cos_ptr + tt[:, None] * stride_cos + dp[None, :])
        stau_a = tl.load(sin_ptr + tt[:, None] * stride_cos + dp[None, :])
        if NH == 2:
            ctau_b = tl.load(cos_ptr + tt[:, None] * stride_cos + PW + dp[None, :])
            stau_b = tl.load(sin_ptr + tt[:, None] * stride_cos + PW + dp[None, :])

    m_i = tl.full([M_P], -1.0e30, tl.float32)
    l_i = tl.zeros([M_P], tl.float32)
    if TRANS:  # scores as [BLOCK_T, M_P] (rebuilt keys are the A operand, kept in registers); acc as [RV_P, M_P]
        acc = tl.zeros([RV_P, M_P], tl.float32)
    else:  # scores as [M_P, BLOCK_T] (rebuilt keys transposed into the B operand); acc as [M_P, RV_P]
        acc = tl.zeros([M_P, RV_P], tl.float32)

    for phase in tl.static_range(2):
        # block ids (and int8 scales) one tile ahead (PREFETCH): their load latency leaves the critical path
        lo_t, hi_t, blk_nxt = _phase_tiles(phase, t_begin, t_mid, t_stop, bt_row, tt, BS, PREFETCH, BLOCK_T)
        if PREFETCH:
            tn = lo_t + tt
            if INT8:
                ro_nxt = _row_offsets(blk_nxt, lo_t, tt, stride_cb, stride_cs, True, BS, BLOCK_T)
                sk_nxt = _load_scale(cache_ptr, ro_nxt, g, tn < hi_t, WIDTH)
                sv_nxt = _load_scale(cache_ptr, ro_nxt, G + g, tn < hi_t, WIDTH)
        for t0 in range(lo_t, hi_t, BLOCK_T):
            t = t0 + tt
            if PREFETCH:
                blk = blk_nxt
                tn = t + BLOCK_T
                blk_nxt = _tile_blocks(bt_row, t0 + BLOCK_T, tt, hi_t, BS, BLOCK_T)
                if INT8:
                    sk = sk_nxt
                    sv = sv_nxt
                    ro_nxt = _row_offsets(blk_nxt, t0 + BLOCK_T, tt, stride_cb, stride_cs, True, BS, BLOCK_T)
                    sk_nxt = _load_scale(cache_ptr, ro_nxt, g, tn < hi_t, WIDTH)
                    sv_nxt = _load_scale(cache_ptr, ro_nxt, G + g, tn < hi_t, WIDTH)
            if not PREFETCH:
                blk = t
            t_ok, row_off = _tile_rows(bt_row, blk, t0, tt, t_stop, stride_cb, stride_cs, phase == 1, PREFETCH, OFF64,
                                       BS, BLOCK_T)
            if INT8 and (not PREFETCH):
                sk = _load_scale(cache_ptr, row_off, g, t_ok, WIDTH)
                sv = _load_scale(cache_ptr, row_off, G + g, t_ok, WIDTH)
            if NRC == 1:  # the key latents of this tile, shared by all pieces and heads of the group
                ck1 = _load_tile(cache_ptr + row_off[:, None] + g * RK + cr[None, :], t_ok, cr < RK,
                                 (phase == 1) or (RK != RCH), INT8).to(DT)

            if TRANS:
                s = tl.zeros([BLOCK_T, M_P], tl.float32)
            else:
                s = tl.zeros([M_P, BLOCK_T], tl.float32)
            for j in tl.static_range(GS):
                for hp in tl.static_range(NH):
                    # rebuild columns [hp * 2PW, (hp + 1) * 2PW) of kv head j: RoPE pairs hp*PW .. (hp+1)*PW - 1
                    kk = tl.zeros([BLOCK_T, 2 * PW], tl.float32)
                    for c in tl.static_range(NRC):
                        if NRC == 1:
                            ck = ck1
                        else:
                            ck = _load_tile(cache_ptr + row_off[:, None] + (g * RK + c * RCH) + cr[None, :], t_ok,
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
                    if ROPE_TAU:
                        if hp == 0:
                            cosv = ctau_a.to(tl.float32)
                            sinv = stau_a.to(tl.float32)
                        else:
                            cosv = ctau_b.to(tl.float32)
                            sinv = stau_b.to(tl.float32)
                    else:
                        cptrs = t[:, None] * stride_cos + hp * PW + dp[None, :]
                        if phase == 1:
                            cosv = tl.load(cos_ptr + cptrs, mask=t_ok[:, None], other=0.0).to(tl.float32)
                            sinv = tl.load(sin_ptr + cptrs, mask=t_ok[:, None], other=0.0).to(tl.float32)
                        else:
                            cosv = tl.load(cos_ptr + cptrs).to(tl.float32)
                            sinv = tl.load(sin_ptr + cptrs).to(tl.float32)
                    r1 = (k1 * cosv - k2 * sinv).to(DT)
                    r2 = (k2 * cosv + k1 * sinv).to(DT)
                    if (GS == 1) and (not ROPE_TAU):
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
                        if ROPE_TAU:  # q' = R_t0^T q
                            cb = tl.load(cos_ptr + t0 * stride_cos + hp * PW + dp).to(tl.float32)[None, :]
                            sb = tl.load(sin_ptr + t0 * stride_cos + hp * PW + dp).to(tl.float32)[None, :]
                            q1, q2 = q1 * cb + q2 * sb, q2 * cb - q1 * sb
                        q1t = tl.trans(q1.to(DT))
                        q2t = tl.trans(q2.to(DT))
                    if TRANS:
                        s = tl.dot(r1, q1t, s)
                        s = tl.dot(r2, q2t, s)
                    else:
                        s = tl.dot(tl.trans(q1t), tl.trans(r1), s)
                        s = tl.dot(tl.trans(q2t), tl.trans(r2), s)

            s = s * qk_scale
            vv = _load_tile(cache_ptr + row_off[:, None] + (G * RK + g * RV) + cv[None, :], t_ok, cv < RV,
                            (phase == 1) or (RV_P != RV), INT8).to(DT)
            if TRANS:
                if phase == 1:
                    valid = row_ok[None, :] & (t[:, None] <= row_pos[None, :]) & t_ok[:, None]
                    s = tl.where(valid, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 0))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[None, :])
                l_i = l_i * alpha + tl.sum(p, 0)
                if INT8:
                    p = p * sv[:, None]
                acc = acc * alpha[None, :]
                acc = tl.dot(tl.trans(vv), p.to(DT), acc)
            else:
                if phase == 1:
                    valid = row_ok[:, None] & (t[None, :] <= row_pos[:, None]) & t_ok[None, :]
                    s = tl.where(valid, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                if INT8:
                    p = p * sv[None, :]
                acc = acc * alpha[:, None]
                acc = tl.dot(p.to(DT), vv, acc)
            m_i = m_new

    if TRANS:
        acc = tl.trans(acc)
    if SPLIT:
        base = (tok.to(tl.int64) * (G * HG) + head) * num_splits + sp
        tl.store(pm_ptr + base, m_i, mask=row_ok)
        tl.store(pl_ptr + base, l_i, mask=row_ok)
        tl.store(pacc_ptr + base[:, None] * RV_P + cv[None, :], acc, mask=row_ok[:, None])
    else:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        u = (acc / l_safe[:, None]).to(DT)
        _bv_epilogue(u, g, tok, head, kvj, row_ok, bv_ptr, biasv_ptr, out_ptr, stride_ot, stride_oh,
                     GS, HD, RV, RV_P, DCH, HAS_BV)


@triton.jit
def _load_cos_sin(cos_ptr, sin_ptr, cp, t_ok, MASKED: tl.constexpr, PW: tl.constexpr, NH: tl.constexpr,
                  F32: tl.constexpr = True):
    """cos / sin of a tile (offsets ``cp [BLOCK_T, PW]``; fp32, or the table's dtype if not F32); the second piece
    (NH == 2) at +PW."""
    if MASKED:
        cos_a = tl.load(cos_ptr + cp, mask=t_ok[:, None], other=0.0)
        sin_a = tl.load(sin_ptr + cp, mask=t_ok[:, None], other=0.0)
    else:
        cos_a = tl.load(cos_ptr + cp)
        sin_a = tl.load(sin_ptr + cp)
    cos_b = cos_a
    sin_b = sin_a
    if NH == 2:
        if MASKED:
            cos_b = tl.load(cos_ptr + PW + cp, mask=t_ok[:, None], other=0.0)
            sin_b = tl.load(sin_ptr + PW + cp, mask=t_ok[:, None], other=0.0)
        else:
            cos_b = tl.load(cos_ptr + PW + cp)
            sin_b = tl.load(sin_ptr + PW + cp)
    if F32:
        cos_a = cos_a.to(tl.float32)
        sin_a = sin_a.to(tl.float32)
        cos_b = cos_b.to(tl.float32)
        sin_b = sin_b.to(tl.float32)
    return cos_a, sin_a, cos_b, sin_b


@triton.jit
def _cos_sin_approx(x):
    """(cos x, sin x) in fp32 with the special function unit (``cos/sin.approx``, sm_90; absolute error ~1e-6 in
    -pi..pi, growing as ~|x| * 6e-8 beyond: below the bf16 rounding of the cos/sin table up to |x| ~ 1e5)."""
    return tl.inline_asm_elementwise("cos.approx.ftz.f32 $0, $2;\n\tsin.approx.ftz.f32 $1, $2;", "=r,=r,r", [x],
                                     dtype=(tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _cos_sin_of(ang, ROPE: tl.constexpr, F32: tl.constexpr = False):
    """cos / sin of fp32 angles: the special-function approximations if ROPE == 1 (rounded to bf16 unless F32),
    else fp32."""
    if ROPE == 1:
        c, s = _cos_sin_approx(ang)
        if not F32:
            c = c.to(tl.bfloat16)
            s = s.to(tl.bfloat16)
    else:
        c = tl.cos(ang)
        s = tl.sin(ang)
    return c, s


@triton.jit
def _angle_cos_sin(t, invf_ptr, dp, PW: tl.constexpr, NH: tl.constexpr, ROPE: tl.constexpr):
    """cos / sin of a tile computed from the positions ``t`` and the inverse frequencies (fp32 angles, the same
    single multiply as vLLM's table): no table rows in the pipeline's shared memory. The second piece (NH == 2)
    at +PW."""
    tf = t.to(tl.float32)[:, None]
    cos_a, sin_a = _cos_sin_of(tf * tl.load(invf_ptr + dp)[None, :], ROPE)
    cos_b = cos_a
    sin_b = sin_a
    if NH == 2:
        cos_b, sin_b = _cos_sin_of(tf * tl.load(invf_ptr + PW + dp)[None, :], ROPE)
    return cos_a, sin_a, cos_b, sin_b


@triton.jit
def _join_pairs(r1, r2, BLOCK_T: tl.constexpr, PW: tl.constexpr):
    """Inverse of :func:`_split_pairs`: (x1, x2) halves [BLOCK_T, PW] -> [BLOCK_T, 2 PW] in B_k's block order."""
    k = tl.reshape(tl.join(r1, r2), [BLOCK_T, PW // 8, 8, 2])
    return tl.reshape(tl.permute(k, (0, 1, 3, 2)), [BLOCK_T, 2 * PW])


@triton.jit(do_not_specialize=["num_reqs", "num_splits", "zero"])
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
    qk_scale, num_splits, zero, flag_ptr,
    G: tl.constexpr, QPK: tl.constexpr, HD: tl.constexpr,
    RK: tl.constexpr, RK_P: tl.constexpr, RV: tl.constexpr, RV_P: tl.constexpr,
    NKV: tl.constexpr, M_P: tl.constexpr, BS: tl.constexpr, BLOCK_T: tl.constexpr, NH: tl.constexpr,
    SPLIT: tl.constexpr, DCH: tl.constexpr, HAS_BK: tl.constexpr, HAS_BV: tl.constexpr,
    DIRECT: tl.constexpr, OFF64: tl.constexpr, PREFETCH: tl.constexpr, COS_PER_HEAD: tl.constexpr,
    ROPE: tl.constexpr = 0, ONE_DOT: tl.constexpr = False, ANGLES: tl.constexpr = 0,
    LATE_SUM: tl.constexpr = False, LAZY: tl.constexpr = 0, PDL: tl.constexpr = False,
):
    """Single-query attention (decode) at group size 1 for NKV KV heads per program.

    The NKV * QPK query heads of the program fill the rows of the score tile ``s [BLOCK_T, M_P]`` (instead of
    padding QPK rows to 16): each KV head's rebuilt, RoPE'd keys are scored against all M_P query rows with the
    same two dots, and ``tl.where`` keeps the columns of that head's own query heads. The cos/sin rows and the
    block ids of a tile are read once for the NKV heads; the value latents of the NKV heads (contiguous in the
    row) are one ``[BLOCK_T, NKV * RV_P]`` load, and ``acc [NKV * RV_P, M_P] += c_v^T p`` accumulates all
    (head, row) pairs, of which the epilogue keeps the diagonal blocks (a masked ``u @ B_v`` over the stacked
    B_v of the NKV heads). DIRECT: program pid serves request pid, whose single query is token pid; otherwise
    program pid serves query token pid (one query per program: varlen batches of decode-like requests),
    causal over keys <= its position.
    """
    HALF: tl.constexpr = HD // 2
    PW: tl.constexpr = HALF // NH
    NV: tl.constexpr = NKV * RV_P
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
        r = _find_request(qsl_ptr, num_reqs, pid)
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
    dp = tl.arange(0, PW)
    dc = tl.arange(0, 2 * PW)
    cr = tl.arange(0, RK_P)
    cvv = tl.arange(0, NV)
    tt = tl.arange(0, BLOCK_T)
    bt_row = bt_ptr + r.to(tl.int64) * stride_bt
    v_col = G * RK + (g0 + cvv // RV_P) * RV + cvv % RV_P  # value latents of the NKV heads
    v_ok = (cvv % RV_P) < RV

    if ONE_DOT:  # q in B_k's block order (x1 of 8 pairs, x2 of the same 8 pairs, ...): one dot per piece
        qd = (dc // 16) * 8 + dc % 8 + (dc % 16 >= 8).to(tl.int32) * HALF
        q1t_a = tl.trans(tl.load(q_row[:, None] + qd[None, :], mask=row_ok[:, None], other=0.0).to(DT))
        q2t_a = q1t_a
        q1t_b = q1t_a
        q2t_b = q1t_a
        if NH == 2:
            q1t_b = tl.trans(tl.load(q_row[:, None] + PW + qd[None, :], mask=row_ok[:, None], other=0.0).to(DT))
            q2t_b = q1t_b
    else:
        q1t_a = tl.trans(tl.load(q_row[:, None] + dp[None, :], mask=row_ok[:, None], other=0.0).to(DT))
        q2t_a = tl.trans(tl.load(q_row[:, None] + HALF + dp[None, :], mask=row_ok[:, None], other=0.0).to(DT))
        if NH == 2:
            q1t_b = tl.trans(tl.load(q_row[:, None] + PW + dp[None, :], mask=row_ok[:, None], other=0.0).to(DT))
            q2t_b = tl.trans(tl.load(q_row[:, None] + HALF + PW + dp[None, :], mask=row_ok[:, None],
                                     other=0.0).to(DT))

    if ANGLES == 2:  # RoPE split as R(t0 + i) = R(t0) R(i): keys turn by their offset i in the tile (cos / sin
        # computed once), the queries by -t0 once per tile (q . R(t0) R(i) k = (R(-t0) q) . (R(i) k))
        # (ANGLES == 2 implies ONE_DOT, NH == 1: q in B_k's block order; each element's pair partner, signed:
        # the rotated query is q * cos + q_partner * sin elementwise)
        cos_a, sin_a, cos_b, sin_b = _angle_cos_sin(tt, invf_ptr, dp, PW, NH, ROPE)
        qdp = tl.where(qd >= HALF, qd - HALF, qd + HALF)
        q_own = tl.load(q_row[:, None] + qd[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        q_par = tl.load(q_row[:, None] + qdp[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        q_par = tl.where((qd >= HALF)[None, :], -q_par, q_par)
        invf_q = tl.load(invf_ptr + (qd % HALF)[None, :] + 0 * rows[:, None])  # (2-D: no layout conversions)

    m_i = tl.full([M_P], -1.0e30, tl.float32)
    l_i = tl.zeros([M_P], tl.float32)
    l_t = tl.zeros([BLOCK_T, M_P], tl.float32)  # LATE_SUM: per-token partial sums, reduced once after the loop
    acc = tl.zeros([NV, M_P], tl.float32)

    for phase in tl.static_range(2):
        lo_t, hi_t, blk_nxt = _phase_tiles(phase, t_begin, t_mid, t_stop, bt_row, tt, BS, PREFETCH, BLOCK_T)
        for t0 in range(lo_t, hi_t, BLOCK_T):
            t = t0 + tt
            if PREFETCH:
                blk = blk_nxt
                blk_nxt = _tile_blocks(bt_row, t0 + BLOCK_T, tt, hi_t, BS, BLOCK_T)
            if not PREFETCH:
                blk = t
            t_ok, row_off = _tile_rows(bt_row, blk, t0, tt, t_stop, stride_cb, stride_cs, phase == 1, PREFETCH, OFF64,
                                       BS, BLOCK_T)
            cp = t[:, None] * stride_cos + dp[None, :]
            if ANGLES == 1:  # cos / sin computed from positions (no table tiles in shared memory)
                cos_a, sin_a, cos_b, sin_b = _angle_cos_sin(t, invf_ptr, dp, PW, NH, ROPE)
            elif (ANGLES == 0) and (not COS_PER_HEAD):  # cos / sin of the tile's positions, shared by the NKV heads
                cos_a, sin_a, cos_b, sin_b = _load_cos_sin(cos_ptr, sin_ptr, cp, t_ok, phase == 1, PW, NH, ROPE == 0)
            s = tl.zeros([BLOCK_T, M_P], tl.float32)
            for h in tl.static_range(NKV):
                ck = _load_tile(cache_ptr + row_off[:, None] + (g0 + h) * RK + cr[None, :], t_ok, cr < RK,
                                (phase == 1) or (RK != RK_P), False).to(DT)
                sh = tl.zeros([BLOCK_T, M_P], tl.float32)
                for hp in tl.static_range(NH):
                    bi = tl.load(bk_ptr + ((g0 + h) * RK + cr[:, None]) * HD + hp * 2 * PW + dc[None, :],
                                 mask=(cr < RK)[:, None], other=0.0)
                    kk = tl.dot(ck, bi)
                    k1, k2 = _split_pairs(kk, BLOCK_T, PW)
                    if COS_PER_HEAD and (hp == 0) and (not ANGLES):  # re-read per head, after the rebuild (``h * zero`` keeps the
                        # compiler from merging the reads, so the fp32 copies need not stay live across heads)
                        cos_a, sin_a, cos_b, sin_b = _load_cos_sin(cos_ptr, sin_ptr, cp + h * zero, t_ok,
                                                                   phase == 1, PW, NH, ROPE == 0)
                    if HAS_BK:
                        k1 += tl.load(bias1_ptr + (g0 + h) * HALF + hp * PW + dp)[None, :]
                        k2 += tl.load(bias2_ptr + (g0 + h) * HALF + hp * PW + dp)[None, :]
                    if hp == 0:
                        cosv = cos_a
                        sinv = sin_a
                        q1t = q1t_a
                        q2t = q2t_a
                        if ANGLES == 2:
                            if h == 0:  # this tile's queries, turned back by the tile's first position. Computed
                                # after the first rebuild: Triton 3.6 fences the shared-memory copy right before
                                # the dot, and the barrier that must follow that fence is only inserted when no
                                # earlier barrier (the rebuild's) sits between the copy and the dot.
                                # (t0 * 1.0: fp32, and a plain int in the interpreter)
                                c0, s0 = _cos_sin_of((t0 * 1.0) * invf_q, ROPE, True)
                                q_tile = tl.trans((q_own * c0 + q_par * s0).to(DT))
                            q1t = q_tile
                    else:
                        cosv = cos_b
                        sinv = sin_b
                        q1t = q1t_b
                        q2t = q2t_b
                    if ROPE == 1:  # packed bf16x2 math (cos / sin stay bf16)
                        r1, r2 = _rope_bf16x2(k1.to(DT), k2.to(DT), cosv, sinv)
                    else:
                        r1 = (k1 * cosv - k2 * sinv).to(DT)
                        r2 = (k2 * cosv + k1 * sinv).to(DT)
                    if ONE_DOT:
                        sh = tl.dot(_join_pairs(r1, r2, BLOCK_T, PW), q1t, sh)
                    else:
                        sh = tl.dot(r1, q1t, sh)
                        sh = tl.dot(r2, q2t, sh)
                s = tl.where((hrow == h)[None, :], sh, s)

            vv = _load_tile(cache_ptr + row_off[:, None] + v_col[None, :], t_ok, v_ok, (phase == 1) or (RV_P != RV),
                            False).to(DT)
            if phase == 1:
                s = tl.where(t_ok[:, None], s, float("-inf"))
            if LAZY == 1:
                # The softmax reference is the first tile's max: no cross-warp max on later tiles, and no
                # rescaling at all (the sums are still zero when the reference is set), so the P.c_v products
                # accumulate straight into acc.
                if t0 == t_begin:
                    m_i = tl.max(s, 0) * qk_scale
                p = tl.exp2(s * qk_scale - m_i[None, :])
                if LATE_SUM:  # no cross-warp reduction per tile
                    l_t += p
                else:
                    l_i += tl.sum(p, 0)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 0) * qk_scale)
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s * qk_scale - m_new[None, :])
                if LATE_SUM:  # no cross-warp reduction per tile
                    l_t = l_t * alpha[None, :] + p
                else:
                    l_i = l_i * alpha + tl.sum(p, 0)
                acc = acc * alpha[None, :]
                m_i = m_new
            acc = tl.dot(tl.trans(vv), p.to(DT), acc)

    if LATE_SUM:
        l_i = tl.sum(l_t, 0)
    if LAZY == 1:  # a weight above 2^64 could have overflowed (each weight <= its row's sum): flag the program
        tl.store(flag_ptr + fid, (tl.max(l_i, 0) > 1.8446744e19).to(tl.int32))  # for the exact pass
    acc_t = tl.trans(acc)  # [M_P, NV]; row i's own values sit in columns hrow[i] * RV_P ...
    diag = ((cvv // RV_P)[None, :] == hrow[:, None]) & row_ok[:, None]
    if SPLIT:
        base = (tok.to(tl.int64) * (G * QPK) + head) * num_splits + sp
        tl.store(pm_ptr + base, m_i, mask=row_ok)
        tl.store(pl_ptr + base, l_i, mask=row_ok)
        tl.store(pacc_ptr + base[:, None] * RV_P + (cvv[None, :] - (hrow * RV_P)[:, None]), acc_t, mask=diag)
    else:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        u = tl.where(diag, acc_t / l_safe[:, None], 0.0).to(DT)
        dd = tl.arange(0, DCH)
        out_row = out_ptr + tok.to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
        bv_row = bv_ptr + ((g0 + cvv // RV_P) * RV + cvv % RV_P) * HD
        for dch in tl.static_range(HD // DCH):
            bvt = tl.load(bv_row[:, None] + dch * DCH + dd[None, :], mask=v_ok[:, None], other=0.0)
            o = tl.dot(u, bvt)
            if HAS_BV:
                o += tl.load(biasv_ptr + (g0 + hrow)[:, None] * HD + dch * DCH + dd[None, :],
                             mask=row_ok[:, None], other=0.0)
            tl.store(out_row[:, None] + dch * DCH + dd[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _latent_reduce(
    pm_ptr, pl_ptr, pacc_ptr, bv_ptr, biasv_ptr, out_ptr, stride_ot, stride_oh, num_splits,
    G: tl.constexpr, GS: tl.constexpr, QPK: tl.constexpr, HD: tl.constexpr,
    RV: tl.constexpr, RV_P: tl.constexpr, M_P: tl.constexpr, DCH: tl.constexpr,
    HAS_BV: tl.constexpr,
):
    """Combine the split-KV partials of one (token, group) and apply B_v once."""
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
    l_sum = tl.zeros([M_P], tl.float32)
    acc = tl.zeros([M_P, RV_P], tl.float32)
    for s in range(num_splits):
        w = tl.exp2(tl.load(pm_ptr + base + s, mask=row_ok, other=-1.0e30) - m_max)
        l_sum += w * tl.load(pl_ptr + base + s, mask=row_ok, other=0.0)
        acc += w[:, None] * tl.load(pacc_ptr + (base + s)[:, None] * RV_P + cv[None, :], mask=row_ok[:, None],
                                    other=0.0)
    l_sum = tl.where(l_sum > 0, l_sum, 1.0)
    u = (acc / l_sum[:, None]).to(DT)
    _bv_epilogue(u, g, tok + rows * 0, head, kvj, row_ok, bv_ptr, biasv_ptr, out_ptr, stride_ot, stride_oh,
                 GS, HD, RV, RV_P, DCH, HAS_BV)


# ------------------------------------------------------------------------------------------------ host side
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _rope_perm(head_dim: int, rot: int, is_neox: bool):
    """Head-dim order that puts RoPE's first members of each pair in the first half, their partners in the second."""
    npass = head_dim - rot
    if npass % 2 or rot % 2:
        raise ValueError(f"head_dim={head_dim}, rot_dim={rot}: need even sizes")
    pass_lo = list(range(rot, rot + npass // 2))
    pass_hi = list(range(rot + npass // 2, head_dim))
    if is_neox:
        first, second = list(range(rot // 2)), list(range(rot // 2, rot))
    else:
        first, second = list(range(0, rot, 2)), list(range(1, rot, 2))
    perm = first + pass_lo + second + pass_hi
    return None if perm == list(range(head_dim)) else perm


@dataclass
class LatentFactors:
    """Factors rearranged for the kernels (built once per layer by :func:`prepare_factors`)."""
    layout: LatentLayout
    dtype: torch.dtype  # compute dtype of the tensor-core operands
    bk: torch.Tensor  # [G, gs, rank_k, hd]: B_k with each head's RoPE pairs side by side (x1_0, x2_0, x1_1, ...)
    bias1: torch.Tensor | None  # [G, gs, hd/2] fp32: bias_k of the x1 / x2 members of the pairs
    bias2: torch.Tensor | None
    bv: torch.Tensor  # [G, rank_v, gs*hd]
    bias_v: torch.Tensor | None  # [G*gs*hd] fp32
    cos: torch.Tensor  # [max(max_pos, 256), hd/2]; 1 / 0 for dims that are not rotated
    sin: torch.Tensor
    perm: torch.Tensor | None  # head-dim permutation applied to q (None: identity)
    bk_blk: torch.Tensor | None = None  # B_k in blocks of 8 RoPE pairs, for _latent_decode_heads (_split_pairs)
    inv_freq: torch.Tensor | None = None  # [hd/2] fp32 (0 for dims not rotated) if it reproduces the cos/sin table


def angles_match(cos_sin_cache: torch.Tensor, inv_freq: torch.Tensor) -> bool:
    """Whether ``cos / sin(t * inv_freq)`` (fp32 angles, as vLLM builds the table) reproduce the table at every
    position, within the table dtype's rounding (checked on the first 1024 positions, where fp32 angles are exact
    to ~1e-4 however the table was computed). False for tables that are not a plain function of t * inv_freq
    (YaRN's magnitude scale, linear position scaling, other frequencies): the kernels then read the table."""
    rot = cos_sin_cache.shape[-1]
    if inv_freq is None or inv_freq.numel() != rot // 2 or not cos_sin_cache.dtype.is_floating_point:
        return False
    cs = cos_sin_cache[:1024].float()
    t = torch.arange(cs.shape[0], dtype=torch.float32, device=cs.device)
    ang = t[:, None] * inv_freq.to(cs.device, torch.float32)[None, :]
    tol = max(torch.finfo(cos_sin_cache.dtype).eps, 1e-4)
    return bool((torch.cat([ang.cos(), ang.sin()], -1) - cs).abs().max() <= tol)


def prepare_factors(layout: LatentLayout, b_k, b_v, bias_k, bias_v, cos_sin_cache, is_neox: bool = True,
                    dtype: torch.dtype = torch.bfloat16, inv_freq: torch.Tensor | None = None) -> LatentFactors:
    G, gs, hd, rk, rv = layout.groups, layout.group_size, layout.head_dim, layout.rank_k, layout.rank_v
    if hd % 2 or hd & (hd - 1) or hd < 32:
        raise ValueError(f"head_dim={hd}: the kernels need a power of two >= 32")
    half = hd // 2
    rot = cos_sin_cache.shape[-1]
    perm = _rope_perm(hd, rot, is_neox)
    dev = b_k.device
    bk = b_k.reshape(G, rk, gs, hd)
    if perm is not None:
        permt = torch.tensor(perm, device=dev)
        bk = bk.index_select(-1, permt)
    # generic kernel: [G, rk, gs, (x1 half | x2 half)] -> [G, gs, rk, (x1_0, x2_0, x1_1, x2_1, ...)]
    # multi-head kernel: -> [G, gs, rk, (x1_0..x1_7, x2_0..x2_7, x1_8..x1_15, x2_8..x2_15, ...)] (_split_pairs)
    bk_blk = (bk.reshape(G, rk, gs, 2, half // 8, 8).permute(0, 2, 1, 4, 3, 5).reshape(G, gs, rk, hd).to(dtype)
              .contiguous())
    bk = bk.reshape(G, rk, gs, 2, half).permute(0, 2, 1, 4, 3).reshape(G, gs, rk, hd).to(dtype).contiguous()
    bias1 = bias2 = None
    if bias_k is not None:
        bb = bias_k.reshape(G, gs, hd).float()
        if perm is not None:
            bb = bb.index_select(-1, permt)
        bias1 = bb[..., :half].contiguous()
        bias2 = bb[..., half:].contiguous()
    bv = b_v.reshape(G, rv, gs * hd).to(dtype).contiguous()
    bvb = None if bias_v is None else bias_v.reshape(-1).float().contiguous()
    if rot == hd:
        cos, sin = cos_sin_cache[:, :half], cos_sin_cache[:, half:]
    else:
        mp, npass = cos_sin_cache.shape[0], (hd - rot) // 2
        one = torch.ones(mp, npass, dtype=cos_sin_cache.dtype, device=cos_sin_cache.device)
        cos = torch.cat([cos_sin_cache[:, : rot // 2], one], 1)
        sin = torch.cat([cos_sin_cache[:, rot // 2:], torch.zeros_like(one)], 1)
    if cos.shape[0] < 256:  # ROPE_TAU reads rows 0..BLOCK_T-1 unmasked
        pad = torch.zeros(256 - cos.shape[0], half, dtype=cos.dtype, device=cos.device)
        cos, sin = torch.cat([cos, pad]), torch.cat([sin, pad])
    if cos.stride(1) != 1 or sin.stride(0) != cos.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    invf = None
    if inv_freq is not None and angles_match(cos_sin_cache, inv_freq):  # dims not rotated: angle 0 (cos 1, sin 0)
        invf = torch.zeros(half, dtype=torch.float32, device=dev)
        invf[: rot // 2] = inv_freq.to(dev, torch.float32)
    return LatentFactors(layout, dtype, bk, bias1, bias2, bv, bvb, cos, sin, None if perm is None else permt, bk_blk,
                         invf)


_FACTOR_CACHE: dict = {}


def _tkey(t):
    if t is None:
        return None
    return (id(t), t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device))


def cached_factors(layout, b_k, b_v, bias_k, bias_v, cos_sin_cache, is_neox, dtype, inv_freq=None) -> LatentFactors:
    """prepare_factors, memoised per (tensor identity, version): weak references guard against a freed tensor's
    address and id being reused by a new one; in-place updates bump ``_version``."""
    ts = (b_k, b_v, bias_k, bias_v, cos_sin_cache, inv_freq)
    key = (layout, is_neox, dtype) + tuple(_tkey(t) for t in ts)
    hit = _FACTOR_CACHE.get(key)
    if hit is not None:
        refs, f = hit
        if all((r is None and t is None) or (r is not None and r() is t) for r, t in zip(refs, ts)):
            return f
    if len(_FACTOR_CACHE) > 256:
        _FACTOR_CACHE.clear()
    f = prepare_factors(layout, b_k, b_v, bias_k, bias_v, cos_sin_cache, is_neox, dtype, inv_freq)
    _FACTOR_CACHE[key] = (tuple(None if t is None else weakref.ref(t) for t in ts), f)
    return f


# VLLM_KVC_TRITON_DEBUG (comma-separated): "masked": mask every tile; "off64": 64-bit offsets; "no_pdl": no
# programmatic dependent launch; "no_exact_pass": skip lazy_max's exact pass (timing probes only: not exact)
_DEBUG = set(os.environ.get("VLLM_KVC_TRITON_DEBUG", "").split(","))
_PROPS: dict = {}
LAST_LAUNCH: dict = {}  # compiled kernels of the last launch (diagnostics: n_regs, n_spills, metadata.shared)


def _props(device: torch.device):
    """The CUDA device's properties, looked up once per device (they are read on every launch)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PROPS:
        _PROPS[idx] = torch.cuda.get_device_properties(idx)
    return _PROPS[idx]


def _num_sms(device: torch.device) -> int:
    return _props(device).multi_processor_count if device.type == "cuda" else 8


def default_splits(n_programs: int, max_ctx: int, block_t: int, device) -> int:
    """Split-KV factor: enough programs for ~2 waves, at least 4 KV tiles per split, a power of two <= 16."""
    want = max(1, -(-2 * _num_sms(device) // max(1, n_programs)))
    cap = max(1, max_ctx // (4 * block_t))
    s = min(want, cap, 16)
    return 1 << (s.bit_length() - 1) if s > 1 else 1


def check_supported(layout: LatentLayout) -> None:
    """Raise NotImplementedError for layouts the kernels do not handle (the caller then uses the reference)."""
    if layout.quantized and not getattr(layout, "is_int8", layout.dtype == "int8"):
        raise NotImplementedError(f"latent dtype {layout.dtype!r}: the Triton kernels read float and int8 latents only")
    hd = layout.head_dim
    if hd & (hd - 1) or hd < 32:
        raise NotImplementedError(f"head_dim={hd}: the kernels need a power of two >= 32")
    if max(16, _next_pow2(layout.rank_k)) * layout.group_size > 512 or _next_pow2(layout.rank_v) > 256:
        # the per-tile key factors and the latent accumulator would not fit on chip (measured on an H100 with
        # triton 3.6: gs=4 at rank 256 needs 413 KB of shared memory; gs=8 at rank 512 spills 62 KB)
        raise NotImplementedError(f"group_size={layout.group_size}, rank_k={layout.rank_k}, rank_v={layout.rank_v}: "
                                  "the kernels need next_pow2(rank_k) * group_size <= 512 and rank_v <= 256")


def _pdl_ok(device: torch.device) -> bool:
    """Programmatic dependent launch (the lazy_max exact pass starts while the lazy pass finishes): sm_90+."""
    return (_HAS_GDC and device.type == "cuda" and not _interpreting() and "no_pdl" not in _DEBUG
            and _props(device).major >= 9)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """Tensor-core operand dtype: q's half type; fp32 otherwise. Under TRITON_INTERPRET the interpreter's tl.dot
    multiplies bf16 operands as their raw uint16 bits (triton 3.9), so bf16 is computed in fp32 there."""
    if q.dtype == torch.bfloat16 and _interpreting():
        return torch.float32
    return q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _prepare_io(q, kv_cache, f: LatentFactors, out):
    """q in the factors' head-dim order with unit last stride, and the output buffer (allocated if None)."""
    if f.perm is not None:
        q = q.index_select(-1, f.perm)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    assert out.stride(-1) == 1
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache rows must be contiguous")
    return q, out


def _split_partials(q, num_splits: int, rv_p: int, dummy):
    """Split-KV partials (running max, denominator, latent accumulator per split), or placeholders."""
    if num_splits == 1:
        return dummy, dummy, dummy
    pm = torch.empty(q.shape[0], q.shape[1], num_splits, dtype=torch.float32, device=q.device)
    pacc = torch.empty(q.shape[0], q.shape[1], num_splits, rv_p, dtype=torch.float32, device=q.device)
    return pm, torch.empty_like(pm), pacc


def _launch(q, kv_cache, layout: LatentLayout, f: LatentFactors, block_table, seq_lens, qsl, tile_start,
            n_grid0, block_q, direct, scale, out, num_splits, block_t, num_warps, num_stages, rank_chunk, trans=True, rope_tau=False,
            pieces=1, group_fast=False, prefetch=True):
    n_tok, hq, hd = q.shape
    G, gs = layout.groups, layout.group_size
    int8 = getattr(layout, "is_int8", layout.dtype == "int8")
    if hq % layout.num_kv_heads:
        raise ValueError(f"{hq} query heads, {layout.num_kv_heads} KV heads")
    qpk = hq // layout.num_kv_heads
    hg = gs * qpk
    q, out = _prepare_io(q, kv_cache, f, out)
    check_supported(layout)
    rk_p = max(16, _next_pow2(layout.rank_k))
    rch = min(rk_p, rank_chunk or 128)
    rv_p = max(16, _next_pow2(layout.rank_v))
    dch = hd
    while rv_p * dch > 128 * 128 and dch > 16:
        dch //= 2
    m_p = max(16, _next_pow2(block_q * hg))
    if hd // 2 // pieces < 16:  # tl.dot needs K >= 16: the score dots contract over hd / 2 / pieces
        pieces = 1
    if n_tok == 0:
        return out
    dummy = f.bk
    common = dict(G=G, GS=gs, QPK=qpk, HD=hd, RV=layout.rank_v, RV_P=rv_p, DCH=dch,
                  HAS_BV=f.bias_v is not None)
    pm, pl, pacc = _split_partials(q, num_splits, rv_p, dummy)
    grid = (G, n_grid0, num_splits) if group_fast else (n_grid0, G, num_splits)
    LAST_LAUNCH.clear()
    LAST_LAUNCH["kernel"] = "generic"
    LAST_LAUNCH["fwd"] = _latent_attn_fwd[grid](
        q, q.stride(0), q.stride(1),
        kv_cache, kv_cache.stride(0), kv_cache.stride(1),
        block_table, block_table.stride(0),
        seq_lens, qsl, tile_start, seq_lens.shape[0],
        f.bk, f.bias1 if f.bias1 is not None else dummy, f.bias2 if f.bias2 is not None else dummy,
        f.cos, f.sin, f.cos.stride(0),
        f.bv, f.bias_v if f.bias_v is not None else dummy,
        out, out.stride(0), out.stride(1),
        pm, pl, pacc,
        float(scale) * LOG2E, num_splits,
        RK=layout.rank_k, RCH=rch, WIDTH=layout.width, BS=kv_cache.shape[1], BLOCK_T=block_t,
        BLOCK_Q=block_q, M_P=m_p, SPLIT=num_splits > 1, INT8=int8,
        HAS_BK=f.bias1 is not None, DIRECT=direct, TRANS=trans, ROPE_TAU=rope_tau,
        OFF64=kv_cache.shape[0] * kv_cache.stride(0) >= 2 ** 31 or "off64" in _DEBUG,
        FAST_TILES="masked" not in _DEBUG, NH=pieces, GROUP_FAST=group_fast, PREFETCH=prefetch,
        num_warps=num_warps, num_stages=num_stages, **common,
    )
    if num_splits > 1:
        LAST_LAUNCH["reduce"] = _latent_reduce[(n_tok, G)](
            pm, pl, pacc, f.bv, f.bias_v if f.bias_v is not None else dummy, out, out.stride(0), out.stride(1),
            num_splits, M_P=max(16, _next_pow2(hg)), num_warps=4, **common,
        )
    return out


def heads_supported(layout: LatentLayout, hq: int) -> bool:
    """Layouts that :func:`_latent_decode_heads` serves: group size 1, float latents, rank_v <= 256."""
    return (layout.group_size == 1 and not layout.quantized and hq % layout.num_kv_heads == 0
            and _next_pow2(layout.rank_v) <= 256 and max(16, _next_pow2(layout.rank_k)) <= 256)


def _pick_nkv(layout: LatentLayout, qpk: int, nkv: int) -> int:
    """KV heads per program: the largest power of two <= nkv that divides the group count."""
    n = 1
    while n * 2 <= nkv and layout.groups % (n * 2) == 0:
        n *= 2
    return n


def _launch_heads_fwd(q, kv_cache, block_table, seq_lens, qsl, n_prog, f, out, pm, pl, pacc, dummy, scale,
                      num_splits, G, qpk, hd, layout, rk_p, rv_p, nkv, block_t, pieces, direct, prefetch,
                      cos_per_head, num_warps, num_stages, rope=0, one_dot=False, maxnreg=None, angles=False,
                      late_sum=False, lazy=0, flags=None, pdl=False):
    dch = hd
    while nkv * rv_p * dch > 128 * 128 and dch > 16:
        dch //= 2
    m_p = max(16, _next_pow2(nkv * qpk))
    LAST_LAUNCH["fwd" if lazy != 2 else "exact_pass"] = _latent_decode_heads[(n_prog, G // nkv, num_splits)](
        q, q.stride(0), q.stride(1),
        kv_cache, kv_cache.stride(0), kv_cache.stride(1),
        block_table, block_table.stride(0),
        seq_lens, qsl, seq_lens.shape[0],
        f.bk_blk, f.bias1 if f.bias1 is not None else dummy, f.bias2 if f.bias2 is not None else dummy,
        f.cos, f.sin, f.cos.stride(0), f.inv_freq if angles else dummy,
        f.bv, f.bias_v if f.bias_v is not None else dummy,
        out, out.stride(0), out.stride(1),
        pm, pl, pacc,
        float(scale) * LOG2E, num_splits, 0, dummy if flags is None else flags,
        G=G, QPK=qpk, HD=hd, RK=layout.rank_k, RK_P=rk_p, RV=layout.rank_v, RV_P=rv_p, NKV=nkv, M_P=m_p,
        BS=kv_cache.shape[1], BLOCK_T=block_t, NH=pieces, SPLIT=num_splits > 1, DCH=dch,
        HAS_BK=f.bias1 is not None, HAS_BV=f.bias_v is not None, DIRECT=direct,
        OFF64=kv_cache.shape[0] * kv_cache.stride(0) >= 2 ** 31 or "off64" in _DEBUG, PREFETCH=prefetch,
        COS_PER_HEAD=cos_per_head, ROPE=rope, ONE_DOT=one_dot, ANGLES=int(angles), LATE_SUM=late_sum, LAZY=lazy,
        PDL=pdl, launch_pdl=pdl and lazy == 2,
        num_warps=num_warps,
        num_stages=num_stages,
        **({} if maxnreg is None else dict(maxnreg=maxnreg)),
    )


def _launch_heads(q, kv_cache, layout: LatentLayout, f: LatentFactors, block_table, seq_lens, qsl, n_prog, direct,
                  scale, out, num_splits, nkv, block_t, num_warps, num_stages, pieces, prefetch, cos_per_head=False,
                  rope=0, one_dot=False, maxnreg=None, angles=False, late_sum=False, lazy_max=False):
    """Launch :func:`_latent_decode_heads` (one query per program, NKV KV heads; gs == 1, float latents).

    ``lazy_max``: two launches. The first takes each program's first-tile max as its softmax reference (no
    per-tile max reduction, and no rescaling: the P.c_v products accumulate straight into acc) and flags the
    programs where a weight could exceed 2^64 (a softmax row sum above it); the second runs only the flagged
    programs again with the running max (the others return at once). On sm_90+ the second is a programmatic
    dependent launch: it starts while the first finishes and waits for it in the kernel (``gdc_wait``)."""
    n_tok, hq, hd = q.shape
    G = layout.groups
    qpk = hq // layout.num_kv_heads
    nkv = _pick_nkv(layout, qpk, nkv)
    q, out = _prepare_io(q, kv_cache, f, out)
    if n_tok == 0:
        return out
    rk_p = max(16, _next_pow2(layout.rank_k))
    rv_p = max(16, _next_pow2(layout.rank_v))
    if hd // 2 // pieces < 16:
        pieces = 1
    if angles == 2 and (pieces != 1 or not one_dot):  # the tile rotation needs q whole, in one dot
        angles = 1
    dummy = f.bk
    pm, pl, pacc = _split_partials(q, num_splits, rv_p, dummy)
    LAST_LAUNCH.clear()
    LAST_LAUNCH["kernel"] = "heads"
    LAST_LAUNCH["angles"] = angles
    while True:  # OutOfResources is raised when compiling, before anything runs: retry with fewer stages / heads
        try:
            flags = torch.empty(n_prog * (G // nkv) * num_splits, dtype=torch.int32, device=q.device) \
                if lazy_max else None
            pdl = lazy_max and _pdl_ok(q.device)
            for lazy in ((1,) if "no_exact_pass" in _DEBUG else (1, 2)) if lazy_max else (0,):
                _launch_heads_fwd(q, kv_cache, block_table, seq_lens, qsl, n_prog, f, out, pm, pl, pacc, dummy,
                                  scale, num_splits, G, qpk, hd, layout, rk_p, rv_p, nkv, block_t, pieces, direct,
                                  prefetch, cos_per_head, num_warps, num_stages, rope, one_dot, maxnreg, angles,
                                  late_sum, lazy, flags, pdl)
            break
        except OutOfResources:
            if num_stages > 2:
                num_stages -= 1
            elif nkv > 1:
                nkv //= 2
            else:
                raise
    if num_splits > 1:
        rdch = hd
        while rv_p * rdch > 128 * 128 and rdch > 16:
            rdch //= 2
        LAST_LAUNCH["reduce"] = _latent_reduce[(n_tok, G)](
            pm, pl, pacc, f.bv, f.bias_v if f.bias_v is not None else dummy, out, out.stride(0), out.stride(1),
            num_splits, G=G, GS=1, QPK=qpk, HD=hd, RV=layout.rank_v, RV_P=rv_p, M_P=max(16, _next_pow2(qpk)),
            DCH=rdch, HAS_BV=f.bias_v is not None, num_warps=4,
        )
    return out


def _heads_opts(f: LatentFactors, d: dict, rope, one_dot, maxnreg, angles, late_sum, lazy_max) -> dict:
    """The multi-head kernel's options, each the caller's or else the default in ``d``: the packed bf16 RoPE
    (inline PTX) needs bf16 operands, a GPU (the interpreter cannot run inline assembly) and bf16 cos/sin (the
    table's, or computed: ``angles``, which needs the factors' inv_freq)."""
    angles = d.get("angles", False) if angles is None else angles
    angles = int(angles) if angles and f.inv_freq is not None else 0
    rope = d.get("rope", 0) if rope is None else rope
    if rope and (_interpreting() or f.dtype != torch.bfloat16 or (f.cos.dtype != torch.bfloat16 and not angles)):
        rope = 0
    return dict(rope=rope, one_dot=d.get("one_dot", False) if one_dot is None else one_dot,
                maxnreg=d.get("maxnreg") if maxnreg is None else maxnreg, angles=angles,
                late_sum=d.get("late_sum", False) if late_sum is None else late_sum,
                lazy_max=d.get("lazy_max", False) if lazy_max is None else lazy_max)


def decode_defaults(layout: LatentLayout, hq: int | None = None) -> dict:
    """Launch options measured best on an H100 (benchmarks/RESULTS.md, GPU kernels). ``heads`` > 0: the
    multi-head decode kernel (:func:`_latent_decode_heads`, gs == 1 float latents) with that many KV heads per
    program; otherwise the generic kernel: 64-token KV tiles, 4 warps; small ranks rebuild the keys in two column
    pieces (fewer live registers, more programs per SM). ``angles`` (where the factors carry inv_freq): 1: cos / sin
    computed in the kernel, 1-3% faster than the table with one KV head per program and 7% slower with two; 2:
    RoPE as R(t0 + i) = R(t0) R(i), keys turned by their offset i in the tile (cos / sin computed once), queries
    by -t0 once per tile: 2% faster than 1 with one KV head per program, 4% slower than the table with two.
    ``late_sum``: the softmax denominators are summed per token and reduced once after the loop (one cross-warp
    reduction per tile fewer; 3-4% faster). ``lazy_max``: the first tile's max is the softmax reference, with an
    exact second pass for the programs where that could overflow (see :func:`_launch_heads`; 1-6% faster)."""
    if hq is not None and heads_supported(layout, hq):  # 1 KV head per program at rank 64, 2 at rank <= 32
        two = layout.rank_k <= 32
        return dict(heads=2 if two else 1, block_t=64, num_warps=4, num_stages=3, pieces=1, rope=1, one_dot=True,
                    angles=0 if two else 2, late_sum=True, lazy_max=True)
    small = layout.rank_k <= 32 and layout.head_dim >= 64
    return dict(heads=0, block_t=64, num_warps=4, num_stages=2 if small else 3, pieces=2 if small else 1)


def latent_decode(q: torch.Tensor, kv_cache: torch.Tensor, layout: LatentLayout, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, factors: LatentFactors, scale: float, out: torch.Tensor | None = None,
                  *, num_splits: int | None = None, block_t: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None, rank_chunk: int | None = None, max_seq_len: int | None = None,
                  trans: bool = True, rope_tau: bool = False, pieces: int | None = None, group_fast: bool = False,
                  prefetch: bool = True, heads: int | None = None, cos_per_head: bool = False,
                  rope: int | None = None, one_dot: bool | None = None, maxnreg: int | None = None,
                  angles: bool | int | None = None, late_sum: bool | None = None,
                  lazy_max: bool | None = None) -> torch.Tensor:
    """Decode fast entry: ``q [R, Hq, hd]`` holds exactly one query (the last token) of each of the R requests.

    Without host synchronisation; ``max_seq_len`` (host int, optional) only sharpens the split-KV choice.
    ``heads``: KV heads per program of the multi-head kernel (0: the generic kernel; None: the default)."""
    R = q.shape[0]
    use_heads = trans and not rope_tau and heads_supported(layout, q.shape[1]) and heads != 0
    d = decode_defaults(layout, q.shape[1] if use_heads else None)
    block_t = block_t or d["block_t"]
    num_warps = num_warps or d["num_warps"]
    num_stages = num_stages or d["num_stages"]
    pieces = pieces or d["pieces"]
    max_ctx = max_seq_len or block_table.shape[1] * kv_cache.shape[1]
    if use_heads:
        nkv = _pick_nkv(layout, q.shape[1] // layout.num_kv_heads, heads or d["heads"])
        if num_splits is None:
            num_splits = default_splits(R * (layout.groups // nkv), max_ctx, block_t, q.device)
        return _launch_heads(q, kv_cache, layout, factors, block_table, seq_lens, seq_lens, R, True, scale, out,
                             num_splits, nkv, block_t, num_warps, num_stages, pieces, prefetch, cos_per_head,
                             **_heads_opts(factors, d, rope, one_dot, maxnreg, angles, late_sum, lazy_max))
    if num_splits is None:
        num_splits = default_splits(R * layout.groups, max_ctx, block_t, q.device)
    return _launch(q, kv_cache, layout, factors, block_table, seq_lens, seq_lens, seq_lens, R, 1, True, scale,
                   out, num_splits, block_t, num_warps, num_stages, rank_chunk, trans, rope_tau, pieces,
                   group_fast, prefetch)


def latent_attention(q: torch.Tensor, kv_cache: torch.Tensor, layout: LatentLayout,
                     block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                     b_k: torch.Tensor, b_v: torch.Tensor, bias_k, bias_v,
                     cos_sin_cache: torch.Tensor, scale: float, is_neox: bool = True,
                     out: torch.Tensor | None = None, *, max_query_len: int | None = None,
                     num_splits: int | None = None, block_q: int | None = None, block_t: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None, trans: bool = True,
                     rope_tau: bool = False, pieces: int | None = None, group_fast: bool = False, prefetch: bool = True,
                     heads: int | None = None, cos_per_head: bool = False, rope: int | None = None,
                     one_dot: bool | None = None, maxnreg: int | None = None, angles: bool | int | None = None,
                     late_sum: bool | None = None, lazy_max: bool | None = None, inv_freq: torch.Tensor | None = None,
                     factors: LatentFactors | None = None,
                     query_start_loc_cpu: torch.Tensor | None = None,
                     rebuild_min_queries: int = REBUILD_MIN_QUERIES,
                     rebuild_min_work: int = REBUILD_MIN_WORK) -> torch.Tensor:
    """Varlen causal attention over latent paged KV; same arguments and result as the reference.

    Long prompts: where ``max_query_len`` and ``query_start_loc_cpu`` (the host copy of ``query_start_loc``) are
    given, requests with at least ``rebuild_min_queries`` query tokens and ``rebuild_min_work`` (query, key) pairs
    (and at most ``REBUILD_MAX_TOKENS`` cached tokens) are computed by rebuilding their keys and values densely
    and running torch's flash attention
    (:func:`reference.rebuild_attention`: prefill is FLOP-bound and the latent kernel's prefill is slower, while
    the rebuild costs ~1 ms per request), the other requests by the kernels in one launch. Deciding reads the
    sequence lengths of the candidates on the host (one synchronisation, only for batches with such prompts).

    No host synchronisation: tiling is chosen from host-known sizes (``max_query_len`` if given, else the token
    and request counts). Factors are rearranged once and cached per (tensor, version). ``inv_freq`` (optional,
    the rotary embedding's fp32 inverse frequencies) lets the decode kernel compute cos / sin itself instead of
    reading table rows, where it reproduces ``cos_sin_cache`` (:func:`angles_match`). The keyword-only launch
    options exist for tuning (benchmarks/gpu_decode.py); the defaults are the measured best on an H100.
    """
    check_supported(layout)
    n_tok = q.shape[0]
    R = seq_lens.shape[0]
    if factors is None:
        factors = cached_factors(layout, b_k, b_v, bias_k, bias_v, cos_sin_cache, is_neox, _compute_dtype(q),
                                 inv_freq)
    if query_start_loc_cpu is not None and max_query_len is not None and max_query_len >= rebuild_min_queries:
        qsl = query_start_loc_cpu.tolist()
        nq = [qsl[r + 1] - qsl[r] for r in range(R)]
        cand = [r for r in range(R) if nq[r] >= rebuild_min_queries]
        lens = dict(zip(cand, seq_lens[cand].tolist() if cand else []))
        long = [r for r in cand if nq[r] * lens[r] >= rebuild_min_work and lens[r] <= REBUILD_MAX_TOKENS]
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        for r in long:
            out[qsl[r]:qsl[r + 1]] = reference.rebuild_attention(
                q[qsl[r]:qsl[r + 1]], kv_cache, layout, block_table[r], lens[r], b_k, b_v, bias_k, bias_v,
                cos_sin_cache, scale, is_neox)
        rest = [r for r in range(R) if nq[r] > 0 and r not in long]
        if rest:  # the others (decodes, short chunks) as one batch through the kernels
            rows = torch.cat([torch.arange(qsl[r], qsl[r + 1]) for r in rest]).to(q.device)
            idx = torch.tensor(rest, device=q.device)
            sub_qsl = torch.tensor([0] + [nq[r] for r in rest]).cumsum(0).to(q.device, query_start_loc.dtype)
            out[rows] = latent_attention(
                q[rows], kv_cache, layout, block_table[idx], seq_lens[idx], sub_qsl, b_k, b_v, bias_k,
                bias_v, cos_sin_cache, scale, is_neox, max_query_len=max(nq[r] for r in rest),
                num_splits=num_splits, block_q=block_q, block_t=block_t, num_warps=num_warps, num_stages=num_stages,
                trans=trans, rope_tau=rope_tau, pieces=pieces, group_fast=group_fast, prefetch=prefetch, heads=heads,
                cos_per_head=cos_per_head, rope=rope, one_dot=one_dot, maxnreg=maxnreg, angles=angles,
                late_sum=late_sum, lazy_max=lazy_max, factors=factors)
        else:
            LAST_LAUNCH.clear()
        LAST_LAUNCH["rebuilt"] = long
        return out
    opts = dict(trans=trans, rope_tau=rope_tau, group_fast=group_fast, prefetch=prefetch)
    if max_query_len == 1 and n_tok == R:
        return latent_decode(q, kv_cache, layout, block_table, seq_lens, factors, scale, out,
                             num_splits=num_splits, block_t=block_t, num_warps=num_warps,
                             num_stages=num_stages, pieces=pieces, heads=heads, cos_per_head=cos_per_head,
                             rope=rope, one_dot=one_dot, maxnreg=maxnreg, angles=angles, late_sum=late_sum,
                             lazy_max=lazy_max, **opts)
    decode_like = (max_query_len == 1) if max_query_len is not None else n_tok <= 2 * R
    if (decode_like and block_q in (None, 1) and trans and not rope_tau and heads != 0
            and heads_supported(layout, q.shape[1])):  # one query per program, several KV heads
        d = decode_defaults(layout, q.shape[1])
        nkv = _pick_nkv(layout, q.shape[1] // layout.num_kv_heads, heads or d["heads"])
        block_t = block_t or d["block_t"]
        if num_splits is None:
            num_splits = default_splits(n_tok * (layout.groups // nkv), block_table.shape[1] * kv_cache.shape[1],
                                        block_t, q.device)
        return _launch_heads(q, kv_cache, layout, factors, block_table, seq_lens, query_start_loc, n_tok, False,
                             scale, out, num_splits, nkv, block_t, num_warps or d["num_warps"],
                             num_stages or d["num_stages"], pieces or d["pieces"], prefetch, cos_per_head,
                             **_heads_opts(factors, d, rope, one_dot, maxnreg, angles, late_sum, lazy_max))
    opts["pieces"] = pieces or 1
    num_stages = num_stages or 2
    if block_q is None:
        block_q = 1 if decode_like else max(1, min(16, _next_pow2(max_query_len or 16)))
        # keep the latent accumulator (rows x rank_v) within ~16K fp32 values per program (registers)
        hg = layout.group_size * (q.shape[1] // layout.num_kv_heads)
        max_rows = max(16, 16384 // max(16, _next_pow2(layout.rank_v)))
        while block_q > 1 and block_q * hg > max_rows:
            block_q //= 2
    if block_t is None:
        block_t = 64
    if num_warps is None:
        num_warps = 4 if block_q * layout.group_size * (q.shape[1] // layout.num_kv_heads) <= 16 else 8
    if num_splits is None:
        if block_q == 1:
            num_splits = default_splits(n_tok * layout.groups, block_table.shape[1] * kv_cache.shape[1],
                                        block_t, q.device)
        else:
            num_splits = 1
    while True:
        if block_q == 1:
            tile_start = query_start_loc
            n_grid0 = n_tok
        else:
            nq = query_start_loc[1:] - query_start_loc[:-1]
            tile_start = torch.zeros(R + 1, dtype=torch.int32, device=q.device)
            tile_start[1:] = torch.cumsum((nq + block_q - 1) // block_q, 0)
            n_grid0 = -(-n_tok // block_q) + R
        try:
            return _launch(q, kv_cache, layout, factors, block_table, seq_lens, query_start_loc, tile_start,
                           n_grid0, block_q, False, scale, out, num_splits, block_t, num_warps, num_stages, None,
                           **opts)
        except OutOfResources:  # raised when compiling, before anything runs: retry with smaller query tiles
            if block_q == 1:
                raise
            block_q //= 2
