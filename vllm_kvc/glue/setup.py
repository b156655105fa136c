"""Reads the compression settings a vLLM process was given and prepares the plan and calibration artifacts."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vllm_kvc.config import ADDITIONAL_CONFIG_KEY, CompressionConfig, parse_compression
from vllm_kvc.glue.backend import CUDA_GRAPHS
from vllm_kvc.methods import get_method, prepare
from vllm_kvc.plan import ModelShape, Plan

log = logging.getLogger("vllm_kvc")


@dataclass(frozen=True)
class CompressionSetup:
    config: CompressionConfig
    plan: Plan
    artifact: Path | None  # the method's calibration artifact (e.g. a factor or dictionary file), if any


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def compression_setup(vllm_config) -> CompressionSetup | None:
    extra = getattr(vllm_config, "additional_config", None) or {}
    raw = extra.get(ADDITIONAL_CONFIG_KEY)
    CUDA_GRAPHS["enabled"] = False
    if raw is None:
        return None
    cfg = parse_compression(dict(raw))
    # the latent backend lets vLLM capture single-token decode batches where this method's CUDA path allows it
    CUDA_GRAPHS["enabled"] = get_method(cfg.method).cuda_graphs
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
    log.info("vllm_kvc: method %s, %s, artifact %s", cfg.method, plan, path)
    step = get_method(cfg.method).engine_defaults(cfg).get("max_num_batched_tokens")
    sched = getattr(vllm_config, "scheduler_config", None)
    if step and sched is not None and (sched.max_num_batched_tokens or 0) > step:
        log.warning("vllm_kvc: method %s codes every new token in the step; %d tokens per step may run past vLLM's "
                    "execute-model timeout on CPUs: pass --max-num-batched-tokens %d", cfg.method,
                    sched.max_num_batched_tokens, step)
    return CompressionSetup(cfg, plan, path)
