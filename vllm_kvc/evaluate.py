"""Perplexity and KV capacity through real vLLM, baseline and compressed measured in one run.

Each measurement runs one vLLM engine (offline ``LLM``) in a child process, so that engines never share a
process and every run sees the same KV budget (``VLLM_CPU_KVCACHE_SPACE`` on CPU; ``gpu_memory_utilization`` on
GPUs). Perplexity comes from vLLM's prompt logprobs on the same token chunks for every run.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vllm_kvc.config import ADDITIONAL_CONFIG_KEY, CompressionConfig, DeploymentConfig
from vllm_kvc.methods import get_method, prepare
from vllm_kvc.plan import ModelShape

DEFAULT_KV_SPACE_GIB = "1"


@dataclass
class RunResult:
    ppl: float
    tokens_evaluated: int
    kv_capacity_tokens: int
    kv_bytes_per_token: int
    seconds: float


def engine_kwargs(dep: DeploymentConfig, model: str, compression: CompressionConfig | None) -> dict:
    kw = dict(dep.engine)
    kw["model"] = model
    if dep.served_model_name:
        kw["served_model_name"] = dep.served_model_name
    kw.setdefault("seed", 0)
    if compression is not None:
        kw["additional_config"] = {ADDITIONAL_CONFIG_KEY: compression.model_dump(mode="json")}
        for key, value in get_method(compression.method).engine_defaults(compression).items():
            kw.setdefault(key, value)
    return kw


def kv_capacity_tokens(llm) -> int:
    cfg = llm.llm_engine.vllm_config.cache_config
    return int(cfg.num_gpu_blocks) * int(cfg.block_size)


def _child(spec_path: str) -> None:
    """Runs in a fresh process: one engine, prompt logprobs over the chunks, JSON out."""
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.time()
    llm = LLM(**spec["engine"])
    chunks = spec["chunks"]
    nll, n = 0.0, 0
    if chunks:
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
        outs = llm.generate([TokensPrompt(prompt_token_ids=c) for c in chunks], sp, use_tqdm=False)
        for c, o in zip(chunks, outs):
            for tok, lp in zip(c[1:], o.prompt_logprobs[1:]):
                nll -= lp[tok].logprob
                n += 1
    res = {"ppl": math.exp(nll / n) if n else None, "tokens_evaluated": n,
           "kv_capacity_tokens": kv_capacity_tokens(llm)}
    if spec.get("retrieval"):
        res.update(_retrieval(llm, spec["retrieval"], spec.get("retrieval_max_tokens", 12)))
    res["seconds"] = time.time() - t0
    Path(spec["out"]).write_text(json.dumps(res))
    # shut the engine down explicitly, then leave without interpreter teardown (which can abort in C++
    # thread-pool destructors after vLLM's shutdown, turning a finished run into a failed exit code)
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _retrieval(llm, cases: list[dict], max_tokens: int) -> dict:
    """Greedy answers to the retrieval prompts (``retrieval.Case.to_json`` rows): accuracy and one row per case."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_kvc.retrieval import is_correct, summarize

    t0 = time.time()
    sp = SamplingParams(max_tokens=max_tokens, temperature=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=c["prompt_ids"]) for c in cases], sp, use_tqdm=False)
    rows = []
    for c, o in zip(cases, outs):
        text = o.outputs[0].text
        rows.append({"length": c["length"], "depth": c["depth"], "prompt_tokens": len(c["prompt_ids"]),
                     "answer": c["answer"], "output": text, "correct": is_correct(text, c["answer"])})
    s = summarize(rows)
    return {"retrieval_acc": s["acc"], "retrieval_cells": s["cells"], "retrieval": rows,
            "retrieval_seconds": time.time() - t0}


