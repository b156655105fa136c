"""CPU attention per layer, one decode step: the latent path (kernels/reference.py, what vLLM's CPU build runs
for lowrank / quant deployments) against dense bf16 SDPA over the same context, side by side in one process.

    .venv/bin/python benchmarks/cpu_attention.py [--batch 32] [--ctx 1024] [--repeats 5] [--ref-file PATH]
        [--ragged] [--block-size 128] [--threads 1] [--spec int8] [--rank-k 120] [--rank-v 192] [--profile]
        [--roped] [--prompt N]

SmolLM2-135M's layer shape (9 query heads, 3 KV heads of 64 dims) with configs/default.yaml's latent layout
(one head group of 3 KV heads, K rank 120, V rank 192, int8) unless ``--spec`` / ``--rank-k`` / ``--rank-v``
say otherwise (a ``seg:`` spec of method tcode sets its own ranks). ``--ref-file`` times another copy of
reference.py in the same run too (e.g. ``git show REV:vllm_kvc/kernels/reference.py > /tmp/ref_old.py``).
``--roped``: keys stored after RoPE; the C decode kernel (kernels/cpu_latent.c) is timed too, as ``latent_c``.
``--prompt N``: each request's last N tokens are queries (a prompt, N = ctx, or a chunked prefill; causal), as
one prefill step instead of a decode step; dense SDPA gets the same causal queries.
``--ragged``: request lengths spread uniformly over ctx/3..ctx (as in a serving batch; dense SDPA is then
timed padded to ctx, which favours it). Prints one JSON line per case: median ms of the latent step(s), timed
interleaved, and of dense SDPA, and their ratio.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time

import torch

from vllm_kvc.kernels import reference
from vllm_kvc.layout import LatentLayout


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--ref-file", help="another reference.py to time in the same run")
    ap.add_argument("--ragged", action="store_true", help="request lengths uniform in ctx/3..ctx")
    ap.add_argument("--threads", type=int, help="torch threads (vLLM's CPU engine core runs 1 on 2 cores)")
    ap.add_argument("--spec", default="int8", help="latent spec (layout.py), e.g. int4@g32 or a tcode row "
                                                   "seg:64x4+96x2/72x4+112x2 (ranks then follow the segments)")
    ap.add_argument("--rank-k", type=int, default=120)
    ap.add_argument("--rank-v", type=int, default=192)
    ap.add_argument("--roped", action="store_true", help="keys: roped (scored in the latent: q B_k^T against the "
                                                        "cached K latents, no rebuild)")
    ap.add_argument("--prompt", type=int, default=1, help="query tokens per request (1: a decode step)")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators of the "
                                                          "latent step")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    b, s, bs = a.batch, a.ctx, a.block_size
    rk, rv = a.rank_k, a.rank_v
    if a.spec.startswith("seg:"):
        from vllm_kvc.plan import parse_segment_spec
        rk, rv = (sum(w for w, _ in p) for p in parse_segment_spec(a.spec))
    lay = LatentLayout(groups=1, group_size=3, head_dim=64, rank_k=rk, rank_v=rv, dtype=a.spec)
    nblk = b * s // bs
    cache = torch.zeros(nblk, bs, lay.row_elems, dtype=lay.cache_dtype)
    cache.view(-1, lay.row_elems)[:] = lay.pack(torch.randn(nblk * bs, 1, rk), torch.randn(nblk * bs, 1, rv))
    bt = torch.arange(nblk).view(b, s // bs).int()
    seq = torch.full((b,), s, dtype=torch.int32)
    if a.ragged:
        seq = torch.randint(max(1, s // 3), s + 1, (b,), dtype=torch.int32)
    nq = a.prompt
    if nq > 1:
        seq = seq.clamp(min=nq)
    qsl = torch.arange(b + 1, dtype=torch.int32) * nq
    q = torch.randn(b * nq, 9, 64, dtype=torch.bfloat16)
    b_k, b_v = torch.randn(1, rk, 192) / 12, torch.randn(1, rv, 192) / 14
    ang = torch.arange(8192)[:, None].float() * (1e5 ** (-torch.arange(32) / 32))[None]
    cs = torch.cat([ang.cos(), ang.sin()], -1)
    out = torch.empty_like(q)
    impls = {"latent": reference}
    if a.ref_file:
        spec = importlib.util.spec_from_file_location("ref_other", a.ref_file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        impls["latent_other"] = mod
    if a.roped:  # the C decode kernel the glue calls on CPUs for roped keys (kernels/cpu_latent.py)
        from vllm_kvc.kernels import cpu_latent
        if cpu_latent.library() is not None:
            impls["latent_c"] = cpu_latent
    k = torch.randn(b, 3, s, 64, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    res = {"spec": a.spec, "keys": "roped" if a.roped else "pre_rope", "rank_k": rk, "rank_v": rv, "batch": b,
           "ctx": s, "query_tokens": nq, "ragged": a.ragged, "cached_tokens": int(seq.sum()),
           "threads": torch.get_num_threads()}
    # the implementations interleaved (alternating order), so that other load on the machine hits all alike
    kw = {}
    if a.roped:  # what the layer passes: each head's query projected on its rows of B_k (per call, timed too)
        views = reference.head_key_views(b_k, lay, 9)
        kw = {"roped_keys": True}

    def query():
        return torch.einsum("nhd,hdr->nhr", q.float(), views) if a.roped else q
    def kwargs(name):  # the C path also gets the roped queries themselves (long prompts rebuild K/V for SDPA)
        return {**kw, "q_heads": q} if name == "latent_c" else kw
    fns = {name: (lambda mod=mod, name=name: mod.latent_attention(query(), cache, lay, bt, seq, qsl, b_k, b_v, None,
                                                                  None, cs, 0.125, True, out=out, **kwargs(name)))
           for name, mod in impls.items()}
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for i in range(a.repeats):
        for name in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
            t = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - t) * 1e3)
    for name in fns:
        res[f"{name}_ms"] = statistics.median(times[name])
    qd = q.view(b, nq, 9, 64).transpose(1, 2)
    mask = None if nq == 1 else torch.ones(nq, s, dtype=torch.bool).tril(s - nq)  # query i sees keys <= s-nq+i
    res["dense_sdpa_ms"] = _median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
        qd, k, v, attn_mask=mask, enable_gqa=True), a.repeats)
    for name in impls:
        res[f"{name}_vs_dense"] = res[f"{name}_ms"] / res["dense_sdpa_ms"]
    print(json.dumps({k: round(x, 3) if isinstance(x, float) else x for k, x in res.items()}))
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fns["latent"]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
