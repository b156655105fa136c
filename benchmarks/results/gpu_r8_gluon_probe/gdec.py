"""Gluon probe: roped int4@g32 rank-128 decode with explicit layouts (mma.sync m16n8k16, one warp per 16 tokens)."""
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from vllm_kvc.kernels.triton_latent.tiles import G_LO0, G_LO1, NIBBLE_ASM_GROUP, U_LO0, U_LO1

MMA = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1, 1], instr_shape=[1, 16, 8])
A_L = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
B_L = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
# K code bytes [warp, token, scale group a, byte j]: a thread holds the 16 bytes (one scale group) of two tokens
KB_L = gl.BlockedLayout(size_per_thread=[1, 1, 1, 16], threads_per_warp=[1, 8, 4, 1], warps_per_cta=[4, 1, 1, 1],
                        order=[3, 2, 1, 0])
# V code bytes [warp, token, block c, byte jj]: a thread holds 8 bytes (half a scale group) of four tokens
VB_L = gl.BlockedLayout(size_per_thread=[1, 2, 1, 8], threads_per_warp=[1, 4, 8, 1], warps_per_cta=[4, 1, 1, 1],
                        order=[3, 1, 2, 0])


@gluon.jit
def _levels(code, s, lut_ptr):
    """level(code) * |s|: Gauss table where s > 0, uniform where s < 0 (layout.py)."""
    tab = gl.where(s < 0, 16, 0)
    return gl.load(lut_ptr + code + tab) * gl.abs(s)


@gluon.jit
def _nibbles(x, s):
    """(low-nibble, high-nibble) bf16 values of code bytes x under fp32 scales s (broadcast over x; each group of
    4 consecutive bytes of a thread shares one scale): the byte-permute table decoder of tiles._nibble_asm_group."""
    neg = s < 0
    t0 = gl.where(neg, U_LO0, G_LO0)
    t1 = gl.where(neg, U_LO1, G_LO1)
    sa = gl.abs(s).to(gl.bfloat16)
    return gl.inline_asm_elementwise(NIBBLE_ASM_GROUP, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r", [x, t0, t1, sa],
                                     dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=4)


@gluon.jit
def _load_block(cache_ptr, bt_row, blk_i, b_hi, seq_len, g, stride_cb, stride_cs, tok_k, kcol, ksc, tok_v, vcol, vsc,
                K_SOFF: gl.constexpr, V_OFF: gl.constexpr, V_SOFF: gl.constexpr, BS: gl.constexpr):
    """Block ``blk_i``'s K / V code bytes and fp16 scales of head group g (nothing read from ``b_hi`` on)."""
    live = blk_i < b_hi
    blk = gl.load(bt_row + blk_i, mask=live, other=0)
    base = cache_ptr + blk.to(gl.int64) * stride_cb
    t0 = blk_i * BS
    okk = ((t0 + tok_k) < seq_len) & live  # [4, 16, 1]
    rowk = base + tok_k * stride_cs
    kx = gl.load(gl.expand_dims(rowk, 3) + g * 64 + kcol, mask=gl.expand_dims(okk, 3), other=0)
    ks = gl.load((rowk + K_SOFF).to(gl.pointer_type(gl.float16)) + g * 4 + ksc, mask=okk, other=0.0)
    okv = ((t0 + tok_v) < seq_len) & live
    rowv = base + tok_v * stride_cs
    vx = gl.load(gl.expand_dims(rowv, 3) + V_OFF + g * 64 + vcol, mask=gl.expand_dims(okv, 3), other=0)
    vs = gl.load((rowv + V_SOFF).to(gl.pointer_type(gl.float16)) + g * 4 + vsc, mask=okv, other=0.0)
    return kx, ks, vx, vs


