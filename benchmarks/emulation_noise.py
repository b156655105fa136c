"""How much a transformers emulation of 2-bit codes moves from float summation order alone (no change of method).

One tcode allocation (``--fraction``), one chunk of held-out text, the same codes computed under perturbations that
change nothing but rounding: 1 or 2 threads, SDPA or eager attention, 1e-5 noise on the embeddings. A code that
sits on a rounding boundary flips, and 2-bit codes amplify it through 30 layers: differences of this size between
single-chunk emulations are noise.

    .venv/bin/python benchmarks/emulation_noise.py [--fraction 0.15] [--tokens 512]
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
    ap.add_argument("--fraction", type=float, default=0.15)
    ap.add_argument("--tokens", type=int, default=512)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from vllm_kvc.emulate import perplexity
    from vllm_kvc.evaluate import eval_chunks
    from vllm_kvc.plan import dense_bytes_per_token, segment_spec
    from vllm_kvc.validate import check_file

    c = check_file(a.config, check_engine=False)
    comp = c.deployment.compression
    base = comp.model_validate({"group_size": comp.group_size, "calibration": comp.calibration.model_dump(),
                                "method": "tcode"})
    model = AutoModelForCausalLM.from_pretrained(c.model_dir, dtype=torch.float32).eval()
    chunks = eval_chunks(c.model_dir, "heldout", a.tokens, a.tokens)
    stats = tcode.load_stats(c.model_dir, base)
    sk, sv, _ = tcode.allocate(stats, int(a.fraction * dense_bytes_per_token(c.shape)))
    tensors, specs = tcode.factors(stats, sk, sv), [segment_spec(k, v) for k, v in zip(sk, sv)]
    for threads, impl, noise in [(1, "sdpa", 0.0), (2, "sdpa", 0.0), (2, "eager", 0.0), (2, "sdpa", 1e-5)]:
        torch.set_num_threads(threads)
        model.config._attn_implementation = impl
        torch.manual_seed(0)
        hooks = [model.model.embed_tokens.register_forward_hook(
            lambda m, args, out: out + noise * torch.randn_like(out))] if noise else []
        with torch.no_grad():
            dense = perplexity(model, chunks)
            undo = tcode.install(model, tensors, specs)
            ppl = perplexity(model, chunks)
        for u in undo + [h.remove for h in hooks]:
            u()
        print(json.dumps({"fraction": a.fraction, "tokens": a.tokens, "threads": threads, "attention": impl,
                          "embedding_noise": noise, "dense_ppl": round(dense, 4), "ppl": round(ppl, 4),
                          "rise_pct": round(100 * (ppl / dense - 1), 3)}), flush=True)


if __name__ == "__main__":
    main()
