"""Checks a deployment before any engine starts: one ConfigError naming the field, or a ready deployment."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from vllm_kvc.checkpoints import resolve_model
from vllm_kvc.config import ConfigError, DeploymentConfig, load_deployment
from vllm_kvc.methods import build_plan
from vllm_kvc.plan import ModelShape, Plan


@dataclass
class Checked:
    deployment: DeploymentConfig
    model_dir: str
    shape: ModelShape
    plan: Plan | None


def engine_arg_names() -> set[str]:
    from vllm.engine.arg_utils import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}


def check_engine_keys(engine: dict) -> None:
    names = engine_arg_names()
    for key in engine:
        if key not in names:
            raise ConfigError(f"engine.{key}", "unknown vLLM engine argument (see `vllm serve --help`)")


def engine_dtype(dep: DeploymentConfig, shape: ModelShape) -> str:
    dt = str(dep.engine.get("dtype", "auto"))
    return shape.dtype if dt == "auto" else {"half": "float16", "float": "float32"}.get(dt, dt)


def check_deployment(dep: DeploymentConfig, check_engine: bool = True) -> Checked:
    model_dir = resolve_model(dep.model)
    if not Path(model_dir).is_dir():
        raise ConfigError("model", f"{model_dir!r} is not a local checkpoint folder (download it first; "
                                   "calibration needs its weights)")
    shape = ModelShape.from_model_dir(model_dir)
    if check_engine:
        check_engine_keys(dep.engine)
    plan = None
    if dep.compression is not None:
        tp = int(dep.engine.get("tensor_parallel_size", 1))
        shape_rt = dataclasses.replace(shape, dtype=engine_dtype(dep, shape))
        plan = build_plan(dep.compression, shape_rt, tp)
    return Checked(dep, model_dir, shape, plan)


def check_file(path: str | Path, check_engine: bool = True) -> Checked:
    return check_deployment(load_deployment(path), check_engine)
