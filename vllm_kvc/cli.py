"""``vllm-kvc``: convert, validate, compress, eval, serve, bench.

Bad settings exit with code 2 and one line ``error: <field>: <what was expected>`` before any engine starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from vllm_kvc.config import ConfigError

EXIT_CONFIG = 2


def _checked(path: str, check_engine: bool = True):
    from vllm_kvc.validate import check_file

    return check_file(path, check_engine)


def cmd_convert(a) -> int:
    from vllm_kvc.checkpoints import ensure_default_model

    print(ensure_default_model())
    return 0


def cmd_validate(a) -> int:
    c = _checked(a.config)
    summary = {"model": c.model_dir, "architecture": c.shape.architecture, "compression": None}
    if c.plan is not None:
        ranks_k, ranks_v = c.plan.reported_ranks()
        summary["compression"] = {
            "method": c.deployment.compression.method, "ranks_k": ranks_k, "ranks_v": ranks_v,
            "latent_dtype": c.plan.latent_dtype, "kv_bytes_per_token": c.plan.bytes_per_token(),
            "kv_bytes_per_token_baseline": c.plan.baseline_bytes_per_token(),
        }
    if a.kv_memory is not None:
        summary["capacity"] = _capacity(c, a)
    print(json.dumps(summary, indent=2))
    return 0


def _capacity(c, a) -> dict:
    """Tokens and concurrent sequences in ``--kv-memory`` per TP rank, dense vs this deployment."""
    from vllm_kvc.methods import build_plan
    from vllm_kvc.plan import dense_bytes_per_token, kv_capacity, parse_bytes
    from vllm_kvc.validate import engine_dtype

    try:
        mem = parse_bytes(a.kv_memory)
    except ValueError as e:
        raise ConfigError("--kv-memory", str(e)) from None
    engine = c.deployment.engine
    tp = a.tp or int(engine.get("tensor_parallel_size", 1))
    context = a.context or int(engine.get("max_model_len") or 0)
    if context <= 0 or mem <= 0 or tp <= 0:
        raise ConfigError("--context" if context <= 0 else "--kv-memory" if mem <= 0 else "--tp",
                          "expected a positive number (--context defaults to engine.max_model_len)")
    bs = a.block_size or int(engine.get("block_size") or 16)
    shape = dataclasses.replace(c.shape, dtype=engine_dtype(c.deployment, c.shape))
    plan = build_plan(c.deployment.compression, shape, tp) if c.deployment.compression is not None else None
    dense_bpt = dense_bytes_per_token(shape, tp)
    out = {"kv_memory_bytes": mem, "context": context, "tensor_parallel_size": tp, "block_size": bs,
           "dense": kv_capacity(dense_bpt, mem, bs, context)}
    if plan is not None:
        out["compressed"] = kv_capacity(plan.bytes_per_token(tp), mem, bs, context)
        out["token_gain"] = out["compressed"]["tokens"] / max(1, out["dense"]["tokens"])
    return out


def cmd_compress(a) -> int:
    from vllm_kvc.methods import get_method, prepare

    c = _checked(a.config, check_engine=False)
    if c.plan is None:
        raise ConfigError("compression", "missing: nothing to compress")
    comp = c.deployment.compression
    plan, path = prepare(c.model_dir, comp, c.plan.shape, int(c.deployment.engine.get("tensor_parallel_size", 1)))
    print(get_method(comp.method).artifact_summary(plan, path))
    return 0


def cmd_allocate(a) -> int:
    """Measured allocation -> a deployable config (explicit per-layer ranks and latent widths, or segments)."""
    import yaml

    from vllm_kvc.config import CompressionConfig
    from vllm_kvc.methods import get_method
    from vllm_kvc.plan import dense_bytes_per_token

    if (a.memory is None) == (a.max_rise is None):
        raise ConfigError("allocate", "give exactly one of --memory FRACTION or --max-rise PERCENT")
    if a.memory is not None and not 0 < a.memory <= 1:
        raise ConfigError("--memory", f"{a.memory}: expected a fraction of the bf16 KV bytes in (0, 1]")
    c = _checked(a.config, check_engine=False)
    base = c.deployment.compression or CompressionConfig(group_size=c.shape.num_kv_heads)
    method = get_method(a.method or base.method)
    if not method.allocatable:
        raise ConfigError("compression.method", f"{method.name}: the allocator allocates latent ranks and widths "
                                                f"(methods {', '.join(_allocatable())})")
    base = base.model_validate({**base.model_dump(), "method": method.name})
    comp, summary = method.allocate(c.model_dir, base, dense_bytes_per_token(c.shape), memory=a.memory,
                                    max_rise=a.max_rise)
    d = c.deployment.model_dump(mode="json", exclude_none=True)
    d["compression"] = comp.model_dump(mode="json", exclude_defaults=True)
    d["compression"]["method"] = method.name
    text = yaml.safe_dump(d, sort_keys=False, default_flow_style=None, width=200)
    header = "# written by: vllm-kvc allocate " + " ".join(sys.argv[2:]) + "\n# " + json.dumps(summary) + "\n"
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(header + text)
        print(a.out)
    else:
        print(header + text)
    return 0


def _allocatable() -> list[str]:
    from vllm_kvc.methods import all_methods

    return [m.name for m in all_methods() if m.allocatable]


def cmd_eval(a) -> int:
    from vllm_kvc.evaluate import evaluate

    c = _checked(a.config)
    rows = evaluate(c.deployment, c.model_dir, corpus=a.corpus, tokens=a.tokens, seq_len=a.seq_len,
                    kv_space_gib=a.kv_space)
    row = rows[0]
    if a.json:
        print(json.dumps(row, indent=2))
    else:
        for k in ("model", "ratio", "schedule", "latent_dtype", "kv_bytes_per_token_baseline",
                  "kv_bytes_per_token", "kv_capacity_tokens_baseline", "kv_capacity_tokens", "ppl_baseline",
                  "ppl", "ppl_rise_pct", "tokens_evaluated"):
            print(f"{k:30s} {row[k]}")
    return 0


def cmd_serve(a) -> int:
    from vllm_kvc.server.serve import serve

    c = _checked(a.config)
    serve(c, a.host, a.port, a.vllm_args)
    return 0


def cmd_bench(a) -> int:
    from vllm_kvc.bench import run_bench

    return run_bench(a)


def cmd_bench_serve(a) -> int:
    from vllm_kvc.bench_serve import run_serve_bench

    return run_serve_bench(a)


def retrieval_default() -> int:
    from vllm_kvc.retrieval import DEFAULT_CASES

    return DEFAULT_CASES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-kvc", description="Low-rank latent KV cache for vLLM")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("convert", help="install and convert the embedded default model (SmolLM2-135M)")
    s.set_defaults(fn=cmd_convert)
    s = sub.add_parser("validate", help="check a deployment config and print its plan (and, with --kv-memory, "
                                        "what fits)")
    s.add_argument("--config", required=True)
    s.add_argument("--kv-memory", help="KV cache memory per GPU / TP rank, e.g. 40GiB: print tokens and concurrent "
                                       "sequences that fit, dense vs this deployment")
    s.add_argument("--context", type=int, help="tokens per sequence for --kv-memory (default: engine.max_model_len)")
    s.add_argument("--tp", type=int, help="tensor-parallel size (default: engine.tensor_parallel_size or 1)")
    s.add_argument("--block-size", type=int, help="KV block size in tokens (default: engine.block_size or 16; "
                                                  "the latent backend prefers 64 on GPUs)")
    s.set_defaults(fn=cmd_validate)
    s = sub.add_parser("compress", help="calibrate ahead of serving: the method's artifacts (factor or dictionary file, sharing groups)")
    s.add_argument("--config", required=True)
    s.set_defaults(fn=cmd_compress)
    s = sub.add_parser("allocate", help="per-layer K/V rank and latent width for a memory budget or a maximum "
                                        "perplexity rise; writes a deployable config")
    s.add_argument("--config", required=True, help="the deployment to start from (model, engine, calibration)")
    s.add_argument("--memory", type=float, help="KV bytes as a fraction of bf16 (scales included), e.g. 0.25; "
                   "tcode: its exact first-token / recent-window rows included, counted at compression.tcode.context "
                   "tokens per sequence")
    s.add_argument("--max-rise", type=float, help="quality mode: largest measured perplexity rise, %% (lowrank: on its "
                   "calibration slice; tcode: on the validation text, the library reference)")
    s.add_argument("--method", choices=_allocatable(), help="what to allocate (default: the config's method): "
                   "ranks and widths per layer, or bits per latent coordinate as segments")
    s.add_argument("--out", help="write the config here (default: print it)")
    s.set_defaults(fn=cmd_allocate)
    s = sub.add_parser("eval", help="perplexity and KV capacity through vLLM, baseline vs compressed")
    s.add_argument("--config", required=True)
    s.add_argument("--corpus", default="default", help="plain-text file, or 'default' (built-in eval corpus)")
    s.add_argument("--tokens", type=int, default=6144)
    s.add_argument("--seq-len", type=int, default=1024)
    s.add_argument("--kv-space", default="1", help="VLLM_CPU_KVCACHE_SPACE (GiB) for both runs, on CPU")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_eval)
    s = sub.add_parser("serve", help="vLLM's OpenAI server with a deployment's settings")
    s.add_argument("--config", required=True)
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("vllm_args", nargs=argparse.REMAINDER, help="further vLLM arguments, after --")
    s.set_defaults(fn=cmd_serve)
    s = sub.add_parser("bench", help="benchmarks")
    bsub = s.add_subparsers(dest="bench", required=True)
    b = bsub.add_parser("pareto", help="memory vs perplexity for every method, through vLLM")
    b.add_argument("--config", required=True)
    b.add_argument("--corpus", default="default")
    b.add_argument("--tokens", type=int, default=6144)
    b.add_argument("--seq-len", type=int, default=1024)
    b.add_argument("--kv-space", default="1")
    b.add_argument("--json", action="store_true")
    b.add_argument("--plot")
    b.add_argument("--methods", nargs="+", help="only these methods (prefixes: kvc-alloc, lexico, pod, quant-int4, "
                                                "svd-whitened, vllm- (vLLM's own formats), ...; 'deployment': the "
                                                "config's own compression); the uncompressed baseline always runs")
    b.add_argument("--points", nargs="+", type=float, help="memory points (fractions of bf16), default "
                                                           "0.5 0.35 0.25 0.2 0.15")
    b.add_argument("--log-dir", help="keep each engine's log here")
    b.add_argument("--no-quality", action="store_true", help="skip the quality-budget allocation (kvc-alloc-q3)")
    b.add_argument("--retrieval", type=int, default=retrieval_default(), metavar="N",
                   help="passkey-retrieval prompts each engine also answers (1k-7k tokens at 10/50/90%% depth: 9 "
                        "cover each cell once; 0: skip)")
    b.set_defaults(fn=cmd_bench)
    b = bsub.add_parser("serve", help="serving throughput, dense vs compressed deployments in the same KV memory "
                                      "(real servers; default: the KV-bound load, about 15 min on 2 CPU cores)")
    b.add_argument("--configs", nargs="+", help="compressed deployments (default: configs/default.yaml "
                                                "configs/smollm2-roped.yaml)")
    b.add_argument("--dense-config", default="configs/smollm2-dense.yaml", help="the dense (vLLM KV) deployment")
    b.add_argument("--requests", type=int, default=48, help="KV-bound load: requests")
    b.add_argument("--concurrency", type=int, default=48, help="requests in flight (both loads)")
    b.add_argument("--prompt-tokens", type=int, default=64, help="KV-bound load: distinct corpus tokens per prompt")
    b.add_argument("--output-tokens", type=int, default=128, help="KV-bound load: greedy tokens per request "
                                                                  "(ignore_eos)")
    b.add_argument("--dense-sequences", type=int, default=12, help="KV budget: whole dense sequences (prompt + "
                                                                   "output) it holds")
    b.add_argument("--kv-memory", help="KV budget in bytes for every deployment, e.g. 140MiB (overrides "
                                       "--dense-sequences)")
    b.add_argument("--unbounded", type=int, default=0, metavar="N", help="also run benchmarks/load.py's mixed load "
                                                                       "with N requests and a KV budget that never "
                                                                       "fills (0: skip)")
    b.add_argument("--unbounded-kv-space", default="1", help="unbounded load: VLLM_CPU_KVCACHE_SPACE (GiB)")
    b.add_argument("--no-kv-bound", action="store_true", help="skip the KV-bound load (with --unbounded N)")
    b.add_argument("--log-dir", help="keep each server's log here (default: a temporary folder)")
    b.add_argument("--out", help="also write the JSON result to this file")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    b.set_defaults(fn=cmd_bench_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    a = build_parser().parse_args(argv)
    if getattr(a, "vllm_args", None) and a.vllm_args[0] == "--":
        a.vllm_args = a.vllm_args[1:]
    try:
        return a.fn(a) or 0
    except ConfigError as e:
        print(f"error: {e.field}: {e.message}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
