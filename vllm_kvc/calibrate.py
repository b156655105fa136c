"""Calibration: input covariances of every layer's K/V projections, and the factor file built from them.

Runs the checkpoint in plain transformers (no vLLM) over calibration text. Results are cached on disk under
``$VLLM_KVC_CACHE`` (default ``~/.cache/vllm_kvc``):

- ``cov/<key>.safetensors``: per-layer covariance, keyed by the checkpoint and the calibration settings;
- ``factors/<key>.safetensors``: per-layer ``A_k, B_k, A_v, B_v`` for every head group, keyed by the
  checkpoint, the calibration and the plan (ranks, group size, factorization, rotation).

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
from vllm_kvc.factorize import group_factors, identity_factors
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


def factors_path(model_dir: str, cfg, plan) -> Path:
    if plan.identity:  # method quant: the weights themselves, nothing calibrated
        key = cache_key(FACTOR_FORMAT, checkpoint_fingerprint(model_dir), "identity", plan.group_size)
    else:  # (the key of float and int8 plans is what it was before int4/int2 existed)
        key = cache_key(FACTOR_FORMAT, checkpoint_fingerprint(model_dir), cfg.calibration.model_dump(),
                        cfg.factorization, plan.group_size, plan.ranks_k, plan.ranks_v, plan.rotate)
    return cache_root() / "factors" / f"{key}.safetensors"


def build_factors(model_dir: str, cfg, plan) -> Path:
    """Compute (or find in the cache) the factor file of this checkpoint, calibration and plan."""
    return build_tensors_once(factors_path(model_dir, cfg, plan), lambda: _compute_factors(model_dir, cfg, plan),
                              "factors")


def _compute_factors(model_dir: str, cfg, plan):
    tok, model = load_hf_model(model_dir)
    covs = None
    if cfg.factorization == "whitened" and not plan.identity:
        covs = covariances(model_dir, cfg.calibration, model, tok)
    hd, gs = plan.shape.head_dim, plan.group_size
    rotate = plan.rotate
    tensors = {}
    t0 = time.time()
    for i, a in enumerate(progress(attn_modules(model), "calibration: factors", unit="layer")):
        cov = covs[i] if covs is not None else None
        for kind, proj, rank in (("k", a.k_proj, plan.ranks_k[i]), ("v", a.v_proj, plan.ranks_v[i])):
            w = proj.weight.detach().float().cpu()
            if plan.identity:
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


def load_layer_factors(path: Path, layer: int, groups: slice):
    """(A_k, B_k, A_v, B_v) of one layer restricted to a range of head groups (a TP rank's)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        ak, bk = f.get_tensor(f"{layer}.a_k"), f.get_tensor(f"{layer}.b_k")
        av, bv = f.get_tensor(f"{layer}.a_v"), f.get_tensor(f"{layer}.b_v")
    rk, rv = bk.shape[1], bv.shape[1]
    g0, g1 = groups.start, groups.stop
    return ak[:, g0 * rk:g1 * rk], bk[g0:g1], av[:, g0 * rv:g1 * rv], bv[g0:g1]
