"""``vllm-kvc bench serve``: serving throughput of dense vs compressed deployments in the same KV memory.

Every deployment runs as a real ``vllm-kvc serve`` (one at a time, each on a free loopback port) and gets the
same load and the same KV budget in bytes (vLLM's ``--kv-cache-memory-bytes``; on CPU ``VLLM_CPU_KVCACHE_SPACE`` is
removed from the server's environment, since it would override the byte budget with whole GiB).

- KV-bound load (the default): ``--requests`` completions of ``--prompt-tokens`` distinct eval-corpus tokens
  each, ``--output-tokens`` greedy tokens each (``ignore_eos``: every request generates exactly that many), at
  concurrency ``--concurrency``; the KV budget holds ``--dense-sequences`` whole dense sequences (prompt +
  output), fewer than the concurrency, so vLLM's dense cache queues and preempts while a compressed deployment
  holds proportionally more sequences in the same bytes.
- Unbounded load (``--unbounded N``): ``benchmarks/load.py``'s mixed load (short chat/completion prompts,
  8-64 tokens, half streamed) with a KV budget that never fills (``--unbounded-kv-space`` GiB).

Reported per deployment and load: requests/s, output tokens/s, p50/p99 latency, p50/p99 TTFT, vLLM's
preemption counter (``vllm:num_preemptions_total``), the most requests running at once and the KV capacity.
``--json`` prints one object whose ``runs`` list holds, per compressed deployment and load, ``config``,
``memory_fraction``, ``requests_per_s``, ``baseline_requests_per_s`` (dense, same run), ``failures`` and the rest.

The helpers here (server start, the async client, the mixed workload) are also what ``benchmarks/load.py`` uses.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_kvc.settings import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DENSE_CONFIG = "configs/smollm2-dense.yaml"
COMPRESSED_CONFIGS = ("configs/default.yaml", "configs/smollm2-roped.yaml")  # 40.6 % and 28.1 % of bf16
BLOCK_SIZE = 128  # vLLM's KV block (tokens) on CPU (platforms/cpu.py); the budget is whole dense blocks

# ------------------------------------------------------------------------------------------- mixed workload
TOPICS = ["the ocean", "a lighthouse", "compilers", "bread", "the moon", "trains", "bees", "chess", "rain",
          "libraries", "volcanoes", "jazz", "glaciers", "owls", "bridges", "tea", "deserts", "robots",
          "gardens", "comets"]
FORMS = ["Write one sentence about {}.", "Explain {} to a child.", "List three facts about {}:",
         "Tell a very short story about {}.", "What is the history of {}?"]
LENGTHS = [8, 16, 32, 64]


def mixed_workload(n: int, seed: int = 0) -> list[dict]:
    """The unbounded load of ``benchmarks/load.py``: 100 distinct short prompts, max_tokens 8-64, half
    streamed, a third chat."""
    prompts = [f.format(t) for t in TOPICS for f in FORMS]  # 100 distinct prompts
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        k = i % len(prompts)  # length and API depend on the prompt only: 100 distinct requests to compare
        jobs.append({"prompt": prompts[k], "max_tokens": LENGTHS[k % len(LENGTHS)],
                     "stream": rng.random() < 0.5, "chat": k % 3 == 0})
    return jobs


def kv_bound_workload(prompts: list[list[int]], output_tokens: int) -> list[dict]:
    """One streamed completion per token-id prompt, exactly ``output_tokens`` greedy tokens each."""
    return [{"prompt": p, "max_tokens": output_tokens, "stream": True, "chat": False, "ignore_eos": True}
            for p in prompts]


def corpus_prompts(model_dir: str, n: int, prompt_tokens: int, corpus: str = "default") -> list[list[int]]:
    """``n`` distinct prompts of exactly ``prompt_tokens`` tokens: consecutive slices of the eval corpus
    (distinct, so vLLM's prefix cache shares nothing between them); cycled if the corpus is short."""
    from vllm_kvc.evaluate import eval_chunks

    chunks = eval_chunks(model_dir, corpus, n * prompt_tokens, prompt_tokens)
    return [chunks[i % len(chunks)] for i in range(n)]


# ------------------------------------------------------------------------------------------------- client
async def one(client, model: str, job: dict):
    """One request -> (text, latency s, TTFT s or None, output tokens or None)."""
    t0 = time.perf_counter()
    kw = dict(model=model, temperature=0, max_tokens=job["max_tokens"])
    if job.get("ignore_eos"):
        kw["extra_body"] = {"ignore_eos": True}
    first = None
    usage = None
    if job["stream"]:
        kw["stream_options"] = {"include_usage": True}
    if job["chat"]:
        msgs = [{"role": "user", "content": job["prompt"]}]
        if job["stream"]:
            parts = []
            async for c in await client.chat.completions.create(messages=msgs, stream=True, **kw):
                if c.choices and c.choices[0].delta.content:
                    first = first or time.perf_counter()
                    parts.append(c.choices[0].delta.content)
                usage = c.usage or usage
            text = "".join(parts)
        else:
            r = await client.chat.completions.create(messages=msgs, **kw)
            text, usage = r.choices[0].message.content, r.usage
    else:
        if job["stream"]:
            parts = []
            async for c in await client.completions.create(prompt=job["prompt"], stream=True, **kw):
                if c.choices and c.choices[0].text:
                    first = first or time.perf_counter()
                    parts.append(c.choices[0].text)
                usage = c.usage or usage
            text = "".join(parts)
        else:
            r = await client.completions.create(prompt=job["prompt"], **kw)
            text, usage = r.choices[0].text, r.usage
    t1 = time.perf_counter()
    return text, t1 - t0, (first - t0) if first else None, (usage.completion_tokens if usage else None)


async def run(url: str, model: str, jobs: list[dict], concurrency: int, poll=None):
    """All ``jobs`` at most ``concurrency`` at a time -> (results, wall s); a failed request's result is its
    exception (no retries: every failure counts). ``poll``: an async callable run alongside until the end."""
    import httpx
    from openai import AsyncOpenAI

    # Idle pooled connections expire before the server's 5 s keep-alive (uvicorn's default), so the client
    # never reuses a connection the server is closing.
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 8, keepalive_expiry=2.0),
                             timeout=httpx.Timeout(1800.0))
    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, http_client=http)
    sem = asyncio.Semaphore(concurrency)
    results = [None] * len(jobs)

    async def worker(i, job):
        async with sem:
            try:
                results[i] = await one(client, model, job)
            except Exception as e:  # noqa: BLE001 (counted as a failure)
                results[i] = e

    poller = asyncio.ensure_future(poll()) if poll else None
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(i, j) for i, j in enumerate(jobs)))
    finally:
        wall = time.perf_counter() - t0
        if poller is not None:
            poller.cancel()
        await http.aclose()
    return results, wall


