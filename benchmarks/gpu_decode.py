"""Decode (and prefill) attention on latent paged KV vs dense bf16 attention, one Llama-3-8B layer, on one GPU.

    PYTHONPATH=. python benchmarks/gpu_decode.py [--json out.json] [--sweep quick|full] [--no-prefill]
    PYTHONPATH=. python benchmarks/gpu_decode.py --formats default [--cases 64x4096,64x16384]
    PYTHONPATH=. python benchmarks/gpu_decode.py --formats bfloat16:0.5,int4@g32:1 --roped [--roped-configs ...]

Per case (batch x context, latent ratio) it prints median times (triton.testing.do_bench, L2 flushed between
runs) of: dense bf16 SDPA (contiguous K/V, best of two GQA formulations), the naive path (rebuild K and V from
the latents with matmuls, RoPE, then SDPA), and our Triton kernel (best configuration found by a small sweep,
for each head-group size), next to the bytes floor (bytes read / measured copy bandwidth) and FLOP floor (FLOPs /
measured bf16 matmul rate) of each. "ratio" = (rank_k + rank_v) / (2 * group_size * head_dim) per group.
``--formats ... --roped``: each format also in the roped-key mode (the K latent codes the key after RoPE; the
kernel scores the latent queries ``q B_k^T`` against it: no key rebuild, no RoPE), timed in the same call next to
the pre-RoPE kernel and dense SDPA, with its own bytes floor.
Transform-coded rows (method tcode): ``--formats "seg:8x8+40x4+56x2/72x4+56x2|gs1,..."`` (the segment lists of
layout.py, ``|gsN`` the head-group size, ranks from the segments) are timed with their exact first token (sink: a
bf16 K / V row per sequence, merged in the split-KV reduce), which their bytes floor counts too.
Needs a CUDA GPU, torch and triton; not vLLM.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from vllm_kvc.kernels import reference as kref  # noqa: E402
from vllm_kvc.kernels import triton_latent as tk  # noqa: E402
from vllm_kvc.kernels.triton_latent import LaunchConfig  # noqa: E402
from vllm_kvc.layout import LatentLayout  # noqa: E402

HQ, HKV, HD = 32, 8, 128  # Llama-3-8B layer
QPK = HQ // HKV
BS = 64  # vLLM block size: the latent backend's default on GPUs (vllm_kvc/glue/backend.py, GPU_BLOCK_SIZE)
DEV = "cuda"


TIMER = {"mode": "cudagraph"}


def bench(fn, warmup=25, rep=100) -> float:
    """Median ms per call. Default: replays of a CUDA graph (triton.testing.do_bench_cudagraph), which removes the
    host's launch overhead (vLLM runs decode under CUDA graphs too); --timer events: do_bench with an L2 flush
    before each call (host overhead can show for runs under ~0.1 ms)."""
    if TIMER["mode"] == "cudagraph":
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
        except Exception as e:  # noqa: BLE001
            print(f"  (graph capture failed: {str(e).splitlines()[0][:100]}; timing with events)", flush=True)
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def measure_ceilings():
    """Copy bandwidth (bytes read + written) and bf16 matmul rate, timed with events (single large ops, so host
    overhead does not matter; graph replays of back-to-back copies read lower)."""
    n = 1 << 30  # 1 GiB copy
    a = torch.empty(n, dtype=torch.uint8, device=DEV).random_(0, 255)
    b = torch.empty_like(a)
    t = float(do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median"))
    bw = 2 * n / (t * 1e-3)
    del a, b
    m = 8192
    x = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    y = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    t = float(do_bench(lambda: x @ y, warmup=25, rep=200, return_mode="median"))
    flops = 2 * m ** 3 / (t * 1e-3)
    del x, y
    torch.cuda.empty_cache()
    return bw, flops


def rope_inv_freq(rot=HD, base=500000.0):
    """vLLM's RotaryEmbedding._compute_inv_freq (fp32)."""
    return (1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float) / rot)).to(DEV)


def rope_cache(max_pos, rot=HD, base=500000.0):
    """vLLM's cos/sin table: fp32 angles t * inv_freq, kept in the model dtype."""
    ang = torch.arange(max_pos, dtype=torch.float, device=DEV)[:, None] * rope_inv_freq(rot, base)[None, :]
    return torch.cat([ang.cos(), ang.sin()], -1).to(torch.bfloat16)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


