"""Eval table of the core issue: ratios x {uniform, progressive} on SmolLM2, through real vLLM, one run.

    .venv/bin/python benchmarks/eval_table.py [--corpus default] [--tokens 6144] [--out benchmarks/results]

Baseline and every setting run on the same tokens and the same KV budget (1 GiB); writes eval_table.json/.md.
"""
import argparse
import json
from pathlib import Path

from vllm_kvc.config import CompressionConfig, load_deployment
from vllm_kvc.evaluate import evaluate
from vllm_kvc.validate import check_deployment

RATIOS = [1.0, 0.75, 0.5, 0.35, 0.25]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/smollm2-r50.yaml")
    ap.add_argument("--corpus", default="default")
    ap.add_argument("--tokens", type=int, default=6144)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    dep = load_deployment(a.config)
    checked = check_deployment(dep)
    base = dep.compression.model_dump()
    comps = [CompressionConfig(**{**base, "ratio": r, "schedule": s})
             for r in RATIOS for s in ("uniform", "progressive") if not (r == 1.0 and s == "progressive")]
    rows = evaluate(dep, checked.model_dir, corpus=a.corpus, tokens=a.tokens, compressions=comps,
                    log_dir=Path(a.out) / "logs")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "eval_table" if a.corpus == "default" else f"eval_table_{Path(a.corpus).stem}"
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    lines = ["| ratio | schedule | group | latent | bytes/token (base -> ours) | capacity tokens (base -> ours) | gain | ppl base | ppl | rise % |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ratio']} | {r['schedule']} | {r['group_size']} | {r['latent_dtype']} | "
                     f"{r['kv_bytes_per_token_baseline']} -> {r['kv_bytes_per_token']} | "
                     f"{r['kv_capacity_tokens_baseline']} -> {r['kv_capacity_tokens']} | {r['capacity_gain']:.2f}x | "
                     f"{r['ppl_baseline']:.3f} | {r['ppl']:.3f} | {r['ppl_rise_pct']:+.1f} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
