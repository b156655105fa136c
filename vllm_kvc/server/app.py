"""What the plugin adds to vLLM's own OpenAI-compatible server, as one HTTP middleware (vLLM's ``--middleware``).

- ``GET /v1/kv_compression``: the deployment's compression, per-layer ranks, bytes per token and KV capacity
  (registered as a route of vLLM's app on the first request, so vLLM's ``--api-key`` guards it like /v1/models).
- ``vllm_kvc_*`` metrics on vLLM's /metrics (refreshed when /metrics is scraped; multiprocess-safe gauges).

Everything is read from the running server's ``app.state.vllm_config``, so the same middleware works under
``vllm-kvc serve`` and under plain ``vllm serve --additional-config ... --middleware ...``.
"""
from __future__ import annotations

import dataclasses
import logging
import threading

from vllm_kvc.config import ADDITIONAL_CONFIG_KEY, SUPPORTED_ARCHITECTURES, parse_compression
from vllm_kvc.methods import get_method, prepare
from vllm_kvc.plan import ModelShape, dense_bytes_per_token, dtype_bytes

log = logging.getLogger("vllm_kvc")
MIDDLEWARE = "vllm_kvc.server.app.kv_compression_middleware"
ROUTE = "/v1/kv_compression"


def _plan_of(vllm_config):
    """(compression config, plan, model shape) of the running server; config and plan None without compression."""
    mc = vllm_config.model_config
    shape = ModelShape.from_hf_config(mc.hf_config.to_dict()) if _supported(mc) else None
    raw = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if raw is None or shape is None:
        return None, None, shape
    shape = dataclasses.replace(shape, dtype=str(mc.dtype).replace("torch.", ""))
    cfg = parse_compression(dict(raw))
    # the engine built (and cached) every artifact before the server started: read, never build, here
    plan, _ = prepare(mc.model, cfg, shape, vllm_config.parallel_config.tensor_parallel_size, build=False)
    return cfg, plan, shape


def _supported(mc) -> bool:
    return any(a in SUPPORTED_ARCHITECTURES for a in (mc.hf_config.architectures or []))


def describe(vllm_config) -> dict:
    """The JSON of GET /v1/kv_compression (bytes per token are per tensor-parallel rank)."""
    cfg, plan, shape = _plan_of(vllm_config)
    cc = vllm_config.cache_config
    tp = vllm_config.parallel_config.tensor_parallel_size
    blocks = int(cc.num_gpu_blocks or 0)
    capacity = blocks * int(cc.block_size)
    mc = vllm_config.model_config
    db = dtype_bytes(str(mc.dtype).replace("torch.", ""))
    out = {
        "model": mc.served_model_name if isinstance(mc.served_model_name, str) else mc.model,
        "enabled": plan is not None,
        "method": cfg.method if cfg is not None else None,
        "settings": cfg.model_dump(mode="json") if cfg is not None else None,
        "tensor_parallel_size": tp,
        "kv_capacity_tokens": capacity,
        "block_size": int(cc.block_size),
        "num_blocks": blocks,
    }
    if plan is None:
        if shape is not None:
            out["kv_bytes_per_token_baseline"] = dense_bytes_per_token(shape, tp, db)
            out["kv_bytes_per_token"] = out["kv_bytes_per_token_baseline"]
        out["kv_capacity_tokens_baseline"] = capacity
        out["compression_ratio"] = 1.0
        return out
    method = get_method(cfg.method)
    bpt = plan.bytes_per_token(tp)
    base = plan.baseline_bytes_per_token(tp, db)
    out.update(method.describe(plan))
    out.update({
        "layers": [
            {"layer": i, "rank_k": plan.layer_ranks(i)[0], "rank_v": plan.layer_ranks(i)[1],
             "bytes_per_token": plan.layer_bytes_per_token(i, tp)}
            for i in range(plan.shape.num_layers)
        ],
        "rank_meaning": method.rank_meaning,
        "kv_bytes_per_token": bpt,
        "kv_bytes_per_token_baseline": base,
        "compression_ratio": base / bpt,
        # what the same KV bytes would hold uncompressed (the model's dtype)
        "kv_capacity_tokens_baseline": capacity * bpt // base,
        "latent_cache_bytes": capacity * bpt,
    })
    return out