class DecodeCase:
    def __init__(self, B, S, gs, rk, rv, lat_dtype="bfloat16", seed=0):
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.B, self.S, self.gs = B, S, gs
        G = HKV // gs
        self.layout = L = LatentLayout(G, gs, HD, rk, rv, lat_dtype)
        nblk = S // BS
        self.q = torch.randn(B, HQ, HD, device=DEV, dtype=torch.bfloat16, generator=g)
        # latents ~ N(0,1); factors scaled so that keys/values are O(1)
        ck = torch.randn(B * S, G, rk, device=DEV, generator=g)
        cv = torch.randn(B * S, G, rv, device=DEV, generator=g)
        self.b_k = (torch.randn(G, rk, gs * HD, device=DEV, generator=g) / math.sqrt(rk)).bfloat16()
        self.b_v = (torch.randn(G, rv, gs * HD, device=DEV, generator=g) / math.sqrt(rv)).bfloat16()
        rows = L.pack(ck, cv)  # [B*S, row_elems]
        self.lat_flat = rows.view(B, S, -1)
        perm = torch.randperm(B * nblk, device=DEV, generator=g)
        self.block_table = perm.view(B, nblk).int()
        self.cache = torch.empty(B * nblk, BS, L.row_elems, dtype=L.cache_dtype, device=DEV)
        self.cache[perm] = rows.view(B * nblk, BS, -1)
        self.seq_lens = torch.full((B,), S, dtype=torch.int32, device=DEV)
        self.cs = rope_cache(S + 1)
        self.scale = HD ** -0.5
        self.factors = tk.prepare_factors(L, self.b_k, self.b_v, None, None, self.cs, True, tk.compute_dtype(self.q),
                                          rope_inv_freq())
        assert self.factors.inv_freq is not None
        self.qt = self.factors_roped = None
        self.sink = None
        if L.segmented:  # method tcode: the exact first token of every sequence
            k0 = torch.randn(B, HKV, HD, device=DEV, generator=g).bfloat16()
            v0 = torch.randn(B, HKV, HD, device=DEV, generator=g).bfloat16()
            self.sink = (k0, v0, torch.ones(B, dtype=torch.bool, device=DEV))
        del ck, cv

    def setup_roped(self):
        """Roped keys: the latent queries q B_k^T per head [B, Hq, rank_k] (bf16) and factors without B_k."""
        L = self.layout
        views = kref.head_key_views(self.b_k.float(), L, HQ)  # [Hq, hd, rank_k]
        self.qt = torch.einsum("bhd,hdr->bhr", self.q.float(), views).to(self.q.dtype).contiguous()
        self.factors_roped = tk.prepare_factors(L, None, self.b_v, None, None, None, True, tk.compute_dtype(self.q),
                                                roped_keys=True)

    # --- costs
    def kernel_bytes(self):
        L = self.layout
        sink = 0
        if self.sink is not None:  # exact K / V rows, and the split partials written and read once
            sink = self.B * HKV * HD * 2 * 2 + 2 * self.B * HQ * (max(16, 1 << (L.rank_v - 1).bit_length()) + 2) * 4
        return (self.B * self.S * L.row_bytes + 2 * self.q.numel() * 2 + (self.b_k.numel() + self.b_v.numel()) * 2
                + self.S * HD * 2 + self.block_table.numel() * 4 + sink)

    def kernel_flops(self):
        L = self.layout
        per_tok = 2 * L.groups * L.rank_k * L.group_size * HD + 2 * HQ * HD + 2 * HQ * L.rank_v
        return self.B * self.S * per_tok + self.B * 2 * HQ * L.rank_v * HD

    def kernel_bytes_roped(self):
        """Roped keys: cache rows + latent queries in, outputs out, B_v, block table (no B_k, no cos / sin)."""
        L = self.layout
        return (self.B * self.S * L.row_bytes + self.B * HQ * (L.rank_k + HD) * 2 + self.b_v.numel() * 2
                + self.block_table.numel() * 4)

    def dense_bytes(self):
        return self.B * self.S * HKV * HD * 2 * 2 + 2 * self.q.numel() * 2

    def dense_flops(self):
        return self.B * self.S * HQ * HD * 4

    # --- paths
    def run_kernel(self, cfg: LaunchConfig | None = None):
        return tk.latent_decode(self.q, self.cache, self.layout, self.block_table, self.seq_lens, self.factors,
                                self.scale, config=cfg, sink=self.sink)

    def run_kernel_roped(self, cfg: LaunchConfig | None = None):
        return tk.latent_decode(self.qt, self.cache, self.layout, self.block_table, self.seq_lens, self.factors_roped,
                                self.scale, config=cfg, roped_keys=True)

    def rebuild_dense(self, rope: bool = True):
        """Naive rebuild: K = RoPE(c_k B_k), V = c_v B_v as [B, Hkv, S, hd] bf16 (rope=False: K = c_k B_k, the
        roped-key mode's keys)."""
        L = self.layout
        lat = self.lat_flat
        if L.quantized:
            ck, cv = L.unpack(lat, torch.bfloat16)
        else:
            ck = lat[..., : L.v_offset].unflatten(-1, (L.groups, L.rank_k))
            cv = lat[..., L.v_offset:].unflatten(-1, (L.groups, L.rank_v))
        k = torch.einsum("bsgr,grd->bsgd", ck, self.b_k).reshape(self.B, self.S, HKV, HD)
        v = torch.einsum("bsgr,grd->bsgd", cv, self.b_v).reshape(self.B, self.S, HKV, HD)
        if self.sink is not None:  # position 0 exact (RoPE at position 0 is the identity)
            k[:, 0], v[:, 0] = self.sink[0], self.sink[1]
        if not rope:
            return k.transpose(1, 2), v.transpose(1, 2)
        cos = self.cs[: self.S, : HD // 2][None, :, None, :]
        sin = self.cs[: self.S, HD // 2:][None, :, None, :]
        k1, k2 = k[..., : HD // 2], k[..., HD // 2:]
        k = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], -1)
        return k.transpose(1, 2), v.transpose(1, 2)

    def run_naive(self, rope: bool = True):
        k, v = self.rebuild_dense(rope)
        q4 = self.q.view(self.B, HKV, QPK, HD)
        return F.scaled_dot_product_attention(q4, k, v, scale=self.scale).reshape(self.B, HQ, HD)


def dense_paths(B, S, seed=1):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, HQ, HD, device=DEV, dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, HKV, S, HD, device=DEV, dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, HKV, S, HD, device=DEV, dtype=torch.bfloat16, generator=g)
    sc = HD ** -0.5
    q4 = q.view(B, HKV, QPK, HD)
    paths = {
        "sdpa_q4": lambda: F.scaled_dot_product_attention(q4, k, v, scale=sc),  # 4 query rows per KV head
        "sdpa_gqa": lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=sc, enable_gqa=True),
    }
    return paths, (q, k, v)


