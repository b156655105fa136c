"""Settings shared by every method and the deployment (pydantic): errors that name the field, the strict base
model, calibration and server settings. Plain Python: importable without vLLM or torch.

config.py assembles the full ``compression:`` schema from these and the registered methods' own settings.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ADDITIONAL_CONFIG_KEY = "kv_compression"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class ConfigError(ValueError):
    """A bad setting: ``field`` is the dotted path of the offending key."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationConfig(Strict):
    corpus: str = Field("default", description="'default' (a registry package's English prose) or a .txt path")
    tokens: int = Field(16384, gt=0, description="calibration tokens")
    seq_len: int = Field(1024, gt=0, le=32768)


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)


def _field_path(err: dict) -> str:
    return ".".join(str(p) for p in err.get("loc", ())) or "<root>"


def first_error(exc: ValidationError, prefix: str = "") -> ConfigError:
    err = exc.errors()[0]
    path = _field_path(err)
    if prefix:
        path = f"{prefix}.{path}" if path != "<root>" else prefix
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden":
        msg = "unknown key"
    elif "input" in err and err.get("type") not in ("missing",):
        msg = f"{msg} (got {err['input']!r})"
    return ConfigError(path, msg)
