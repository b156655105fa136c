"""Does the quality mode keep its promise on text it never saw? (issue 16, item 4)

For each ``--max-rise`` budget, runs ``vllm-kvc allocate --method tcode --max-rise X``'s search
(``tcode.quality_config``: bisection on the memory fraction, each candidate's rise measured on the validation
text, the library reference) and then measures the chosen allocation on the held-out and eval corpora in the
same transformers emulation (float32, exact sink), neither of which the statistics or the search saw.

    .venv/bin/python benchmarks/quality_mode.py --max-rise 1 2 3 5 [--tokens 4096] [--corpora heldout default]
    .venv/bin/python benchmarks/quality_mode.py --at 0.165 0.2 --validation-chunks 8   # per-chunk rises
    .venv/bin/python benchmarks/quality_mode.py --max-rise 3 --window 16   # each query's 16 newest tokens exact

Prints one JSON line per budget (``--at``: per memory fraction, the rise of every chunk of the validation text and
of the corpora, no search).
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
    ap.add_argument("--max-rise", type=float, nargs="+", default=[3.0])
    ap.add_argument("--corpora", nargs="+", default=["heldout", "default"])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window", type=int, default=0, help="each query's newest tokens exact (compression.tcode.window)")
    ap.add_argument("--at", type=float, nargs="+", help="no search: per-chunk rises at these memory fractions")
    ap.add_argument("--validation-chunks", type=int, default=8, help="with --at: chunks of the validation text")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from vllm_kvc.allocate import _context
    from vllm_kvc.emulate import perplexity
    from vllm_kvc.evaluate import eval_chunks
    from vllm_kvc.plan import dense_bytes_per_token, format_segments, segment_spec
    from vllm_kvc.validate import check_file

    c = check_file(a.config, check_engine=False)
    comp = c.deployment.compression
    base = comp.model_validate({"group_size": comp.group_size, "calibration": comp.calibration.model_dump(),
                                "method": "tcode"})
    full = dense_bytes_per_token(c.shape)
    texts = {name: eval_chunks(c.model_dir, name, a.tokens, a.seq_len) for name in a.corpora}
    if a.at:
        per_chunk(c, base, full, texts, a)
        return
    for budget in a.max_rise:
        sk, sv, used, info = tcode.quality_config(c.model_dir, base, budget, full, window=a.window)
        model = _context(c.model_dir, base, tcode.DEFAULT_PROBE).model  # the float32 model the search used
        tensors = tcode.factors(tcode.load_stats(c.model_dir, base), sk, sv)
        specs = [segment_spec(k, v) for k, v in zip(sk, sv)]
        row = {"max_rise_pct": budget, "window": a.window, "paged_fraction": round(used / full, 5),
               # the exact rows of a sequence (sink + window) counted at the chunk length, as bench pareto does
               "memory_fraction": round(used / full + (1 + a.window) / a.seq_len, 5), "bytes_per_token": used,
               "validation_rise_pct": info["validation_rise_pct"], "tried": info["tried"],
               "segments_k": [format_segments(s) for s in sk], "segments_v": [format_segments(s) for s in sv]}
        for name, chunks in texts.items():
            with torch.no_grad():
                dense = perplexity(model, chunks)
                undo = tcode.install(model, tensors, specs, window=a.window)
                try:
                    ppl = perplexity(model, chunks)
                finally:
                    for u in undo:
                        u()
            row[f"{name}_rise_pct"] = round(100 * (ppl / dense - 1), 3)
            row[f"{name}_tokens"] = sum(len(ch) for ch in chunks)
            row[f"{name}_within_budget"] = row[f"{name}_rise_pct"] <= budget
        print(json.dumps(row), flush=True)


def per_chunk(c, base, full, texts, a) -> None:
    from vllm_kvc.allocate import _context
    from vllm_kvc.corpus import load_text, spread_chunks
    from vllm_kvc.emulate import perplexity
    from vllm_kvc.plan import segment_spec

    stats = tcode.load_stats(c.model_dir, base)
    ctx = _context(c.model_dir, base, tcode.DEFAULT_PROBE)
    texts = {"validation": spread_chunks(ctx.tok, load_text("validation"), a.validation_chunks, a.seq_len), **texts}
    for frac in a.at:
        sk, sv, used = tcode.allocate(stats, int(frac * full))
        tensors, specs = tcode.factors(stats, sk, sv), [segment_spec(k, v) for k, v in zip(sk, sv)]
        row = {"memory_fraction": round(used / full, 5)}
        for name, chunks in texts.items():
            rises = []
            with torch.no_grad():
                for ch in chunks:
                    dense = perplexity(ctx.model, [ch])
                    undo = tcode.install(ctx.model, tensors, specs)
                    coded = perplexity(ctx.model, [ch])
                    for u in undo:
                        u()
                    rises.append(round(100 * (coded / dense - 1), 2))
            row[f"{name}_chunk_rises_pct"] = rises
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