def kernel_configs(sweep: str, gs: int, ratio=None) -> list[LaunchConfig]:
    """Launch configurations (without the split factor, which is swept per case: it is a run-time argument).
    ``heads`` > 0: the multi-head decode kernel with that many KV heads per program (gs == 1 float latents);
    0: the generic kernel. Variants that RESULTS.md rejected (trans=False, prefetch=False, cos_per_head, angles=1,
    the decode kernel in two pieces) left the kernels with the issue-13 split; git history has their sweeps."""
    keys = ("block_t", "num_warps", "num_stages", "pieces")
    if sweep == "final":  # the winners of the quick sweeps (benchmarks/RESULTS.md, GPU kernels), timed again
        base = [(64, 4, 3, 1), (64, 4, 2, 1), (64, 4, 2, 2)] if gs == 1 else [(64, 4, 3, 1), (64, 4, 2, 2)]
    elif sweep == "full":
        base = [(bt, w, st, nh) for bt in (64, 128) for w in (4, 8) for st in (2, 3, 4) for nh in (1, 2)]
    elif sweep == "heads":  # the generic kernel's two winners, then the multi-head kernel's grid
        base = [(64, 4, 3, 1), (64, 4, 2, 2)]
    elif gs == 1:
        base = [(64, 4, 3, 1), (64, 4, 2, 1), (64, 4, 3, 2), (64, 4, 2, 2), (128, 4, 3, 2), (128, 4, 2, 2)]
    elif gs == 2:
        base = [(64, 4, 3, 2), (64, 4, 2, 2), (64, 4, 3, 1)]
    else:
        base = [(64, 4, 2, 2), (64, 4, 3, 1)]
    generic = [LaunchConfig(heads=0, **dict(zip(keys, c))) for c in base]
    heads = []
    if gs == 1 and ratio != "int8" and sweep in ("heads", "final", "quick"):
        hk = ("heads", "block_t", "num_warps", "num_stages")
        if sweep == "heads":
            grid = [(nkv, 64, 4, st) for nkv in (1, 2, 4) for st in (2, 3)] + [(4, 128, 8, 2)]
        else:
            grid = HEADS_FINAL
        heads = [LaunchConfig(**dict(zip(hk, c))) for c in grid]
        if sweep == "final":  # RoPE by tile rotation or from the table; first-tile vs running max
            heads += [dataclasses.replace(c, tile_rotation=rot, lazy_max=lz)
                      for c in heads[:2] for rot in (True, False) for lz in (True, False)]
    return generic + heads


HEADS_FINAL = [(1, 64, 4, 3), (2, 64, 4, 3), (4, 64, 4, 3), (4, 128, 8, 2)]


def cfg_text(cfg: dict) -> str:
    """A launch configuration (as a dict) in a few words."""
    rot = cfg.get("tile_rotation")
    lazy = cfg.get("lazy_max")
    return (f"h{cfg.get('heads') or 0} T{cfg['block_t']} w{cfg['num_warps']} st{cfg['num_stages']} "
            f"p{cfg.get('pieces') or 1} s{cfg['num_splits']}"
            f"{'' if rot is None else (' tile rotation' if rot else ' table')}"
            f"{'' if lazy is None else (' lazy max' if lazy else ' running max')}"
            f"{'' if cfg.get('maxnreg') is None else ' maxnreg %d' % cfg['maxnreg']}"
            f"{'' if cfg.get('explicit') is None else (' explicit' if cfg['explicit'] else ' triton')}"
            f"{' rings %d' % cfg['stages'] if cfg.get('stages') else ''}")


def _warm_job(job):
    """Compile one kernel variant in a worker process (fills Triton's disk cache for the main process)."""
    global BS
    kind, gs, rk, rv, lat, cfg, BS = job
    if lat.startswith("seg:"):
        gs = int(lat.partition("|gs")[2] or 1)
        lat = lat.partition("|")[0]
    t = time.time()
    try:
        if kind == "decode":
            c = DecodeCase(2, 256, gs, rk, rv, lat)
            c.run_kernel(cfg)
        elif kind == "roped":
            c = DecodeCase(2, 256, gs, rk, rv, lat)
            c.setup_roped()
            c.run_kernel_roped(cfg)
        else:
            c = DecodeCase(2, 256, gs, rk, rv, lat)
            qf = torch.randn(2 * 256, HQ, HD, device=DEV, dtype=torch.bfloat16)
            qsl = torch.arange(0, 2 * 256 + 1, 256, device=DEV, dtype=torch.int32)
            tk.latent_attention(qf, c.cache, c.layout, c.block_table, c.seq_lens, qsl, c.b_k, c.b_v, None, None,
                                c.cs, c.scale, factors=c.factors, config=cfg)
        torch.cuda.synchronize()
        return None, time.time() - t
    except Exception as e:  # noqa: BLE001
        return str(e).splitlines()[0][:200], time.time() - t


def precompile(jobs, workers):
    import concurrent.futures as cf
    import multiprocessing as mp
    t = time.time()
    errs = 0
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        for job, (err, dt) in zip(jobs, ex.map(_warm_job, [j + (BS,) for j in jobs])):
            if err:
                errs += 1
                print(f"  compile failed {job}: {err}", flush=True)
    print(f"precompiled {len(jobs)} variants in {time.time() - t:.0f}s with {workers} workers ({errs} failed)",
          flush=True)


def variant_shapes(ratio, gs):
    if ratio == "int8":
        return HD // 2, HD // 2, "int8"
    r = int(round(ratio * gs * HD))
    return r, r, "bfloat16"


# ------------------------------------------------------------------------------------------------ latent formats
DEFAULT_FORMATS = ("bfloat16:0.5,int8:0.5,int4@g32:0.5,int8/int4:0.5,int8/int4@g32:0.5,int4:0.5,int2@g32:0.5,"
                   "bfloat16:0.25,int4@g32:0.25")


