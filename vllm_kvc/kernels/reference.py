"""Plain-torch reference of latent paged attention: the CPU path and the oracle for the Triton kernels.

Importable without vLLM. Conventions (same as vLLM's v1 attention metadata):

- ``kv_cache``: ``[num_blocks, block_size, layout.row_elems]`` of ``layout.cache_dtype`` (see layout.py).
- ``slot_mapping[i]``: flat slot (block * block_size + offset) where token i's latent row is written.
- A batch holds ``R`` requests; request r owns queries ``query_start_loc[r]:query_start_loc[r+1]``, which are
  the *last* tokens of its sequence of ``seq_lens[r]`` tokens (context + new), whose rows are found through
  ``block_table[r]``. Cached token j sits at position j (RoPE is applied at that position when rebuilt).
- Factors on this rank: ``b_k [G, rank_k, gs*hd]``, ``b_v [G, rank_v, gs*hd]``, optional biases
  ``bias_k, bias_v [G*gs*hd]``. K_j = RoPE(c_k B_k + bias_k); V = c_v B_v + bias_v, with B_v applied after the
  attention-weighted sum of latents (it is linear, and the weights sum to one, so the bias is added once).
- Roped keys (``roped_keys=True``): the K latent codes the *roped* key (``k_j ~ c_k B_k``, no RoPE at attention)
  and ``q`` is already projected per head, ``q B_k^T`` ``[num_tokens, Hq, rank_k]``: scores are ``q . c_k``.
- ``q``: ``[num_tokens, Hq, hd]``, RoPE already applied. ``cos_sin_cache``: ``[max_pos, rot_dim]`` (vLLM's
  format: cos halves then sin halves), neox or GPT-J style.
"""
from __future__ import annotations

import torch

from vllm_kvc.layout import LatentLayout


def write_latents(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, layout: LatentLayout,
                  lat_k: torch.Tensor, lat_v: torch.Tensor) -> None:
    """Store ``lat_k [N, G, rank_k]``, ``lat_v [N, G, rank_v]`` at ``slot_mapping [N]`` (slots < 0 skipped).

    ``kv_cache`` is ``[num_blocks, block_size, row]`` with any strides (vLLM may interleave layers)."""
    write_rows(kv_cache, slot_mapping, layout.pack(lat_k, lat_v))


def write_rows(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, rows: torch.Tensor) -> None:
    """Store cache rows ``[N, row_elems]`` at ``slot_mapping [N]`` (slots < 0 skipped)."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        rows, slot_mapping = rows[valid], slot_mapping[valid]
    slots = slot_mapping.long()
    bs = kv_cache.shape[1]
    kv_cache[slots // bs, slots % bs] = rows


def gather_rows(kv_cache: torch.Tensor, block_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Rows of positions 0..seq_len-1 of one request: [seq_len, row_elems]."""
    bs = kv_cache.shape[1]
    nblk = (seq_len + bs - 1) // bs
    rows = kv_cache[block_row[:nblk].long()].reshape(nblk * bs, kv_cache.shape[-1])
    return rows[:seq_len]  # advanced indexing copies, so any block strides work


