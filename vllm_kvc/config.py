"""Deployment settings (pydantic): the schema of a deployment YAML (``configs/*.yaml``) and of its
``compression:`` section, assembled from the registered methods (vllm_kvc/methods/): their flat fields sit
directly under ``compression:``, their sections under ``compression.<method>:``. Importable without vLLM.

The compression part travels to every vLLM process inside ``additional_config["kv_compression"]`` (vLLM's own
passthrough for plugins).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, field_validator

from vllm_kvc.methods import all_methods, method_names
from vllm_kvc.settings import (ADDITIONAL_CONFIG_KEY, SUPPORTED_ARCHITECTURES, CalibrationConfig, ConfigError,
                               ServerConfig, Strict, first_error)

__all__ = ["ADDITIONAL_CONFIG_KEY", "SUPPORTED_ARCHITECTURES", "CalibrationConfig", "CompressionConfig",
           "ConfigError", "DeploymentConfig", "ServerConfig", "load_deployment", "parse_compression"]


def _compression_model():
    methods = all_methods()
    flat = [m.fields for m in methods if m.fields is not None]
    # one base per family of flat fields (a method's fields may extend another's, e.g. quant's lowrank's)
    bases = tuple(dict.fromkeys(f for f in flat if not any(g is not f and issubclass(g, f) for g in flat)))
    names = method_names()
    head = create_model("_Method", __base__=Strict, method=(Literal[names], Field(
        names[0], description="; ".join(m.summary for m in methods))))
    sections = {m.name: (m.section, m.section()) for m in methods if m.section is not None}
    model = create_model("CompressionConfig", __base__=(*bases, head), __module__=__name__,
                         calibration=(CalibrationConfig, CalibrationConfig()), **sections)
    model.__doc__ = "The ``compression:`` section of a deployment: ``method`` and every method's settings."
    return model


CompressionConfig = _compression_model()


class DeploymentConfig(Strict):
    model: str = Field(..., description="HF checkpoint folder, hub id, or 'smollm2' for the embedded default")
    served_model_name: str | None = None
    engine: dict[str, Any] = Field(default_factory=dict, description="vLLM engine arguments")
    compression: CompressionConfig | None = None
    server: ServerConfig = ServerConfig()

    @field_validator("engine")
    @classmethod
    def _no_additional_config(cls, v):
        if "additional_config" in v:
            raise ValueError("set compression under 'compression:', not engine.additional_config")
        return v


def parse_compression(data: dict | None) -> CompressionConfig | None:
    if data is None:
        return None
    try:
        return CompressionConfig.model_validate(data)
    except ValidationError as e:
        raise first_error(e, "compression") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects a key given twice in one mapping (plain YAML keeps the last silently)."""


def _mapping_without_duplicates(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}, first given at line {seen[key] + 1}", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def load_deployment(path: str | Path) -> DeploymentConfig:
    p = Path(path)
    if not p.exists():
        raise ConfigError("config", f"file {p} does not exist")
    try:
        data = load_yaml(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        what = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError("config", f"{p} is not valid YAML: {what}{where}") from None
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"{p} must hold a mapping, got {type(data).__name__}")
    try:
        return DeploymentConfig.model_validate(data)
    except ValidationError as e:
        raise first_error(e) from None