@gluon.jit
def roped_int4_decode(q_ptr, stride_qt, stride_qh, cache_ptr, stride_cb, stride_cs, bt_ptr, stride_bt, seq_lens_ptr,
                      pm_ptr, pl_ptr, pacc_ptr, lut_ptr, qk_scale, num_splits,
                      G: gl.constexpr, QPK: gl.constexpr, K_SOFF: gl.constexpr, V_OFF: gl.constexpr,
                      V_SOFF: gl.constexpr, BS: gl.constexpr, PREFETCH: gl.constexpr = True):
    r = gl.program_id(0)
    g = gl.program_id(1)
    sp = gl.program_id(2)
    seq_len = gl.load(seq_lens_ptr + r)
    n_blk = gl.cdiv(seq_len, BS)
    per = gl.cdiv(n_blk, num_splits)
    b_lo = sp * per
    b_hi = gl.minimum(n_blk, b_lo + per)

    # latent queries as the A operand [warp, head row m (QPK real), logical k]; logical k -> physical rank
    ar_b = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, A_L)))
    ar_m = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, A_L)))
    ar_k = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(1, A_L)))
    # k = r0 + 2a + 8 j0 + 16 j1 + 32 j2 + 64 j3  ->  rank 32 a + r0 + 2 (j0 + 2 j1 + 4 j2 + 8 j3)
    kr0 = ar_k % 2
    ka = (ar_k // 2) % 4
    kj = (ar_k // 8)
    phys_k = 32 * ka + kr0 + 2 * kj
    m3 = gl.expand_dims(gl.expand_dims(ar_m, 0), 2)
    q_ptrs = (q_ptr + r.to(gl.int64) * stride_qt + (g * QPK + m3) * stride_qh
              + gl.expand_dims(gl.expand_dims(phys_k, 0), 1) + 0 * gl.expand_dims(gl.expand_dims(ar_b, 1), 2))
    qa = gl.load(q_ptrs, mask=(m3 < QPK) & (gl.expand_dims(gl.expand_dims(ar_b, 1), 2) >= 0), other=0.0)
    qa = qa.to(gl.bfloat16)

    # K bytes [4, 16, 4, 16] and their scales [4, 16, 4]
    kb_w = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, KB_L))))
    kb_t = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, KB_L))))
    kb_a = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, KB_L))))
    kb_j = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, KB_L))))
    tok_k = gl.expand_dims(gl.expand_dims(kb_w, 1) * 16 + gl.expand_dims(kb_t, 0), 2)  # [4, 16, 1] token in block
    kcol = gl.expand_dims(gl.expand_dims(gl.expand_dims(kb_a * 16, 0), 1), 3) + \
        gl.expand_dims(gl.expand_dims(gl.expand_dims(kb_j, 0), 1), 2)  # [1, 1, 4, 16]
    ksc = gl.expand_dims(gl.expand_dims(kb_a, 0), 1)  # [1, 1, 4]
    # V bytes [4, 16, 8, 8] and scales [4, 16, 8]
    vb_w = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, VB_L))))
    vb_t = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, VB_L))))
    vb_c = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, VB_L))))
    vb_j = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, VB_L))))
    tok_v = gl.expand_dims(gl.expand_dims(vb_w, 1) * 16 + gl.expand_dims(vb_t, 0), 2)
    vcol = gl.expand_dims(gl.expand_dims(gl.expand_dims(vb_c * 8, 0), 1), 3) + \
        gl.expand_dims(gl.expand_dims(gl.expand_dims(vb_j, 0), 1), 2)
    vsc = gl.expand_dims(gl.expand_dims(vb_c // 2, 0), 1)

    # token index of each score column [4, 16(m), 16(tok)] in the accumulator layout
    s_w = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, MMA)))
    s_t = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, MMA)))
    tok_s = gl.expand_dims(gl.expand_dims(s_w * 16, 1), 2) + gl.expand_dims(gl.expand_dims(s_t, 0), 1)

    m_i = gl.full([4, 16], -1.0e30, gl.float32, layout=gl.SliceLayout(2, MMA))
    l_i = gl.full([4, 16], 0.0, gl.float32, layout=gl.SliceLayout(2, MMA))
    acc = gl.full([4, 16, 128], 0.0, gl.float32, layout=MMA)
    bt_row = bt_ptr + r.to(gl.int64) * stride_bt
    kx, ks, vx, vs = _load_block(cache_ptr, bt_row, b_lo, b_hi, seq_len, g, stride_cb, stride_cs, tok_k, kcol, ksc,
                                 tok_v, vcol, vsc, K_SOFF, V_OFF, V_SOFF, BS)
    for blk_i in range(b_lo, b_hi):
        t0 = blk_i * BS
        kx_c, ks_c, vx_c, vs_c = kx, ks, vx, vs
        if PREFETCH:  # the next block's codes and scales, in flight while this block is computed
            kx, ks, vx, vs = _load_block(cache_ptr, bt_row, blk_i + 1, b_hi, seq_len, g, stride_cb, stride_cs,
                                         tok_k, kcol, ksc, tok_v, vcol, vsc, K_SOFF, V_OFF, V_SOFF, BS)
        else:
            kx_c, ks_c, vx_c, vs_c = _load_block(cache_ptr, bt_row, blk_i, b_hi, seq_len, g, stride_cb, stride_cs,
                                                 tok_k, kcol, ksc, tok_v, vcol, vsc, K_SOFF, V_OFF, V_SOFF, BS)
        klo, khi = _nibbles(kx_c, gl.expand_dims(ks_c.to(gl.float32), 3))
        kv = gl.join(klo, khi)  # [4, 16, 4, 16, 2]: (w, t, a, j, r0)
        kv = gl.reshape(kv, [4, 16, 4, 2, 2, 2, 2, 2])  # (w, t, a, j3, j2, j1, j0, r0)
        kv = gl.permute(kv, (0, 3, 4, 5, 6, 2, 7, 1))  # (w, j3, j2, j1, j0, a, r0, t)
        kv = gl.reshape(kv, [4, 128, 16])
        kv = gl.convert_layout(kv, B_L, assert_trivial=True)
        s = mma_v2(qa, kv, gl.full([4, 16, 16], 0.0, gl.float32, layout=MMA))
        s = gl.where((t0 + tok_s) < seq_len, s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 2))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 2))
        l_i = l_i * alpha + gl.sum(p, 2)
        acc = acc * gl.expand_dims(alpha, 2)
        m_i = m_new
        pa = gl.convert_layout(p.to(gl.bfloat16), A_L)
        vlo, vhi = _nibbles(vx_c, gl.expand_dims(vs_c.to(gl.float32), 3))
        vv = gl.join(vlo, vhi)  # (w, t, c, jj, nib)
        vv = gl.permute(vv, (0, 1, 3, 4, 2))  # (w, t, jj, nib, c)
        vv = gl.reshape(vv, [4, 16, 128])
        vv = gl.convert_layout(vv, B_L, assert_trivial=True)
        acc = mma_v2(pa, vv, acc)

    # partials: split sp * 4 + warp; acc column n -> physical rank 16 (n % 8) + n // 8
    o_m = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, MMA)))
    o_n = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(1, MMA)))
    head = g * QPK + gl.expand_dims(o_m, 0)  # [1, 16]
    nsp = num_splits * 4
    base2 = (r.to(gl.int64) * (G * QPK) + head) * nsp + sp * 4 + gl.expand_dims(s_w, 1)  # [4, 16]
    ok2 = gl.expand_dims(o_m, 0) < QPK
    gl.store(pm_ptr + base2, m_i, mask=ok2 & (gl.expand_dims(s_w, 1) >= 0))
    gl.store(pl_ptr + base2, l_i, mask=ok2 & (gl.expand_dims(s_w, 1) >= 0))
    phys_n = 16 * (o_n % 8) + o_n // 8
    optr = pacc_ptr + gl.expand_dims(base2, 2) * 128 + gl.expand_dims(gl.expand_dims(phys_n, 0), 1)
    gl.store(optr, acc, mask=gl.expand_dims(ok2, 2) & (gl.expand_dims(gl.expand_dims(phys_n, 0), 1) >= 0))