# ------------------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config: str, log_path: Path, extra: list[str] | None = None, kv_space_gib: str | None = "1",
                 timeout_s: float = 900):
    """``vllm-kvc serve --config`` on a free loopback port -> (process, url) once /health answers.

    ``kv_space_gib``: VLLM_CPU_KVCACHE_SPACE; None removes it (the budget then comes from ``extra``:
    ``--kv-cache-memory-bytes``)."""
    import requests

    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    env = dict(os.environ)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # set, it overrides --kv-cache-memory-bytes on CPU
    if kv_space_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = kv_space_gib
    cmd = [str(Path(sys.executable).parent / "vllm-kvc"), "serve", "--config", config, "--port", str(port)]
    if extra:
        cmd += ["--", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            log.close()
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"server for {config} exited with code {proc.returncode}; log {log_path}:\n{tail}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(2)
    stop_server(proc)
    raise RuntimeError(f"server for {config} not healthy after {timeout_s:.0f} s; log {log_path}")


def stop_server(proc) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------------------ metrics
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, list[tuple[str, float]]]:
    """Prometheus text -> {name: [(labels, value)]}."""
    out: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            try:
                out.setdefault(m.group(1), []).append((m.group(2) or "", float(m.group(3))))
            except ValueError:
                pass
    return out


