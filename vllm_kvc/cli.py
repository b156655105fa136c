"""``vllm-kvc``: convert, validate, compress, eval, serve, bench.

Bad settings exit with code 2 and one line ``error: <field>: <what was expected>`` before any engine starts.
"""
from __future__ import annotations

import argparse
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
        summary["compression"] = {
            "ranks_k": list(c.plan.ranks_k), "ranks_v": list(c.plan.ranks_v),
            "latent_dtype": c.plan.latent_dtype, "kv_bytes_per_token": c.plan.bytes_per_token(),
            "kv_bytes_per_token_baseline": c.plan.baseline_bytes_per_token(),
        }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_compress(a) -> int:
    from vllm_kvc.calibrate import build_factors

    c = _checked(a.config, check_engine=False)
    if c.plan is None:
        raise ConfigError("compression", "missing: nothing to compress")
    print(build_factors(c.model_dir, c.deployment.compression, c.plan))
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-kvc", description="Low-rank latent KV cache for vLLM")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("convert", help="install and convert the embedded default model (SmolLM2-135M)")
    s.set_defaults(fn=cmd_convert)
    s = sub.add_parser("validate", help="check a deployment config and print its plan")
    s.add_argument("--config", required=True)
    s.set_defaults(fn=cmd_validate)
    s = sub.add_parser("compress", help="calibrate and write the factor file of a deployment")
    s.add_argument("--config", required=True)
    s.set_defaults(fn=cmd_compress)
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
    b.set_defaults(fn=cmd_bench)
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