class _Metrics:
    def __init__(self):
        from prometheus_client import Gauge

        kw = {"multiprocess_mode": "mostrecent"}
        self.bpt = Gauge("vllm_kvc_kv_cache_bytes_per_token", "KV cache bytes per token with compression "
                         "(all layers, one tensor-parallel rank)", ["model_name"], **kw)
        self.base_bpt = Gauge("vllm_kvc_kv_cache_baseline_bytes_per_token", "KV cache bytes per token "
                              "without compression, in the model dtype", ["model_name"], **kw)
        self.ratio = Gauge("vllm_kvc_compression_ratio", "Baseline over compressed KV bytes per token",
                           ["model_name"], **kw)
        self.rank = Gauge("vllm_kvc_layer_rank", "Latent rank per head group of each layer",
                          ["model_name", "layer", "kind"], **kw)
        self.cap = Gauge("vllm_kvc_kv_capacity_tokens", "Tokens that fit in the KV cache", ["model_name"], **kw)
        self.cap_base = Gauge("vllm_kvc_kv_capacity_baseline_tokens", "Tokens the same KV bytes would hold "
                              "uncompressed", ["model_name"], **kw)
        self.used = Gauge("vllm_kvc_latent_cache_used_bytes", "Latent KV bytes in use now", ["model_name"], **kw)
        self.info = Gauge("vllm_kvc_deployment_info", "Compression settings of this deployment (value 1)",
                          ["model_name", "method", "schedule", "ratio", "latent_dtype", "group_size"], **kw)
        self.total_bytes = 0
        self.model = ""
        self.describe: dict = {}

    def set_static(self, d: dict) -> None:
        m = self.model = str(d["model"])
        s = d.get("settings") or {}
        self.bpt.labels(m).set(d.get("kv_bytes_per_token", 0))
        self.base_bpt.labels(m).set(d.get("kv_bytes_per_token_baseline", 0))
        self.ratio.labels(m).set(d.get("compression_ratio", 1.0))
        self.cap.labels(m).set(d["kv_capacity_tokens"])
        self.cap_base.labels(m).set(d.get("kv_capacity_tokens_baseline", d["kv_capacity_tokens"]))
        for layer in d.get("layers", []):
            self.rank.labels(m, str(layer["layer"]), "k").set(layer["rank_k"])
            self.rank.labels(m, str(layer["layer"]), "v").set(layer["rank_v"])
        self.info.labels(m, str(d.get("method") or "none"), str(s.get("schedule", "none")),
                         str(s.get("ratio", 1.0)), str(d.get("latent_dtype", "none")),
                         str(d.get("group_size", 0))).set(1)
        self.total_bytes = d.get("latent_cache_bytes", d["kv_capacity_tokens"] * d.get("kv_bytes_per_token", 0))

    def refresh(self) -> None:
        """Latent bytes in use = vLLM's own KV usage fraction x the latent cache's bytes."""
        from prometheus_client import REGISTRY

        usage = None
        for metric in REGISTRY.collect():
            if metric.name == "vllm:kv_cache_usage_perc":
                vals = [s.value for s in metric.samples]
                usage = max(vals) if vals else None
                break
        if usage is not None:
            self.used.labels(self.model).set(usage * self.total_bytes)
        else:
            self.used.labels(self.model).set(0)


_metrics: _Metrics | None = None
_lock = threading.Lock()


def _ensure_metrics(vllm_config) -> _Metrics:
    """The gauges, set once from ``describe`` (the plan and vLLM's capacity are fixed once the server runs)."""
    global _metrics
    with _lock:
        if _metrics is None:
            m = _Metrics()
            m.describe = describe(vllm_config)
            m.set_static(m.describe)
            _metrics = m
    return _metrics


def _install_route(app) -> None:
    """GET /v1/kv_compression as a route of vLLM's own app, so that it sits behind vLLM's middleware stack
    (``--api-key`` authentication included) and runs in the threadpool, off the event loop."""
    from fastapi.responses import JSONResponse

    def kv_compression():
        return JSONResponse(_ensure_metrics(app.state.vllm_config).describe)

    with _lock:
        if not getattr(app.state, "kvc_route", False):
            app.add_api_route(ROUTE, kv_compression, methods=["GET"], include_in_schema=False)
            app.state.kvc_route = True


async def kv_compression_middleware(request, call_next):
    """vLLM's ``--middleware`` hook: adds the route on the first request, refreshes the gauges on /metrics."""
    from starlette.concurrency import run_in_threadpool

    app = request.app
    cfg = getattr(app.state, "vllm_config", None)
    if cfg is not None:
        if not getattr(app.state, "kvc_route", False):
            _install_route(app)
        if request.url.path == "/metrics":
            try:
                metrics = await run_in_threadpool(_ensure_metrics, cfg)
                metrics.refresh()
            except Exception:  # noqa: BLE001 (vLLM's own metrics must still be served)
                log.exception("vllm_kvc: could not update the vllm_kvc_* metrics")
    return await call_next(request)
