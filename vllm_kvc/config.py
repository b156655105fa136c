"""Compression and deployment settings (pydantic). Plain Python: importable without vLLM or torch.

A deployment YAML (``configs/*.yaml``) holds a :class:`DeploymentConfig`. The compression part travels to
every vLLM process inside ``additional_config["kv_compression"]`` (vLLM's own passthrough for plugins).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ADDITIONAL_CONFIG_KEY = "kv_compression"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class ConfigError(ValueError):
    """A bad setting: ``field`` is the dotted path of the offending key."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationConfig(_Strict):
    corpus: str = Field("default", description="'default' (a registry package's English prose) or a .txt path")
    tokens: int = Field(16384, gt=0, description="calibration tokens")
    seq_len: int = Field(1024, gt=0, le=32768)


class LayerRanks(_Strict):
    """Explicit ranks per layer (per head group), one entry per decoder layer."""

    k: list[int]
    v: list[int]

    @model_validator(mode="after")
    def _same_len(self):
        if len(self.k) != len(self.v):
            raise ValueError(f"k has {len(self.k)} entries and v has {len(self.v)}: expected one per layer in both")
        if any(r < 1 for r in self.k + self.v):
            raise ValueError("ranks must be >= 1")
        return self


class LexicoConfig(_Strict):
    """Method ``lexico``: each KV head's key (before RoPE) and value is a sparse combination of atoms of a
    per-layer dictionary learned once from calibration K/V; the cache row holds (int16 index, fp16 value) pairs."""

    atoms: int = Field(1024, ge=16, le=32768, description="dictionary atoms per layer and per K/V")
    sparsity_k: int = Field(8, ge=1, le=256, description="non-zero coefficients per key vector")
    sparsity_v: int = Field(8, ge=1, le=256, description="non-zero coefficients per value vector")
    iters: int = Field(6, ge=0, le=100, description="dictionary-learning iterations over calibration K/V")
    train_sparsity: int = Field(8, ge=1, le=256, description="sparsity the dictionaries are learned at; one "
                                                             "dictionary serves every sparsity_k / sparsity_v")
    recent_window: int = Field(0, ge=0, description="newest tokens per sequence attended with exact K/V "
                                                     "(kept in a dense side pool); 0: every token from its code")


class PodConfig(_Strict):
    """Method ``pod``: in each group of adjacent layers the first (lead) keeps its keys; the others (followers)
    score distant tokens with the lead's queries and keys and keep only their own values, plus exact keys for
    the sink and recent tokens."""

    followers: int | None = Field(None, ge=0, description="layers that share the distant keys of their group's "
                                                          "lead (default: half of the layers)")
    max_group: int = Field(2, ge=2, le=16, description="most layers per sharing group (lead included)")
    window: int = Field(64, ge=0, description="recent tokens a follower scores with its own keys")
    sinks: int = Field(4, ge=0, description="first tokens a follower scores with its own keys")
    groups: list[list[int]] | None = Field(
        None, description="explicit sharing groups of adjacent layers (first = lead), covering every layer in "
                          "order; default: chosen from measured inter-layer attention similarity")


class CompressionConfig(_Strict):
    method: Literal["lowrank", "quant", "lexico", "pod"] = Field(
        "lowrank", description="lowrank: factorized latents; quant: K/V themselves quantized per token group "
                               "(KIVI-style baseline, full rank, no rotation); lexico: sparse codes over a "
                               "learned dictionary; pod: distant-token keys shared across adjacent layers")
    bits: Literal[8, 4, 2] = Field(4, description="method quant: bits per K/V value")
    ratio: float = Field(0.5, gt=0, le=1, description="kept rank / full rank of each head group, K and V")
    ratio_k: float | None = Field(None, gt=0, le=1, description="overrides ratio for keys")
    ratio_v: float | None = Field(None, gt=0, le=1, description="overrides ratio for values")
    ranks: LayerRanks | None = Field(None, description="explicit per-layer ranks (overrides ratio and schedule)")
    schedule: Literal["uniform", "progressive"] = "uniform"
    progressive_spread: float = Field(
        0.4, ge=0, lt=1, description="progressive: layer 0 keeps (1+spread)x the mean rank, the last (1-spread)x")
    group_size: int = Field(1, ge=1, description="KV heads per factorized head group")
    latent_dtype: Literal["auto", "bfloat16", "float16", "float32", "int8", "int4", "int2"] = "auto"
    latent_dtype_k: Literal["int8", "int4", "int2"] | None = Field(None, description="overrides latent_dtype for keys")
    latent_dtype_v: Literal["int8", "int4", "int2"] | None = Field(None, description="overrides latent_dtype for values")
    quant_group: int | None = Field(
        None, ge=0, description="integer latents: values per fp16 scale; 0: one scale per token, head group and "
                                "K/V (default for lowrank); method quant defaults to 32")
    factorization: Literal["whitened", "plain"] = "whitened"
    calibration: CalibrationConfig = CalibrationConfig()
    lexico: LexicoConfig = LexicoConfig()
    pod: PodConfig = PodConfig()

    @property
    def k_ratio(self) -> float:
        return self.ratio_k if self.ratio_k is not None else self.ratio

    @property
    def v_ratio(self) -> float:
        return self.ratio_v if self.ratio_v is not None else self.ratio


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)


class DeploymentConfig(_Strict):
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


def parse_compression(data: dict | None) -> CompressionConfig | None:
    if data is None:
        return None
    try:
        return CompressionConfig.model_validate(data)
    except ValidationError as e:
        raise first_error(e, "compression") from None


def load_deployment(path: str | Path) -> DeploymentConfig:
    p = Path(path)
    if not p.exists():
        raise ConfigError("config", f"file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("config", f"{p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"{p} must hold a mapping, got {type(data).__name__}")
    try:
        return DeploymentConfig.model_validate(data)
    except ValidationError as e:
        raise first_error(e) from None