@gluon.jit
def roped_int4_decode_t(q_ptr, stride_qt, stride_qh, cache_ptr, stride_cb, stride_cs, bt_ptr, stride_bt, seq_lens_ptr,
                        pm_ptr, pl_ptr, pacc_ptr, lut_ptr, qk_scale, num_splits,
                        G: gl.constexpr, QPK: gl.constexpr, K_SOFF: gl.constexpr, V_OFF: gl.constexpr,
                        V_SOFF: gl.constexpr, BS: gl.constexpr, PREFETCH: gl.constexpr = False):
    """Tokens as the M dimension: S [tok, head] = K [tok, k] q^T [k, head]; O^T [rank, head] = V^T [rank, tok] P."""
    r = gl.program_id(0)
    g = gl.program_id(1)
    sp = gl.program_id(2)
    seq_len = gl.load(seq_lens_ptr + r)
    n_blk = gl.cdiv(seq_len, BS)
    per = gl.cdiv(n_blk, num_splits)
    b_lo = sp * per
    b_hi = gl.minimum(n_blk, b_lo + per)

    # latent queries as the B operand [warp, logical k, head n (QPK real of 8)]
    qb_w = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, B_L)))
    qb_k = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(2, B_L)))
    qb_n = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, B_L)))
    phys_k = 32 * ((qb_k // 2) % 4) + qb_k % 2 + 2 * (qb_k // 8)
    n3 = gl.expand_dims(gl.expand_dims(qb_n, 0), 1)  # [1, 1, 8]
    w3 = gl.expand_dims(gl.expand_dims(qb_w, 1), 2)  # [4, 1, 1]
    q_ptrs = (q_ptr + r.to(gl.int64) * stride_qt + (g * QPK + n3) * stride_qh
              + gl.expand_dims(gl.expand_dims(phys_k, 0), 2) + 0 * w3)
    qb = gl.load(q_ptrs, mask=(n3 < QPK) & (w3 >= 0), other=0.0).to(gl.bfloat16)

    kb_w = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, KB_L))))
    kb_t = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, KB_L))))
    kb_a = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, KB_L))))
    kb_j = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, KB_L))))
    tok_k = gl.expand_dims(gl.expand_dims(kb_w, 1) * 16 + gl.expand_dims(kb_t, 0), 2)
    kcol = gl.expand_dims(gl.expand_dims(gl.expand_dims(kb_a * 16, 0), 1), 3) + \
        gl.expand_dims(gl.expand_dims(gl.expand_dims(kb_j, 0), 1), 2)
    ksc = gl.expand_dims(gl.expand_dims(kb_a, 0), 1)
    vb_w = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, VB_L))))
    vb_t = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, VB_L))))
    vb_c = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, VB_L))))
    vb_j = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, VB_L))))
    tok_v = gl.expand_dims(gl.expand_dims(vb_w, 1) * 16 + gl.expand_dims(vb_t, 0), 2)
    vcol = gl.expand_dims(gl.expand_dims(gl.expand_dims(vb_c * 8, 0), 1), 3) + \
        gl.expand_dims(gl.expand_dims(gl.expand_dims(vb_j, 0), 1), 2)
    vsc = gl.expand_dims(gl.expand_dims(vb_c // 2, 0), 1)

    # token of each score row [4, 16, 1] in the accumulator layout
    s_w = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, MMA)))
    s_t = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, MMA)))
    tok_s = gl.expand_dims(gl.expand_dims(s_w * 16, 1) + gl.expand_dims(s_t, 0), 2)

    m_i = gl.full([4, 8], -1.0e30, gl.float32, layout=gl.SliceLayout(1, MMA))
    l_i = gl.full([4, 8], 0.0, gl.float32, layout=gl.SliceLayout(1, MMA))
    acc = gl.full([4, 128, 8], 0.0, gl.float32, layout=MMA)
    bt_row = bt_ptr + r.to(gl.int64) * stride_bt
    kx, ks, vx, vs = _load_block(cache_ptr, bt_row, b_lo, b_hi, seq_len, g, stride_cb, stride_cs, tok_k, kcol, ksc,
                                 tok_v, vcol, vsc, K_SOFF, V_OFF, V_SOFF, BS)
    for blk_i in range(b_lo, b_hi):
        t0 = blk_i * BS
        kx_c, ks_c, vx_c, vs_c = kx, ks, vx, vs
        if PREFETCH:
            kx, ks, vx, vs = _load_block(cache_ptr, bt_row, blk_i + 1, b_hi, seq_len, g, stride_cb, stride_cs,
                                         tok_k, kcol, ksc, tok_v, vcol, vsc, K_SOFF, V_OFF, V_SOFF, BS)
        else:
            kx_c, ks_c, vx_c, vs_c = _load_block(cache_ptr, bt_row, blk_i, b_hi, seq_len, g, stride_cb, stride_cs,
                                                 tok_k, kcol, ksc, tok_v, vcol, vsc, K_SOFF, V_OFF, V_SOFF, BS)
        klo, khi = _nibbles(kx_c, gl.expand_dims(ks_c.to(gl.float32), 3))
        ka = gl.join(klo, khi)  # (w, t, a, j, r0)
        ka = gl.reshape(ka, [4, 16, 4, 2, 2, 2, 2, 2])  # (w, t, a, j3, j2, j1, j0, r0)
        ka = gl.permute(ka, (0, 1, 3, 4, 5, 6, 2, 7))  # (w, t, j3, j2, j1, j0, a, r0)
        ka = gl.reshape(ka, [4, 16, 128])
        ka = gl.convert_layout(ka, A_L, assert_trivial=True)
        s = mma_v2(ka, qb, gl.full([4, 16, 8], 0.0, gl.float32, layout=MMA))
        s = gl.where((t0 + tok_s) < seq_len, s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, 1)
        acc = acc * gl.expand_dims(alpha, 1)
        m_i = m_new
        pb = gl.convert_layout(p.to(gl.bfloat16), B_L)
        vlo, vhi = _nibbles(vx_c, gl.expand_dims(vs_c.to(gl.float32), 3))
        va = gl.join(vlo, vhi)  # (w, t, c, jj, nib)
        va = gl.permute(va, (0, 3, 4, 2, 1))  # (w, jj, nib, c, t)
        va = gl.reshape(va, [4, 128, 16])
        va = gl.convert_layout(va, A_L, assert_trivial=True)
        acc = mma_v2(va, pb, acc)

    # partials: split sp * 4 + warp; acc row m -> physical rank 16 (m % 8) + m // 8
    o_m = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(2, MMA)))
    o_n = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, MMA)))
    head = g * QPK + gl.expand_dims(o_n, 0)  # [1, 8]
    nsp = num_splits * 4
    w2 = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(1, MMA))), 1)  # [4, 1]
    base2 = (r.to(gl.int64) * (G * QPK) + head) * nsp + sp * 4 + w2  # [4, 8]
    ok2 = (gl.expand_dims(o_n, 0) < QPK) & (w2 >= 0)
    gl.store(pm_ptr + base2, m_i, mask=ok2)
    gl.store(pl_ptr + base2, l_i, mask=ok2)
    phys_m = 16 * (o_m % 8) + o_m // 8
    optr = pacc_ptr + gl.expand_dims(base2, 1) * 128 + gl.expand_dims(gl.expand_dims(phys_m, 0), 2)
    gl.store(optr, acc, mask=gl.expand_dims(ok2, 1) & (gl.expand_dims(gl.expand_dims(phys_m, 0), 2) >= 0))