def metric_sum(metrics: dict, name: str) -> float | None:
    vals = metrics.get(name)
    return sum(v for _, v in vals) if vals else None


def scrape(url: str) -> dict:
    import requests

    return parse_metrics(requests.get(url + "/metrics", timeout=10).text)


def cache_info(metrics: dict, key: str) -> int | None:
    """An integer label of ``vllm:cache_config_info`` (num_gpu_blocks, block_size)."""
    for labels, _ in metrics.get("vllm:cache_config_info", []):
        m = re.search(key + r'="(\d+)"', labels)
        if m:
            return int(m.group(1))
    return None


# ------------------------------------------------------------------------------------------ budget, stats
def kv_budget_bytes(dense_bytes_per_token: int, sequences: int, seq_tokens: int,
                    block_size: int = BLOCK_SIZE) -> int:
    """Bytes in which vLLM's dense cache holds exactly ``sequences`` whole sequences of ``seq_tokens`` tokens:
    their blocks plus the one null block vLLM's block pool holds back."""
    if dense_bytes_per_token <= 0 or sequences <= 0 or seq_tokens <= 0 or block_size <= 0:
        raise ValueError("dense_bytes_per_token, sequences, seq_tokens and block_size must be positive")
    return (sequences * math.ceil(seq_tokens / block_size) + 1) * block_size * dense_bytes_per_token


