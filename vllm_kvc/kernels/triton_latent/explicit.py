"""The explicit-layout decode kernel (Gluon): roped 4- or 8-bit keys and 4-bit values with 32-value scales, ranks up
to 256, head groups of up to 8 query heads.

The Triton kernels decode a value tile in whatever register layout the compiler derives backwards from the tensor-core
operand, which for the value tile is one byte per shared-memory load with bank conflicts (benchmarks/RESULTS.md,
GPU rounds 5-6). Here every layout is chosen (Triton's Gluon dialect): each thread reads exactly the code bytes that
its ``mma.sync m16n8k16`` fragments need, as vector loads, decodes them in registers (the byte-permute level tables
of :func:`~.tiles.nibble_lut_group`; keys as (low, high) nibble pairs of one byte, the pairs an A fragment holds;
8-bit keys as fp16 by a byte permute, :data:`INT8_ASM`, against the query scaled to at most 1 in fp16) and feeds
them to the tensor cores; the layout conversions between the decoded tiles and the operands are register
renames (checked when compiling: ``convert_layout(..., assert_trivial=True)``). The code bytes are loaded straight
into registers, or (``stages`` > 0, :data:`STAGES`) through shared-memory rings that ``cp.async`` fills a few
blocks ahead, each thread copying the bytes it will read back (16- and 8-byte copies, the same layout both ways;
:func:`ring_ok`), with the fp16 scales loaded one block ahead into registers.

One program serves (request, head group, KV split) with 4 warps; each warp takes 16 of a 64-token block's tokens
and keeps its own online softmax (no barriers, but two per block with the rings). Tokens are the M dimension of both products:
``S [tok, head] = K [tok, k] . q^T [k, head]`` (the group's query heads padded to 8 columns) and
``O^T [rank, head] += V^T [rank, tok] . P [tok, head]``. A latent coordinate's position in a fragment is not its
position in the row: each thread's 16 K bytes (one scale group) and 8 V bytes (half of one) are contiguous in the
row, and the query (K) and the output rows (V) are permuted to match (:func:`k_rank`, :func:`v_rank`). Each warp's
(max, sum, weighted values) are written as one split-KV partial; the reduce (``prefill._latent_reduce``) merges
them and applies ``B_v``.

Served (:func:`serves`): roped keys, ``int4@g32`` or ``int8/int4@g32`` latents of even ranks up to 256 (K and V
apart; the fragments are 128 wide, a rank above 128 takes a second K tile and a second value accumulator, and the
bytes and scales past a rank are read as zeros and its output rows dropped),
any group size with at most 8 query heads per head group (a group's KV heads share its latents: their query heads
are the score tile's columns), 64-token blocks, bf16 queries, decode (one query per request), no sink, sm_90.
Everything else keeps the Triton kernels. Measured: benchmarks/RESULTS.md, "GPU speed", rounds 8-10.
"""
from __future__ import annotations

import torch

from .config import device_props, interpreting, next_pow2, row_format
from .tiles import G_LO0, G_LO1, GROUP_ASM_OK, NIBBLE_ASM_BYTES, NIBBLE_ASM_GROUP, U_LO0, U_LO1

try:  # Gluon: Triton's explicit-layout dialect (triton >= 3.5)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
    # global -> shared copies (cp.async): triton 3.6 names it async_copy_global_to_shared, later ones async_load
    _ASYNC_LOAD = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    AVAILABLE = GROUP_ASM_OK
except ImportError:  # pragma: no cover - older triton: the Triton kernels serve every layout
    AVAILABLE = False

BLOCK = 64  # tokens per vLLM block (the kernel reads one block per step: 4 warps x 16 tokens)
FRAG = 128  # the fragments' width in latent coordinates (ranks below a multiple of it read masked, as zeros)
RANK = 256  # the largest K / V rank: two fragments' widths (the second half of a rank above 128 in a second tile)
MAX_QPK = 8  # query heads per head group: the columns of the score tile
DTYPES = ("int4@g32", "int8/int4@g32")  # 4- or 8-bit keys, 4-bit values, 32 values per scale
# blocks of code bytes in flight per program (shared-memory rings filled by cp.async, a power of two); 0, the
# default: straight loads into registers (the rings hide the loads' latency but add ~115 instructions and two
# barriers per step: 12 % slower per layer in one wave, 2 % faster in the whole model; RESULTS.md, round 9)
STAGES = 0
# stages 0: the first block's max as each warp's softmax reference (per thread sums and maxima, no rescaling; a second
# sweep where a later score exceeds it by 2^64)
LAZY_MAX = False


# the register cap of ranks above 128 (two K tiles, two value accumulators: ~200 registers uncapped, 2 programs per
# SM; at 168 three fit, with ~100 bytes of spills)
WIDE_MAXNREG = 168


def default_maxnreg(layout) -> int:
    """The launch's register cap where the caller gives none: 128 (4 programs per SM without spills) up to rank
    128, :data:`WIDE_MAXNREG` above."""
    return 128 if max(layout.rank_k, layout.rank_v) <= FRAG else WIDE_MAXNREG


