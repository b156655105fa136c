"""KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"), as published: the math
of method ``kivi`` (vllm_kvc/methods/kivi.py). Importable without vLLM.

The published scheme (the authors' code, ``models/llama_kivi.py`` and ``quant/new_pack.py`` of jy-yuan/KIVI):

- keys after RoPE, quantized **per channel**: each channel of each KV head over a group of ``group_size``
  consecutive tokens (groups aligned at multiples of ``group_size`` from the first token) shares one zero point
  (the group's minimum) and one scale ((max - min) / (2^bits - 1)), both fp16;
- values quantized **per token**: each token's head vector in groups of ``group_size`` channels, same asymmetric
  min / scale pair in fp16;
- codes ``clamp(round((x - min) / scale), 0, 2^bits - 1)``, read back as ``code * scale + min``;
- a full-precision residual: keys are quantized ``residual`` tokens at a time, when the full-precision tail fills
  (after the token that fills it has attended); values slide: a token's value is quantized once ``residual`` newer
  tokens follow it. The query at position ``i`` therefore sees keys ``j < residual * floor(i / residual)``
  and values ``j < i - residual`` quantized, every other visible key and value in the model's precision.
- the prompt (prefill) attends with its own full-precision K/V; only the tokens decoded afterwards see the
  quantized cache.

Bytes (:func:`bytes_at`): per KV head, ``bits / 8`` per quantized value, 4 bytes (fp16 min + fp16 scale) per
group (per channel per ``group_size`` keys, per ``group_size`` channels of each value), and the model dtype's
bytes for each full-precision token, counted while the last token of a ``context``-token sequence attends: the
most the cache holds at that length (key tail ``(context - 1) % residual + 1`` tokens, value tail
``min(context, residual + 1)``).
"""
from __future__ import annotations

import math

import torch

