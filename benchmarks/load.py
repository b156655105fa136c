"""Load test of a live vllm-kvc server: N requests at concurrency C, streaming and not, mixed lengths.

    .venv/bin/python benchmarks/load.py [--config configs/default.yaml] [--requests 1000] [--concurrency 64]
    .venv/bin/python benchmarks/load.py --url http://127.0.0.1:8000 ...   (an already running server)
    .venv/bin/python benchmarks/load.py --config configs/smollm2-dense.yaml   (vLLM's dense KV, same load)
    .venv/bin/python benchmarks/load.py --dtype float32 ...   (the model in float32)

Starts `vllm-kvc serve` on a free loopback port unless --url is given. Every request is greedy; each distinct
(prompt, max_tokens) pair is then asked again alone, sequentially, and the concurrent outputs are compared
with those. Prints and writes benchmarks/results/load.json: failures, throughput, latency percentiles, and
how many concurrent outputs equal the sequential ones.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["the ocean", "a lighthouse", "compilers", "bread", "the moon", "trains", "bees", "chess", "rain",
          "libraries", "volcanoes", "jazz", "glaciers", "owls", "bridges", "tea", "deserts", "robots",
          "gardens", "comets"]
FORMS = ["Write one sentence about {}.", "Explain {} to a child.", "List three facts about {}:",
         "Tell a very short story about {}.", "What is the history of {}?"]
LENGTHS = [8, 16, 32, 64]


def workload(n: int, seed: int = 0):
    prompts = [f.format(t) for t in TOPICS for f in FORMS]  # 100 distinct prompts
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        k = i % len(prompts)  # length and API depend on the prompt only: 100 distinct requests to compare
        jobs.append({"prompt": prompts[k], "max_tokens": LENGTHS[k % len(LENGTHS)],
                     "stream": rng.random() < 0.5, "chat": k % 3 == 0})
    return jobs


async def one(client, model, job):
    t0 = time.perf_counter()
    kw = dict(model=model, temperature=0, max_tokens=job["max_tokens"])
    first = None
    if job["chat"]:
        msgs = [{"role": "user", "content": job["prompt"]}]
        if job["stream"]:
            parts = []
            async for c in await client.chat.completions.create(messages=msgs, stream=True, **kw):
                if c.choices and c.choices[0].delta.content:
                    first = first or time.perf_counter()
                    parts.append(c.choices[0].delta.content)
            text = "".join(parts)
        else:
            text = (await client.chat.completions.create(messages=msgs, **kw)).choices[0].message.content
    else:
        if job["stream"]:
            parts = []
            async for c in await client.completions.create(prompt=job["prompt"], stream=True, **kw):
                if c.choices and c.choices[0].text:
                    first = first or time.perf_counter()
                    parts.append(c.choices[0].text)
            text = "".join(parts)
        else:
            text = (await client.completions.create(prompt=job["prompt"], **kw)).choices[0].text
    t1 = time.perf_counter()
    return text, t1 - t0, (first - t0) if first else None


async def run(url, model, jobs, concurrency):
    import httpx
    from openai import AsyncOpenAI

    # no retries: every failure counts. Idle pooled connections expire before the server's 5 s keep-alive
    # (uvicorn's default), so the client never reuses a connection the server is closing.
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 8, keepalive_expiry=2.0),
                             timeout=httpx.Timeout(600.0))
    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, http_client=http)
    sem = asyncio.Semaphore(concurrency)
    results = [None] * len(jobs)

    async def worker(i, job):
        async with sem:
            try:
                results[i] = await one(client, model, job)
            except Exception as e:  # counted as a failure
                results[i] = e

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i, j) for i, j in enumerate(jobs)))
    return results, time.perf_counter() - t0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config, dtype=None):
    port = _free_port()
    tag = Path(config).stem + (f"_{dtype}" if dtype else "")
    log = open(ROOT / "benchmarks" / "results" / f"load_server_{tag}.log", "w")
    extra = ["--", "--dtype", dtype] if dtype else []
    proc = subprocess.Popen([str(Path(sys.executable).parent / "vllm-kvc"), "serve", "--config", config,
                             "--port", str(port), *extra], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"server exited; see {log.name}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(2)
    raise SystemExit("server not healthy")


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
        proc, url = start_server(a.config, a.dtype)
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
        lat = sorted(r[1] for _, r in ok)
        ttft = sorted(r[2] for _, r in ok if r[2] is not None)
        pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None
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
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)


if __name__ == "__main__":
    sys.exit(main())