def parse_formats(text: str):
    """'int4@g32:0.5,int8/int4:0.5' -> [(latent spec, ratio)] (gs = 1, rank = ratio * head_dim for K and V;
    'int4@g32:0.5|gs2': head groups of 2 KV heads, rank = ratio * 2 * head_dim, the spec keeps the suffix).
    Transform-coded items ``seg:<K>/<V>|gsN`` keep their spec with the suffix as the first element (see
    :func:`format_shape`) and their ratio of ranks to the head group's dims as the second."""
    out = []
    for item in text.split(","):
        if item.startswith("seg:"):
            spec, gs, rk, rv = format_shape(item)
            out.append((item, (rk + rv) / (2 * gs * HD)))
            continue
        spec, _, ratio = item.partition(":")
        ratio, _, gs = ratio.partition("|gs")  # 'int4@g32:0.5|gs2': head groups of 2 KV heads
        out.append((spec + (f"|gs{gs}" if gs else ""), float(ratio or 0.5)))
    return out


def format_shape(item: str, ratio: float = 0.5):
    """(latent spec, group size, rank_k, rank_v) of a --formats item: 'seg:<K>/<V>|gsN' (ranks from the segments),
    else gs 1 (or N after '|gsN') and ranks ratio * gs * head_dim."""
    if item.startswith("seg:"):
        from vllm_kvc.plan import parse_segment_spec
        spec, _, gs = item.partition("|gs")
        k, v = parse_segment_spec(spec)
        return spec, int(gs or 1), sum(w for w, _ in k), sum(w for w, _ in v)
    item, _, gs = item.partition("|gs")
    gs = int(gs or 1)
    r = int(round(ratio * HD * gs))
    return item, gs, r, r


CONFIGS: list = []  # --configs: replaces format_configs' grid
ROPED_CONFIGS: list = []  # --roped-configs: tried in roped-key mode besides the defaults


def parse_configs(text: str) -> list[LaunchConfig]:
    """'num_stages=2;maxnreg=168,num_splits=2': one LaunchConfig per ';'-separated item (booleans as 0 / 1)."""
    return [LaunchConfig.parse(item) for item in filter(None, text.split(";"))]


def format_configs(spec: str) -> list[LaunchConfig]:
    """Launch options tried per format besides the defaults (LaunchConfig()): KV heads per program 1 / 2,
    2 / 3 pipeline stages, 1 / 2 KV splits (the original int8 layout runs on the generic kernel: splits only);
    --configs replaces these."""
    if CONFIGS:
        return [] if spec == "int8" else list(CONFIGS)
    if spec.startswith("seg:"):  # the generic kernel (no multi-head decode kernel): splits only
        return [LaunchConfig(num_splits=s) for s in (1, 2, 4)]
    if spec == "int8":
        return [LaunchConfig(num_splits=s) for s in (1, 2)]
    return [LaunchConfig(heads=h, num_stages=st, num_splits=s) for h in (1, 2) for st in (2, 3) for s in (1, 2)]


def try_configs(run, ref_out, configs, label: str) -> list[dict]:
    """``run(cfg)`` under each launch configuration: {cfg, ms, err} (median ms, error vs ``ref_out``), or {cfg,
    error} where it fails (out of resources etc.)."""
    tried = []
    for cfg in configs:
        try:
            out = run(cfg)
            torch.cuda.synchronize()
            err = rel(out, ref_out)
            t = bench(lambda: run(cfg))
        except Exception as e:  # noqa: BLE001  (out of resources etc.)
            tried.append(dict(cfg=dataclasses.asdict(cfg), error=str(e).splitlines()[0][:160]))
            print(f"    {label} {cfg}: {tried[-1]['error']}", flush=True)
            continue
        tried.append(dict(cfg=dataclasses.asdict(cfg), ms=t, err=err))
    return tried


def run_formats(args, bw, mm, results):
    """Every latent format of the plan (gs = 1, Llama-3-8B layer) against dense bf16 SDPA in the same call: the
    defaults and the best of :func:`format_configs`, each with its bytes floor (its own row bytes)."""
    cases = [tuple(int(x) for x in c.split("x")) for c in (args.cases or "64x4096,64x16384").split(",")]
    fmts = parse_formats(args.formats)
    rows = []
    for (B, S) in cases:
        paths, keep = dense_paths(B, S)
        dense_t = {name: bench(fn) for name, fn in paths.items()}
        dense_best = min(dense_t.values())
        dense_floor = (B * S * HKV * HD * 4 + 2 * B * HQ * HD * 2) / bw * 1e3
        del keep, paths
        torch.cuda.empty_cache()
        print(f"B={B} S={S}: dense SDPA {dense_best:.4f} ms {dense_t} (bytes floor {dense_floor:.4f})", flush=True)
        for item, ratio in fmts:
            spec, gs, r, rv = format_shape(item, ratio)
            c = DecodeCase(B, S, gs, r, rv, spec)
            ref_out = c.run_naive()
            t0 = time.time()
            tried = try_configs(c.run_kernel, ref_out, [LaunchConfig()] + ([] if args.no_sweep
                                                                           else format_configs(spec)), spec)
            ok = [x for x in tried if "ms" in x]
            best = min(ok, key=lambda x: x["ms"]) if ok else None
            dflt = tried[0] if "ms" in tried[0] else None
            kb = c.kernel_bytes()
            row = dict(B=B, S=S, spec=spec + (f" gs{gs}" if gs > 1 else ""), gs=gs, ratio=ratio, rank=r, rank_v=rv, row_bytes=c.layout.row_bytes,
                       dense_row_bytes=c.layout.dense_row_bytes(), dense_ms=dense_best, dense_paths=dense_t,
                       dense_floor_ms=dense_floor, bytes=kb, bytes_floor_ms=kb / bw * 1e3,
                       flop_floor_ms=c.kernel_flops() / mm * 1e3, default=dflt, best=best, tried=tried,
                       plan=str(tk.plan_launch(c.layout, HQ, B, B, max_query_len=1, angles_ok=True,
                                               max_ctx=S, sms=results["sms"], sink=c.sink is not None)),
                       sweep_s=time.time() - t0)
            if args.roped and not c.layout.segmented:
                row["roped"] = time_roped(c, spec, bw, results)
            rows.append(row)
            results["formats"] = rows
            save_json(args, results)
            if best:
                frac = row['row_bytes'] / row['dense_row_bytes']
                dms = dflt["ms"] if dflt else float("nan")
                print(f"  {spec:>15} gs{gs} r={r:3d}/{rv:3d} {row['row_bytes']:4d} B/token ({frac:.1%} of bf16): dflt {dms:.4f} ms, "
                      f"best {best['ms']:.4f} ms "
                      f"[{cfg_text(best['cfg'])}] err {best['err']:.1e}; floor {row['bytes_floor_ms']:.4f} ms "
                      f"({row['sweep_s']:.0f}s)", flush=True)
            del c
            torch.cuda.empty_cache()
    return rows