def apply_rope(x: torch.Tensor, positions: torch.Tensor | None, cos_sin_cache: torch.Tensor,
               is_neox: bool = True) -> torch.Tensor:
    """x [..., T, H, hd] float; rotates the first rot_dim dims of each head at ``positions [T]`` (None: 0..T-1,
    the same for every leading index, so a padded batch of sequences reads the table once)."""
    rot = cos_sin_cache.shape[-1]
    if positions is None:
        cs = cos_sin_cache[: x.shape[-3]].to(x.dtype)
    else:
        cs = cos_sin_cache.index_select(0, positions.long()).to(x.dtype)
    cos, sin = cs[:, None, : rot // 2], cs[:, None, rot // 2 :]
    if x.shape[-2] > 1:  # the table spread over the heads: the same products, several times faster on CPU
        cos = cos.expand(-1, x.shape[-2], -1).contiguous()
        sin = sin.expand(-1, x.shape[-2], -1).contiguous()
    xr, rest = x[..., :rot], x[..., rot:]
    if is_neox:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
        # written into the halves of one output, each half rounded exactly as x1 * cos - x2 * sin (a product,
        # a product, their difference): no fused multiply-add, whose different last bits other tests notice
        out = torch.empty(torch.broadcast_shapes(xr.shape, x.shape[:-1] + (rot,)), dtype=x.dtype, device=x.device)
        o1, o2 = out[..., : rot // 2], out[..., rot // 2 :]
        torch.mul(x1, cos, out=o1).sub_(x2 * sin)
        torch.mul(x2, cos, out=o2).add_(x1 * sin)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1) if rest.numel() else out


def rebuild_keys(ck: torch.Tensor, b_k: torch.Tensor, bias_k, layout: LatentLayout,
                 cos_sin_cache: torch.Tensor, is_neox: bool, positions: torch.Tensor | None = None) -> torch.Tensor:
    """ck [..., T, G, rank_k] -> roped keys [..., T, G*gs, hd] at ``positions`` (default 0..T-1 in every row)."""
    lead = ck.shape[:-2]
    k = torch.einsum("...gr,grd->...gd", ck, b_k.to(ck.dtype)).reshape(*lead, layout.num_kv_heads, layout.head_dim)
    if bias_k is not None:
        k = k + bias_k.to(k.dtype).view(layout.num_kv_heads, layout.head_dim)
    return apply_rope(k, positions, cos_sin_cache, is_neox)


def rebuild_values(cv: torch.Tensor, b_v: torch.Tensor, bias_v, layout: LatentLayout) -> torch.Tensor:
    """cv [T, G, rank_v] -> values [T, G*gs, hd]."""
    bv = b_v.to(cv.dtype).view(layout.groups, layout.rank_v, layout.group_size, layout.head_dim)
    v = torch.einsum("tgr,grwd->tgwd", cv, bv).reshape(cv.shape[0], layout.num_kv_heads, layout.head_dim)
    if bias_v is not None:
        v = v + bias_v.to(v.dtype).view(layout.num_kv_heads, layout.head_dim)
    return v


def rebuild_attention(q: torch.Tensor, kv_cache: torch.Tensor, layout: LatentLayout, block_row: torch.Tensor,
                      seq_len: int, b_k: torch.Tensor, b_v: torch.Tensor, bias_k, bias_v,
                      cos_sin_cache: torch.Tensor, scale: float, is_neox: bool = True,
                      compute_dtype: torch.dtype = torch.float32, sink=None) -> torch.Tensor:
    """Causal attention of one request's queries ``q [nq, Hq, hd]`` (its last nq positions) by rebuilding its
    keys (then RoPE) and values densely, in ``compute_dtype``, and running torch's scaled_dot_product_attention in
    q's dtype (flash / memory-efficient kernels on GPUs). For long prompts this is faster than attention over the
    latents: prefill is FLOP-bound and latents save it no FLOPs (benchmarks/RESULTS.md, GPU kernels, prefill).
    ``sink``: None or ``(k0 [Hkv, hd], v0 [Hkv, hd], on)`` of this request: where ``on`` (a 0-d tensor, read on
    the device), position 0's key and value are these exact ones (see :func:`latent_attention`)."""
    nq, hq, hd = q.shape
    ck, cv = layout.unpack(gather_rows(kv_cache, block_row, seq_len), compute_dtype)
    k = rebuild_keys(ck, b_k, bias_k, layout, cos_sin_cache, is_neox)
    v = rebuild_values(cv, b_v, bias_v, layout)
    if sink is not None:
        on = sink[2].to(torch.bool)
        k[0] = torch.where(on, sink[0].to(k.dtype), k[0])
        v[0] = torch.where(on, sink[1].to(v.dtype), v[0])
    # [1, heads, tokens, hd]: the fused SDPA kernels take 4-D inputs only (3-D ones fall back to the math path)
    k = k.to(q.dtype).transpose(0, 1)[None]
    v = v.to(q.dtype).transpose(0, 1)[None]
    if nq == seq_len:
        mask, causal = None, True
    else:  # the queries are the last nq positions (SDPA's boolean masks mark what is visible)
        mask, causal = ~visibility_mask([seq_len], nq, seq_len, True, q.device)[0], False
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=mask,
                                                         is_causal=causal, scale=scale, enable_gqa=hq != k.shape[1])
    return o[0].transpose(0, 1)


