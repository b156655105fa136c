"""Load test of a live vllm-kvc server: N requests at concurrency C, streaming and not, mixed lengths.

    .venv/bin/python benchmarks/load.py [--config configs/default.yaml] [--requests 1000] [--concurrency 64]
    .venv/bin/python benchmarks/load.py --url http://127.0.0.1:8000 ...   (an already running server)
    .venv/bin/python benchmarks/load.py --config configs/smollm2-dense.yaml   (vLLM's dense KV, same load)
    .venv/bin/python benchmarks/load.py --dtype float32 ...   (the model in float32)

Starts `vllm-kvc serve` on a free loopback port unless --url is given (the server, client and workload helpers
are vllm_kvc/bench_serve.py's; `vllm-kvc bench serve --unbounded N` runs this load for dense and compressed
deployments side by side, without the sequential comparison). Every request is greedy; each distinct
(prompt, max_tokens) pair is then asked again alone, sequentially, and the concurrent outputs are compared
with those. Prints and writes benchmarks/results/load.json: failures, throughput, latency percentiles, and
how many concurrent outputs equal the sequential ones.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import requests

from vllm_kvc.bench_serve import mixed_workload as workload  # the load, shared with bench serve
from vllm_kvc.bench_serve import percentile, run, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--url")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--dtype", help="override the deployment's model dtype (e.g. float32: batching then changes "
                                    "far fewer greedy choices than in bf16)")
    ap.add_argument("--out")
    a = ap.parse_args()
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    proc = None
    url = a.url
    if url is None:
        tag = Path(a.config).stem + (f"_{a.dtype}" if a.dtype else "")
        proc, url = start_server(a.config, ROOT / "benchmarks" / "results" / f"load_server_{tag}.log",
                                 ["--dtype", a.dtype] if a.dtype else None, kv_space_gib="1")
    try:
        jobs = workload(a.requests)
        results, wall = asyncio.run(run(url, a.model, jobs, a.concurrency))
        failures = [(j, repr(r)) for j, r in zip(jobs, results) if isinstance(r, Exception)]
        ok = [(j, r) for j, r in zip(jobs, results) if not isinstance(r, Exception)]
        # sequential reference: each distinct (prompt, max_tokens, chat) once, alone
        keys = sorted({(j["prompt"], j["max_tokens"], j["chat"]) for j, _ in ok})
        seq_jobs = [{"prompt": p, "max_tokens": m, "chat": c, "stream": False} for p, m, c in keys]
        seq_results, seq_wall = asyncio.run(run(url, a.model, seq_jobs, 1))
        ref = {k: r[0] for k, r in zip(keys, seq_results) if not isinstance(r, Exception)}
        same = sum(1 for j, r in ok if ref.get((j["prompt"], j["max_tokens"], j["chat"])) == r[0])
        lat = [r[1] for _, r in ok]
        ttft = [r[2] for _, r in ok if r[2] is not None]
        pct = percentile
        kvc = requests.get(url + "/v1/kv_compression", timeout=10)
        kvc = kvc.json() if kvc.status_code == 200 else {}
        summary = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dtype": a.dtype or "deployment's",
            "requests": len(jobs), "concurrency": a.concurrency, "failures": len(failures),
            "streaming": sum(j["stream"] for j in jobs), "chat": sum(j["chat"] for j in jobs),
            "wall_s": round(wall, 1), "requests_per_s": round(len(ok) / wall, 2),
            "latency_p50_s": round(pct(lat, 0.5), 2), "latency_p99_s": round(pct(lat, 0.99), 2),
            "ttft_p50_s": round(pct(ttft, 0.5), 2) if ttft else None,
            "distinct_sequential": len(keys), "sequential_wall_s": round(seq_wall, 1),
            "equal_to_sequential": same, "compared": len(ok),
            "compression": {k: kvc.get(k) for k in ("method", "settings", "kv_bytes_per_token",
                                                      "kv_bytes_per_token_baseline", "kv_capacity_tokens")},
            "first_failures": failures[:5],
        }
        tag = Path(a.config).stem + (f"_{a.dtype}" if a.dtype else "")
        out = Path(a.out or f"benchmarks/results/load_{tag}.json")
        out.write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary, indent=1))
        return 0 if not failures else 1
    finally:
        stop_server(proc)


if __name__ == "__main__":
    sys.exit(main())
