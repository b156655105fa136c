"""The paths the latent backend's batches take on a GPU, timed side by side on one Llama-3-8B layer.

    PYTHONPATH=. python benchmarks/gpu_serving_paths.py [--batches 1,8] [--ctx 4096] [--chunks 16,...,4096]

Decode batches: ``latent_attention`` with ``max_query_len=1`` (what the backend passes: the direct decode kernel)
vs without it (the varlen multi-head kernel, which looks each program's request up in the query offsets),
64 requests x ``ctx`` tokens, median of CUDA-graph replays.

Long prompts: the latent kernel vs the rebuild-then-flash path, by query chunk length. Each of B requests has
``ctx`` cached tokens of which the last ``chunk`` are queries (a prompt when chunk == ctx, else a chunked-prefill
step), bf16 latents at ratio 0.5 and 0.25. Times ``triton_latent.latent_attention`` with every request on the
kernels and with every request on the rebuild path (``reference.rebuild_attention``: keys and values rebuilt
densely, torch SDPA), and names the path the default thresholds pick; median of ``triton.testing.do_bench``
(events, L2 flushed; the rebuild path reads the sequence lengths on the host, so it cannot be graph-captured).
This is how ``REBUILD_MIN_QUERIES`` and ``REBUILD_MIN_WORK`` (vllm_kvc/kernels/triton_latent/config.py) were
chosen; the path named is what ``plan_launch`` decides.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_decode as gd  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from vllm_kvc.kernels import triton_latent as tk  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--chunks", default="16,32,64,128,256,512,1024,4096")
    ap.add_argument("--ratios", default="0.5,0.25")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, ctx {args.ctx}, block size {gd.BS}; "
          "median ms (decode: CUDA-graph replays; prompts: events)")
    print("| ratio | decode batch | max_query_len=1 ms | max_query_len=None ms |")
    print("|---|---|---|---|")
    for ratio in (float(x) for x in args.ratios.split(",")):
        rk, rv, lat = gd.variant_shapes(ratio, 1)
        c = gd.DecodeCase(64, args.ctx, 1, rk, rv, lat)
        qsl = torch.arange(0, 65, dtype=torch.int32, device=gd.DEV)
        t = {m: gd.bench(lambda: tk.latent_attention(c.q, c.cache, c.layout, c.block_table, c.seq_lens, qsl, c.b_k,
                                                     c.b_v, None, None, c.cs, c.scale, max_query_len=m,
                                                     factors=c.factors))
             for m in (1, None)}
        print(f"| {ratio} | 64x{args.ctx} | {t[1]:.4f} | {t[None]:.4f} |", flush=True)
        del c
    print()
    print("| ratio | batch | chunk | kernels ms | rebuild + SDPA ms | kernels / rebuild | default path | rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for ratio in (float(x) for x in args.ratios.split(",")):
        rk, rv, lat = gd.variant_shapes(ratio, 1)
        for B in (int(x) for x in args.batches.split(",")):
            c = gd.DecodeCase(B, args.ctx, 1, rk, rv, lat)
            for nq in (int(x) for x in args.chunks.split(",")):
                if nq > args.ctx:
                    continue
                q = torch.randn(B * nq, gd.HQ, gd.HD, device=gd.DEV, dtype=torch.bfloat16)
                qsl_cpu = torch.arange(0, B * nq + 1, nq, dtype=torch.int32)
                qsl = qsl_cpu.to(gd.DEV)

                def run(cfg):
                    return tk.latent_attention(q, c.cache, c.layout, c.block_table, c.seq_lens, qsl, c.b_k, c.b_v,
                                               None, None, c.cs, c.scale, max_query_len=nq, factors=c.factors,
                                               query_start_loc_cpu=qsl_cpu, config=cfg)
                kern = lambda: run(tk.LaunchConfig(rebuild_min_queries=1 << 30))  # noqa: E731
                rebuild = lambda: run(tk.LaunchConfig(rebuild_min_queries=1, rebuild_min_work=0))  # noqa: E731
                diff = gd.rel(kern(), rebuild())
                tk_ms = do_bench(kern, return_mode="median")
                rb_ms = do_bench(rebuild, return_mode="median")
                plan = tk.plan_launch(c.layout, gd.HQ, B * nq, B, max_query_len=nq, query_lens=[nq] * B,
                                      seq_lens=[args.ctx] * B)
                chosen = "rebuild" if plan.rebuilt else "kernels"
                print(f"| {ratio} | {B} | {nq} | {tk_ms:.3f} | {rb_ms:.3f} | {tk_ms / rb_ms:.2f} | {chosen} | "
                      f"{diff:.1e} |", flush=True)
            del c
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