def sequences_that_fit(bytes_per_token: int, kv_memory: int, seq_tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """Whole sequences of ``seq_tokens`` tokens in ``kv_memory`` bytes (vLLM's blocks, less its null block)."""
    blocks = kv_memory // (block_size * bytes_per_token) - 1
    return max(0, blocks) // math.ceil(seq_tokens / block_size)


def max_model_len_for(seq_tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """The engine's max_model_len for this load: the sequence rounded up to whole blocks."""
    return math.ceil(seq_tokens / block_size) * block_size


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile of a list (None when empty)."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def summarize(jobs: list[dict], results: list, wall: float) -> dict:
    failures = [repr(r) for r in results if isinstance(r, Exception) or r is None]
    ok = [r for r in results if not isinstance(r, Exception) and r is not None]
    lat = [r[1] for r in ok]
    ttft = [r[2] for r in ok if r[2] is not None]
    out_tokens = sum(r[3] if r[3] is not None else 0 for r in ok)
    short = sum(1 for j, r in zip(jobs, results)
                if j.get("ignore_eos") and not isinstance(r, Exception) and r is not None and r[3] != j["max_tokens"])
    r2 = lambda x: None if x is None else round(x, 3)  # noqa: E731
    return {"requests": len(jobs), "failures": len(failures), "wall_s": round(wall, 1),
            "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else None,
            "output_tokens": out_tokens, "output_tokens_per_s": round(out_tokens / wall, 1) if wall > 0 else None,
            "latency_p50_s": r2(percentile(lat, 0.5)), "latency_p99_s": r2(percentile(lat, 0.99)),
            "ttft_p50_s": r2(percentile(ttft, 0.5)), "ttft_p99_s": r2(percentile(ttft, 0.99)),
            "short_outputs": short, "first_failures": failures[:3]}


# --------------------------------------------------------------------------------------------- one server
def measure(config: str, jobs: list[dict], concurrency: int, model: str, log_path: Path, extra: list[str],
            kv_space_gib: str | None) -> dict:
    """Start the deployment, run the load once, read vLLM's counters, stop it."""
    proc, url = start_server(config, log_path, extra, kv_space_gib)
    try:
        before = scrape(url)
        peak = {"running": 0.0, "waiting": 0.0, "kv_usage": 0.0}

        async def poll():
            import httpx

            async with httpx.AsyncClient(timeout=5.0) as c:
                while True:
                    try:
                        m = parse_metrics((await c.get(url + "/metrics")).text)
                        for key, name in (("running", "vllm:num_requests_running"),
                                          ("waiting", "vllm:num_requests_waiting"),
                                          ("kv_usage", "vllm:kv_cache_usage_perc")):
                            v = metric_sum(m, name)
                            if v is not None:
                                peak[key] = max(peak[key], v)
                    except Exception:  # noqa: BLE001 (a missed poll only lowers a peak)
                        pass
                    await asyncio.sleep(1.0)

        results, wall = asyncio.run(run(url, model, jobs, concurrency, poll))
        after = scrape(url)
        name = "vllm:num_preemptions_total"
        pre = (metric_sum(after, name) or 0) - (metric_sum(before, name) or 0)
        row = {"config": config, **summarize(jobs, results, wall), "preemptions": int(pre),
               "max_running": int(peak["running"]), "max_waiting": int(peak["waiting"]),
               "max_kv_usage": round(peak["kv_usage"], 3)}
        blocks, bs = cache_info(after, "num_gpu_blocks"), cache_info(after, "block_size")
        if blocks is not None and bs is not None:
            row["kv_capacity_tokens"] = blocks * bs
        row["server_log"] = str(log_path)
        return row
    finally:
        stop_server(proc)


# ----------------------------------------------------------------------------------------------- the bench
@dataclasses.dataclass
class ServeBenchArgs:
    configs: list[str] = dataclasses.field(default_factory=lambda: list(COMPRESSED_CONFIGS))
    dense_config: str = DENSE_CONFIG
    requests: int = 48
    concurrency: int = 48
    prompt_tokens: int = 64
    output_tokens: int = 128
    dense_sequences: int = 12
    kv_memory: str | None = None
    unbounded: int = 0
    unbounded_kv_space: str = "1"
    kv_bound: bool = True
    log_dir: str | None = None


def check_args(a: ServeBenchArgs) -> None:
    """Bad input -> ConfigError naming the option, before any server starts."""
    for name in ("requests", "concurrency", "prompt_tokens", "output_tokens", "dense_sequences"):
        v = getattr(a, name)
        if not isinstance(v, int) or v <= 0:
            raise ConfigError("--" + name.replace("_", "-"), f"{v!r}: expected a positive integer")
    if not isinstance(a.unbounded, int) or a.unbounded < 0:
        raise ConfigError("--unbounded", f"{a.unbounded!r}: expected a number of requests >= 0 (0: skip)")
    if not str(a.unbounded_kv_space).isdigit() or int(a.unbounded_kv_space) <= 0:
        raise ConfigError("--unbounded-kv-space", f"{a.unbounded_kv_space!r}: expected a whole number of GiB >= 1")
    if not a.kv_bound and not a.unbounded:
        raise ConfigError("--no-kv-bound", "nothing to run: give --unbounded N as well")
    if a.kv_memory is not None:
        from vllm_kvc.plan import parse_bytes

        try:
            if parse_bytes(a.kv_memory) <= 0:
                raise ValueError(f"{a.kv_memory!r}: expected a positive size")
        except ValueError as e:
            raise ConfigError("--kv-memory", str(e)) from None
    if not a.configs:
        raise ConfigError("--configs", "expected at least one compressed deployment")


def serve_bench(a: ServeBenchArgs) -> dict:
    from vllm_kvc.plan import dense_bytes_per_token, parse_bytes
    from vllm_kvc.validate import check_file, engine_dtype

    check_args(a)
    checked, paths = {}, {}
    for cfg in [a.dense_config, *a.configs]:
        path = Path(cfg) if Path(cfg).is_file() else ROOT / cfg
        if not path.is_file():
            raise ConfigError("--configs" if cfg != a.dense_config else "--dense-config", f"{cfg}: no such file")
        paths[cfg] = str(path.resolve())
        checked[cfg] = check_file(paths[cfg])
    dense = checked[a.dense_config]
    if dense.plan is not None:
        raise ConfigError("--dense-config", f"{a.dense_config}: has a compression: section (expected vLLM's dense KV)")
    model = dense.deployment.served_model_name or dense.model_dir
    for cfg in a.configs:
        c = checked[cfg]
        if c.plan is None:
            raise ConfigError("--configs", f"{cfg}: no compression: section (the dense deployment is --dense-config)")
        if c.model_dir != dense.model_dir:
            raise ConfigError("--configs", f"{cfg}: serves {c.model_dir}, the dense deployment {dense.model_dir}")
    shape = dataclasses.replace(dense.shape, dtype=engine_dtype(dense.deployment, dense.shape))
    dense_bpt = dense_bytes_per_token(shape)
    fractions = {cfg: checked[cfg].plan.bytes_per_token() / checked[cfg].plan.baseline_bytes_per_token()
                 for cfg in a.configs}
    logs = Path(a.log_dir) if a.log_dir else Path(tempfile.mkdtemp(prefix="vllm_kvc_bench_serve_"))
    logs.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": dense.model_dir,
                 "dense_config": a.dense_config, "log_dir": str(logs)}
    loads = []
    if a.kv_bound:
        seq = a.prompt_tokens + a.output_tokens
        budget = parse_bytes(a.kv_memory) if a.kv_memory else kv_budget_bytes(dense_bpt, a.dense_sequences, seq)
        dense_fit = sequences_that_fit(dense_bpt, budget, seq)
        if dense_fit < 1:
            raise ConfigError("--kv-memory", f"{budget} bytes hold less than one dense sequence of {seq} tokens "
                                             f"in {BLOCK_SIZE}-token blocks")
        mml = max_model_len_for(seq)
        prompts = corpus_prompts(dense.model_dir, a.requests, a.prompt_tokens)
        settings = {"requests": a.requests, "concurrency": a.concurrency, "prompt_tokens": a.prompt_tokens,
                    "output_tokens": a.output_tokens, "kv_memory_bytes": budget, "max_model_len": mml,
                    "block_size": BLOCK_SIZE, "dense_sequences_that_fit": dense_fit,
                    "sequences_that_fit": {cfg: sequences_that_fit(checked[cfg].plan.bytes_per_token(), budget, seq)
                                           for cfg in a.configs}}
        extra = ["--kv-cache-memory-bytes", str(budget), "--max-model-len", str(mml)]
        loads.append(("kv-bound", kv_bound_workload(prompts, a.output_tokens), extra, None, settings))
    if a.unbounded:
        settings = {"requests": a.unbounded, "concurrency": a.concurrency, "kv_space_gib": int(a.unbounded_kv_space),
                    "workload": "benchmarks/load.py mixed: 100 distinct short prompts, max_tokens 8-64, "
                                "half streamed, a third chat"}
        loads.append(("unbounded", mixed_workload(a.unbounded), [], str(a.unbounded_kv_space), settings))
    runs = []
    for name, jobs, extra, kv_space, settings in loads:
        rows = {}
        for cfg in [a.dense_config, *a.configs]:
            tag = f"{name}_{Path(cfg).stem}"
            print(f"bench serve: {name} load on {cfg} ({len(jobs)} requests) ...", file=sys.stderr, flush=True)
            rows[cfg] = measure(paths[cfg], jobs, a.concurrency, model, logs / f"{tag}.log", extra, kv_space)
            r = rows[cfg]
            r["config"] = cfg
            print(f"bench serve: {name} {cfg}: {r['requests_per_s']} req/s, {r['output_tokens_per_s']} tok/s, "
                  f"{r['failures']} failures, {r['preemptions']} preemptions", file=sys.stderr, flush=True)
        base = rows[a.dense_config]
        out[name.replace("-", "_")] = {"settings": settings, "dense": base,
                                       "compressed": [rows[c] for c in a.configs]}
        for cfg in a.configs:
            r = rows[cfg]
            runs.append({"load": name, "config": cfg, "memory_fraction": round(fractions[cfg], 4),
                         "requests_per_s": r["requests_per_s"], "baseline_requests_per_s": base["requests_per_s"],
                         "speedup": round(r["requests_per_s"] / base["requests_per_s"], 3)
                         if r["requests_per_s"] and base["requests_per_s"] else None,
                         "failures": r["failures"], "baseline_failures": base["failures"],
                         **{k: r.get(k) for k in ("output_tokens_per_s", "latency_p50_s", "latency_p99_s",
                                                  "ttft_p50_s", "ttft_p99_s", "preemptions", "max_running",
                                                  "kv_capacity_tokens")},
                         "baseline_output_tokens_per_s": base["output_tokens_per_s"],
                         "baseline_preemptions": base["preemptions"]})
    out["runs"] = runs
    out["seconds"] = round(time.time() - t_start, 1)
    return out


def _fmt(v) -> str:
    return "-" if v is None else str(v)


def tables(res: dict) -> str:
    """Markdown tables, one per load."""
    lines = []
    for key, title in (("kv_bound", "KV-bound load"), ("unbounded", "unbounded load")):
        if key not in res:
            continue
        s = res[key]["settings"]
        lines.append(f"{title}: " + ", ".join(f"{k} {v}" for k, v in s.items()))
        lines.append("")
        lines.append("| deployment | KV bytes vs bf16 | KV tokens | failures | requests/s | vs dense | output tok/s | "
                     "p50 / p99 latency s | p50 / p99 TTFT s | preemptions | max running |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        base = res[key]["dense"]
        fr = {r["config"]: r["memory_fraction"] for r in res["runs"]}
        for r in [base, *res[key]["compressed"]]:
            ok = r["requests_per_s"] and base["requests_per_s"]
            ratio = r["requests_per_s"] / base["requests_per_s"] if ok else None
            lines.append(f"| {r['config']} | {fr.get(r['config'], 1.0):.3f} | {_fmt(r.get('kv_capacity_tokens'))} | "
                         f"{r['failures']} / {r['requests']} | {_fmt(r['requests_per_s'])} | "
                         f"{'-' if ratio is None else f'{ratio:.2f}x'} | {_fmt(r['output_tokens_per_s'])} | "
                         f"{_fmt(r['latency_p50_s'])} / {_fmt(r['latency_p99_s'])} | "
                         f"{_fmt(r['ttft_p50_s'])} / {_fmt(r['ttft_p99_s'])} | {r['preemptions']} | "
                         f"{r['max_running']} |")
        lines.append("")
    return "\n".join(lines)


def run_serve_bench(args) -> int:
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    a = ServeBenchArgs(configs=list(args.configs or COMPRESSED_CONFIGS), dense_config=args.dense_config,
                       requests=args.requests, concurrency=args.concurrency, prompt_tokens=args.prompt_tokens,
                       output_tokens=args.output_tokens, dense_sequences=args.dense_sequences,
                       kv_memory=args.kv_memory, unbounded=args.unbounded,
                       unbounded_kv_space=str(args.unbounded_kv_space), kv_bound=not args.no_kv_bound,
                       log_dir=args.log_dir)
    res = serve_bench(a)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(tables(res))
    failed = sum(r["failures"] for k in ("kv_bound", "unbounded") if k in res
                 for r in [res[k]["dense"], *res[k]["compressed"]])
    return 0 if failed == 0 else 1
