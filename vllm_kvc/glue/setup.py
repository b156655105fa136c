"""Reads the compression settings a vLLM process was given and prepares the plan and factors."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vllm_kvc.config import ADDITIONAL_CONFIG_KEY, CompressionConfig, parse_compression
from vllm_kvc.plan import CompressionPlan, ModelShape

log = logging.getLogger("vllm_kvc")


@dataclass(frozen=True)
class CompressionSetup:
    config: CompressionConfig
    plan: CompressionPlan
    factors_path: Path | None  # lowrank / quant: factor file; lexico: dictionary file; pod: none


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def compression_setup(vllm_config) -> CompressionSetup | None:
    extra = getattr(vllm_config, "additional_config", None) or {}
    raw = extra.get(ADDITIONAL_CONFIG_KEY)
    if raw is None:
        return None
    from vllm_kvc.prepare import prepare

    cfg = parse_compression(dict(raw))
    mc = vllm_config.model_config
    shape = ModelShape.from_hf_config(mc.hf_config.to_dict())
    shape = replace(shape, dtype=_dtype_name(mc.dtype))
    tp = vllm_config.parallel_config.tensor_parallel_size
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        plan, path = prepare(mc.model, cfg, shape, tp)
    finally:
        torch.set_default_dtype(prev)
    log.info("vllm_kvc: %s ranks k=%s v=%s, latent %s, factors %s", cfg.schedule, plan.ranks_k, plan.ranks_v,
             plan.latent_dtype, path)
    return CompressionSetup(cfg, plan, path)
