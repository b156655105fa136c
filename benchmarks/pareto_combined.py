"""One table and one plot from several `vllm-kvc bench pareto --json` runs over the same tokens.

    .venv/bin/python benchmarks/pareto_combined.py OUT.png RUN.json [RUN.json ...] [--dominance kvc-tcode-w16 ...]

Perplexity through vLLM is deterministic for a given setting, corpus and token count, so runs can be joined
when their baselines agree (checked: same corpus, tokens and baseline perplexity). A later run's point replaces
an earlier one of the same method and memory fraction (e.g. a re-measurement after a quantizer change).
Prints the markdown table (methods: ours first) and writes the plot; with ``--dominance``, issue 16's checks
(``bench.check_dominance``: the rule at each memory point, and vs every baseline at a larger memory) for each
method named, over all the runs' points, as JSON.
"""
from __future__ import annotations

import json
import sys

from vllm_kvc.bench import _table, check_dominance, plot


def combine(paths: list[str]) -> tuple[dict, list[dict]]:
    base, points = None, {}
    for p in paths:
        run = json.load(open(p))
        b = run["baseline"]
        # a partial file (written while a run goes on) has only the baseline and the points so far
        run.setdefault("corpus", "default")
        run.setdefault("tokens_evaluated", b.get("tokens_evaluated"))
        if base is None:
            base = dict(b, corpus=run["corpus"], tokens=run["tokens_evaluated"])
        elif (run["corpus"], run["tokens_evaluated"]) != (base["corpus"], base["tokens"]) or \
                abs(b["ppl"] - base["ppl"]) > 1e-6:
            raise SystemExit(f"{p}: another corpus or baseline ({run['corpus']}, {b['ppl']}) than {paths[0]}")
        for pt in run["points"]:
            points[(pt["method"], round(pt["memory_fraction"], 4))] = dict(pt, run=p)
    return base, list(points.values())


def main(argv: list[str]) -> int:
    ours = argv[argv.index("--dominance") + 1:] if "--dominance" in argv else []
    argv = argv[:argv.index("--dominance")] if ours else argv
    out, paths = argv[0], argv[1:]
    base, points = combine(paths)
    plot(points, out, f"SmolLM2-135M KV memory vs perplexity rise through vLLM ({len(paths)} runs, same tokens)")
    print(_table(points, base))
    for m in ours:
        print(json.dumps({"dominance": m, **check_dominance(points, m)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