def time_roped(c: DecodeCase, spec: str, bw: float, results) -> dict:
    """The roped-key kernel on the same cache: the defaults and --roped-configs; error against dense SDPA over the
    keys c_k B_k (no RoPE) and values c_v B_v."""
    c.setup_roped()
    ref_out = c.run_naive(rope=False)
    tried = try_configs(c.run_kernel_roped, ref_out, [LaunchConfig()] + list(ROPED_CONFIGS), f"roped {spec}")
    ok = [x for x in tried if "ms" in x]
    best = min(ok, key=lambda x: x["ms"]) if ok else None
    kb = c.kernel_bytes_roped()
    r = dict(default=tried[0] if "ms" in tried[0] else None, best=best, tried=tried, bytes=kb,
             bytes_floor_ms=kb / bw * 1e3,
             plan=str(tk.plan_launch(c.layout, HQ, c.B, c.B, max_query_len=1, angles_ok=False, max_ctx=c.S,
                                     sms=results["sms"], roped=True)))
    if best:
        d = r["default"]
        print(f"  {'roped':>15} r={c.layout.rank_k:3d}: dflt {d['ms'] if d else float('nan'):.4f} ms, best "
              f"{best['ms']:.4f} ms [{cfg_text(best['cfg'])}] err {best['err']:.1e}; floor {r['bytes_floor_ms']:.4f}"
              " ms", flush=True)
        for x in tried[1:]:
            print(f"  {'':>15}   [{cfg_text(x['cfg'])}] " + (f"{x['ms']:.4f} ms, err {x['err']:.1e}" if "ms" in x
                                                             else x["error"]), flush=True)
    return r


def print_roped_table(rows):
    """Pre-RoPE vs roped keys vs dense SDPA, the measured defaults of each (same call, same cache)."""
    print("| batch x ctx | latent dtype | rank K/V | % of bf16 K/V bytes | dense SDPA ms | pre-RoPE ms | pre-RoPE "
          "floor ms | pre-RoPE / floor | pre-RoPE vs dense | roped ms | roped floor ms | roped / floor | roped vs dense"
          " | roped vs pre-RoPE |")
    print("|" + "---|" * 14)
    for r in rows:
        d, rr = r["default"], r.get("roped") or {}
        rd = rr.get("default")
        frac = r['row_bytes'] / r['dense_row_bytes']
        pm = d["ms"] if d else float("nan")
        rm = rd["ms"] if rd else float("nan")
        rf = rr.get("bytes_floor_ms", float("nan"))
        print(f"| {r['B']}x{r['S']} | {r['spec']} | {r['rank']} | {frac:.1%} | {r['dense_ms']:.4f} | {pm:.4f} | "
              f"{r['bytes_floor_ms']:.4f} | {pm / r['bytes_floor_ms']:.2f} | {r['dense_ms'] / pm:.2f}x | {rm:.4f} | "
              f"{rf:.4f} | {rm / rf:.2f} | {r['dense_ms'] / rm:.2f}x | {pm / rm:.2f}x |")
    if any((r.get("roped") or {}).get("best") for r in rows):
        print("\nroped keys, best of the defaults and --roped-configs:")
        for r in rows:
            b = (r.get("roped") or {}).get("best")
            if b:
                print(f"  {r['B']}x{r['S']} {r['spec']} r={r['rank']}: {b['ms']:.4f} ms [{cfg_text(b['cfg'])}]")


def print_formats_table(rows):
    print("| batch x ctx | latent dtype | rank K/V | bytes/token (% of bf16 K/V) | default ms | best ms (cfg) | "
          "bytes floor ms | best / floor | dense SDPA ms | dense / best |")
    print("|" + "---|" * 10)
    for r in rows:
        b, d = r["best"], r["default"]
        rank = f"{r['rank']}/{r.get('rank_v', r['rank'])}" + (f" gs{r['gs']}" if r.get("gs", 1) != 1 else "")
        if not b:
            print(f"| {r['B']}x{r['S']} | {r['spec']} | {rank} | - | failed | | | | | |")
            continue
        frac = r['row_bytes'] / r['dense_row_bytes']
        print(f"| {r['B']}x{r['S']} | {r['spec']} | {rank} | {r['row_bytes']} ({frac:.1%})"
              f" | {d['ms'] if d else float('nan'):.4f} | {b['ms']:.4f} ({cfg_text(b['cfg'])}) | "
              f"{r['bytes_floor_ms']:.4f} | {b['ms'] / r['bytes_floor_ms']:.2f} | {r['dense_ms']:.4f} | "
              f"{r['dense_ms'] / b['ms']:.2f}x |")