def run_engine(engine: dict, chunks: list[list[int]], kv_space_gib: str, log_path: Path | None = None,
               retrieval: list[dict] | None = None, retrieval_max_tokens: int = 12) -> dict:
    """One engine in a child process: perplexity over ``chunks`` and, if given, the retrieval prompts
    (``retrieval.Case.to_json`` rows; the result then has ``retrieval_acc`` and one row per case)."""
    with tempfile.TemporaryDirectory() as d:
        spec = Path(d) / "spec.json"
        out = Path(d) / "out.json"
        spec.write_text(json.dumps({"engine": engine, "chunks": chunks, "out": str(out),
                                    "retrieval": retrieval or [], "retrieval_max_tokens": retrieval_max_tokens}))
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", kv_space_gib)
        log = open(log_path, "w") if log_path else subprocess.DEVNULL
        try:
            proc = subprocess.run([sys.executable, "-m", "vllm_kvc.evaluate", str(spec)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
        finally:
            if log_path:
                log.close()
        if proc.returncode != 0 or not out.exists():
            where = f" (log: {log_path})" if log_path else ""
            raise RuntimeError(f"vLLM engine run failed with exit code {proc.returncode}{where}")
        return json.loads(out.read_text())


def eval_chunks(model_dir: str, corpus: str, tokens: int, seq_len: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from vllm_kvc.corpus import load_text, token_chunks

    tok = AutoTokenizer.from_pretrained(model_dir)
    return token_chunks(tok, load_text(corpus, "eval"), tokens, seq_len)


def evaluate(dep: DeploymentConfig, model_dir: str, corpus: str = "default", tokens: int = 6144,
             seq_len: int = 1024, kv_space_gib: str = DEFAULT_KV_SPACE_GIB, log_dir: Path | None = None,
             compressions: list[CompressionConfig] | None = None) -> list[dict]:
    """Baseline and each compression setting on the same tokens and KV budget.

    Returns one row per compressed setting with the baseline's numbers alongside."""
    comps = compressions if compressions is not None else [dep.compression or CompressionConfig()]
    chunks = eval_chunks(model_dir, corpus, tokens, seq_len)
    shape = ModelShape.from_model_dir(model_dir)
    engine_dtype = str(dep.engine.get("dtype", shape.dtype)).replace("auto", shape.dtype)
    dtype_bytes = 4 if engine_dtype == "float32" else 2
    logs = log_dir or Path(tempfile.mkdtemp(prefix="vllm_kvc_eval_"))
    logs.mkdir(parents=True, exist_ok=True)
    base = run_engine(engine_kwargs(dep, model_dir, None), chunks, kv_space_gib, logs / "baseline.log")
    rows = []
    for i, comp in enumerate(comps):
        # the method's calibration artifacts before the engine starts (cached)
        plan, _ = prepare(model_dir, comp, shape.__class__(**{**shape.__dict__, "dtype": engine_dtype}))
        ranks_k, ranks_v = plan.reported_ranks()
        res = run_engine(engine_kwargs(dep, model_dir, comp), chunks, kv_space_gib, logs / f"compressed_{i}.log")
        rows.append({
            "model": dep.model,
            "method": comp.method,
            "ratio": comp.ratio,
            "ratio_k": comp.k_ratio,
            "ratio_v": comp.v_ratio,
            "schedule": comp.schedule,
            "group_size": comp.group_size,
            "latent_dtype": plan.latent_dtype,
            "factorization": comp.factorization,
            "ranks_k": ranks_k,
            "ranks_v": ranks_v,
            "kv_bytes_per_token_baseline": plan.baseline_bytes_per_token(dtype_bytes=dtype_bytes),
            "kv_bytes_per_token": plan.bytes_per_token(),
            "kv_capacity_tokens_baseline": base["kv_capacity_tokens"],
            "kv_capacity_tokens": res["kv_capacity_tokens"],
            "capacity_gain": res["kv_capacity_tokens"] / base["kv_capacity_tokens"],
            "ppl_baseline": base["ppl"],
            "ppl": res["ppl"],
            "ppl_rise_pct": 100.0 * (res["ppl"] / base["ppl"] - 1.0),
            "tokens_evaluated": res["tokens_evaluated"],
            "corpus": corpus,
        })
    return rows


if __name__ == "__main__":
    _child(sys.argv[1])
