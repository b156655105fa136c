"""Entry points: factor preparation and caching, the launch plan, and the paths a batch takes.

:func:`plan_launch` is the one place that decides, from host-known sizes only, which requests of a batch are
computed by rebuild-then-flash (long prompts), which kernel serves the others (the multi-head decode kernel,
directly per request or per query token, or the generic kernel), and the resolved launch configuration.
:func:`latent_attention` and :func:`latent_decode` follow its plan.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch
from triton.runtime.errors import OutOfResources

from vllm_kvc.kernels import reference
from vllm_kvc.layout import LatentLayout

from .config import (LaunchConfig, check_supported, compute_dtype, decode_defaults, default_splits, heads_supported,
                     next_pow2, num_sms, pick_heads, programs_per_sm)
from . import explicit
from .decode import launch_decode, nibble_split
from .prefill import launch_generic
from .write import can_encode, encode_rows, write_rows


# ------------------------------------------------------------------------------------------------ factors
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
    """Factors rearranged for the kernels (built once per layer by :func:`prepare_factors`).

    GPT-J (interleaved) style and partial rotary are handled by permuting the head dims of ``B_k``, ``bias_k``
    and ``q`` the same way (a dot product does not change under a common permutation) and padding cos/sin with
    1/0 for dims that are not rotated.

    Roped keys (``roped_keys``): the kernels read no key factor and no RoPE table, so ``bk``, ``bk_blk``, the key
    biases, ``cos``, ``sin``, ``perm`` and ``inv_freq`` are None."""
    layout: LatentLayout
    dtype: torch.dtype  # compute dtype of the tensor-core operands
    bk: torch.Tensor | None  # [G, gs, rank_k, hd]: B_k with each head's RoPE pairs side by side (x1_0, x2_0, ...)
    bias1: torch.Tensor | None  # [G, gs, hd/2] fp32: bias_k of the x1 / x2 members of the pairs
    bias2: torch.Tensor | None
    bv: torch.Tensor  # [G, rank_v, gs*hd]
    bias_v: torch.Tensor | None  # [G*gs*hd] fp32
    cos: torch.Tensor | None  # [max_pos, hd/2]; 1 / 0 for dims that are not rotated
    sin: torch.Tensor | None
    perm: torch.Tensor | None  # head-dim permutation applied to q (None: identity)
    bk_blk: torch.Tensor | None = None  # B_k in blocks of 8 RoPE pairs, for the decode kernel (split_pairs)
    inv_freq: torch.Tensor | None = None  # [hd/2] fp32 (0 for dims not rotated) if it reproduces the cos/sin table
    roped_keys: bool = False  # prepared for roped keys only (no key factors)


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
                    dtype: torch.dtype = torch.bfloat16, inv_freq: torch.Tensor | None = None,
                    roped_keys: bool = False) -> LatentFactors:
    """The factors rearranged for the kernels. ``roped_keys``: only B_v and bias_v are used (``b_k``, ``bias_k``,
    ``cos_sin_cache`` and ``inv_freq`` may be None); such factors serve roped-key launches only."""
    G, gs, hd, rk, rv = layout.groups, layout.group_size, layout.head_dim, layout.rank_k, layout.rank_v
    if hd % 2 or hd & (hd - 1) or hd < 32:
        raise ValueError(f"head_dim={hd}: the kernels need a power of two >= 32")
    if roped_keys:
        bv = b_v.reshape(G, rv, gs * hd).to(dtype).contiguous()
        bvb = None if bias_v is None else bias_v.reshape(-1).float().contiguous()
        return LatentFactors(layout, dtype, None, None, None, bv, bvb, None, None, None, roped_keys=True)
    half = hd // 2
    rot = cos_sin_cache.shape[-1]
    perm = _rope_perm(hd, rot, is_neox)
    dev = b_k.device
    bk = b_k.reshape(G, rk, gs, hd)
    if perm is not None:
        permt = torch.tensor(perm, device=dev)
        bk = bk.index_select(-1, permt)
    # generic kernel: [G, rk, gs, (x1 half | x2 half)] -> [G, gs, rk, (x1_0, x2_0, x1_1, x2_1, ...)]
    # decode kernel: -> [G, gs, rk, (x1_0..x1_7, x2_0..x2_7, x1_8..x1_15, x2_8..x2_15, ...)] (split_pairs)
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


def cached_factors(layout, b_k, b_v, bias_k, bias_v, cos_sin_cache, is_neox, dtype, inv_freq=None,
                   roped_keys: bool = False) -> LatentFactors:
    """prepare_factors, memoised per (tensor identity, version): weak references guard against a freed tensor's
    address and id being reused by a new one; in-place updates bump ``_version``. Roped keys: keyed on B_v and
    bias_v alone (the other tensors are not read)."""
    if roped_keys:
        b_k = bias_k = cos_sin_cache = inv_freq = None
        is_neox = True
    ts = (b_k, b_v, bias_k, bias_v, cos_sin_cache, inv_freq)
    key = (layout, is_neox, dtype, roped_keys) + tuple(_tkey(t) for t in ts)
    hit = _FACTOR_CACHE.get(key)
    if hit is not None:
        refs, f = hit
        if all((r is None and t is None) or (r is not None and r() is t) for r, t in zip(refs, ts)):
            return f
    if len(_FACTOR_CACHE) > 256:
        _FACTOR_CACHE.clear()
    f = prepare_factors(layout, b_k, b_v, bias_k, bias_v, cos_sin_cache, is_neox, dtype, inv_freq, roped_keys)
    _FACTOR_CACHE[key] = (tuple(None if t is None else weakref.ref(t) for t in ts), f)
    return f


# ------------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class LaunchPlan:
    """What :func:`latent_attention` does with a batch.

    rebuilt: requests computed by rebuild-then-flash (:func:`reference.rebuild_attention`); when not empty, the
        kernels serve ``kept`` (the other requests with queries) as one sub-batch.
    kernel: "explicit" (the explicit-layout decode kernel, explicit.py), "decode" (the multi-head decode kernel),
        "generic", or "none" (nothing left for the kernels).
    direct: one query per request, program = request (else varlen: programs find their request).
    config: the launch configuration with every field resolved.
    tile_rotation: the decode kernel computes RoPE by tile rotation (else it reads the cos / sin table)."""
    kernel: str
    direct: bool = False
    config: LaunchConfig | None = None
    tile_rotation: bool = False
    rebuilt: tuple[int, ...] = ()
    kept: tuple[int, ...] = ()


def rebuild_candidates(query_lens: Sequence[int], config: LaunchConfig | None = None) -> list[int]:
    """Requests with enough queries to be considered for rebuild-then-flash (their cached lengths decide)."""
    cfg = config or LaunchConfig()
    return [r for r, n in enumerate(query_lens) if n >= cfg.rebuild_min_queries]


def plan_launch(layout: LatentLayout, num_heads: int, num_tokens: int, num_reqs: int, *,
                max_query_len: int | None = None, config: LaunchConfig | None = None, angles_ok: bool = False,
                max_ctx: int = 0, sms: int = 8, query_lens: Sequence[int] | None = None,
                seq_lens: Mapping[int, int] | Sequence[int] | None = None, roped: bool = False,
                sink: bool = False, block_size: int = 0, explicit_ok: bool = False) -> LaunchPlan:
    """The launch plan of a batch, from host-known sizes (pure; no tensors).

    ``max_query_len``: the batch's longest query run (None: unknown). ``angles_ok``: the factors carry inv_freq
    (tile rotation possible). ``max_ctx`` (the block table's capacity in tokens) and ``sms`` (the device's SM
    count) size the default KV split. Long prompts: where ``query_lens`` (per request) and ``seq_lens`` (cached
    tokens, at least of :func:`rebuild_candidates`) are given, requests with at least ``rebuild_min_queries``
    queries, ``rebuild_min_work`` (query, key) pairs and at most ``rebuild_max_tokens`` cached tokens are rebuilt
    (prefill is FLOP-bound and the latent kernel's prefill is slower, while the rebuild costs ~1 ms per request),
    and the plan of the others follows. ``roped``: roped keys (their measured decode defaults). ``sink``: an exact
    first token joins (the generic kernel and its reduce merge it; the multi-head decode kernel does not).
    ``block_size`` (the cache's tokens per block) and ``explicit_ok`` (the device and queries suit it,
    ``explicit.device_ok``): one-query-per-request batches of the layouts ``explicit.serves`` take the
    explicit-layout kernel (its KV splits by the resident-program rule: 4 programs per SM)."""
    cfg = config or LaunchConfig()
    if query_lens is not None and seq_lens is not None and max_query_len is not None:
        rebuilt = tuple(r for r in rebuild_candidates(query_lens, cfg)
                        if query_lens[r] * seq_lens[r] >= cfg.rebuild_min_work
                        and seq_lens[r] <= cfg.rebuild_max_tokens)
        if rebuilt:
            kept = tuple(r for r in range(num_reqs) if query_lens[r] > 0 and r not in rebuilt)
            if not kept:
                return LaunchPlan("none", rebuilt=rebuilt)
            rest = plan_launch(layout, num_heads, sum(query_lens[r] for r in kept), len(kept),
                               max_query_len=max(query_lens[r] for r in kept), config=cfg, angles_ok=angles_ok,
                               max_ctx=max_ctx, sms=sms, roped=roped, sink=sink, block_size=block_size,
                               explicit_ok=explicit_ok)
            return replace(rest, rebuilt=rebuilt, kept=kept)
    direct = max_query_len == 1 and num_tokens == num_reqs
    if (direct and explicit_ok and cfg.explicit is not False
            and explicit.serves(layout, num_heads, block_size, roped, sink)):
        splits = cfg.num_splits or default_splits(num_reqs * layout.groups, max_ctx, explicit.BLOCK, sms,
                                                  explicit.per_sm(cfg.maxnreg or explicit.default_maxnreg(layout)))
        return LaunchPlan("explicit", True, replace(cfg, block_t=explicit.BLOCK, num_warps=4, num_splits=splits))
    decode_like = (max_query_len == 1) if max_query_len is not None else num_tokens <= 2 * num_reqs
    use_decode = (heads_supported(layout, num_heads) and cfg.heads != 0 and not sink
                  and (direct or (decode_like and cfg.block_q in (None, 1))))
    if direct or use_decode:  # the measured decode defaults fill what the config leaves open
        d = decode_defaults(layout, num_heads if use_decode else None, roped)
        cfg = replace(cfg, **{k: getattr(d, k) for k in ("heads", "block_t", "num_warps", "num_stages", "pieces",
                                                         "tile_rotation", "lazy_max", "maxnreg")
                              if getattr(cfg, k) is None})
    if use_decode:
        nkv = pick_heads(layout, cfg.heads)
        if nkv > 1 and (config is None or config.maxnreg is None):  # the default cap is for one KV head per program
            cfg = replace(cfg, maxnreg=0)
        if cfg.block_t < 32 and any(nibble_split(layout, max(16, next_pow2(layout.rank_k)),
                                                 max(16, next_pow2(layout.rank_v)))):
            # even / odd nibble tiles with 16-token tiles compute wrong results on the H200 (triton 3.6;
            # benchmarks/results/gpu_roped_diag.txt): such layouts take 32-token tiles at least
            cfg = replace(cfg, block_t=32)
        if cfg.num_splits is None:
            cfg = replace(cfg, num_splits=default_splits(num_tokens * (layout.groups // nkv), max_ctx, cfg.block_t,
                                                         sms, programs_per_sm(cfg)))
        return LaunchPlan("decode", direct, cfg, bool(cfg.tile_rotation and angles_ok))
    if direct:
        if cfg.num_splits is None:
            cfg = replace(cfg, num_splits=default_splits(num_reqs * layout.groups, max_ctx, cfg.block_t, sms))
        return LaunchPlan("generic", True, replace(cfg, block_q=1))
    # varlen generic: query tiles that keep the latent accumulator (rows x rank_v) within ~16K fp32 values
    hg = layout.group_size * (num_heads // layout.num_kv_heads)
    block_q = cfg.block_q
    if block_q is None:
        block_q = 1 if decode_like else max(1, min(16, next_pow2(max_query_len or 16)))
        max_rows = max(16, 16384 // max(16, next_pow2(layout.rank_v)))
        while block_q > 1 and block_q * hg > max_rows:
            block_q //= 2
    block_t = cfg.block_t or 64
    splits = cfg.num_splits
    if splits is None:
        splits = default_splits(num_tokens * layout.groups, max_ctx, block_t, sms) if block_q == 1 else 1
    return LaunchPlan("generic", False, replace(
        cfg, block_q=block_q, block_t=block_t, num_splits=splits, pieces=cfg.pieces or 1,
        num_stages=cfg.num_stages or 2,
        num_warps=cfg.num_warps or (4 if block_q * hg <= 16 else 8)))


# ------------------------------------------------------------------------------------------------ entry points
def _run_plan(plan: LaunchPlan, q, kv_cache, f: LatentFactors, block_table, seq_lens, query_start_loc, scale, out,
              roped: bool = False, sink=None):
    """Launch the kernel of a plan (no rebuilt requests) over the whole batch."""
    cfg = plan.config
    if plan.kernel == "explicit":
        return explicit.launch(q, kv_cache, f, block_table, seq_lens, scale, out, cfg.num_splits, cfg.maxnreg,
                              cfg.stages, cfg.lazy_max)
    if plan.kernel == "decode":
        assert sink is None, "the multi-head decode kernel does not merge a sink (plan_launch(sink=True))"
        qsl = seq_lens if plan.direct else query_start_loc
        return launch_decode(q, kv_cache, f, block_table, seq_lens, qsl, plan.direct, scale, out, cfg,
                             plan.tile_rotation and not roped, roped)
    if plan.direct:
        return launch_generic(q, kv_cache, f, block_table, seq_lens, seq_lens, seq_lens, q.shape[0], 1, True,
                              scale, out, cfg, roped, sink)
    block_q = cfg.block_q
    R = seq_lens.shape[0]
    while True:
        if block_q == 1:
            tile_start, n_grid0 = query_start_loc, q.shape[0]
        else:
            nq = query_start_loc[1:] - query_start_loc[:-1]
            tile_start = torch.zeros(R + 1, dtype=torch.int32, device=q.device)
            tile_start[1:] = torch.cumsum((nq + block_q - 1) // block_q, 0)
            n_grid0 = -(-q.shape[0] // block_q) + R
        try:
            return launch_generic(q, kv_cache, f, block_table, seq_lens, query_start_loc, tile_start, n_grid0,
                                  block_q, False, scale, out, cfg, roped, sink)
        except OutOfResources:  # raised when compiling, before anything runs: retry with smaller query tiles
            if block_q == 1:
                raise
            block_q //= 2


def check_roped(q: torch.Tensor, layout: LatentLayout, roped_keys: bool, factors: LatentFactors | None = None,
                sink=None) -> None:
    """Validate a call's key mode: roped keys take latent queries ``[n, Hq, rank_k]`` (ValueError otherwise, and
    with an exact first token); factors prepared for roped keys serve roped-key calls only."""
    if roped_keys:
        if q.dim() != 3 or q.shape[-1] != layout.rank_k:
            raise ValueError(f"roped keys: q must hold latent queries [num_tokens, Hq, rank_k={layout.rank_k}] "
                             f"(q B_k^T per head, reference.head_key_views), got {tuple(q.shape)}")
        if sink is not None:
            raise ValueError("roped keys and an exact first token (sink) do not combine")
        if layout.segmented:
            raise ValueError(f"latent dtype {layout.dtype!r}: transform-coded rows hold pre-RoPE keys; the kernels "
                             "do not read them as roped keys (roped_keys=False)")
    elif factors is not None and factors.roped_keys:
        raise ValueError("these factors were prepared for roped keys (no B_k): pass roped_keys=True")


def latent_decode(q: torch.Tensor, kv_cache: torch.Tensor, layout: LatentLayout, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, factors: LatentFactors, scale: float, out: torch.Tensor | None = None,
                  *, config: LaunchConfig | None = None, max_seq_len: int | None = None,
                  roped_keys: bool = False, sink=None) -> torch.Tensor:
    """Decode fast entry: ``q [R, Hq, hd]`` holds exactly one query (the last token) of each of the R requests
    (roped keys: the latent queries ``[R, Hq, rank_k]``, see :func:`latent_attention`).

    Without host synchronisation; ``max_seq_len`` (host int, optional) only sharpens the split-KV choice.
    ``sink``: see :func:`latent_attention`."""
    check_supported(layout)
    check_roped(q, layout, roped_keys, factors, sink)
    R = q.shape[0]
    plan = plan_launch(layout, q.shape[1], R, R, max_query_len=1, config=config,
                       angles_ok=factors.inv_freq is not None and not roped_keys,
                       max_ctx=max_seq_len or block_table.shape[1] * kv_cache.shape[1], sms=num_sms(q.device),
                       roped=roped_keys, sink=sink is not None, block_size=kv_cache.shape[1],
                       explicit_ok=explicit.device_ok(q))
    return _run_plan(plan, q, kv_cache, factors, block_table, seq_lens, None, scale, out, roped_keys, sink)


def rebuild_roped_attention(q: torch.Tensor, kv_cache: torch.Tensor, layout: LatentLayout, block_row: torch.Tensor,
                            seq_len: int, b_v: torch.Tensor, bias_v, scale: float,
                            compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Roped keys' long-prompt path (the counterpart of :func:`reference.rebuild_attention`): one request's latent
    queries ``q [nq, Hq, rank_k]`` (its last nq positions) attend causally over its key latents by torch's
    scaled_dot_product_attention, with the value latents as values (one KV head per head group, GQA over the
    group's query heads); ``B_v`` and ``bias_v`` are then applied per query head -> ``[nq, Hq, head_dim]``.
    Nothing is rebuilt: keys need no RoPE in this mode, and the values stay latent through the weighted sum.
    Head dims are zero-padded to one common multiple of 8 (what the fused SDPA kernels take)."""
    nq, hq, rk = q.shape
    ck, cv = layout.unpack(reference.gather_rows(kv_cache, block_row, seq_len), compute_dtype)  # [s, G, r]
    e = -(-max(rk, layout.rank_v) // 8) * 8

    def heads(x):  # [s, G, r] / [nq, Hq, r] -> [1, heads, tokens, e] in q's dtype
        x = x.to(q.dtype)
        if x.shape[-1] < e:
            x = torch.nn.functional.pad(x, (0, e - x.shape[-1]))
        return x.transpose(0, 1)[None]

    if nq == seq_len:
        mask, causal = None, True
    else:  # the queries are the last nq positions (SDPA's boolean masks mark what is visible)
        mask, causal = ~reference.visibility_mask([seq_len], nq, seq_len, True, q.device)[0], False
    u = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(ck), heads(cv), attn_mask=mask,
                                                         is_causal=causal, scale=scale,
                                                         enable_gqa=hq != layout.groups)
    u = u[0, :, :, : layout.rank_v]  # [Hq, nq, rank_v]
    _, bv_heads = reference.head_factor_views(b_v.to(q.dtype), layout, hq)  # [Hq, rank_v, hd]
    o = torch.matmul(u, bv_heads).transpose(0, 1)  # [nq, Hq, hd]
    if bias_v is not None:
        o = o + bias_v.to(o.dtype).view(layout.num_kv_heads, layout.head_dim).repeat_interleave(
            hq // layout.num_kv_heads, 0)
    return o


def latent_attention(q: torch.Tensor, kv_cache: torch.Tensor, layout: LatentLayout,
                     block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                     b_k: torch.Tensor, b_v: torch.Tensor, bias_k, bias_v,
                     cos_sin_cache: torch.Tensor, scale: float, is_neox: bool = True,
                     out: torch.Tensor | None = None, *, max_query_len: int | None = None,
                     query_start_loc_cpu: torch.Tensor | None = None, inv_freq: torch.Tensor | None = None,
                     config: LaunchConfig | None = None, factors: LatentFactors | None = None,
                     roped_keys: bool = False, sink=None) -> torch.Tensor:
    """Varlen causal attention over latent paged KV; same arguments and result as the reference
    (:func:`vllm_kvc.kernels.reference.latent_attention`, whose docstring gives the conventions).

    ``roped_keys``: the K latents code the roped keys and ``q`` holds each head's latent query ``q B_k^T``
    ``[num_tokens, Hq, rank_k]`` (reference.head_key_views); scores are ``scale * q . c_k`` and ``b_k``,
    ``bias_k``, ``cos_sin_cache``, ``is_neox`` and ``inv_freq`` are not read (may be None). The output is
    ``[num_tokens, Hq, head_dim]``. Long prompts attend over the latents by SDPA (:func:`rebuild_roped_attention`).

    No host synchronisation, except for long prompts: where ``max_query_len`` and ``query_start_loc_cpu`` (the
    host copy of ``query_start_loc``) are given and a request has enough queries, the cached lengths of those
    requests are read on the host to decide which are rebuilt (:func:`plan_launch`). Factors are rearranged
    once and cached per (tensor, version). ``inv_freq`` (optional, the rotary embedding's fp32 inverse
    frequencies) lets the decode kernel compute cos / sin itself where it reproduces ``cos_sin_cache``
    (:func:`angles_match`). ``config``: launch options (None: the measured defaults).

    ``sink``: None, or ``(k0 [R, Hkv, hd], v0 [R, Hkv, hd], on [R])`` device tensors as the reference takes them
    (method tcode's exact first token): where ``on``, position 0 is attended with these exact keys and values
    instead of its latent row; merged in the split-KV reduce (no host synchronisation, capturable)."""
    check_supported(layout)
    check_roped(q, layout, roped_keys, factors, sink)
    R = seq_lens.shape[0]
    cfg = config or LaunchConfig()
    if factors is None:
        factors = cached_factors(layout, b_k, b_v, bias_k, bias_v, cos_sin_cache, is_neox, compute_dtype(q),
                                 inv_freq, roped_keys)
    query_lens = lens = None
    if query_start_loc_cpu is not None and max_query_len is not None and max_query_len >= cfg.rebuild_min_queries:
        qsl = query_start_loc_cpu.tolist()
        query_lens = [qsl[r + 1] - qsl[r] for r in range(R)]
        cand = rebuild_candidates(query_lens, cfg)
        lens = dict(zip(cand, seq_lens[cand].tolist() if cand else []))
    plan = plan_launch(layout, q.shape[1], q.shape[0], R, max_query_len=max_query_len, config=cfg,
                       angles_ok=factors.inv_freq is not None and not roped_keys,
                       max_ctx=block_table.shape[1] * kv_cache.shape[1], sms=num_sms(q.device),
                       query_lens=query_lens, seq_lens=lens, roped=roped_keys, sink=sink is not None,
                       block_size=kv_cache.shape[1], explicit_ok=explicit.device_ok(q))
    if not plan.rebuilt:
        return _run_plan(plan, q, kv_cache, factors, block_table, seq_lens, query_start_loc, scale, out,
                         roped_keys, sink)
    if out is None:
        shape = (q.shape[0], q.shape[1], layout.head_dim) if roped_keys else q.shape
        out = torch.empty(shape, dtype=q.dtype, device=q.device)
    for r in plan.rebuilt:
        if roped_keys:
            out[qsl[r]:qsl[r + 1]] = rebuild_roped_attention(q[qsl[r]:qsl[r + 1]], kv_cache, layout, block_table[r],
                                                             lens[r], b_v, bias_v, scale)
        else:
            out[qsl[r]:qsl[r + 1]] = reference.rebuild_attention(
                q[qsl[r]:qsl[r + 1]], kv_cache, layout, block_table[r], lens[r], b_k, b_v, bias_k, bias_v,
                cos_sin_cache, scale, is_neox, sink=None if sink is None else tuple(t[r] for t in sink))
    if plan.kept:  # the others (decodes, short chunks) as one batch through the kernels
        rows = torch.cat([torch.arange(qsl[r], qsl[r + 1]) for r in plan.kept]).to(q.device)
        idx = torch.tensor(plan.kept, device=q.device)
        sub_qsl = torch.tensor([0] + [query_lens[r] for r in plan.kept]).cumsum(0).to(q.device, query_start_loc.dtype)
        out[rows] = _run_plan(plan, q[rows], kv_cache, factors, block_table[idx], seq_lens[idx], sub_qsl, scale,
                              None, roped_keys, None if sink is None else tuple(t[idx] for t in sink))
    return out


def latent_step(q: torch.Tensor, lat: torch.Tensor, kv_cache: torch.Tensor, layout: LatentLayout,
                slot_mapping: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                query_start_loc: torch.Tensor, b_k: torch.Tensor, b_v: torch.Tensor, bias_k, bias_v,
                cos_sin_cache: torch.Tensor, scale: float, is_neox: bool = True, out: torch.Tensor | None = None, *,
                max_query_len: int | None = None, query_start_loc_cpu: torch.Tensor | None = None,
                inv_freq: torch.Tensor | None = None, config: LaunchConfig | None = None,
                roped_keys: bool = False, sink=None) -> torch.Tensor:
    """One call of the latent backend on CUDA (what ``LatentAttention.kvc_attend`` runs): this step's latent rows
    ``lat [N, width]`` (K latents of every group, then V latents) are encoded into cache rows (layout.py) and
    written at ``slot_mapping`` (padding slots < 0 skipped; packed integer rows by the fused encoder,
    ``write.encode_rows``), then :func:`latent_attention` over the paged cache.

    Decode batches (``max_query_len == 1``) read nothing on the host and allocate only from the caching
    allocator, so vLLM can capture them in CUDA graphs (the backend declares ``UNIFORM_SINGLE_TOKEN_DECODE``).
    ``roped_keys``, ``sink``: see :func:`latent_attention` (``q`` holds the latent queries; the rows are written
    alike)."""
    n = lat.shape[0]
    if can_encode(layout):  # packed integer rows: one fused encoder kernel per K / V part
        encode_rows(kv_cache, slot_mapping[:n], layout, lat)
    else:
        g, rk, rv = layout.groups, layout.rank_k, layout.rank_v
        lat_k = lat[:, : g * rk].reshape(n, g, rk)
        lat_v = lat[:, g * rk: layout.width].reshape(n, g, rv)
        write_rows(kv_cache, slot_mapping[:n], layout.pack(lat_k, lat_v))
    return latent_attention(q, kv_cache, layout, block_table, seq_lens, query_start_loc, b_k, b_v, bias_k, bias_v,
                            cos_sin_cache, scale, is_neox, out=out, max_query_len=max_query_len,
                            query_start_loc_cpu=query_start_loc_cpu, inv_freq=inv_freq, config=config,
                            roped_keys=roped_keys, sink=sink)