def run_decode(args, bw, mm, results):
    cases = [(16, 4096), (64, 4096), (64, 16384)]
    if args.cases:
        cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    ratios = [0.5, 0.25]
    group_sizes = [int(x) for x in args.group_sizes.split(",")]
    rows = []
    for (B, S) in cases:
        paths, keep = dense_paths(B, S)
        dense_t = {name: bench(fn) for name, fn in paths.items()}
        dense_best = min(dense_t.values())
        ref_case_bytes = B * S * HKV * HD * 4
        del keep, paths
        torch.cuda.empty_cache()
        for ratio in ratios + (["int8"] if args.int8 else []):
            variants = []
            for gs in group_sizes:
                if ratio == "int8" and gs != 1:
                    continue
                rk, rv, lat = variant_shapes(ratio, gs)  # int8: the ratio-0.5 ranks stored as int8
                c = DecodeCase(B, S, gs, rk, rv, lat)
                t0 = time.time()
                naive_t = bench(c.run_naive)
                ref_out = c.run_naive()
                best = None
                tried = []
                for kc in kernel_configs(args.sweep, gs, ratio):
                    for ns in ((1, 2, 4) if args.sweep in ("final", "heads") else (1, 2, 4, 8)):
                        cfg = dataclasses.replace(kc, num_splits=ns)
                        try:
                            out = c.run_kernel(cfg)
                            torch.cuda.synchronize()
                            err = rel(out, ref_out)
                            t = bench(lambda: c.run_kernel(cfg))
                        except Exception as e:  # noqa: BLE001  (out of resources etc.)
                            tried.append(dict(cfg=dataclasses.asdict(cfg), error=str(e).splitlines()[0][:120]))
                            continue
                        tried.append(dict(cfg=dataclasses.asdict(cfg), ms=t, err=err))
                        if best is None or t < best["ms"]:
                            best = dict(cfg=dataclasses.asdict(cfg), ms=t, err=err)
                kb, kf = c.kernel_bytes(), c.kernel_flops()
                v = dict(B=B, S=S, ratio=ratio, gs=gs, rank_k=c.layout.rank_k, rank_v=c.layout.rank_v,
                         lat_dtype=c.layout.dtype, naive_ms=naive_t, kernel=best, bytes=kb, flops=kf,
                         bytes_floor_ms=kb / bw * 1e3, flop_floor_ms=kf / mm * 1e3, tried=tried,
                         sweep_s=time.time() - t0)
                variants.append(v)
                print(f"  B={B} S={S} ratio={ratio} gs={gs}: naive {naive_t:.3f} ms, kernel "
                      f"{best['ms'] if best else float('nan'):.3f} ms {best['cfg'] if best else ''} "
                      f"err={best['err'] if best else float('nan'):.1e} floors bytes {v['bytes_floor_ms']:.3f} "
                      f"flops {v['flop_floor_ms']:.3f} ({v['sweep_s']:.0f}s)", flush=True)
                for tr in sorted([x for x in tried if "ms" in x], key=lambda x: x["ms"])[:6]:
                    print(f"    {tr['ms']:.4f} ms err {tr['err']:.1e} {cfg_text(tr['cfg'])}", flush=True)
                del c
                torch.cuda.empty_cache()
            ok = [v for v in variants if v["kernel"]]
            if not ok:
                continue
            bestv = min(ok, key=lambda v: v["kernel"]["ms"])
            dfl = max(B * S * HKV * HD * 4 / bw, B * S * HQ * HD * 4 / mm) * 1e3
            row = dict(B=B, S=S, ratio=ratio, dense_ms=dense_best, dense_paths=dense_t, dense_floor_ms=dfl,
                       dense_bytes=ref_case_bytes, best=bestv, variants=variants)
            rows.append(row)
            results["decode"] = rows
            save_json(args, results)
    results["decode"] = rows
    return rows


def save_json(args, results):
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=1)


def print_decode_table(rows, md=False):
    hdr = ("| batch x ctx | ratio | dense SDPA ms | dense floor ms | naive ms | kernel ms (gs, cfg) | bytes floor ms"
           " | FLOP floor ms | binds | kernel/floor | speedup vs dense | vs naive |")
    print(hdr)
    print("|" + "---|" * 12)
    for r in rows:
        b = r["best"]
        k = b["kernel"]
        fl = max(b["bytes_floor_ms"], b["flop_floor_ms"])
        binds = "bytes" if b["bytes_floor_ms"] >= b["flop_floor_ms"] else "FLOPs"
        cfg = k["cfg"]
        cs = f"gs={b['gs']}, {cfg_text(cfg)}"
        rat = r["ratio"] if r["ratio"] != "int8" else "0.5 int8"
        print(f"| {r['B']}x{r['S']} | {rat} | {r['dense_ms']:.3f} | {r['dense_floor_ms']:.3f} | {b['naive_ms']:.3f} | "
              f"{k['ms']:.3f} ({cs}) | {b['bytes_floor_ms']:.3f} | {b['flop_floor_ms']:.3f} | {binds} | "
              f"{k['ms'] / fl:.2f} | {r['dense_ms'] / k['ms']:.2f}x | {b['naive_ms'] / k['ms']:.2f}x |")
    print()
    print("| batch x ctx | ratio | " + " | ".join(f"gs={g} ms" for g in sorted({v['gs'] for r in rows
                                                                                for v in r['variants']})) + " |")
    gss = sorted({v['gs'] for r in rows for v in r['variants']})
    print("|" + "---|" * (2 + len(gss)))
    for r in rows:
        by = {v["gs"]: v for v in r["variants"]}
        cells = []
        for g in gss:
            v = by.get(g)
            if v is None or not v["kernel"]:
                cells.append("-")
            else:
                cells.append(f"{v['kernel']['ms']:.3f} (floor {max(v['bytes_floor_ms'], v['flop_floor_ms']):.3f})")
        rat = r["ratio"] if r["ratio"] != "int8" else "0.5 int8"
        print(f"| {r['B']}x{r['S']} | {rat} | " + " | ".join(cells) + " |")


