"""CPU decoding of packed 4 / 2-bit latent parts (issue 15, item 2): the byte-table decoder
(``layout.decode_packed``: one gather of a byte's levels from a 512-row table, one multiply) against the
element-wise path it replaced (``unpack_codes`` shifts and masks, then ``dequantize``: two level gathers and a
select by the scale's sign), side by side in one process, same rows, bitwise-equal results checked.

    .venv/bin/python benchmarks/cpu_decode_codes.py [--rows 32768] [--repeats 7] [--threads 2]

Rows are SmolLM2-shaped latent rows (one head group of 3 KV heads): K rank 120 and V rank 192 of
``int4@g32`` (the allocator's 25% format), and ``int2@g32``. Prints one JSON line per case (median ms).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vllm_kvc.layout import LatentLayout, decode_packed, dequantize, unpack_codes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for spec, rank in (("int4@g32", 120), ("int4@g32", 192), ("int2@g32", 192), ("int4", 192)):
        lay = LatentLayout(1, 3, 64, rank, rank, spec)
        rows = lay.pack(torch.randn(a.rows, 1, rank), torch.randn(a.rows, 1, rank))
        kb, so, ns = lay.k_bytes, lay.scale_offset, lay.scales_per_group_k
        scales = rows[..., so:].contiguous().view(torch.float16).float()[..., :ns].reshape(-1, 1, ns)

        def old():
            return dequantize(unpack_codes(rows[..., :kb], lay.bits_k, rank).reshape(-1, 1, rank), scales,
                              lay.bits_k, lay.quant_group)

        def new():
            return decode_packed(rows[..., :kb], scales, lay.bits_k, lay.quant_group, 1, rank)

        assert torch.equal(old(), new())
        t_old, t_new = [], []
        for _ in range(a.repeats):  # interleaved
            t = time.perf_counter()
            old()
            t_old.append(time.perf_counter() - t)
            t = time.perf_counter()
            new()
            t_new.append(time.perf_counter() - t)
        mo, mn = 1e3 * statistics.median(t_old), 1e3 * statistics.median(t_new)
        print(json.dumps({"spec": spec, "rank": rank, "rows": a.rows, "threads": a.threads,
                          "elementwise_ms": round(mo, 2), "byte_table_ms": round(mn, 2),
                          "speedup": round(mo / mn, 2)}), flush=True)


if __name__ == "__main__":
    main()
