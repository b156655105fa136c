"""CPU row encoder: a step's new latent rows written by the C encoder (kernels/cpu_latent.c, what the glue uses on
CPUs) against layout.pack + write (kernels/reference.py), per layout, same rows, bytes checked equal.

    .venv/bin/python benchmarks/cpu_encode.py [--rows 48] [--repeats 20] [--threads 1]

Prints one JSON line per layout: median ms of each, their ratio, and whether the bytes are equal.
"""
from __future__ import annotations

import argparse
import json

import torch
from cpu_attention import _median_ms  # benchmarks/ (the script's folder)

from vllm_kvc.kernels import cpu_latent, reference
from vllm_kvc.layout import LatentLayout

LAYOUTS = [(1, 3, 64, 192, 192, "int4@g32"), (1, 3, 64, 192, 192, "int4"), (1, 3, 64, 120, 192, "int8"),
           (1, 3, 64, 192, 192, "int8/int4@g32"), (1, 3, 64, 136, 176, "seg:8x8+64x4+64x2/96x4+80x2")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    for spec in LAYOUTS:
        lay = LatentLayout(*spec)
        k = torch.randn(a.rows, lay.groups, lay.rank_k)
        v = torch.randn(a.rows, lay.groups, lay.rank_v)
        slots = torch.randperm(4 * 16)[:a.rows]
        c_ref = torch.zeros(4, 16, lay.row_elems, dtype=torch.uint8)
        c_c = c_ref.clone()
        t_ref = _median_ms(lambda: reference.write_latents(c_ref, slots, lay, k, v), a.repeats)
        t_c = _median_ms(lambda: cpu_latent.encode_rows(c_c, slots, lay, k, v), a.repeats)
        print(json.dumps({"spec": lay.dtype, "rows": a.rows, "threads": a.threads, "torch_ms": round(t_ref, 3),
                          "c_ms": round(t_c, 3), "speedup": round(t_ref / t_c, 1),
                          "bytes_equal": bool(torch.equal(c_ref, c_c))}))


if __name__ == "__main__":
    main()
