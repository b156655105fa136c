"""Quick probe of multi-head decode kernel variants (RoPE by table or tile rotation, lazy max, heads, stages)
at one shape.

    PYTHONPATH=. python benchmarks/rope_probe.py [--cases 64x4096] [--ratios 0.5,0.25] [--configs "<python list>"]

``--configs``: a list of dicts of ``LaunchConfig`` fields (e.g. ``[dict(heads=1, num_stages=3)]``), each laid
over 64-token tiles and 4 warps. Prints median ms (CUDA-graph replays, as benchmarks/gpu_decode.py) and the
error vs the naive bf16 path. ``--alt FILE``: configs with ``alt=True`` run FILE's ``_latent_decode_heads`` (a
decode kernel with the same arguments, e.g. the previous commit's:
``git show HEAD:vllm_kvc/kernels/triton_latent/decode.py > /tmp/old_decode.py``), for same-call A/B
comparisons; ``alt="other.py"`` in a config runs that file's instead. (The debug flags of earlier rounds,
``no_pdl`` / ``no_exact_pass``, left the kernels with the issue-13 split; RESULTS.md has their timings.)
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_decode as gd  # noqa: E402
from vllm_kvc.kernels.triton_latent import LaunchConfig, decode  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="64x4096")
    ap.add_argument("--ratios", default="0.5,0.25")
    ap.add_argument("--configs", default="")
    ap.add_argument("--splits", default="1")
    ap.add_argument("--alt", default="")
    ap.add_argument("--block-sizes", default=str(gd.BS), help="vLLM block sizes to run each case with")
    args = ap.parse_args()
    own = decode._latent_decode_heads
    alts = {}

    def kernel_of(cfg0):
        path = cfg0.get("alt")
        if not path:
            return own
        path = args.alt if path is True else path
        if path not in alts:  # loaded as a module of the kernel package, so that its relative imports resolve
            name = f"{decode.__package__}._alt{len(alts)}"
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod  # (dataclasses look their module up)
            spec.loader.exec_module(mod)
            alts[path] = mod._latent_decode_heads
        return alts[path]

    def config_of(cfg0, ns):
        return dataclasses.replace(base, **{k: v for k, v in cfg0.items() if k != "alt"}, num_splits=ns)
    base = LaunchConfig(block_t=64, num_warps=4)
    configs = eval(args.configs) if args.configs else [dict(heads=1, num_stages=3)]
    jobs = []
    for ratio in (float(x) for x in args.ratios.split(",")):
        rk, rv, lat = gd.variant_shapes(ratio, 1)
        for cfg0 in configs:
            for ns in (int(x) for x in args.splits.split(",")):
                jobs.append(("decode", 1, rk, rv, lat, config_of(cfg0, ns)))
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
                    cfg = config_of(cfg0, ns)
                    decode._latent_decode_heads = kernel_of(cfg0)  # (the launcher reads the module's global)
                    t0 = time.time()
                    try:
                        out = c.run_kernel(cfg)
                        torch.cuda.synchronize()
                        err = gd.rel(out, ref)
                        t = gd.bench(lambda: c.run_kernel(cfg))
                    except Exception as e:  # noqa: BLE001
                        print(f"  r={ratio} {cfg0} s{ns}: ERROR {str(e).splitlines()[0][:150]}", flush=True)
                        continue
                    print(f"  r={ratio} {cfg0} s{ns}: {t:.4f} ms  x{min(dense.values()) / t:.2f} vs dense  "
                          f"{kb / t / 1e6:.0f} GB/s  err {err:.1e}  ({time.time() - t0:.0f}s)", flush=True)
            del c
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
