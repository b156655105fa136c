"""One entry point for every method's calibration artifacts: the plan and what the attention layers load.

- ``lowrank`` / ``quant``: the factor file (calibrate.py);
- ``lexico``: the dictionary file (lexico.py);
- ``pod``: no file for the layers; the sharing groups (measured, pod.py, or ``pod.groups``) go into the plan.

All of them are cached on disk and built under file locks, so every vLLM process (TP workers, the API server)
calls this and only the first one computes.
"""
from __future__ import annotations

from pathlib import Path

from vllm_kvc.config import CompressionConfig
from vllm_kvc.plan import CompressionPlan, ModelShape, build_plan


def prepare(model_dir: str, cfg: CompressionConfig, shape: ModelShape, tp_size: int = 1,
            build: bool = True) -> tuple[CompressionPlan, Path | None]:
    """(plan, artifact path). ``build=False``: only what is already cached (a pod plan falls back to its
    placeholder groups, which have the same bytes)."""
    plan = build_plan(cfg, shape, tp_size)
    if cfg.method == "lexico":
        from vllm_kvc.lexico import build_dictionaries

        return plan, build_dictionaries(model_dir, cfg) if build else None
    if cfg.method == "pod":
        groups = cfg.pod.groups
        if groups is None:
            from vllm_kvc.pod import build_pod_plan, cached_pod_plan

            pp = build_pod_plan(model_dir, cfg) if build else cached_pod_plan(model_dir, cfg)
            groups = pp.groups if pp is not None else None
        if groups is not None:
            plan = build_plan(cfg, shape, tp_size, pod_groups=[list(g) for g in groups])
        return plan, None
    from vllm_kvc.calibrate import build_factors

    return plan, build_factors(model_dir, cfg, plan) if build else None
