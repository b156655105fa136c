"""Independent emulations of each method in plain transformers (no vLLM, no paged cache); each method's
``emulate`` (vllm_kvc/methods/) installs one of these.

- ``install_factors`` (lowrank, quant): each layer's k_proj / v_proj become the low-rank products of the factor
  file, K = (x A_k) B_k, applied through forward hooks on the projections' inputs, with the latent rounded to
  the latent dtype (bf16/fp16, or int8 with one absmax scale per token and head group); with roped keys, each
  roped key k becomes (k A_k) B_k (``install_roped_keys``);
- ``install_sparse`` (lexico): k_proj / v_proj outputs replaced by decode(encode(.)) over the dictionaries;
- ``install_pod`` (pod): every layer's attention replaced by POD's over the whole sequence.

Perplexity is computed on the same token chunks as the vLLM eval: the two must agree, which checks the whole
vLLM path (cache layout, paging, rebuild, RoPE, folding of B_v).
"""
from __future__ import annotations

import math

import torch

from vllm_kvc.layout import roundtrip
from vllm_kvc.plan import parse_latent_spec


def _round_latent(c: torch.Tensor, dtype: str, groups: int, quant_group: int = 0) -> torch.Tensor:
    """c [..., G*r] -> what the cache gives back (``dtype``: one part's dtype, e.g. bfloat16 / int8 / int4)."""
    if dtype == "float32":
        return c
    shp = c.shape
    cg = c.reshape(*shp[:-1], groups, shp[-1] // groups)
    return roundtrip(cg, dtype, quant_group).reshape(shp)


def install_factors(model, factors_path: str, latent_dtype: str, roped_keys: bool = False) -> list:
    """Replace every layer's k_proj/v_proj output by its low-rank emulation; returns callables that undo it.

    ``latent_dtype``: the plan's latent spec (layout.py), e.g. ``int8``, ``int4/int8@g32``. ``roped_keys``: the
    K factors code the roped key (calibrate.py): each roped key becomes what its latent scores as, ``c B_k``
    with ``c = k A_k`` rounded (``install_roped_keys``); k_proj is left exact."""
    from safetensors.torch import load_file

    f = load_file(factors_path)
    dk, dv, qg = parse_latent_spec(latent_dtype)
    undo = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        for kind, proj in (("k", attn.k_proj), ("v", attn.v_proj)):
            if kind == "k" and roped_keys:
                continue
            a = f[f"{i}.a_{kind}"].float()  # [hidden, G*r]
            b = f[f"{i}.b_{kind}"].float()  # [G, r, gdim]
            groups = b.shape[0]
            dt = dk if kind == "k" else dv

            def hook(mod, args, out, a=a, b=b, groups=groups, dt=dt):
                x = args[0].float()
                c = _round_latent(x @ a, dt, groups, qg)
                c = c.reshape(*c.shape[:-1], groups, -1)
                y = torch.einsum("...gr,grd->...gd", c, b).reshape(*x.shape[:-1], -1)
                if mod.bias is not None:
                    y = y + mod.bias.float()
                return y.to(out.dtype)

            undo.append(proj.register_forward_hook(hook).remove)
    if roped_keys:
        coders = []
        for i in range(len(model.model.layers)):
            a, b = f[f"{i}.a_k"].float(), f[f"{i}.b_k"].float()  # [gdim, G*r], [G, r, gdim]

            def code(k, a=a, b=b):
                g, r, gdim = b.shape
                kk = k.reshape(*k.shape[:-1], g, gdim)
                c = torch.einsum("...gd,gdr->...gr", kk, a.view(gdim, g, r).transpose(0, 1))
                c = _round_latent(c.flatten(-2), dk, g, qg).reshape(c.shape)
                return torch.einsum("...gr,grd->...gd", c, b).reshape(k.shape)

            coders.append(code)
        undo += install_roped_keys(model, coders)
    return undo


def install_roped_keys(model, coders) -> list:
    """Replace each layer's roped keys by ``coders[layer](k)`` (k: [..., tokens, KV heads x head_dim], float32)
    inside the checkpoint's attention, right after RoPE: the modeling module's ``apply_rotary_pos_emb`` is
    wrapped (Llama / Mistral / Qwen2 modules call it by name) and a pre-hook on each attention module tells the
    wrapper which layer runs. Returns callables that undo it."""
    import sys

    mods = {sys.modules[type(layer.self_attn).__module__] for layer in model.model.layers}
    state = {"layer": None}
    undo = []
    for mod in mods:
        rope = mod.apply_rotary_pos_emb

        def wrapped(q, k, cos, sin, *args, _rope=rope, **kw):
            q, k = _rope(q, k, cos, sin, *args, **kw)
            if state["layer"] is None:
                return q, k
            b, h, t, d = k.shape  # HF order: [batch, KV heads, tokens, head_dim]
            kk = k.transpose(1, 2).reshape(b, t, h * d).float()
            return q, coders[state["layer"]](kk).reshape(b, t, h, d).transpose(1, 2).to(k.dtype)

        mod.apply_rotary_pos_emb = wrapped
        undo.append(lambda mod=mod, rope=rope: setattr(mod, "apply_rotary_pos_emb", rope))
    for i, layer in enumerate(model.model.layers):
        undo.append(layer.self_attn.register_forward_pre_hook(
            lambda m, args, i=i: state.__setitem__("layer", i)).remove)
    undo.append(lambda: state.__setitem__("layer", None))
    return undo[::-1]


def install_sparse(model, dictionaries_path, sparsity_k, sparsity_v) -> list:
    """Replace every layer's k_proj / v_proj output (before RoPE) by its sparse code's reconstruction over the
    layer's dictionaries (vllm_kvc/lexico.py), ``sparsity_k[i]`` / ``sparsity_v[i]`` atoms. Returns undo
    callables."""
    from vllm_kvc.lexico import SparseLayout, load_dictionaries

    hkv = model.config.num_key_value_heads
    undo = []
    for i, layer in enumerate(model.model.layers):
        hd = layer.self_attn.head_dim
        layout = SparseLayout(hkv, hd, sparsity_k[i], sparsity_v[i])
        d_k, d_v = load_dictionaries(dictionaries_path, i)
        for which, proj in (("k", layer.self_attn.k_proj), ("v", layer.self_attn.v_proj)):
            def hook(mod, args, out, d_k=d_k, d_v=d_v, which=which, layout=layout, hd=hd):
                x = out.float().reshape(-1, hkv, hd)
                k, v = layout.decode(layout.encode(x, x, d_k, d_v), d_k, d_v)
                return (k if which == "k" else v).reshape(out.shape).to(out.dtype)
            undo.append(proj.register_forward_hook(hook).remove)
    return undo


@torch.no_grad()
def perplexity(model, chunks: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for ids in chunks:
        t = torch.tensor([ids])
        logits = model(t).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1)
        tgt = t[0, 1:]
        nll -= lp.gather(1, tgt[:, None]).sum().item()
        n += len(ids) - 1
    return math.exp(nll / n)


def emulate_ppl(model_dir: str, factors_path: str | None, latent_dtype: str, chunks: list[list[int]],
                model=None) -> float:
    from transformers import AutoModelForCausalLM

    model = model or AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    undo = install_factors(model, factors_path, latent_dtype) if factors_path else []
    try:
        return perplexity(model, chunks)
    finally:
        for u in undo:
            u()


def install_pod(model, groups, window: int, sinks: int) -> list:
    """Replace every layer's attention by POD's (vllm_kvc.pod.pod_attention) over the whole sequence, no cache:
    leads attend as usual and leave their roped q / k for their followers. Returns the restore handles
    (call ``h()`` on each). An independent check of the vLLM path (paged rows, side pool, lead queries)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from vllm_kvc.pod import pod_attention

    lead_of = {m: g[0] for g in groups for m in g}
    stash: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        orig = attn.forward

        def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, *a,
                    attn=attn, i=i, **kw):
            b, t, _ = hidden_states.shape
            hd = attn.head_dim
            q = attn.q_proj(hidden_states).view(b, t, -1, hd).transpose(1, 2)
            k = attn.k_proj(hidden_states).view(b, t, -1, hd).transpose(1, 2)
            v = attn.v_proj(hidden_states).view(b, t, -1, hd).transpose(1, 2)
            cos, sin = position_embeddings
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            outs = []
            for j in range(b):
                qj, kj, vj = q[j].transpose(0, 1), k[j].transpose(0, 1), v[j].transpose(0, 1)  # [T, H, d]
                lead = lead_of[i]
                if lead == i:
                    stash[(i, j)] = (qj, kj)
                    ql, kl = qj, kj
                else:
                    ql, kl = stash[(lead, j)]
                outs.append(pod_attention(qj, kj, vj, ql, kl, attn.scaling, window, sinks, torch.arange(t)))
            o = torch.stack(outs).reshape(b, t, -1)
            return attn.o_proj(o), None

        attn.forward = forward
        handles.append(lambda attn=attn, orig=orig: setattr(attn, "forward", orig))
    return handles


def windowed_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **_):
    """A transformers attention function for ``install_window``: ``key`` / ``value`` carry twice the KV heads
    (the exact ones, then the coded ones); query position i reads key j exactly where j < sinks or i - j <
    window (``module.kvc_window = (window, sinks)``), the coded one elsewhere (one softmax over both), causal.
    Single unpadded sequences (the perplexity chunks). -> ([B, T, Hq, hd], None)."""
    window, sinks = module.kvc_window
    hk = key.shape[1] // 2
    rep = query.shape[1] // hk
    t = query.shape[2]
    i = torch.arange(t, device=query.device)
    d = i[:, None] - i[None, :]
    exact = (d < window) | (i[None, :] < sinks)

    def heads(x, part):
        return x[:, part * hk:(part + 1) * hk].repeat_interleave(rep, 1)

    ke, kc, ve, vc = heads(key, 0), heads(key, 1), heads(value, 0), heads(value, 1)
    s = torch.where(exact, query @ ke.transpose(-1, -2), query @ kc.transpose(-1, -2)) * scaling
    p = torch.softmax(s.masked_fill(d < 0, float("-inf")).float(), -1).to(query.dtype)
    out = (p * exact) @ ve + (p * ~exact) @ vc
    return out.transpose(1, 2).contiguous(), None


def install_window(model, window: int, sinks: int) -> list:
    """Attention of every layer through :func:`windowed_attention` (the K/V projections must emit exact and coded
    heads side by side, see tcode.install). Returns undo callables."""
    from transformers import AttentionInterface

    AttentionInterface.register("kvc_window", windowed_attention)
    old = model.config._attn_implementation
    model.config._attn_implementation = "kvc_window"
    for layer in model.model.layers:
        layer.self_attn.kvc_window = (int(window), int(sinks))

    def undo():
        model.config._attn_implementation = old
        for layer in model.model.layers:
            del layer.self_attn.kvc_window
    return [undo]
