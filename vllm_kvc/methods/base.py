"""The interface every compression method implements, and the registry of methods.

A method is one small class (one module under ``vllm_kvc/methods/``) that owns, for its ``compression.method``:

- its settings: ``fields`` (a pydantic model whose fields sit directly under ``compression:``) and/or
  ``section`` (a pydantic model under ``compression.<name>:``); config.py assembles the schema from all methods;
- its plan: ``plan(cfg, shape, tp_size)`` validates the settings against the model and returns a
  :class:`vllm_kvc.plan.Plan` (explicit fields; its bytes per token are what vLLM's capacity counts);
- its calibration artifacts: ``prepare(model_dir, cfg, shape, tp_size, build)`` builds them (cached on disk,
  locked: vllm_kvc/artifacts.py) and returns the plan that uses them and the artifact path;
- its attention layer in vLLM: ``attention(layer, plan, cfg, artifact, cache_config, prefix)`` returns a
  ``glue.attention.RowAttention`` that caches this method's rows and computes attention from them;
- what ``/v1/kv_compression`` and the metrics report about it: ``describe(plan)`` and ``rank_meaning``;
- its emulation in plain transformers for tests: ``emulate(model, plan, artifact, cfg)``;
- its points of ``vllm-kvc bench pareto``: ``bench_points(...)``.

Nothing outside ``vllm_kvc/methods/`` names a method: callers go through :func:`get_method`.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vllm_kvc.settings import ConfigError, Strict

if TYPE_CHECKING:
    from vllm_kvc.plan import ModelShape, Plan


class Method:
    name: ClassVar[str]
    summary: ClassVar[str]  # one line: what the cache holds (the schema's description of ``method``)
    fields: ClassVar[type[Strict] | None] = None  # settings directly under ``compression:``
    section: ClassVar[type[Strict] | None] = None  # settings under ``compression.<name>:``
    rank_meaning: ClassVar[str] = "latent rank per head group"
    allocatable: ClassVar[bool] = False  # ``vllm-kvc allocate`` can choose its per-layer ranks and widths
    # its attention on CUDA runs single-token decode batches without host reads (capturable in CUDA graphs)
    cuda_graphs: ClassVar[bool] = False
    # the modules that implement only this method (its math and its vLLM layer); they may name it, nothing else may
    modules: ClassVar[tuple[str, ...]] = ()

    # ----- plan and calibration -----
    def plan(self, cfg, shape: "ModelShape", tp_size: int = 1) -> "Plan":
        raise NotImplementedError

    def prepare(self, model_dir: str, cfg, shape: "ModelShape", tp_size: int = 1,
                build: bool = True) -> tuple["Plan", Path | None]:
        """(plan, artifact path) with this method's calibration artifacts built (``build``) or only read from the
        cache (``build=False``: the artifact may be None; the plan keeps the same bytes per token)."""
        return self.plan(cfg, shape, tp_size), None

    def artifact_summary(self, plan: "Plan", artifact: Path | None) -> str:
        """What ``vllm-kvc compress`` prints."""
        return str(artifact)

    def allocate(self, model_dir: str, base, baseline_bytes: int, memory: float | None = None,
                 max_rise: float | None = None) -> tuple[Any, dict]:
        """``vllm-kvc allocate`` (methods with ``allocatable``): the settings of ``base`` with what the allocator
        chose for ``memory`` (fraction of the bf16 KV bytes, scales included) or ``max_rise`` (perplexity rise
        on calibration text, %), and a JSON summary for the written config's header."""
        raise NotImplementedError

    # ----- vLLM -----
    def engine_defaults(self, cfg) -> dict[str, Any]:
        """vLLM engine arguments this method needs unless the deployment sets them (e.g. a bound on the tokens
        of one step for a method whose CPU path is slow, so that no step nears vLLM's execute-model timeout)."""
        return {}

    def attention(self, layer, plan: "Plan", cfg, artifact: Path | None, cache_config, prefix: str):
        """The vLLM attention layer of decoder layer ``layer.layer_idx`` (``layer``: the glue's
        ``LatentSelfAttention``, which holds the head counts, rotary embedding and projections)."""
        raise NotImplementedError

    # ----- reporting -----
    def describe(self, plan: "Plan") -> dict[str, Any]:
        """Method-specific keys of GET /v1/kv_compression (the per-layer table and bytes are generic):
        ``latent_dtype`` (how the cache stores its values) and ``group_size`` (KV heads coded together)."""
        return {"latent_dtype": plan.latent_dtype, "group_size": 1}

    # ----- tests and benchmarks -----
    def emulate(self, model, plan: "Plan", artifact: Path | None, cfg) -> list:
        """Install this method on an HF transformers model (hooks); returns callables that undo it."""
        raise NotImplementedError(f"method {self.name}: no transformers emulation")

    def bench_points(self, base, shape: "ModelShape", model_dir: str, points, include, **kw) -> list[dict]:
        """``vllm-kvc bench pareto`` points: [{method, is_baseline, target, compression[, allocation]}]. Keywords
        passed by the bench (take ``**_`` for the rest): ``quality_pct``, ``seq_len`` (perplexity chunk length)."""
        return []


_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: one instance per method name."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError("compression.method",
                          f"unknown method {name!r}: expected one of {', '.join(_REGISTRY)}") from None


def all_methods() -> tuple[Method, ...]:
    return tuple(_REGISTRY.values())