# ------------------------------------------------------------------------------------------------ prefill
def prefill_configs():
    return [LaunchConfig(block_q=bq, block_t=bt, num_warps=w, num_splits=1)
            for bq in (16, 32) for bt in (64, 128) for w in (4, 8)]


def run_prefill(args, bw, mm, results):
    cases = [tuple(int(x) for x in c.split("x")) for c in args.prefill_cases.split(",")]
    out_rows = []
    for (B, S) in cases:
        g = torch.Generator(device=DEV).manual_seed(7)
        q = torch.randn(B, HQ, S, HD, device=DEV, dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, HKV, S, HD, device=DEV, dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, HKV, S, HD, device=DEV, dtype=torch.bfloat16, generator=g)
        kx, vx = k.repeat_interleave(QPK, 1), v.repeat_interleave(QPK, 1)
        sc = HD ** -0.5
        dense = {
            "sdpa_gqa": bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=sc,
                                                                     enable_gqa=True)),
            "sdpa_expanded": bench(lambda: F.scaled_dot_product_attention(q, kx, vx, is_causal=True, scale=sc)),
        }
        del q, k, v, kx, vx
        torch.cuda.empty_cache()
        dense_flops = B * HQ * HD * 4 * S * (S + 1) / 2
        c = DecodeCase(B, S, 1, HD // 2, HD // 2)  # ratio 0.5, gs=1
        qf = torch.randn(B * S, HQ, HD, device=DEV, dtype=torch.bfloat16, generator=g)
        qsl = torch.arange(0, B * S + 1, S, device=DEV, dtype=torch.int32)

        def naive():
            kk, vv = c.rebuild_dense()
            qq = qf.view(B, S, HQ, HD).transpose(1, 2)
            return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=c.scale, enable_gqa=True)

        naive_t = bench(naive)
        ref = naive().transpose(1, 2).reshape(B * S, HQ, HD)
        best, tried = None, []
        for cfg in prefill_configs():
            fn = lambda: tk.latent_attention(qf, c.cache, c.layout, c.block_table, c.seq_lens, qsl,  # noqa: E731
                                             c.b_k, c.b_v, None, None, c.cs, c.scale, factors=c.factors,
                                             config=cfg)
            try:
                err = rel(fn(), ref)
                t = bench(fn, warmup=5, rep=40)
            except Exception as e:  # noqa: BLE001
                tried.append(dict(cfg=dataclasses.asdict(cfg), error=str(e).splitlines()[0][:120]))
                continue
            tried.append(dict(cfg=dataclasses.asdict(cfg), ms=t, err=err))
            if best is None or t < best["ms"]:
                best = dict(cfg=dataclasses.asdict(cfg), ms=t, err=err)
        L = c.layout
        # our kernel's FLOPs with query tiles of block_q tokens: QK + P c_v, + key rebuild once per (q tile, kv tile)
        bq = best["cfg"]["block_q"] if best else 16
        pairs = B * S * (S + 1) / 2
        kflops = pairs * (2 * HQ * HD + 2 * HQ * L.rank_v) + B * (S / bq) * (S / 2) * 2 * HKV * L.rank_k * HD
        row = dict(B=B, S=S, dense=dense, dense_ms=min(dense.values()), dense_flops=dense_flops,
                   dense_flop_floor_ms=dense_flops / mm * 1e3, naive_ms=naive_t, kernel=best, kernel_flops=kflops,
                   kernel_flop_floor_ms=kflops / mm * 1e3, tried=tried)
        out_rows.append(row)
        results["prefill"] = out_rows
        save_json(args, results)
        print(f"  prefill B={B} S={S}: dense {row['dense_ms']:.3f} ms {dense}, naive {naive_t:.3f}, kernel "
              f"{best['ms'] if best else float('nan'):.3f} {best['cfg'] if best else ''} err "
              f"{best['err'] if best else float('nan'):.1e}", flush=True)
        del c, qf
        torch.cuda.empty_cache()
    results["prefill"] = out_rows
    return out_rows


