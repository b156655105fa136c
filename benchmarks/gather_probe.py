"""How fast can a decode program *read* latent rows through vLLM's block table? (GPU, no vLLM needed)

    python benchmarks/gather_probe.py

A Triton kernel with the decode kernel's access pattern and pipeline (64-token tiles through the block table,
cp.async stages feeding one small dot per tile) but no attention math, on the Llama-3-8B layer shapes at 64x4096:
ratio 0.5 (8 programs per request, each reading its KV head's 128-byte key and value segments of a 2 KB row) and
ratio 0.25 (4 programs per request, two KV heads each: 1 KB rows). It compares the cache layout the kernels
read today (token rows: all heads of a token side by side) with a head-major block layout (each head's 16
tokens contiguous inside the block), and the two grid orders (consecutive programs = requests or = heads).
Prints GB/s (bytes of the latent rows / median time, CUDA-graph replays) next to the device copy rate.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.testing import do_bench, do_bench_cudagraph


@triton.jit
def _gather(cache_ptr, bt_ptr, stride_bt, w_ptr, out_ptr, S,
            NPROG: tl.constexpr, SEG: tl.constexpr, BS: tl.constexpr, BLOCK_T: tl.constexpr,
            HEAD_MAJOR: tl.constexpr, HEAD_FAST: tl.constexpr):
    if HEAD_FAST:
        g = tl.program_id(0)
        r = tl.program_id(1)
    else:
        r = tl.program_id(0)
        g = tl.program_id(1)
    ROW: tl.constexpr = 2 * NPROG * SEG
    tt = tl.arange(0, BLOCK_T)
    cs = tl.arange(0, SEG)
    w = tl.load(w_ptr + cs[:, None] * 16 + tl.arange(0, 16)[None, :])
    acc = tl.zeros([BLOCK_T, 16], tl.float32)
    for t0 in range(0, S, BLOCK_T):
        t = t0 + tt
        blk = tl.load(bt_ptr + r.to(tl.int64) * stride_bt + t // BS).to(tl.int64)
        if HEAD_MAJOR:
            base = blk * (BS * ROW) + g * (BS * 2 * SEG) + (t % BS) * (2 * SEG)
            k = tl.load(cache_ptr + base[:, None] + cs[None, :])
            v = tl.load(cache_ptr + base[:, None] + SEG + cs[None, :])
        else:
            base = blk * (BS * ROW) + (t % BS) * ROW
            k = tl.load(cache_ptr + base[:, None] + g * SEG + cs[None, :])
            v = tl.load(cache_ptr + base[:, None] + NPROG * SEG + g * SEG + cs[None, :])
        acc = tl.dot(k, w, acc)
        acc = tl.dot(v, w, acc)
    tl.store(out_ptr + (r * NPROG + g) * BLOCK_T * 16 + tt[:, None] * 16 + tl.arange(0, 16)[None, :], acc)


def main():
    dev = "cuda"
    a = torch.empty(2 ** 29, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    print(f"device copy: {2 * a.numel() / (t * 1e-3) / 1e9:.0f} GB/s (read + write)", flush=True)
    del a, b
    B, S, BS = 64, 4096, 16
    for name, nprog, seg in (("ratio 0.5 (1 head/program)", 8, 64), ("ratio 0.25 (2 heads/program)", 4, 64)):
        row = 2 * nprog * seg
        nblk = B * S // BS
        cache = torch.randn(nblk, BS, row, device=dev, dtype=torch.bfloat16)
        bt = torch.randperm(nblk, device=dev).view(B, S // BS).int()
        w = torch.randn(seg, 16, device=dev, dtype=torch.bfloat16)
        out = torch.empty(B * nprog, 64, 16, device=dev, dtype=torch.float32)
        nbytes = cache.numel() * 2
        for hm in (False, True):
            for hf in (False, True):
                for st in (2, 3, 4):
                    grid = (nprog, B) if hf else (B, nprog)

                    def fn():
                        _gather[grid](cache, bt, bt.stride(0), w, out, S, NPROG=nprog, SEG=seg, BS=BS, BLOCK_T=64,
                                      HEAD_MAJOR=hm, HEAD_FAST=hf, num_warps=4, num_stages=st)
                    fn()
                    t = do_bench_cudagraph(fn, rep=100, return_mode="median")
                    print(f"{name}: {'head-major' if hm else 'token rows'}, grid {'heads' if hf else 'requests'} "
                          f"fastest, st={st}: {t:.4f} ms, {nbytes / (t * 1e-3) / 1e9:.0f} GB/s", flush=True)
        del cache


if __name__ == "__main__":
    main()
