"""Round 6 probe (issue 14): roped integer decode on one Llama-3-8B layer, in one process.

1. launch variants at 64x4096 / 64x16384 (block-id reads, KV splits, stages, maxnreg), the default timed twice;
2. KV splits 1 / 2 / 4 against the default choice over batch sizes (lead 1 of gpu_r5_notes.md);
3. registers / spills / shared memory of every compiled decode kernel; SASS of chosen kernels.

    PYTHONPATH=.:benchmarks python3 benchmarks/results/gpu_r6_probe.py --out DIR [--variants ...] [--sweep 0/1]

Calls 1 and 2 (gpu_r6_run1.sh / run2.sh) also timed LaunchConfig fields that were removed afterwards (no gain):
``block_ids`` (the decode kernel's block-id reads: 0 in the tile, 2 two tiles ahead, 3 one id per token) and
``unroll`` (``tl.range(..., loop_unroll_factor=2)`` on the full-tile loop); gpu_r6_notes.md has their numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gpu_decode as gd  # noqa: E402

from vllm_kvc.kernels import triton_latent as tk  # noqa: E402
from vllm_kvc.kernels.triton_latent import LaunchConfig  # noqa: E402
from vllm_kvc.kernels.triton_latent import decode as dec  # noqa: E402

REGS: dict = {}
KERNELS: dict = {}
_orig_run = dec._latent_decode_heads.run
KEYS = ("RK", "RV", "K_BITS", "V_BITS", "QUANT", "SPLIT", "BIDS", "UNROLL", "AHEAD", "KGRP", "LAZY", "num_stages",
        "maxnreg")


def _run(*a, **kw):
    k = _orig_run(*a, **kw)
    key = tuple((n, kw[n]) for n in KEYS if n in kw)
    if key not in REGS:
        REGS[key] = dict(regs=k.n_regs, spills=k.n_spills, shared=k.metadata.shared)
        KERNELS[key] = k
    return k


dec._latent_decode_heads.run = _run

FORMATS = [("int4@g32", 128), ("int4@g32", 112), ("int8/int4@g32", 128)]


def parse(text):
    out = []
    for item in text.split(";"):
        name, _, body = item.partition(":")
        kv = dict(x.split("=") for x in body.split(",")) if body else {}
        out.append((name, LaunchConfig(**{k: (v == "1") if k in gd.BOOL_FIELDS else int(v) for k, v in kv.items()})))
    return out


def time_cfg(c, cfg, ref):
    out = c.run_kernel_roped(cfg)
    torch.cuda.synchronize()
    err = gd.rel(out, ref)
    return gd.bench(lambda: c.run_kernel_roped(cfg)), err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--variants", default="dflt:;old:maxnreg=0;r96:maxnreg=96;s2:num_splits=2;dflt2:")
    ap.add_argument("--cases", default="64x4096,64x16384")
    ap.add_argument("--sweep", type=int, default=1)
    ap.add_argument("--sweep-cfg", default="", help="LaunchConfig fields for the split sweep, e.g. block_ids=2")
    ap.add_argument("--sweep-cases", default="1x16384,4x16384,16x16384,32x16384,48x16384,"
                    "8x4096,16x4096,32x4096,48x4096")
    ap.add_argument("--sass", default="", help="save the SASS / TTGIR / PTX of the roped r128 4-bit K kernels")
    ap.add_argument("--precompile", type=int, default=12)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(0)
    bw, mm = gd.measure_ceilings()
    res = dict(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), device=props.name, copy_bw=bw,
               sms=props.multi_processor_count, variants=[], sweep=[], regs=[])
    print(f"{res['date']} {props.name}: copy {bw / 1e12:.2f} TB/s, bf16 {mm / 1e12:.0f} TFLOP/s", flush=True)
    variants = parse(args.variants)
    scfg = parse("s:" + args.sweep_cfg)[0][1]
    jobs = [("roped", 1, r, r, spec, dataclasses.replace(cfg, num_splits=ns)) for spec, r in FORMATS
            for _, cfg in variants for ns in (cfg.num_splits or 1,)]
    if args.sweep:
        jobs += [("roped", 1, r, r, spec, dataclasses.replace(cf, num_splits=ns)) for spec, r in FORMATS
                 for ns in (1, 2) for cf in (scfg, dataclasses.replace(scfg, maxnreg=0))]
    gd.precompile(list(dict.fromkeys(jobs)), args.precompile)
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    for (B, S) in cases:
        paths, keep = gd.dense_paths(B, S)
        dense = min(gd.bench(fn) for fn in paths.values())
        del keep, paths
        torch.cuda.empty_cache()
        for spec, r in FORMATS:
            c = gd.DecodeCase(B, S, 1, r, r, spec)
            c.setup_roped()
            ref = c.run_naive(rope=False)
            floor = c.kernel_bytes_roped() / bw * 1e3
            for name, cfg in variants:
                try:
                    ms, err = time_cfg(c, cfg, ref)
                except Exception as e:  # noqa: BLE001
                    print(f"  {B}x{S} {spec} r{r} {name}: {str(e).splitlines()[0][:150]}", flush=True)
                    continue
                res["variants"].append(dict(B=B, S=S, spec=spec, rank=r, name=name, ms=ms, err=err, floor=floor,
                                            dense=dense))
                print(f"  {B}x{S} {spec:>13} r{r} {name:>6}: {ms:.4f} ms err {err:.1e} floor {floor:.4f} "
                      f"({ms / floor:.2f}x floor, {dense / ms:.2f}x dense {dense:.4f})", flush=True)
            del c
            torch.cuda.empty_cache()
    if args.sweep:
        for sc in args.sweep_cases.split(","):
            B, S = (int(x) for x in sc.split("x"))
            for spec, r in FORMATS:
                c = gd.DecodeCase(B, S, 1, r, r, spec)
                c.setup_roped()
                ref = c.run_naive(rope=False)
                plan = tk.plan_launch(c.layout, gd.HQ, B, B, max_query_len=1, config=scfg, max_ctx=S,
                                      sms=props.multi_processor_count, roped=True)
                n_prog = B * c.layout.groups
                old_s = tk.default_splits(n_prog, S, 64, props.multi_processor_count)
                row = dict(B=B, S=S, spec=spec, rank=r, default_splits=plan.config.num_splits,
                           maxnreg=plan.config.maxnreg, old_splits=old_s, ms={})
                for ns in (1, 2, 4, 8, 16):
                    if ns > max(1, S // 256) or (ns > 1 and n_prog * ns > 8 * 4 * props.multi_processor_count):
                        continue
                    ms, err = time_cfg(c, dataclasses.replace(scfg, num_splits=ns), ref)
                    row["ms"][ns] = ms
                    assert err < 2e-2, err
                row["dflt_ms"], _ = time_cfg(c, scfg, ref)
                row["old_ms"], _ = time_cfg(c, dataclasses.replace(scfg, maxnreg=0, num_splits=old_s), ref)
                res["sweep"].append(row)
                best = min(row["ms"], key=row["ms"].get)
                print(f"  sweep {B}x{S} {spec:>13} r{r}: " + " ".join(f"s{k} {v:.4f}" for k, v in row["ms"].items())
                      + f" | default s{row['default_splits']} {row['dflt_ms']:.4f} (old: s{old_s} maxnreg 0 "
                      f"{row['old_ms']:.4f}) best s{best}", flush=True)
                del c
                torch.cuda.empty_cache()
    for key, v in REGS.items():
        res["regs"].append(dict(key=dict(key), **v))
    print("\ncompiled decode kernels (registers, spills, shared bytes):")
    for x in res["regs"]:
        print("  ", x["key"], x["regs"], x["spills"], x["shared"])
    with open(os.path.join(args.out, "gpu_r6_probe.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    if args.sass:
        import tarfile
        import io
        with tarfile.open(os.path.join(args.out, "gpu_r6_sass.tar.gz"), "w:gz") as tf:
            for key, k in KERNELS.items():
                d = dict(key)
                if d.get("RK") != 128 or d.get("K_BITS") != 4 or d.get("SPLIT"):
                    continue
                name = "_".join(f"{a}{b}" for a, b in key
                                if a in ("BIDS", "UNROLL", "AHEAD", "LAZY", "num_stages", "maxnreg"))
                for kind in ("sass", "ttgir", "ptx"):
                    try:
                        txt = k.asm[kind]
                    except Exception as e:  # noqa: BLE001
                        txt = f"unavailable: {e}"
                    b = txt.encode() if isinstance(txt, str) else txt
                    ti = tarfile.TarInfo(f"int4g32_r128_{name or 'dflt'}.{kind}")
                    ti.size = len(b)
                    tf.addfile(ti, io.BytesIO(b))
    # summary tables
    print("\n| case | format | variant | ms | floor ms | x floor | vs dense |")
    print("|---|---|---|---|---|---|---|")
    for v in res["variants"]:
        print(f"| {v['B']}x{v['S']} | {v['spec']} r{v['rank']} | {v['name']} | {v['ms']:.4f} | {v['floor']:.4f} | "
              f"{v['ms'] / v['floor']:.2f} | {v['dense'] / v['ms']:.2f}x |")
    if res["sweep"]:
        print("\n| case | format | s1 | s2 | s4 | s8 | s16 | old default (splits, no cap) | new default | best |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for row in res["sweep"]:
            m = row["ms"]
            best = min(m, key=m.get)
            cells = " | ".join(f"{m[k]:.4f}" if k in m else "-" for k in (1, 2, 4, 8, 16))
            print(f"| {row['B']}x{row['S']} | {row['spec']} r{row['rank']} | {cells} | s{row['old_splits']} "
                  f"{row['old_ms']:.4f} | s{row['default_splits']} {row['dflt_ms']:.4f} | s{best} |")


if __name__ == "__main__":
    main()