def print_prefill_table(rows):
    print("| prefill batch x len (causal) | dense SDPA ms | dense FLOP floor ms | naive ms | kernel ms (cfg) | "
          "kernel FLOP floor ms | kernel vs dense |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        k = r["kernel"]
        cfg = k["cfg"]
        print(f"| {r['B']}x{r['S']} | {r['dense_ms']:.3f} | {r['dense_flop_floor_ms']:.3f} | {r['naive_ms']:.3f} | "
              f"{k['ms']:.3f} (q={cfg['block_q']}, T={cfg['block_t']}, w={cfg['num_warps']}) | "
              f"{r['kernel_flop_floor_ms']:.3f} | {r['dense_ms'] / k['ms']:.2f}x |")


def main():
    global BS
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "gpu_decode.json"))
    ap.add_argument("--sweep", default="quick", choices=["quick", "full", "final", "heads"])
    ap.add_argument("--cases", default="", help="e.g. 16x4096,64x4096")
    ap.add_argument("--group-sizes", default="1,2,4")
    ap.add_argument("--timer", default="cudagraph", choices=["cudagraph", "events"])
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--no-int8", dest="int8", action="store_false")
    ap.add_argument("--no-sweep", action="store_true", help="--formats: the measured defaults only")
    ap.add_argument("--precompile", type=int, default=min(12, os.cpu_count() or 1),
                    help="worker processes compiling the kernel variants first (0: off)")
    ap.add_argument("--prefill-cases", default="1x4096,1x16384,8x2048")
    ap.add_argument("--block-size", type=int, default=BS, help="vLLM block size of the paged caches")
    ap.add_argument("--profile", default="", help="B=64,S=4096,ratio=0.5,gs=1[,lat=int4@g32 or seg:..][,roped=1],"
                    "<LaunchConfig fields>: run that kernel 5 times and exit (for ncu; roped=1: the roped-key kernel)")
    ap.add_argument("--configs", default="", help="--formats: launch options tried instead of the built-in grid, "
                    "e.g. 'maxnreg=168;num_stages=2,maxnreg=168' (LaunchConfig fields)")
    ap.add_argument("--roped", action="store_true", help="--formats: also time each format in the roped-key mode")
    ap.add_argument("--roped-configs", default="", help="--roped: launch options tried besides the defaults "
                    "(as --configs)")
    ap.add_argument("--formats", default="", help=f"latent formats vs dense, e.g. '{DEFAULT_FORMATS}' ('default': "
                    "that list); runs only this sweep")
    args = ap.parse_args()
    CONFIGS[:] = parse_configs(args.configs)
    ROPED_CONFIGS[:] = parse_configs(args.roped_configs)
    BS = args.block_size
    if args.formats == "default":
        args.formats = DEFAULT_FORMATS
    TIMER["mode"] = args.timer
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.profile:
        kv = dict(x.split("=") for x in args.profile.split(","))
        B, S, gs = int(kv.pop("B")), int(kv.pop("S")), int(kv.pop("gs"))
        ratio = kv.pop("ratio")
        rk, rv, lat = variant_shapes(ratio if ratio == "int8" else float(ratio), gs)
        lat = kv.pop("lat", lat)
        if lat.startswith("seg:"):  # ranks from the segments
            lat, gs, rk, rv = format_shape(f"{lat}|gs{gs}")
        c = DecodeCase(B, S, gs, rk, rv, lat)
        roped = kv.pop("roped", "0") == "1"
        cfg = LaunchConfig.parse(",".join(f"{k}={v}" for k, v in kv.items()))
        if roped:
            c.setup_roped()
        for _ in range(5):
            c.run_kernel_roped(cfg) if roped else c.run_kernel(cfg)
        torch.cuda.synchronize()
        print("profiled", cfg)
        return
    props = torch.cuda.get_device_properties(0)
    results = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                   triton=triton.__version__, argv=sys.argv[1:], timer=args.timer, block_size=BS)
    bw, mm = measure_ceilings()
    results.update(copy_bw=bw, matmul_flops=mm)
    print(f"{results['date']} {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"triton {triton.__version__}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s", flush=True)
    if args.formats:
        if args.precompile:
            shapes = [format_shape(item, ratio) for item, ratio in parse_formats(args.formats)]
            jobs = [("decode", gs, rk, rv, spec, dataclasses.replace(cfg, num_splits=ns))
                    for spec, gs, rk, rv in shapes
                    for cfg in [LaunchConfig()] + ([] if args.no_sweep else format_configs(spec))
                    for ns in ((cfg.num_splits,) if cfg.num_splits else (1, 2))]
            if args.roped:
                jobs += [("roped", gs, rk, rv, spec, dataclasses.replace(cfg, num_splits=ns))
                         for spec, gs, rk, rv in shapes if not spec.startswith("seg:")
                         for cfg in [LaunchConfig()] + list(ROPED_CONFIGS)
                         for ns in ((cfg.num_splits,) if cfg.num_splits else (1, 2))]
            precompile(jobs, args.precompile)
        rows = run_formats(args, bw, mm, results)
        save_json(args, results)
        print()
        print(f"decode, one Llama-3-8B layer (32 q / 8 kv heads, d=128), gs=1, block size {BS}; "
              f"median ms ({args.timer})")
        print_formats_table(rows)
        if args.roped:
            print()
            print("roped keys vs pre-RoPE vs dense (measured defaults; bytes floor = bytes read / copy bandwidth)")
            print_roped_table(rows)
        print(f"\nJSON: {args.json}")
        return
    if args.precompile:
        cases_r = [0.5, 0.25] + (["int8"] if args.int8 else [])
        jobs = []
        for gs in [int(x) for x in args.group_sizes.split(",")]:
            for ratio in cases_r:
                if ratio == "int8" and gs != 1:
                    continue
                rk, rv, lat = variant_shapes(ratio, gs)
                for kc in kernel_configs(args.sweep, gs, ratio):
                    for ns in (1, 2):
                        jobs.append(("decode", gs, rk, rv, lat, dataclasses.replace(kc, num_splits=ns)))
        if args.no_decode:
            jobs = []
        if not args.no_prefill:
            for cfg in prefill_configs():
                jobs.append(("prefill", 1, HD // 2, HD // 2, "bfloat16", cfg))
        precompile(jobs, args.precompile)
    rows = run_decode(args, bw, mm, results) if not args.no_decode else []
    prow = None if args.no_prefill else run_prefill(args, bw, mm, results)
    save_json(args, results)
    print()
    print(f"decode, one Llama-3-8B layer (32 q / 8 kv heads, d=128), bf16, block size {BS}; median ms ({args.timer})")
    if rows:
        print_decode_table(rows)
    if prow:
        print()
        print_prefill_table(prow)
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
