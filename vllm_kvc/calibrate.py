"""Calibration: input covariances of every layer's K/V projections, and the factor file built from them.

Runs the checkpoint in plain transformers (no vLLM) over calibration text. Results are cached on disk under
``$VLLM_KVC_CACHE`` (default ``~/.cache/vllm_kvc``):

- ``cov/<key>.safetensors``: per-layer covariance, keyed by the checkpoint and the calibration settings;
- ``cov/roped-<key>.safetensors``: per-layer second moments of the roped keys and queries (plans with
  ``keys: roped``), keyed by the checkpoint and the calibration settings;
- ``factors/<key>.safetensors``: per-layer ``A_k, B_k, A_v, B_v`` for every head group, keyed by the
  checkpoint, the calibration and the plan (ranks, group size, factorization, rotation, key mode).

Roped keys (``keys: roped``): the K latent is ``c = k A_k`` of the *roped* key of each head group (``A_k``
[group dim, G*rank], group g in columns g*rank:(g+1)*rank) and attention scores it as ``(q B_k^T) . c``
(``B_k`` [G, rank, group dim], as for pre-RoPE keys): factorize.score_factors on the moments above.

The vLLM plugin loads the factor file (building it first if missing, under a file lock so that
tensor-parallel workers compute it once).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from vllm_kvc.artifacts import (CHECKPOINT_S, Parts, attn_modules, build_tensors_once, cache_key, cache_root,
                                cached_tensors, checkpoint_fingerprint, file_lock, load_hf_model, progress,
                                save_tensors_atomic)
from vllm_kvc.factorize import group_factors, identity_factors, score_factors
from vllm_kvc.settings import CalibrationConfig

log = logging.getLogger("vllm_kvc")
FACTOR_FORMAT = 2


def compute_covariances(model, tok, calib: CalibrationConfig, parts: Parts | None = None) -> torch.Tensor:
    """E[x x^T] of every layer's K/V projection input over the calibration chunks. ``parts``: the running sums
    are saved every ``CHECKPOINT_S`` seconds there, and a restarted run continues after the last saved chunk
    (same order of additions: the same result bit for bit)."""
    from vllm_kvc.corpus import load_text, token_chunks

    chunks = token_chunks(tok, load_text(calib.corpus, "calibration"), calib.tokens, calib.seq_len)
    attn = attn_modules(model)
    hidden = model.config.hidden_size
    covs = torch.zeros(len(attn), hidden, hidden, dtype=torch.float64)
    count, start = 0, 0
    state = parts.get("state") if parts is not None else None
    if state is not None and state["sum"].shape == covs.shape:
        covs, count, start = state["sum"], int(state["count"]), int(state["chunks"])
        log.info("calibration: resuming after chunk %d/%d", start, len(chunks))
    hooks = []
    for i, a in enumerate(attn):
        def hook(mod, args, i=i):
            x = args[0].reshape(-1, hidden).double().cpu()
            covs[i] += x.t() @ x
        hooks.append(a.k_proj.register_forward_pre_hook(hook))
    t0 = saved = time.time()
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            for n, ids in enumerate(progress(chunks[start:], "calibration: covariances", unit="chunk"), start):
                model(torch.tensor([ids], device=dev))
                count += len(ids)
                log.info("calibration %d/%d chunks (%.0f s)", n + 1, len(chunks), time.time() - t0)
                if parts is not None and n + 1 < len(chunks) and time.time() - saved >= CHECKPOINT_S:
                    parts.put("state", {"sum": covs, "count": torch.tensor(count), "chunks": torch.tensor(n + 1)})
                    saved = time.time()
    finally:
        for h in hooks:
            h.remove()
    return covs / count


def covariance_path(model_dir: str, calib: CalibrationConfig) -> Path:
    return cache_root() / "cov" / f"{cache_key(checkpoint_fingerprint(model_dir), calib.model_dump())}.safetensors"


def covariances(model_dir: str, calib: CalibrationConfig, model=None, tok=None) -> torch.Tensor:
    """Per-layer input covariances [layers, hidden, hidden] (float64), from the cache or computed once (file
    lock); ``model`` / ``tok``: an already loaded HF model to compute with."""
    cpath = covariance_path(model_dir, calib)
    with file_lock(cpath):
        if (t := cached_tensors(cpath)) is not None:
            return t["cov"].double()
        if model is None:
            tok, model = load_hf_model(model_dir)
        parts = Parts(cpath)
        covs = compute_covariances(model, tok, calib, parts)
        stored = covs.float()
        save_tensors_atomic({"cov": stored}, cpath, metadata={"calibration": json.dumps(calib.model_dump())})
        parts.clear()
        log.info("covariances of %d layers written to %s", covs.shape[0], cpath)
        # what a later run reads back: factors do not depend on whether the covariances were cached
        return stored.double()


def compute_roped_moments(model, tok, calib: CalibrationConfig, sinks: int = 1):
    """Per layer, over the calibration chunks (positions ``sinks``.. of each: the first token's huge key is
    not what the rest look like), ``E[k k^T]`` of the roped keys of all KV heads [D, D] and the block-diagonal
    ``E[q q^T]`` whose KV-head block sums the roped queries that read that head (D = KV heads x head_dim)."""
    from vllm_kvc.corpus import load_text, token_chunks
    from vllm_kvc.pod import capture_qkv

    chunks = token_chunks(tok, load_text(calib.corpus, "calibration"), calib.tokens, calib.seq_len)
    ck = cq = None
    n = 0
    for ids in progress(chunks, "calibration: roped moments", unit="chunk"):
        for i, (q, k, _) in enumerate(capture_qkv(model, torch.tensor(ids))):
            q, k = q[sinks:].double(), k[sinks:].double()
            t, hkv, hd = k.shape
            rep = q.shape[1] // hkv
            if ck is None:
                nl = len(attn_modules(model))
                ck = torch.zeros(nl, hkv * hd, hkv * hd, dtype=torch.float64)
                cq = torch.zeros_like(ck)
            kk = k.reshape(t, hkv * hd)
            ck[i] += kk.t() @ kk
            for h in range(hkv):
                qh = q[:, h * rep:(h + 1) * rep].reshape(-1, hd)
                cq[i, h * hd:(h + 1) * hd, h * hd:(h + 1) * hd] += qh.t() @ qh
        n += max(0, len(ids) - sinks)
    return ck / n, cq / n


def roped_moments(model_dir: str, calib: CalibrationConfig, model=None, tok=None):
    """(E[k k^T], E[q q^T]) per layer of the roped keys and queries (``compute_roped_moments``), float64, from
    the cache or computed once."""
    path = cache_root() / "cov" / f"roped-{cache_key(checkpoint_fingerprint(model_dir), calib.model_dump())}.safetensors"

    def build():
        nonlocal tok, model
        if model is None:
            tok, model = load_hf_model(model_dir)
        ck, cq = compute_roped_moments(model, tok, calib)
        return {"k": ck.float(), "q": cq.float()}, {"calibration": json.dumps(calib.model_dump())}

    t = cached_tensors(build_tensors_once(path, build, "roped moments"))
    return t["k"].double(), t["q"].double()


def factors_path(model_dir: str, cfg, plan) -> Path:
    roped = ("roped-keys",) if plan.roped_keys else ()  # (keys of pre-RoPE plans unchanged)
    if plan.identity:  # method quant: the weights themselves, nothing calibrated
        key = cache_key(FACTOR_FORMAT, checkpoint_fingerprint(model_dir), "identity", plan.group_size, *roped)
    else:  # (the key of float and int8 plans is what it was before int4/int2 existed)
        key = cache_key(FACTOR_FORMAT, checkpoint_fingerprint(model_dir), cfg.calibration.model_dump(),
                        cfg.factorization, plan.group_size, plan.ranks_k, plan.ranks_v, plan.rotate, *roped)
    return cache_root() / "factors" / f"{key}.safetensors"


def build_factors(model_dir: str, cfg, plan) -> Path:
    """Compute (or find in the cache) the factor file of this checkpoint, calibration and plan."""
    return build_tensors_once(factors_path(model_dir, cfg, plan), lambda: _compute_factors(model_dir, cfg, plan),
                              "factors")


def _compute_factors(model_dir: str, cfg, plan):
    tok, model = load_hf_model(model_dir)
    covs = moments = None
    if cfg.factorization == "whitened" and not plan.identity:
        covs = covariances(model_dir, cfg.calibration, model, tok)
    if plan.roped_keys and not plan.identity:
        moments = roped_moments(model_dir, cfg.calibration, model, tok)
    hd, gs = plan.shape.head_dim, plan.group_size
    rotate = plan.rotate
    tensors = {}
    t0 = time.time()
    for i, a in enumerate(progress(attn_modules(model), "calibration: factors", unit="layer")):
        cov = covs[i] if covs is not None else None
        for kind, proj, rank in (("k", a.k_proj, plan.ranks_k[i]), ("v", a.v_proj, plan.ranks_v[i])):
            w = proj.weight.detach().float().cpu()
            if kind == "k" and plan.roped_keys:
                A, B = roped_key_factors(moments, i, w.shape[0] // (gs * hd), gs * hd, rank, rotate)
            elif plan.identity:
                A, B = identity_factors(w, gs, hd)
            else:
                A, B = group_factors(w, gs, hd, rank, cov, rotate)
            tensors[f"{i}.a_{kind}"] = A.float().contiguous()
            tensors[f"{i}.b_{kind}"] = B.float().contiguous()
        if (i + 1) % 10 == 0:
            log.info("factors: %d/%d layers (%.1f s)", i + 1, plan.shape.num_layers, time.time() - t0)
    log.info("factors of %d layers computed (%.1f s)", plan.shape.num_layers, time.time() - t0)
    del model
    return tensors, {"plan": json.dumps(plan.to_json()), "format": str(FACTOR_FORMAT)}


def roped_key_factors(moments, layer: int, groups: int, gdim: int, rank: int, rotate: bool):
    """A_k [gdim, G*rank], B_k [G, rank, gdim] of one layer's roped keys (identity where ``moments`` is None:
    method quant, the roped key itself)."""
    if moments is None:
        eye = torch.eye(gdim, dtype=torch.float64)
        return eye.repeat(1, groups), eye.expand(groups, gdim, gdim).contiguous()
    ck, cq = moments
    a_list, b_list = [], []
    for g in range(groups):
        blk = slice(g * gdim, (g + 1) * gdim)
        a, b = score_factors(cq[layer][blk, blk], ck[layer][blk, blk], rank, rotate, seed=g)
        a_list.append(a)
        b_list.append(b.t())
    return torch.cat(a_list, dim=1), torch.stack(b_list)


def load_layer_factors(path: Path, layer: int, groups: slice):
    """(A_k, B_k, A_v, B_v) of one layer restricted to a range of head groups (a TP rank's)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        ak, bk = f.get_tensor(f"{layer}.a_k"), f.get_tensor(f"{layer}.b_k")
        av, bv = f.get_tensor(f"{layer}.a_v"), f.get_tensor(f"{layer}.b_v")
    rk, rv = bk.shape[1], bv.shape[1]
    g0, g1 = groups.start, groups.stop
    return ak[:, g0 * rk:g1 * rk], bk[g0:g1], av[:, g0 * rv:g1 * rv], bv[g0:g1]
