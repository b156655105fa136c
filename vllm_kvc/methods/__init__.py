"""The compression methods: one module each, behind one interface (base.py), found by name in the registry.

``build_plan`` and ``prepare`` are what the rest of the package calls; nothing outside this package names a
method. Adding a method: docs/ARCHITECTURE.md.
"""
from __future__ import annotations

from pathlib import Path

from vllm_kvc.methods import lowrank, quant, lexico, pod, vllm_format, kivi, tcode  # noqa: F401, I001  (registration; lowrank first: the default)
from vllm_kvc.methods.base import Method, all_methods, get_method, method_names
from vllm_kvc.plan import ModelShape, Plan
from vllm_kvc.settings import ConfigError

__all__ = ["Method", "all_methods", "build_plan", "get_method", "method_names", "prepare"]


def _check_tp(shape: ModelShape, tp_size: int) -> None:
    if tp_size > 1 and shape.num_kv_heads % tp_size and shape.num_kv_heads > tp_size:
        raise ConfigError("engine.tensor_parallel_size",
                          f"{tp_size} does not divide the model's {shape.num_kv_heads} KV heads")


def build_plan(cfg, shape: ModelShape, tp_size: int = 1) -> Plan:
    """The plan of ``cfg`` for ``shape`` (settings validated against the model; nothing calibrated)."""
    _check_tp(shape, tp_size)
    return get_method(cfg.method).plan(cfg, shape, tp_size)


def prepare(model_dir: str, cfg, shape: ModelShape, tp_size: int = 1,
            build: bool = True) -> tuple[Plan, Path | None]:
    """(plan, artifact path) with the method's calibration artifacts: cached on disk and built under file locks,
    so every vLLM process (TP workers, the API server) calls this and only the first one computes.
    ``build=False``: only what is already cached."""
    _check_tp(shape, tp_size)
    return get_method(cfg.method).prepare(model_dir, cfg, shape, tp_size, build)