def head_factor_views(b_v: torch.Tensor, layout: LatentLayout, num_q_heads: int):
    """Per query head: index of its latent group and its [rank_v, hd] slice of B_v -> (grp [Hq], bv [Hq, rv, hd])."""
    q_per_kv = num_q_heads // layout.num_kv_heads
    kv_head = torch.arange(num_q_heads, device=b_v.device) // q_per_kv
    grp = kv_head // layout.group_size
    within = kv_head % layout.group_size
    bv = b_v.view(layout.groups, layout.rank_v, layout.group_size, layout.head_dim)
    return grp, bv[grp, :, within, :]


def head_key_views(b_k: torch.Tensor, layout: LatentLayout, num_q_heads: int) -> torch.Tensor:
    """Per query head, its KV head's rows of B_k, transposed: [Hq, hd, rank_k] (roped keys: a query head's
    latent query is ``q_h @ out[h]``)."""
    q_per_kv = num_q_heads // layout.num_kv_heads
    kv_head = torch.arange(num_q_heads, device=b_k.device) // q_per_kv
    bk = b_k.view(layout.groups, layout.rank_k, layout.group_size, layout.head_dim)
    return bk[kv_head // layout.group_size, :, kv_head % layout.group_size, :].transpose(1, 2)


def latent_attention(q: torch.Tensor, kv_cache: torch.Tensor, layout: LatentLayout,
                     block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                     b_k: torch.Tensor, b_v: torch.Tensor, bias_k, bias_v,
                     cos_sin_cache: torch.Tensor, scale: float, is_neox: bool = True,
                     out: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32,
                     sink=None, roped_keys: bool = False) -> torch.Tensor:
    """Varlen causal attention over latent paged KV (prefill, chunked prefill and decode alike).

    Requests with one query token (decodes) are computed together as one padded batch; the others one by one.
    ``sink``: None, or ``(k0 [R, Hkv, hd], v0 [R, Hkv, hd], on [R] bool)`` per request: where ``on``, position 0
    is attended with these exact keys (roped: position 0 rotates by nothing) and values instead of its latent
    row (the exact first token of method ``tcode``). ``roped_keys``: ``q`` is ``[num_tokens, Hq, rank_k]`` (see
    the module notes); the output still ``[num_tokens, Hq, hd]``."""
    n_tok, hq = q.shape[:2]
    hd = layout.head_dim
    if roped_keys and sink is not None:
        raise ValueError("roped keys and an exact first token (sink) do not combine")
    if out is None:
        out = torch.empty(n_tok, hq, hd, dtype=q.dtype, device=q.device)

    def keys(ck, positions=None):  # cached keys as the scores read them: [..., T, G, rk] or roped [..., T, Hkv, hd]
        if roped_keys:
            return ck
        return rebuild_keys(ck, b_k, bias_k, layout, cos_sin_cache, is_neox, positions=positions)

    _, bv_heads = head_factor_views(b_v.to(compute_dtype), layout, hq)
    bias_v_heads = None
    if bias_v is not None:
        q_per_kv = hq // layout.num_kv_heads
        bias_v_heads = bias_v.to(compute_dtype).view(layout.num_kv_heads, hd).repeat_interleave(q_per_kv, 0)
    qsl = query_start_loc.tolist()
    sls = seq_lens.tolist()
    decodes = [r for r in range(len(sls)) if qsl[r + 1] - qsl[r] == 1]
    if len(decodes) > 1:
        _decode_batch(q, kv_cache, layout, block_table, sls, qsl, decodes, keys, bv_heads, bias_v_heads, scale, out,
                      compute_dtype, sink)
        done = set(decodes)
    else:
        done = set()
    for r in range(len(sls)):
        qs, qe, s = qsl[r], qsl[r + 1], sls[r]
        if qe <= qs or r in done:
            continue
        rows = gather_rows(kv_cache, block_table[r], s)
        ck, cv = layout.unpack(rows, compute_dtype)
        k = keys(ck)  # [s, Hkv, hd] (roped keys: the latents [s, G, rk])
        sv = None
        if sink is not None and bool(sink[2][r]):
            k[0] = sink[0][r].to(k.dtype)
            sv = sink[1][r:r + 1].to(compute_dtype), sink[2][r:r + 1]
        o = _attend(q[qs:qe].to(compute_dtype)[None], k[None], cv[None], torch.tensor([s]), bv_heads,
                    bias_v_heads, scale, causal=True, sink_v=sv)
        out[qs:qe] = o[0].to(out.dtype)
    return out


def _attend(q, k, cv, seq_lens, bv_heads, bias_v_heads, scale, causal, sink_v=None):
    """q [B, nq, Hq, hd], k [B, S, Hkv, hd], cv [B, S, G, rv] -> [B, nq, Hq, hd] (roped keys: q [B, nq, Hq, rk],
    k the latents [B, S, G, rk]).

    Key j of batch row b is visible to query i if j < seq_lens[b] and (causal) j <= seq_lens[b] - nq + i.
    ``sink_v``: None or (v0 [B, Hkv, hd], on [B] bool): where on, position 0's value is v0, not its latent."""
    b, nq, hq, hd = q.shape
    s, groups = k.shape[1], cv.shape[2]
    scores = _gqa_scores(q, k, scale)  # [B, Hq, nq, S]
    scores = scores.masked_fill(visibility_mask(seq_lens, nq, s, causal, q.device)[:, None], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    if sink_v is not None:  # position 0 read exactly: its weight leaves the latent sum for the exact value
        v0, on = sink_v
        p0 = p[..., 0] * on.to(p.dtype)[:, None, None]  # [B, Hq, nq]
        p = p.clone()
        p[..., 0] -= p0
    # the query heads of one head group are consecutive and share its value latent: no per-head copy of it
    u = torch.matmul(p.view(b, groups, -1, s), cv.permute(0, 2, 1, 3)).view(b, hq, nq, -1)  # [B, Hq, nq, rv]
    o = torch.matmul(u, bv_heads)  # [B, Hq, nq, hd]
    if sink_v is not None:
        if bias_v_heads is not None:  # the bias joins B_v once per unit of latent weight: remove the sink's share
            o = o - p0[..., None] * bias_v_heads[None, :, None, :]
        o = o + p0[..., None] * v0.repeat_interleave(hq // v0.shape[1], 1)[:, :, None, :]
    if bias_v_heads is not None:
        o = o + bias_v_heads[None, :, None, :]
    return o.permute(0, 2, 1, 3)


def _decode_batch(q, kv_cache, layout, block_table, sls, qsl, reqs, keys, bv_heads, bias_v_heads, scale, out,
                  compute_dtype, sink=None):
    """One query token per request, all requests at once. Requests of different lengths: only the cached rows
    themselves are gathered, decoded and rebuilt (one flat list of tokens, RoPE at each token's position), and
    the padded [B, S] layout the scores and the value-latent sum need is filled from it (value latents: zeros
    elsewhere, so that 0 * NaN never reaches the weighted sum)."""
    bs = kv_cache.shape[1]
    lens = torch.tensor([sls[r] for r in reqs])
    b, smax = len(reqs), int(lens.max())
    idx = torch.tensor(reqs, device=block_table.device)
    blocks = block_table.index_select(0, idx).long()
    dev = kv_cache.device
    if int(lens.min()) == smax:  # no padding: whole blocks, and the flat tokens are the [B, S] layout already
        nblk = (smax + bs - 1) // bs
        rows = kv_cache[blocks[:, :nblk].to(dev)].reshape(b, nblk * bs, kv_cache.shape[-1])[:, :smax]
        ck, cv = layout.unpack(rows, compute_dtype)  # [B, S, G, r]
        kp = keys(ck)  # [B, S, Hkv, hd], positions 0..S-1
        cvp = cv
    else:
        pos = torch.arange(smax)
        bi, pi = (pos[None, :] < lens[:, None]).nonzero(as_tuple=True)  # (request, position) of each cached token
        bi, pi = bi.to(dev), pi.to(dev)
        rows = kv_cache[blocks.to(dev)[bi, pi // bs], pi % bs]  # [T, row_elems]; any block strides work
        ck, cv = layout.unpack(rows, compute_dtype)  # [T, G, r]
        k = keys(ck, pi)  # [T, Hkv, hd]
        # keys in the [B, Hkv, hd, S] order the score matmul reads; padding left as is: its scores are masked to
        # -inf whatever they are
        kp = k.new_empty(b, k.shape[1], k.shape[2], smax).permute(0, 3, 1, 2)
        kp[bi, pi] = k
        cvp = cv.new_zeros(b, smax, *cv.shape[1:])
        cvp[bi, pi] = cv
    sv = None
    if sink is not None:
        ri = torch.tensor(reqs, device=kp.device)
        on = sink[2].index_select(0, ri)
        kp[:, 0] = torch.where(on[:, None, None], sink[0].index_select(0, ri).to(kp.dtype), kp[:, 0])
        sv = sink[1].index_select(0, ri).to(compute_dtype), on
    qi = torch.tensor([qsl[r] for r in reqs], device=q.device)
    o = _attend(q.index_select(0, qi).to(compute_dtype)[:, None], kp, cvp, lens, bv_heads, bias_v_heads,
                scale, causal=False, sink_v=sv)
    out.index_copy_(0, qi, o[:, 0].to(out.dtype))


def gather_padded_rows(kv_cache: torch.Tensor, block_table: torch.Tensor, lens: list[int]):
    """Rows of several requests padded to the longest: ([B, S, row_elems], valid [B, S]); padding rows are zero."""
    bs = kv_cache.shape[1]
    smax = max(lens)
    nblk = (smax + bs - 1) // bs
    blocks = block_table[:, :nblk].long()
    rows = kv_cache[blocks].reshape(len(lens), nblk * bs, kv_cache.shape[-1])[:, :smax]
    valid = torch.arange(smax, device=rows.device)[None, :] < torch.tensor(lens, device=rows.device)[:, None]
    rows = torch.where(valid[..., None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    return rows, valid


def _gqa_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, nq, Hq, hd], k [B, S, Hkv, hd] -> scaled scores [B, Hq, nq, S]; query heads h*rep..h*rep+rep-1 of
    KV head h are one matmul against it (no repeated copy of the keys)."""
    b, nq, hq, hd = q.shape
    hkv = k.shape[2]
    qh = q.permute(0, 2, 1, 3).reshape(b, hkv, (hq // hkv) * nq, hd)
    return (torch.matmul(qh, k.permute(0, 2, 3, 1)) * scale).view(b, hq, nq, k.shape[1])


def attend_dense(q, k, v, seq_lens, scale, causal=True):
    """q [B, nq, Hq, hd], k/v [B, S, Hkv, hd] (k roped) -> [B, nq, Hq, hd]; visibility as in ``_attend``."""
    b, nq, hq, hd = q.shape
    s, hkv = k.shape[1], k.shape[2]
    scores = _gqa_scores(q, k, scale)
    scores = scores.masked_fill(visibility_mask(seq_lens, nq, s, causal, q.device)[:, None], float("-inf"))
    p = torch.softmax(scores, dim=-1).view(b, hkv, -1, s)
    return torch.matmul(p, v.permute(0, 2, 1, 3)).view(b, hq, nq, hd).permute(0, 2, 1, 3)


def visibility_mask(seq_lens, nq: int, s: int, causal: bool, device) -> torch.Tensor:
    """[B, nq, S] True where key j is NOT visible to query i (the last nq tokens of each sequence)."""
    b = len(seq_lens)
    j = torch.arange(s, device=device)
    sl = torch.as_tensor(seq_lens, device=device)[:, None, None]
    limit = sl - nq + torch.arange(nq, device=device)[None, :, None] if causal else sl.expand(b, nq, 1)
    return (j[None, None, :] > limit) | (j[None, None, :] >= sl)


def rows_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                   query_start_loc: torch.Tensor, decode, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Varlen causal attention over paged rows of any codec: ``decode(rows [B, S, row_elems])`` returns roped
    keys and values ``[B, S, Hkv, hd]`` (float32) of positions 0..S-1. Decodes go as one padded batch."""
    qsl, sls = query_start_loc.tolist(), seq_lens.tolist()
    decodes = [r for r in range(len(sls)) if qsl[r + 1] - qsl[r] == 1]
    batch = decodes if len(decodes) > 1 else []
    if batch:
        idx = torch.tensor(batch, device=block_table.device)
        rows, _ = gather_padded_rows(kv_cache, block_table.index_select(0, idx), [sls[r] for r in batch])
        k, v = decode(rows)
        qi = torch.tensor([qsl[r] for r in batch], device=q.device)
        o = attend_dense(q.index_select(0, qi).float()[:, None], k, v, [sls[r] for r in batch], scale, causal=False)
        out.index_copy_(0, qi, o[:, 0].to(out.dtype))
    for r in range(len(sls)):
        qs, qe, s = qsl[r], qsl[r + 1], sls[r]
        if qe <= qs or r in batch:
            continue
        k, v = decode(gather_rows(kv_cache, block_table[r], s)[None])
        o = attend_dense(q[qs:qe].float()[None], k, v, [s], scale, causal=True)
        out[qs:qe] = o[0].to(out.dtype)
    return out


def dense_reference(q, k, v, scale, causal_offset: int = 0):
    """Plain attention for tests: q [nq, Hq, hd], k/v [s, Hkv, hd] (k already roped)."""
    hq, hkv = q.shape[1], k.shape[1]
    rep = hq // hkv
    kk = k.transpose(0, 1).repeat_interleave(rep, 0).float()
    vv = v.transpose(0, 1).repeat_interleave(rep, 0).float()
    s = torch.matmul(q.transpose(0, 1).float(), kk.transpose(1, 2)) * scale
    nq, sl = q.shape[0], k.shape[0]
    qpos = torch.arange(sl - nq, sl)
    s = s.masked_fill(torch.arange(sl)[None, :] > qpos[:, None], float("-inf"))
    return torch.matmul(torch.softmax(s, -1), vv).transpose(0, 1)


def attend_two_source(qa, ka, va, qb, kb, vb, use_a: torch.Tensor, visible: torch.Tensor, scale: float):
    """One request's attention where key j is scored and read from source A where ``use_a [nq, S]`` and from
    source B elsewhere (both only where ``visible [nq, S]``): logits ``qa . ka_j`` or ``qb . kb_j``, one softmax,
    values ``va_j`` or ``vb_j``. q* [nq, Hq, hd]; k*, v* [S, Hkv, hd] (keys roped); float32 -> [nq, Hq, hd].

    Lexico's recent window (A: exact K/V, B: sparse codes, same query) and POD's followers (A: own exact keys of
    sink and recent tokens, B: the lead layer's query and keys; values their own) are both this."""
    hq, hkv = qa.shape[1], ka.shape[1]
    rep = hq // hkv

    def scores(q, k):
        kk = k.transpose(0, 1).repeat_interleave(rep, 0)  # [Hq, S, hd]
        return torch.matmul(q.transpose(0, 1), kk.transpose(1, 2)) * scale  # [Hq, nq, S]

    s = torch.where(use_a[None], scores(qa, ka), scores(qb, kb))
    s = s.masked_fill(~visible[None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    if vb is va:
        return torch.matmul(p, va.transpose(0, 1).repeat_interleave(rep, 0)).transpose(0, 1)
    ua = use_a[None].to(p.dtype)
    o = torch.matmul(p * ua, va.transpose(0, 1).repeat_interleave(rep, 0))
    o = o + torch.matmul(p * (1 - ua), vb.transpose(0, 1).repeat_interleave(rep, 0))
    return o.transpose(0, 1)
