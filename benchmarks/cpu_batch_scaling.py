"""How much a larger decode batch buys on this CPU: the ceiling of the KV-bound gain (issue 15).

    .venv/bin/python benchmarks/cpu_batch_scaling.py [--config configs/smollm2-roped.yaml] [--requests 48]

An offline vLLM engine in this process (no server), KV memory large enough for every sequence; the KV-bound load's
shapes (prompts of 64 corpus tokens, 128 greedy output tokens, ignore_eos). Runs dense at max_num_seqs 12 (what
the KV-bound budget of `vllm-kvc bench serve` holds for dense) and at the compressed deployment's count, and the
compressed deployment at its count, one after the other in one process each (children), and prints output tokens/s.
If dense gains little from 12 -> N sequences, fitting N sequences cannot buy much more throughput on this machine.
"""
from __future__ import annotations

import argparse
import json
import time

from cpu_offline_load import run_child  # benchmarks/ is the script's directory (sys.path[0])

CHILD = r'''
import json, os, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from vllm_kvc.validate import check_file
from vllm_kvc.evaluate import engine_kwargs
from vllm_kvc.bench_serve import corpus_prompts
cfg, comp_on, seqs, n = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
c = check_file(cfg, check_engine=False)
kw = engine_kwargs(c.deployment, c.model_dir, c.deployment.compression if comp_on else None)
kw.update(max_model_len=256, max_num_seqs=seqs)
llm = LLM(**kw)
prompts = [{"prompt_token_ids": p} for p in corpus_prompts(c.model_dir, n, 64)]
sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
t = time.perf_counter()
outs = llm.generate(prompts, sp, use_tqdm=False)
dt = time.perf_counter() - t
print("RESULT " + json.dumps({"config": cfg, "compressed": comp_on, "max_num_seqs": seqs, "requests": n,
                              "wall_s": round(dt, 2), "output_tokens_per_s": round(sum(len(o.outputs[0].token_ids) for o in outs) / dt, 1)}))
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/smollm2-roped.yaml")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--dense-seqs", type=int, default=12)
    ap.add_argument("--seqs", type=int, default=43, help="sequences the compressed deployment fits (bench serve)")
    a = ap.parse_args()
    rows = [run_child(CHILD, [a.config, comp, seqs, a.requests], "2")
            for comp, seqs in ((0, a.dense_seqs), (0, a.seqs), (1, a.seqs))]
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}))


if __name__ == "__main__":
    main()