SCALE_BYTES = 4  # fp16 zero point (the group minimum) + fp16 scale, per quantization group


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _quant_groups(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric min/max quantization of ``x`` (float32) with one group along ``dim``; returns the values read
    back (fp16 zero point and scale, as KIVI stores them). A constant group reads back as its minimum."""
    maxq = (1 << bits) - 1
    mn = _fp16(x.amin(dim, keepdim=True))
    scale = _fp16((x.amax(dim, keepdim=True) - x.amin(dim, keepdim=True)) / maxq)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((x - mn) / safe).clamp_(0, maxq).round_()
    return codes * scale + mn


def quantize_keys(k: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """k ``[T, H, D]`` (roped), ``T`` a multiple of ``group_size`` -> k read back from KIVI's per-channel
    quantization over groups of ``group_size`` consecutive tokens (float32)."""
    t, h, d = k.shape
    if t % group_size:
        raise ValueError(f"quantize_keys: {t} tokens are not whole groups of {group_size}")
    x = k.float().reshape(t // group_size, group_size, h, d)
    return _quant_groups(x, bits, 1).reshape(t, h, d)


def quantize_values(v: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """v ``[T, H, D]`` -> v read back from KIVI's per-token quantization over groups of ``group_size`` channels."""
    t, h, d = v.shape
    if d % group_size:
        raise ValueError(f"quantize_values: head_dim {d} is not whole groups of {group_size}")
    x = v.float().reshape(t, h, d // group_size, group_size)
    return _quant_groups(x, bits, 3).reshape(t, h, d)


def quantized_prefix(i: torch.Tensor | int, residual: int):
    """For a query at position ``i``: (keys ``j < kq`` and values ``j < vq`` are read quantized)."""
    if isinstance(i, int):
        return residual * (i // residual), max(0, i - residual)
    return residual * torch.div(i, residual, rounding_mode="floor"), (i - residual).clamp(min=0)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, bits: int, group_size: int,
           residual: int, scale: float, exact: bool = False, block_elems: int = 1 << 24) -> torch.Tensor:
    """Causal attention of one sequence's queries ``q [nq, Hq, D]`` at positions ``q_pos [nq]`` (increasing)
    over its K/V ``[S, Hkv, D]`` (positions 0..S-1, keys roped, full precision) with KIVI's cache state at each
    query's own decode step (``exact``: every K/V in full precision, KIVI's prefill). Float32 ``[nq, Hq, D]``.

    Queries go in blocks inside one residual window (``residual * floor(pos / residual)`` equal), so a block
    shares its quantized key prefix; values differ only in the block's band of sliding tails, corrected there."""
    nq, hq, d = q.shape
    hkv = k.shape[1]
    rep = hq // hkv
    qf, kf, vf = q.float(), k.float(), v.float()
    pos_cpu = q_pos.tolist()
    kq_all = vq_all = None
    if not exact:
        kq_len, vq_len = quantized_prefix(int(pos_cpu[-1]), residual)
        kq_all = quantize_keys(kf[:kq_len], bits, group_size) if kq_len else kf[:0]
        vq_all = quantize_values(vf[:vq_len], bits, group_size) if vq_len else vf[:0]
    out = torch.empty(nq, hq, d, dtype=torch.float32, device=q.device)
    step = max(1, block_elems // max(1, hq * (int(pos_cpu[-1]) + 1)))
    a = 0
    while a < nq:
        win = pos_cpu[a] // residual
        b = a + 1
        while b < nq and b - a < step and (exact or pos_cpu[b] // residual == win):
            b += 1
        lo, hi = int(pos_cpu[a]), int(pos_cpu[b - 1])
        se = hi + 1  # keys visible to some query of the block
        if exact:
            keys, vals, v_lo, v_hi = kf[:se], vf[:se], 0, 0
        else:
            kqn = residual * win
            v_lo, v_hi = max(0, lo - residual), max(0, hi - residual)
            keys = torch.cat([kq_all[:kqn], kf[kqn:se]]) if kqn else kf[:se]
            vals = torch.cat([vq_all[:v_lo], vf[v_lo:se]]) if v_lo else vf[:se]
        pos = q_pos[a:b].to(q.device)
        j = torch.arange(se, device=q.device)
        qh = qf[a:b].transpose(0, 1).reshape(hkv, rep * (b - a), d)  # the query heads of one KV head together
        sc = torch.matmul(qh, keys.permute(1, 2, 0)) * scale  # [Hkv, rep*n, se]
        hidden = (j[None, :] > pos[:, None]).repeat(rep, 1)
        p = torch.softmax(sc.masked_fill(hidden[None], float("-inf")), -1)
        o = torch.matmul(p, vals.transpose(0, 1))  # [Hkv, rep*n, D]
        if v_hi > v_lo:  # values j in [v_lo, v_hi) are quantized for the later queries of the block only
            band = torch.arange(v_lo, v_hi, device=q.device)
            use = (band[None, :] < (pos - residual)[:, None]).repeat(rep, 1).to(p.dtype)
            dv = (vq_all[v_lo:v_hi] - vf[v_lo:v_hi]).transpose(0, 1)
            o += torch.matmul(p[..., v_lo:v_hi] * use, dv)
        out[a:b] = o.reshape(hq, b - a, d).transpose(0, 1)
        a = b
    return out


def head_bytes_at(context: int, head_dim: int, bits: int, group_size: int, residual: int,
                  dtype_bytes: int = 2) -> tuple[int, int]:
    """(key bytes, value bytes) of one KV head holding ``context`` tokens, while the last one attends."""
    n = int(context)
    k_full = (n - 1) % residual + 1
    v_full = min(n, residual + 1)
    k_q, v_q = n - k_full, n - v_full
    key = k_q * head_dim * bits // 8 + (k_q // group_size) * head_dim * SCALE_BYTES + k_full * head_dim * dtype_bytes
    val = v_q * head_dim * bits // 8 + v_q * (head_dim // group_size) * SCALE_BYTES + v_full * head_dim * dtype_bytes
    return key, val


def bytes_at(context: int, num_kv_heads: int, head_dim: int, bits: int, group_size: int, residual: int,
             dtype_bytes: int = 2) -> float:
    """Bytes per token of one layer (``num_kv_heads`` heads) at ``context`` tokens: scales, zero points and the
    full-precision residual included (see the module doc)."""
    k, v = head_bytes_at(context, head_dim, bits, group_size, residual, dtype_bytes)
    return num_kv_heads * (k + v) / context


def layer_bytes(context: int, num_kv_heads: int, head_dim: int, bits: int, group_size: int, residual: int,
                dtype_bytes: int = 2) -> int:
    """:func:`bytes_at` rounded up to whole bytes (never flatters the format)."""
    return math.ceil(bytes_at(context, num_kv_heads, head_dim, bits, group_size, residual, dtype_bytes) - 1e-9)


def install_kivi(model, bits: int, group_size: int, residual: int, exact_prefill: bool = False) -> list:
    """Plain-transformers emulation: every layer's attention over the whole sequence (no cache, batch rows
    unpadded, positions 0..T-1) replaced by :func:`attend`, each query with KIVI's state at its own decode step
    (``exact_prefill``: plain attention, KIVI's prefill). Returns undo callables."""
    from transformers import AttentionInterface

    name = "vllm_kvc_kivi_emulation"
    prev = model.config._attn_implementation

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        b, hq, t, d = query.shape
        sc = scaling if scaling is not None else d ** -0.5
        pos = torch.arange(t, device=query.device)
        outs = [attend(query[r].transpose(0, 1), key[r].transpose(0, 1), value[r].transpose(0, 1), pos, bits,
                       group_size, residual, sc, exact=exact_prefill) for r in range(b)]
        return torch.stack(outs).to(query.dtype), None

    AttentionInterface.register(name, fn)
    model.set_attn_implementation(name)
    return [lambda: model.set_attn_implementation(prev)]
