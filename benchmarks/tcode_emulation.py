"""Method tcode in plain transformers (float32, CPU): where the perplexity rise of an allocation comes from.

For each memory fraction, allocates as ``vllm-kvc allocate --method tcode`` does (optionally with another segment
unit), builds its factors, and measures the perplexity rise on a corpus with every layer's K/V replaced by their
transform-coded round trip (``tcode.install``'s arithmetic), in variants:

- ``all``: K and V coded, the first ``--sinks`` positions exact (default 1: what the deployment serves);
- ``k`` / ``v``: only that part coded (the other exact);
- ``no2``: 2-bit segments read at 4 bits (same allocation: the price of the 2-bit coordinates);
- ``exactkept``: kept coordinates exact, dropped ones dropped (the price of truncation alone).

``--windows``: each variant also with each query's newest N tokens exact (``compression.tcode.window``; 0: none;
1: the query's own token). The fraction printed is the paged rows'; ``counted_fraction`` adds the exact rows
(sinks + window) at ``--seq-len`` tokens, as ``bench pareto`` counts them.

    .venv/bin/python benchmarks/tcode_emulation.py --fractions 0.15 [--unit 8] [--corpus heldout] \
        [--tokens 2048] [--seq-len 1024] [--sinks 1] [--variants all k v no2 exactkept] [--windows 0 16]

Prints one JSON line per (fraction, variant).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_kvc import tcode  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.15])
    ap.add_argument("--unit", type=int, default=tcode.UNIT)
    ap.add_argument("--corpus", default="heldout")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--sinks", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=["all", "k", "v", "no2", "exactkept"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, nargs="+", default=[0])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    from vllm_kvc.emulate import perplexity
    from vllm_kvc.evaluate import eval_chunks
    from vllm_kvc.methods import build_plan
    from vllm_kvc.plan import dense_bytes_per_token, format_segments, segment_spec
    from vllm_kvc.validate import check_file

    c = check_file(a.config, check_engine=False)
    base = c.deployment.compression.model_validate({"group_size": c.deployment.compression.group_size,
                                                    "calibration": c.deployment.compression.calibration.model_dump(),
                                                    "method": "tcode"})
    model = AutoModelForCausalLM.from_pretrained(c.model_dir, dtype=torch.float32).eval()
    chunks = eval_chunks(c.model_dir, a.corpus, a.tokens, a.seq_len)
    with torch.no_grad():
        dense = perplexity(model, chunks)
    stats = tcode.load_stats(c.model_dir, base)
    for frac in a.fractions:
        sk, sv, used = tcode.allocate(stats, int(frac * dense_bytes_per_token(c.shape)), tcode.MENU, a.unit)
        comp = base.model_validate({**base.model_dump(), "tcode": {"segments": {
            "k": [format_segments(s) for s in sk], "v": [format_segments(s) for s in sv]}}})
        plan = build_plan(comp, c.shape)
        tensors = tcode.factors(stats, sk, sv)  # what method.prepare caches for the deployment
        specs = [segment_spec(k, v) for k, v in zip(sk, sv)]
        for var, win in [(v, w) for v in a.variants for w in a.windows]:
            read = {"no2": lambda b: 4 if b == 2 else b, "exactkept": lambda b: 16}.get(var)
            undo = tcode.install(model, tensors, specs, a.sinks, {"k": (0,), "v": (1,)}.get(var, (0, 1)), read,
                                 window=win)
            with torch.no_grad():
                ppl = perplexity(model, chunks)
            for u in undo:
                u()
            paged = plan.bytes_per_token() / dense_bytes_per_token(c.shape)
            print(json.dumps({"fraction": paged, "target": frac, "window": win,
                              "counted_fraction": round(paged + (a.sinks + win) / a.seq_len, 5),
                              "unit": a.unit, "variant": var, "sinks": a.sinks, "corpus": a.corpus,
                              "tokens": sum(len(ch) for ch in chunks), "dense_ppl": round(dense, 4),
                              "ppl": round(ppl, 4), "rise_pct": round(100 * (ppl / dense - 1), 3),
                              "bytes_per_token": used}), flush=True)


if __name__ == "__main__":
    main()