def per_sm(maxnreg: int | None = None) -> int:
    """Programs resident per SM (4 warps each, no shared memory) under a register cap (None / 0: 128)."""
    return max(1, 65536 // ((maxnreg or 128) * 32 * 4))


def k_rank(k):
    """Latent coordinate (in the row) of position k of the K fragments: thread lane % 4 = a holds positions
    2a + r0 + 8 j0 + 16 j1 + 32 j2 + 64 j3, i.e. coordinates 32 a + r0 + 2 (j0 + 2 j1 + 4 j2 + 8 j3): its 16 bytes."""
    return 32 * ((k // 2) % 4) + k % 2 + 2 * (k // 8)


def v_rank(m):
    """Latent coordinate of row m of the weighted-value tile: thread lane // 4 = c holds rows c + 8 t, i.e.
    coordinates 16 c + t: its 8 bytes."""
    return 16 * (m % 8) + m // 8


def serves(layout, num_heads: int, block_size: int, roped: bool, sink: bool = False) -> bool:
    """Whether the explicit-layout kernel serves a decode batch of this layout (the device checks are the
    caller's: :func:`device_ok`)."""
    return (AVAILABLE and roped and not sink and layout.dtype in DTYPES
            and all(0 < r <= RANK and r % 2 == 0 for r in (layout.rank_k, layout.rank_v)) and block_size == BLOCK
            and num_heads % layout.num_kv_heads == 0
            and layout.group_size * (num_heads // layout.num_kv_heads) <= MAX_QPK)


# int8 codes -> fp16, 4 per instance ($2: the bytes, $3: the fp16 scale of bytes 0, 1 twice): the biased byte
# u = b + 128 as the mantissa of 1024 + u (a byte permute against 0x64 high bytes), minus 1152 exactly, times the scale
INT8_ASM = """{
.reg .b32 u, h, c;
xor.b32 u, $2, 0x80808080;
mov.b32 c, 0x64806480;
prmt.b32 h, u, 0x64646464, 0x4140;
sub.rn.f16x2 h, h, c;
mul.rn.f16x2 $0, h, $3;
prmt.b32 h, u, 0x64646464, 0x4342;
sub.rn.f16x2 h, h, c;
mul.rn.f16x2 $1, h, $3;
}"""


def ring_ok(layout, kv_cache: torch.Tensor) -> bool:
    """Whether the code bytes can go through the shared-memory rings: cp.async copies 4, 8 or 16 bytes, so every
    head group's K and V codes must start 4-byte aligned (ranks multiples of 8) in rows of a multiple of 16 bytes
    (what the launch specialises on), ranks up to 128; otherwise the kernel loads them straight into registers."""
    return (layout.bits_k == 4 and max(layout.rank_k, layout.rank_v) <= FRAG and layout.rank_k % 8 == 0
            and layout.rank_v % 8 == 0 and kv_cache.stride(1) % 16 == 0
            and kv_cache.stride(0) % 16 == 0 and kv_cache.data_ptr() % 16 == 0)


def device_ok(q: torch.Tensor) -> bool:
    """A CUDA device of compute capability 9.0 or newer (packed bf16 multiplies), bf16 queries, not the
    interpreter (the device's properties are looked up once: this runs on every attention call)."""
    return (q.is_cuda and q.dtype == torch.bfloat16 and not interpreting()
            and device_props(q.device).major >= 9)


if AVAILABLE:
    R_ = gl.constexpr(FRAG)  # (globals a kernel reads must be constexprs)
    INT8_ASM_C = gl.constexpr(INT8_ASM)
    MMA = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1, 1], instr_shape=[1, 16, 8])
    A_L = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_L = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    # K code bytes [warp, token, scale group a, byte j]: lane % 4 = a, lane // 4 = token (and token + 8 in a
    # register): a thread's 16 bytes are one scale group of one token, one 16-byte load
    KB_L = gl.BlockedLayout(size_per_thread=[1, 1, 1, 16], threads_per_warp=[1, 8, 4, 1],
                            warps_per_cta=[4, 1, 1, 1], order=[3, 2, 1, 0])
    # 8-bit K codes likewise: a thread's 32 bytes are one scale group of one token, two 16-byte loads
    KB8_L = gl.BlockedLayout(size_per_thread=[1, 1, 1, 32], threads_per_warp=[1, 8, 4, 1],
                             warps_per_cta=[4, 1, 1, 1], order=[3, 2, 1, 0])
    # V code bytes [warp, token, block c, byte jj]: lane % 4 -> tokens 2a, 2a + 1 (+ 8), lane // 4 = c: a thread's
    # 8 bytes of 4 tokens, one 8-byte load each
    VB_L = gl.BlockedLayout(size_per_thread=[1, 2, 1, 8], threads_per_warp=[1, 4, 8, 1],
                            warps_per_cta=[4, 1, 1, 1], order=[3, 1, 2, 0])
    # the code-byte rings [stage, warp, token, part, byte] (a layout of the 4 inner dimensions), unswizzled: each
    # thread reads back what it copied; stages a power of two (Gluon)
    RING5 = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[3, 2, 1, 0])

    @gluon.jit
    def _nibbles(x, s, ASM: gl.constexpr):
        """Two bf16 tensors of x's shape: the values of code bytes x under fp32 scales s (broadcast over x; every 4
        consecutive bytes of a thread share a scale) by the byte-permute decoder of tiles._nibble_asm_group: with
        ``NIBBLE_ASM_GROUP`` (low-nibble, high-nibble) values; with ``NIBBLE_ASM_BYTES`` (in each 4 bytes) the
        (low, high) values of bytes 0, 2 and of bytes 1, 3."""
        neg = s < 0
        t0 = gl.where(neg, U_LO0, G_LO0)
        t1 = gl.where(neg, U_LO1, G_LO1)
        sa = gl.abs(s).to(gl.bfloat16)
        return gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r", [x, t0, t1, sa],
                                         dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=4)

    @gluon.jit
    def _int8s(x, s):
        """fp16 values of int8 codes x (as uint8) times their fp16 scales s (broadcast over x; every 4 consecutive
        bytes of a thread share a scale), element by element: :data:`INT8_ASM`."""
        return gl.inline_asm_elementwise(INT8_ASM_C, "=r,=r,r,r,r", [x, s], dtype=gl.float16, is_pure=True, pack=4)

    @gluon.jit
    def _block_offsets(L: gl.constexpr, NPART: gl.constexpr, NB: gl.constexpr, PER_SCALE: gl.constexpr):
        """Addressing of a block's code bytes laid out as [warp, token, part, byte] in layout L: each row's token in
        the block [4, 16, 1], each element's byte in the head group's codes [1, 1, NPART, NB] (part p: bytes
        NB p ..), each part's scale within the head group [1, 1, NPART] (PER_SCALE parts per scale)."""
        w = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L))))
        t = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L))))
        p = gl.arange(0, NPART, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L))))
        j = gl.arange(0, NB, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L))))
        tok = gl.expand_dims(gl.expand_dims(w, 1) * 16 + gl.expand_dims(t, 0), 2)
        col = (gl.expand_dims(gl.expand_dims(gl.expand_dims(p * NB, 0), 1), 3)
               + gl.expand_dims(gl.expand_dims(gl.expand_dims(j, 0), 1), 2))
        return tok, col, gl.expand_dims(gl.expand_dims(p // PER_SCALE, 0), 1)

    @gluon.jit
    def _part_ptrs(cache_ptr, blk, live, t0, seq_len, g, stride_cb, stride_cs, tok, col, sc, R: gl.constexpr,
                   OFF: gl.constexpr, SOFF: gl.constexpr, BITS: gl.constexpr = 4, C0: gl.constexpr = 0):
        """Pointers and masks of block ``blk``'s (its first token ``t0``) code bytes and fp16 scales of head group g
        in one part of a row (K or V) of rank R at BITS per value, its codes from byte OFF and its scales from SOFF
        (``tok``, ``col``, ``sc``: :func:`_block_offsets`), the 128 coordinates from C0 (0, or 128: the second
        half of a rank above 128): tokens from seq_len on, all where not ``live``, and bytes and scales past rank R
        masked (read as 0)."""
        ok = ((t0 + tok) < seq_len) & live  # [4, 16, 1]
        row = cache_ptr + blk.to(gl.int64) * stride_cb + tok * stride_cs
        ok_x = gl.expand_dims(ok, 3)
        ok_s = ok
        if R - C0 < R_:
            ok_x = ok_x & (col < (R - C0) * BITS // 8)
            ok_s = ok_s & (sc < (R - C0 + 31) // 32)
        return (gl.expand_dims(row, 3) + OFF + g * (R * BITS // 8) + C0 * BITS // 8 + col, ok_x,
                (row + SOFF).to(gl.pointer_type(gl.float16)) + g * ((R + 31) // 32) + C0 // 32 + sc, ok_s)

    @gluon.jit
    def _load_part(cache_ptr, blk, live, t0, seq_len, g, stride_cb, stride_cs, tok, col, sc, R: gl.constexpr,
                   OFF: gl.constexpr, SOFF: gl.constexpr, BITS: gl.constexpr = 4, C0: gl.constexpr = 0):
        """(code bytes, fp16 scales) of :func:`_part_ptrs`, loaded."""
        xp, ok_x, sp, ok_s = _part_ptrs(cache_ptr, blk, live, t0, seq_len, g, stride_cb, stride_cs, tok, col, sc, R,
                                        OFF, SOFF, BITS, C0)
        return gl.load(xp, mask=ok_x, other=0), gl.load(sp, mask=ok_s, other=0.0)

    @gluon.jit
    def _load_scales(cache_ptr, blk, live, t0, seq_len, g, stride_cb, stride_cs, tok, col, sc, R: gl.constexpr,
                     OFF: gl.constexpr, SOFF: gl.constexpr):
        """The fp16 scales of :func:`_part_ptrs`, loaded."""
        _xp, _okx, sp, ok_s = _part_ptrs(cache_ptr, blk, live, t0, seq_len, g, stride_cb, stride_cs, tok, col, sc, R,
                                         OFF, SOFF)
        return gl.load(sp, mask=ok_s, other=0.0)

    @gluon.jit
    def _copy_codes(ring_k, ring_v, cache_ptr, blk, live, t0, seq_len, g, stride_cb, stride_cs, tok_k, kcol, ksc,
                    tok_v, vcol, vsc, RK: gl.constexpr, RV: gl.constexpr, K_SOFF: gl.constexpr, V_OFF: gl.constexpr,
                    V_SOFF: gl.constexpr):
        """Block ``blk``'s K and V code bytes into one stage of the rings (cp.async; masked bytes written as 0), one
        commit group. Each thread copies the bytes it will read back (same layout), so no barrier is needed."""
        xp, ok_x, _sp, _oks = _part_ptrs(cache_ptr, blk, live, t0, seq_len, g, stride_cb, stride_cs, tok_k, kcol, ksc,
                                         RK, 0, K_SOFF)
        _ASYNC_LOAD(ring_k, xp, mask=ok_x)
        xp, ok_x, _sp, _oks = _part_ptrs(cache_ptr, blk, live, t0, seq_len, g, stride_cb, stride_cs, tok_v, vcol, vsc,
                                         RV, V_OFF, V_SOFF)
        _ASYNC_LOAD(ring_v, xp, mask=ok_x)
        async_copy.commit_group()

    @gluon.jit
    def _load_block(cache_ptr, blk, live, t0, seq_len, g, stride_cb, stride_cs, tok_k, kcol, ksc, tok_v, vcol, vsc,
                    RK: gl.constexpr, RV: gl.constexpr, K_SOFF: gl.constexpr, V_OFF: gl.constexpr,
                    V_SOFF: gl.constexpr, K_BITS: gl.constexpr):
        """Block ``blk``'s (its first token t0) code bytes and scales: K's first 128 coordinates, then its next 128
        (where rank_k > 128; else the first again, unused), likewise V."""
        kx, ks = _load_part(cache_ptr, blk, live, t0, seq_len, g, stride_cb, stride_cs, tok_k, kcol, ksc, RK, 0,
                            K_SOFF, K_BITS)
        if RK > R_:
            kx1, ks1 = _load_part(cache_ptr, blk, live, t0, seq_len, g, stride_cb, stride_cs, tok_k, kcol, ksc, RK, 0,
                                  K_SOFF, K_BITS, R_)
        else:
            kx1, ks1 = kx, ks
        vx, vs = _load_part(cache_ptr, blk, live, t0, seq_len, g, stride_cb, stride_cs, tok_v, vcol, vsc, RV, V_OFF,
                            V_SOFF)
        if RV > R_:
            vx1, vs1 = _load_part(cache_ptr, blk, live, t0, seq_len, g, stride_cb, stride_cs, tok_v, vcol, vsc, RV,
                                  V_OFF, V_SOFF, 4, R_)
        else:
            vx1, vs1 = vx, vs
        return kx, ks, kx1, ks1, vx, vs, vx1, vs1

    @gluon.jit
    def _key_mma(kx, ks, qb, s, K_BITS: gl.constexpr):
        """s + 128 coordinates' share of the scores [warp, token, head]: K code bytes and scales, decoded into the A
        fragments, times the latent queries qb."""
        if K_BITS == 8:
            # byte j = 2 J + r of the 32 (J = 8 j3 + 4 j2 + 2 j1 + j0): fragment position
            # k = r + 2 a + 8 j0 + 16 j1 + 32 j2 + 64 j3 (the coordinates k_rank gives, as for 4 bits)
            kv = _int8s(kx, gl.expand_dims(ks, 3))
            ka = gl.reshape(kv, [4, 16, 4, 2, 2, 2, 2, 2])  # (warp, t, a, j3, j2, j1, j0, r)
            ka = gl.reshape(gl.permute(ka, (0, 1, 3, 4, 5, 6, 2, 7)), [4, 16, R_])
        else:
            # byte j = 4 w + 2 e + T of the 16, nibble r: fragment position k = r + 2 a + 8 T + 16 e + 32 w
            k02, k13 = _nibbles(kx, gl.expand_dims(ks.to(gl.float32), 3), NIBBLE_ASM_BYTES)
            ka = gl.reshape(gl.join(k02, k13), [4, 16, 4, 2, 2, 2, 2, 2])  # (warp, t, a, w1, w0, e, r, T)
            ka = gl.reshape(gl.permute(ka, (0, 1, 3, 4, 5, 7, 2, 6)), [4, 16, R_])
        return mma_v2(gl.convert_layout(ka, A_L, assert_trivial=True), qb, s)

    @gluon.jit
    def _scores(kx, ks, kx1, ks1, t0, seq_len, qb, qb1, s_mul, tok_s, RK: gl.constexpr, K_BITS: gl.constexpr):
        """Scores [warp, token, head] (log2 units; tokens from seq_len on -inf) of one block (its first token t0):
        both halves of a rank above 128."""
        s = _key_mma(kx, ks, qb, gl.full([4, 16, 8], 0.0, gl.float32, layout=MMA), K_BITS)
        if RK > R_:
            s = _key_mma(kx1, ks1, qb1, s, K_BITS)
        return gl.where((t0 + tok_s) < seq_len, s * s_mul, float("-inf"))

    @gluon.jit
    def _value_mma(vx, vs, pb, acc):
        """acc + 128 coordinates of the block's values (V code bytes and scales) weighted by pb."""
        vlo, vhi = _nibbles(vx, gl.expand_dims(vs.to(gl.float32), 3), NIBBLE_ASM_GROUP)
        va = gl.permute(gl.join(vlo, vhi), (0, 3, 4, 2, 1))  # (w, t, c, jj, nibble) -> (w, jj, nibble, c, t)
        va = gl.convert_layout(gl.reshape(va, [4, R_, 16]), A_L, assert_trivial=True)
        return mma_v2(va, pb, acc)

    @gluon.jit
    def _weigh_values(vx, vs, vx1, vs1, p, acc, acc1, RV: gl.constexpr):
        """(acc, acc1) + the block's values weighted by p [warp, token, head]: acc1 the second half of a rank
        above 128."""
        pb = gl.convert_layout(p.to(gl.bfloat16), B_L)
        acc = _value_mma(vx, vs, pb, acc)
        if RV > R_:
            acc1 = _value_mma(vx1, vs1, pb, acc1)
        return acc, acc1

    @gluon.jit
    def _attend(kx, ks, kx1, ks1, vx, vs, vx1, vs1, t0, seq_len, qb, qb1, s_mul, tok_s, m_i, l_i, acc, acc1,
                RK: gl.constexpr, RV: gl.constexpr, K_BITS: gl.constexpr):
        """One block (its first token t0) of code bytes and scales (:func:`_load_block`) into the running (max, sum,
        weighted value latents) of each warp's 16 tokens (online softmax)."""
        s = _scores(kx, ks, kx1, ks1, t0, seq_len, qb, qb1, s_mul, tok_s, RK, K_BITS)
        m_new = gl.maximum(m_i, gl.max(s, 1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, 1)
        alpha = gl.expand_dims(alpha, 1)
        acc = acc * alpha
        if RV > R_:
            acc1 = acc1 * alpha
        acc, acc1 = _weigh_values(vx, vs, vx1, vs1, p, acc, acc1, RV)
        return m_new, l_i, acc, acc1

    @gluon.jit
    def _sweep_fixed(m_ref, cache_ptr, bt_row, b_lo, b_hi, seq_len, g, stride_cb, stride_cs, tok_k, kcol, ksc,
                     tok_v, vcol, vsc, qb, qb1, s_mul, tok_s, RK: gl.constexpr, RV: gl.constexpr,
                     K_SOFF: gl.constexpr, V_OFF: gl.constexpr, V_SOFF: gl.constexpr, BS: gl.constexpr,
                     K_BITS: gl.constexpr):
        """The blocks b_lo .. b_hi - 1 against a fixed softmax reference m_ref [warp, head] (no rescaling, no
        reductions across lanes per block): (each thread's running max of its scores, its sums of the weights,
        weighted value latents and their second half)."""
        mx = gl.full([4, 16, 8], -1.0e30, gl.float32, layout=MMA)
        l_t = gl.full([4, 16, 8], 0.0, gl.float32, layout=MMA)
        acc = gl.full([4, R_, 8], 0.0, gl.float32, layout=MMA)
        acc1 = gl.full([4, R_, 8], 0.0, gl.float32, layout=MMA)
        ref = gl.expand_dims(m_ref, 1)
        blk = gl.load(bt_row + b_lo, mask=b_lo < b_hi, other=0)
        for blk_i in range(b_lo, b_hi):
            nxt = gl.load(bt_row + blk_i + 1, mask=blk_i + 1 < b_hi, other=0)
            kx, ks, kx1, ks1, vx, vs, vx1, vs1 = _load_block(
                cache_ptr, blk, blk_i < b_hi, blk_i * BS, seq_len, g, stride_cb, stride_cs, tok_k, kcol, ksc, tok_v,
                vcol, vsc, RK, RV, K_SOFF, V_OFF, V_SOFF, K_BITS)
            s = _scores(kx, ks, kx1, ks1, blk_i * BS, seq_len, qb, qb1, s_mul, tok_s, RK, K_BITS)
            mx = gl.maximum(mx, s)
            p = gl.exp2(s - ref)
            l_t = l_t + p
            acc, acc1 = _weigh_values(vx, vs, vx1, vs1, p, acc, acc1, RV)
            blk = nxt
        return mx, l_t, acc, acc1

    @gluon.jit
    def _roped_int4_decode(q_ptr, stride_qt, stride_qh, cache_ptr, stride_cb, stride_cs, bt_ptr, stride_bt,
                           seq_lens_ptr, pm_ptr, pl_ptr, pacc_ptr, qk_scale, num_splits,
                           G: gl.constexpr, QPK: gl.constexpr, RK: gl.constexpr, RV: gl.constexpr, RV_P: gl.constexpr,
                           K_SOFF: gl.constexpr, V_OFF: gl.constexpr, V_SOFF: gl.constexpr, BS: gl.constexpr,
                           STAGES: gl.constexpr, K_BITS: gl.constexpr, LAZY_MAX: gl.constexpr):
        """Program (request r, head group g, split sp): the blocks of its split, one per step; per warp the
        partial (max, sum, weighted value latents) of its 16 tokens of each block -> split sp * 4 + warp."""
        r = gl.program_id(0)
        g = gl.program_id(1)
        sp = gl.program_id(2)
        seq_len = gl.load(seq_lens_ptr + r)
        n_blk = gl.cdiv(seq_len, BS)
        per = gl.cdiv(n_blk, num_splits)
        b_lo = sp * per
        b_hi = gl.minimum(n_blk, b_lo + per)

        # the latent queries as the B operand [warp, fragment position k, head n] (heads >= QPK zero)
        qb_w = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, B_L)))
        qb_k = gl.arange(0, R_, layout=gl.SliceLayout(0, gl.SliceLayout(2, B_L)))
        qb_n = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, B_L)))
        phys_k = 32 * ((qb_k // 2) % 4) + qb_k % 2 + 2 * (qb_k // 8)  # k_rank
        n3 = gl.expand_dims(gl.expand_dims(qb_n, 0), 1)
        w3 = gl.expand_dims(gl.expand_dims(qb_w, 1), 2)
        q_ptrs = (q_ptr + r.to(gl.int64) * stride_qt + (g * QPK + n3) * stride_qh
                  + gl.expand_dims(gl.expand_dims(phys_k, 0), 2) + 0 * w3)
        q_ok = (n3 < QPK) & (w3 >= 0) & (gl.expand_dims(gl.expand_dims(phys_k, 0), 2) < RK)
        qf = gl.load(q_ptrs, mask=q_ok, other=0.0).to(gl.float32)
        if RK > R_:  # coordinates 128 .. of a rank above 128: the second K tile's queries
            q_ok1 = (n3 < QPK) & (w3 >= 0) & (gl.expand_dims(gl.expand_dims(phys_k, 0), 2) + R_ < RK)
            qf1 = gl.load(q_ptrs + R_, mask=q_ok1, other=0.0).to(gl.float32)
        else:
            qf1 = qf
        if K_BITS == 8:
            # 8-bit keys are fp16 tensor-core operands (exact integers times an fp16 scale): so is the query, divided
            # by its absolute maximum (each warp holds the whole query) and the scores multiplied back
            qmax = gl.maximum(gl.maximum(gl.max(gl.max(gl.abs(qf), 2), 1), gl.max(gl.max(gl.abs(qf1), 2), 1)),
                              1.0e-30)  # [warp]
            qb = (qf / gl.expand_dims(gl.expand_dims(qmax, 1), 2)).to(gl.float16)
            qb1 = (qf1 / gl.expand_dims(gl.expand_dims(qmax, 1), 2)).to(gl.float16)
            s_mul = gl.expand_dims(gl.expand_dims(gl.convert_layout(
                qmax, gl.SliceLayout(1, gl.SliceLayout(2, MMA))), 1), 2) * qk_scale
        else:
            qb = qf.to(gl.bfloat16)
            qb1 = qf1.to(gl.bfloat16)
            s_mul = qk_scale

        # addresses within a block: K [warp, token, scale group, byte], V [warp, token, 8-byte block, byte]
        if K_BITS == 8:
            tok_k, kcol, ksc = _block_offsets(gl.constexpr(KB8_L), 4, 32, 1)
        else:
            tok_k, kcol, ksc = _block_offsets(gl.constexpr(KB_L), 4, 16, 1)
        tok_v, vcol, vsc = _block_offsets(gl.constexpr(VB_L), 8, 8, 2)
        s_w = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, MMA)))
        s_t = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, MMA)))
        tok_s = gl.expand_dims(gl.expand_dims(s_w * 16, 1) + gl.expand_dims(s_t, 0), 2)  # score rows' tokens

        m_i = gl.full([4, 8], -1.0e30, gl.float32, layout=gl.SliceLayout(1, MMA))
        l_i = gl.full([4, 8], 0.0, gl.float32, layout=gl.SliceLayout(1, MMA))
        acc = gl.full([4, R_, 8], 0.0, gl.float32, layout=MMA)
        acc1 = gl.full([4, R_, 8], 0.0, gl.float32, layout=MMA)  # V coordinates 128 .. (ranks above 128)
        bt_row = bt_ptr + r.to(gl.int64) * stride_bt
        blk = gl.load(bt_row + b_lo, mask=b_lo < b_hi, other=0)
        if STAGES > 0:
            # code bytes through shared-memory rings of STAGES blocks, copied STAGES - 1 blocks ahead; the scales
            # one block ahead in registers (ranks up to 128: ring_ok)
            gl.static_assert(RK <= R_ and RV <= R_)
            ring_k = gl.allocate_shared_memory(gl.uint8, [STAGES, 4, 16, 4, 16], RING5)
            ring_v = gl.allocate_shared_memory(gl.uint8, [STAGES, 4, 16, 8, 8], RING5)
            for st in gl.static_range(STAGES - 1):
                bid = gl.load(bt_row + b_lo + st, mask=b_lo + st < b_hi, other=0)
                _copy_codes(ring_k.index(st), ring_v.index(st), cache_ptr, bid, b_lo + st < b_hi, (b_lo + st) * BS,
                            seq_len, g, stride_cb, stride_cs, tok_k, kcol, ksc, tok_v, vcol, vsc, RK, RV, K_SOFF,
                            V_OFF, V_SOFF)
            ks_n = _load_scales(cache_ptr, blk, b_lo < b_hi, b_lo * BS, seq_len, g, stride_cb, stride_cs, tok_k, kcol,
                                ksc, RK, 0, K_SOFF)
            vs_n = _load_scales(cache_ptr, blk, b_lo < b_hi, b_lo * BS, seq_len, g, stride_cb, stride_cs, tok_v, vcol,
                                vsc, RV, V_OFF, V_SOFF)
        if LAZY_MAX and STAGES == 0:
            # the first block's max as the softmax reference: no rescaling and no reductions across lanes per block;
            # where a later score exceeds it by more than 2^64 (weights past bf16's range for the products' sums)
            # the program sweeps its blocks again against the true max
            kx, ks, kx1, ks1, vx, vs, vx1, vs1 = _load_block(
                cache_ptr, blk, b_lo < b_hi, b_lo * BS, seq_len, g, stride_cb, stride_cs, tok_k, kcol, ksc, tok_v,
                vcol, vsc, RK, RV, K_SOFF, V_OFF, V_SOFF, K_BITS)
            m_i = gl.maximum(gl.max(_scores(kx, ks, kx1, ks1, b_lo * BS, seq_len, qb, qb1, s_mul, tok_s, RK, K_BITS),
                                    1), -1.0e30)
            mx, l_t, acc, acc1 = _sweep_fixed(m_i, cache_ptr, bt_row, b_lo, b_hi, seq_len, g, stride_cb, stride_cs,
                                              tok_k, kcol, ksc, tok_v, vcol, vsc, qb, qb1, s_mul, tok_s, RK, RV,
                                              K_SOFF, V_OFF, V_SOFF, BS, K_BITS)
            m_max = gl.max(mx, 1)
            if gl.max(gl.max(m_max - m_i, 1), 0) > 64.0:
                m_i = m_max
                mx, l_t, acc, acc1 = _sweep_fixed(m_i, cache_ptr, bt_row, b_lo, b_hi, seq_len, g, stride_cb,
                                                  stride_cs, tok_k, kcol, ksc, tok_v, vcol, vsc, qb, qb1, s_mul,
                                                  tok_s, RK, RV, K_SOFF, V_OFF, V_SOFF, BS, K_BITS)
            l_i = gl.sum(l_t, 1)
            b_hi = b_lo  # (the online-softmax loop below runs no step)
        for blk_i in range(b_lo, b_hi):
            # the next block's id now, a register carried to the next step (its load is off the critical path)
            nxt = gl.load(bt_row + blk_i + 1, mask=blk_i + 1 < b_hi, other=0)
            if STAGES > 0:
                ahead = blk_i + STAGES - 1
                stage = (blk_i - b_lo) % STAGES
                bid = gl.load(bt_row + ahead, mask=ahead < b_hi, other=0)
                _copy_codes(ring_k.index((stage + STAGES - 1) % STAGES), ring_v.index((stage + STAGES - 1) % STAGES),
                            cache_ptr, bid, ahead < b_hi, ahead * BS, seq_len, g, stride_cb, stride_cs, tok_k, kcol,
                            ksc, tok_v, vcol, vsc, RK, RV, K_SOFF, V_OFF, V_SOFF)
                ks = ks_n
                vs = vs_n
                ks_n = _load_scales(cache_ptr, nxt, blk_i + 1 < b_hi, (blk_i + 1) * BS, seq_len, g, stride_cb,
                                    stride_cs, tok_k, kcol, ksc, RK, 0, K_SOFF)
                vs_n = _load_scales(cache_ptr, nxt, blk_i + 1 < b_hi, (blk_i + 1) * BS, seq_len, g, stride_cb,
                                    stride_cs, tok_v, vcol, vsc, RV, V_OFF, V_SOFF)
                async_copy.wait_group(STAGES - 1)  # this block's copies (this thread's own bytes) have landed
                kx = ring_k.index(stage).load(KB_L)
                vx = ring_v.index(stage).load(VB_L)
                kx1, ks1, vx1, vs1 = kx, ks, vx, vs
            else:
                kx, ks, kx1, ks1, vx, vs, vx1, vs1 = _load_block(
                    cache_ptr, blk, blk_i < b_hi, blk_i * BS, seq_len, g, stride_cb, stride_cs, tok_k, kcol, ksc,
                    tok_v, vcol, vsc, RK, RV, K_SOFF, V_OFF, V_SOFF, K_BITS)
            m_i, l_i, acc, acc1 = _attend(kx, ks, kx1, ks1, vx, vs, vx1, vs1, blk_i * BS, seq_len, qb, qb1, s_mul,
                                          tok_s, m_i, l_i, acc, acc1, RK, RV, K_BITS)
            blk = nxt
        if STAGES > 0:
            async_copy.wait_group(0)  # the copies past the end (masked, zero-filled) land before the program exits

        # partials of split sp * 4 + warp; row m of acc holds latent coordinate v_rank(m)
        o_m = gl.arange(0, R_, layout=gl.SliceLayout(0, gl.SliceLayout(2, MMA)))
        o_n = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, MMA)))
        w2 = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(1, MMA))), 1)
        base = (r.to(gl.int64) * (G * QPK) + g * QPK + gl.expand_dims(o_n, 0)) * (num_splits * 4) + sp * 4 + w2
        ok = (gl.expand_dims(o_n, 0) < QPK) & (w2 >= 0)
        gl.store(pm_ptr + base, m_i, mask=ok)
        gl.store(pl_ptr + base, l_i, mask=ok)
        col = gl.expand_dims(gl.expand_dims(16 * (o_m % 8) + o_m // 8, 0), 2)  # v_rank
        gl.store(pacc_ptr + gl.expand_dims(base, 1) * RV_P + col, acc, mask=gl.expand_dims(ok, 1) & (col < RV))
        if RV > R_:
            gl.store(pacc_ptr + gl.expand_dims(base, 1) * RV_P + col + R_, acc1,
                     mask=gl.expand_dims(ok, 1) & (col + R_ < RV))


def launch(q, kv_cache, f, block_table, seq_lens, scale: float, out, num_splits: int, maxnreg: int | None = None,
           stages: int | None = None, lazy_max: bool | None = None):
    """Decode over ``kv_cache`` for ``q [R, Hq, rank_k]`` (latent queries, bf16) of the layout of ``f`` (one of
    :func:`serves`), then the split-KV reduce (``B_v``) into ``out`` ([R, Hq, head_dim], allocated if None).
    ``maxnreg``: a register cap (Triton's; None: :func:`default_maxnreg`, 128 up to rank 128: the compiler's own
    choice at rank 128 and what keeps 4 programs per SM at smaller ranks without spills; 0: the compiler's choice). ``stages``: blocks in the
    shared-memory rings of code bytes (0: loads straight into registers; None: :data:`STAGES`). ``lazy_max``
    (stages 0): the first block's max as each warp's softmax reference (None: :data:`LAZY_MAX`)."""
    from .prefill import LOG2E, launch_reduce
    layout = f.layout
    R, hq = q.shape[:2]
    qpk = hq // layout.num_kv_heads
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(R, hq, layout.head_dim, dtype=q.dtype, device=q.device)
    nsp = 4 * num_splits
    pm = torch.empty(R, hq, nsp, dtype=torch.float32, device=q.device)
    pl = torch.empty_like(pm)
    rv_p = max(16, next_pow2(layout.rank_v))  # the reduce's row of partial values
    pacc = torch.empty(R, hq, nsp, rv_p, dtype=torch.float32, device=q.device)
    kf, vf = row_format(layout)
    if stages is None:
        stages = STAGES
    if stages and not ring_ok(layout, kv_cache):
        stages = 0
    _roped_int4_decode[(R, layout.groups, num_splits)](
        q, q.stride(0), q.stride(1), kv_cache, kv_cache.stride(0), kv_cache.stride(1), block_table,
        block_table.stride(0), seq_lens, pm, pl, pacc, float(scale) * LOG2E, num_splits,
        G=layout.groups, QPK=layout.group_size * qpk, RK=layout.rank_k, RV=layout.rank_v, RV_P=rv_p, K_SOFF=kf.soff,
        V_OFF=vf.off, V_SOFF=vf.soff, BS=BLOCK, STAGES=stages, K_BITS=layout.bits_k,
        LAZY_MAX=bool(LAZY_MAX if lazy_max is None else lazy_max) and not stages, num_warps=4,
        **({"maxnreg": default_maxnreg(layout) if maxnreg is None else maxnreg} if maxnreg != 0 else {}))
    launch_reduce(pm, pl, pacc, f, out, nsp, layout.group_size, qpk, f.bv)
    return out


__all__ = ["AVAILABLE", "BLOCK", "STAGES", "default_maxnreg", "device_ok", "k_rank", "launch", "ring_ok", "serves",
           "v_rank"]
