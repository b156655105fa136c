"""The unbounded mixed load of `vllm-kvc bench serve` / `benchmarks/load.py`, offline: one in-process vLLM engine
(no server, no engine-core process), dense vs a compressed deployment, each in its own child, one after the other.

    .venv/bin/python benchmarks/cpu_offline_load.py [--config configs/default.yaml] [--requests 320]

Prints requests/s and output tokens/s per engine: the step costs without the server's own (the API server and the
engine core process share the 2 cores with the worker when served).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r'''
import json, os, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from vllm_kvc.validate import check_file
from vllm_kvc.evaluate import engine_kwargs
from vllm_kvc.bench_serve import mixed_workload
cfg, comp_on, n = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
c = check_file(cfg, check_engine=False)
kw = engine_kwargs(c.deployment, c.model_dir, c.deployment.compression if comp_on else None)
kw.update(max_model_len=2048, max_num_seqs=64)
llm = LLM(**kw)
jobs = mixed_workload(n)
prompts = [j["prompt"] for j in jobs]
sps = [SamplingParams(temperature=0, max_tokens=j["max_tokens"]) for j in jobs]
llm.generate(prompts[:8], sps[:8], use_tqdm=False)
t = time.perf_counter()
outs = llm.generate(prompts, sps, use_tqdm=False)
dt = time.perf_counter() - t
print("RESULT " + json.dumps({"config": cfg, "compressed": comp_on, "requests": n, "wall_s": round(dt, 2),
                              "requests_per_s": round(n / dt, 2),
                              "output_tokens_per_s": round(sum(len(o.outputs[0].token_ids) for o in outs) / dt, 1)}))
'''


def run_child(code: str, args: list, kv_space_gib: str) -> dict:
    """One engine in a fresh interpreter (``code`` prints one ``RESULT {json}`` line): its JSON, printed too; the
    child's stderr tail as the exit message if it fails."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=kv_space_gib)
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        sys.exit(p.stderr[-3000:])
    print(line[0][7:], flush=True)
    return json.loads(line[0][7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--requests", type=int, default=320)
    a = ap.parse_args()
    for comp in (0, 1):
        run_child(CHILD, [a.config, comp, a.requests], "1")


if __name__ == "__main__":
    main()
