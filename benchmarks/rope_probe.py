"""Quick probe of multi-head decode kernel variants (RoPE mode, one score dot, stages, maxnreg) at one shape.

    PYTHONPATH=. python benchmarks/rope_probe.py [--cases 64x4096] [--ratios 0.5,0.25] [--configs "<python list>"]

Prints median ms (CUDA-graph replays, as benchmarks/gpu_decode.py), error vs the naive bf16 path, registers.
``--alt FILE``: configs with ``alt=True`` run FILE's ``_latent_decode_heads`` (e.g. the previous commit's
kernel: ``git show HEAD:vllm_kvc/kernels/triton_latent.py > /tmp/old.py``), for same-call A/B comparisons;
``alt="other.py"`` in a config runs that file's instead.
A config's ``debug`` key (e.g. ``debug="no_exact_pass"``) sets the kernels' debug flags for that config only.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_decode as gd  # noqa: E402
from vllm_kvc.kernels import triton_latent as tk  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="64x4096")
    ap.add_argument("--ratios", default="0.5,0.25")
    ap.add_argument("--configs", default="")
    ap.add_argument("--splits", default="1")
    ap.add_argument("--alt", default="")
    ap.add_argument("--block-sizes", default=str(gd.BS), help="vLLM block sizes to run each case with")
    args = ap.parse_args()
    own = tk._latent_decode_heads
    alts = {}

    def kernel_of(cfg0):
        path = cfg0.get("alt")
        if not path:
            return own
        path = args.alt if path is True else path
        if path not in alts:
            import importlib.util
            name = f"alt_latent{len(alts)}"
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod  # (dataclasses look their module up)
            spec.loader.exec_module(mod)
            alts[path] = mod._latent_decode_heads
        return alts[path]
    probe_keys = ("debug", "alt")
    base = dict(block_t=64, num_warps=4, pieces=1, trans=True, prefetch=True)
    configs = eval(args.configs) if args.configs else [dict(heads=1, num_stages=3)]
    jobs = []
    for ratio in (float(x) for x in args.ratios.split(",")):
        rk, rv, lat = gd.variant_shapes(ratio, 1)
        for cfg0 in configs:
            for ns in (int(x) for x in args.splits.split(",")):
                opts = {k: v for k, v in cfg0.items() if k not in probe_keys}
                jobs.append(("decode", 1, rk, rv, lat, dict(base, **opts, num_splits=ns)))
    gd.precompile(jobs, min(14, os.cpu_count() or 1))
    for case, bs in ((c, int(b)) for c in args.cases.split(",") for b in args.block_sizes.split(",")):
        B, S = (int(x) for x in case.split("x"))
        gd.BS = bs
        paths, keep = gd.dense_paths(B, S)
        dense = {n: gd.bench(fn) for n, fn in paths.items()}
        del keep, paths
        torch.cuda.empty_cache()
        print(f"{B}x{S} block size {bs}: dense {min(dense.values()):.4f} ms {dense}", flush=True)
        for ratio in (float(x) for x in args.ratios.split(",")):
            rk, rv, lat = gd.variant_shapes(ratio, 1)
            c = gd.DecodeCase(B, S, 1, rk, rv, lat)
            ref = c.run_naive()
            kb = c.kernel_bytes()
            for cfg0 in configs:
                for ns in (int(x) for x in args.splits.split(",")):
                    cfg = dict(base, **{k: v for k, v in cfg0.items() if k not in probe_keys}, num_splits=ns)
                    tk._latent_decode_heads = kernel_of(cfg0)
                    tk._DEBUG.clear()  # a config's "debug" key: VLLM_KVC_TRITON_DEBUG flags for that config only
                    tk._DEBUG.update(cfg0.get("debug", "").split(","))
                    t0 = time.time()
                    try:
                        out = c.run_kernel(**cfg)
                        torch.cuda.synchronize()
                        err = gd.rel(out, ref)
                        t = gd.bench(lambda: c.run_kernel(**cfg))
                    except Exception as e:  # noqa: BLE001
                        print(f"  r={ratio} {cfg0} s{ns}: ERROR {str(e).splitlines()[0][:150]}", flush=True)
                        continue
                    st = gd.kernel_stats().get("fwd", {})
                    print(f"  r={ratio} {cfg0} s{ns}: {t:.4f} ms  x{min(dense.values()) / t:.2f} vs dense  "
                          f"{kb / t / 1e6:.0f} GB/s  err {err:.1e}  {st}  ({time.time() - t0:.0f}s)", flush=True)
            del c
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
