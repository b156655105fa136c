"""Whole decode steps of a Llama-3-8B-shaped decoder on one GPU: dense bf16 KV against latent KV formats, each
holding as many 8k-token sequences as fit in one fixed KV budget, timed under CUDA graphs.

    PYTHONPATH=. python benchmarks/gpu_model_decode.py [--kv-gib 64] [--context 8192] [--formats default]
                                                       [--formats dense,bfloat16:64,bfloat16:64:roped,...]
                                                       [--json $OUT/gpu_model_decode.json]

vLLM cannot be installed on the GPU machine, so this stands in for a GPU vLLM run: a decoder with the shapes of
Llama-3-8B (32 layers, hidden 4096, 32 query / 8 KV heads of 128, MLP 14336, vocabulary 128256; random bf16
weights, RMSNorm, RoPE theta 500000) whose attention calls are, for a latent format, exactly the latent backend's
call on CUDA: ``kernels.triton_latent.latent_step`` (this step's latents encoded and written at their slots,
then the decode kernel over 64-token paged blocks) with the metadata vLLM passes (block table, cached lengths,
query start offsets, slot mapping, ``max_query_len=1``). The latent projections ``A_k, A_v`` are fused with Q into
one matmul as glue/latent.py does. The dense baseline keeps K and V in contiguous per-sequence bf16 caches and
runs PyTorch's SDPA (flash) with the 4 query heads of each KV head as its query rows, plus the k/v write.

A format may carry launch options after '|', joined by '+' (``LaunchConfig`` fields, e.g.
``int4@g32:112|maxnreg=168+tile_rotation=0``).
Per format: the largest batch whose caches fit ``--kv-gib`` at ``--context`` tokens per sequence (every sequence
full: the step reads ``context`` cached tokens and writes one), the whole step (32 layers + final norm + LM head)
captured in one CUDA graph, the median of ``--reps`` replays, tokens/s = batch / step time, and the attention
calls alone (their own graph) for the share of the step. Formats: ``dense`` or ``<latent dtype>:<rank>`` (rank of
K and of V per head group, group size 1), ``<latent dtype>:<rank>:gsN`` (head groups of N KV heads), optionally
``...:roped`` (before any '|').

``:roped``: the roped-key mode (``keys: roped``), as glue/latent.py runs it: the fused matmul gives Q, the full K
projection and the V latents (``x A_v``); RoPE on q and k; the K latent ``c_k = RoPE(k) A_k`` per head group
(random ``A_k [gdim, rank_k]``); each query head's latent query ``q_t = q_h B_k^T`` on its KV head's rows of B_k
(``reference.head_key_views``); then ``latent_step(..., roped_keys=True)``. Its attention time (the attention
calls alone) counts k's RoPE, the A_k projection and the q_t einsum, as the dense baseline's counts k's RoPE.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vllm_kvc.kernels import reference  # noqa: E402
from vllm_kvc.kernels import triton_latent as tk  # noqa: E402
from vllm_kvc.layout import LatentLayout  # noqa: E402

LAYERS, HIDDEN, HQ, HKV, HD, MLP, VOCAB = 32, 4096, 32, 8, 128, 14336, 128256
QPK = HQ // HKV
THETA = 500000.0
BLOCK = 64  # the latent backend's GPU block size (glue/backend.py, GPU_BLOCK_SIZE)
DEV = "cuda"
DEFAULT_FORMATS = "dense,bfloat16:64,int4@g32:112,bfloat16:32,int8:64,int4@g32:88"


def rope_tables(max_pos: int):
    inv_freq = 1.0 / (THETA ** (torch.arange(0, HD, 2, dtype=torch.float32, device=DEV) / HD))
    ang = torch.arange(max_pos, dtype=torch.float32, device=DEV)[:, None] * inv_freq[None, :]
    return torch.cat([ang.cos(), ang.sin()], -1).to(torch.bfloat16), inv_freq


def rope(x, cos_sin, pos):
    """Neox RoPE of x [B, H, HD] at positions pos [B]."""
    cs = cos_sin[pos][:, None, :]
    cos, sin = cs[..., : HD // 2], cs[..., HD // 2:]
    x1, x2 = x[..., : HD // 2], x[..., HD // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Shared:
    """The weights every format shares (o_proj, MLP, norms, LM head), random bf16."""

    def __init__(self, gen):
        def w(*shape):
            return (torch.randn(*shape, device=DEV, generator=gen, dtype=torch.bfloat16) / math.sqrt(shape[-1]))
        self.wo = [w(HIDDEN, HQ * HD) for _ in range(LAYERS)]
        self.w13 = [w(2 * MLP, HIDDEN) for _ in range(LAYERS)]
        self.w2 = [w(HIDDEN, MLP) for _ in range(LAYERS)]
        self.n1 = [torch.ones(HIDDEN, device=DEV, dtype=torch.bfloat16) for _ in range(LAYERS)]
        self.n2 = [torch.ones(HIDDEN, device=DEV, dtype=torch.bfloat16) for _ in range(LAYERS)]
        self.nf = torch.ones(HIDDEN, device=DEV, dtype=torch.bfloat16)
        self.lm = w(VOCAB, HIDDEN)


def split_roped(spec: str) -> tuple[str, bool]:
    """'bfloat16:64:roped' -> ('bfloat16:64', True); any other format -> (spec, False)."""
    if spec.endswith(":roped"):
        return spec[: -len(":roped")], True
    return spec, False


def parse_format(spec: str):
    if spec == "dense":
        return None
    lat, _, rank = spec.partition(":")
    rank, _, gs = rank.partition(":gs")  # 'int4@g32:128:gs2': head groups of 2 KV heads
    r, gs = int(rank), int(gs or 1)
    return LatentLayout(HKV // gs, gs, HD, r, r, lat)


def bytes_per_token(layout) -> int:
    """KV bytes per token per layer."""
    return 2 * HKV * HD * 2 if layout is None else layout.row_bytes


class Model:
    """One format's decoder: projections, caches and the decode step (eager; captured by the caller)."""

    config = None  # LaunchConfig of the latent calls (main sets it per format)

    def __init__(self, shared: Shared, layout, batch: int, context: int, gen, roped: bool = False):
        self.s, self.layout, self.B, self.S, self.roped = shared, layout, batch, context, roped
        if roped and layout is None:
            raise ValueError("roped keys need a latent format")
        # roped keys: the full K projection then the V latents (A_k is applied after RoPE, in attention())
        width = (HKV * 2 * HD if layout is None else
                 HKV * HD + layout.groups * layout.rank_v if roped else layout.width)
        self.wqkv = [(torch.randn(HQ * HD + width, HIDDEN, device=DEV, generator=gen, dtype=torch.bfloat16)
                      / math.sqrt(HIDDEN)) for _ in range(LAYERS)]
        self.cos_sin, self.inv_freq = rope_tables(context + 8)
        self.pos = torch.full((batch,), context - 1, dtype=torch.long, device=DEV)  # this step's token
        self.x = torch.randn(batch, HIDDEN, device=DEV, generator=gen, dtype=torch.bfloat16)
        self.attn_out = torch.empty(batch, HQ, HD, device=DEV, dtype=torch.bfloat16)
        if layout is None:
            self.k = [torch.randn(batch, HKV, context, HD, device=DEV, generator=gen, dtype=torch.bfloat16)
                      for _ in range(LAYERS)]
            self.v = [torch.randn_like(k) for k in self.k]
            self.rows = torch.arange(batch, device=DEV)
            return
        L = layout
        gdim = L.group_size * HD
        self.b_k = [(torch.randn(L.groups, L.rank_k, gdim, device=DEV, generator=gen) / math.sqrt(L.rank_k))
                    .to(torch.bfloat16) for _ in range(LAYERS)]
        self.b_v = [(torch.randn(L.groups, L.rank_v, gdim, device=DEV, generator=gen) / math.sqrt(L.rank_v))
                    .to(torch.bfloat16) for _ in range(LAYERS)]
        if roped:  # A_k per group [G, gdim, rank_k]; per query head its KV head's B_k rows [Hq, hd, rank_k]
            self.a_k = [(torch.randn(L.groups, gdim, L.rank_k, device=DEV, generator=gen) / math.sqrt(gdim))
                        .to(torch.bfloat16) for _ in range(LAYERS)]
            self.q_keys = [reference.head_key_views(bk, L, HQ).contiguous() for bk in self.b_k]
        nblk = -(-context // BLOCK)
        self.block_table = torch.randperm(batch * nblk, device=DEV, generator=gen).to(torch.int32).view(batch, nblk)
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32, device=DEV)
        self.qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEV)
        self.qsl_cpu = torch.arange(batch + 1, dtype=torch.int32)
        last = context - 1
        self.slots = (self.block_table[:, last // BLOCK].long() * BLOCK + last % BLOCK)
        # every cached row a valid encoding of random latents (a tile of them repeated over the cache)
        tile_lat = torch.randn(4096, L.width, device=DEV, generator=gen)
        tile = L.pack(tile_lat[:, : L.v_offset].reshape(-1, L.groups, L.rank_k),
                      tile_lat[:, L.v_offset:].reshape(-1, L.groups, L.rank_v))
        self.cache = []
        for _ in range(LAYERS):
            c = torch.empty(batch * nblk, BLOCK, L.row_elems, dtype=L.cache_dtype, device=DEV)
            flat = c.view(-1, L.row_elems)
            for i in range(0, flat.shape[0], tile.shape[0]):
                n = min(tile.shape[0], flat.shape[0] - i)
                flat[i:i + n] = tile[:n]
            self.cache.append(c)

    def attention(self, i: int, q, kv):
        """Layer i's attention call (this step's K/V or latents written, then attention over the cache)."""
        B = self.B
        if self.layout is None:
            k, v = kv.split(HKV * HD, -1)
            k = rope(k.view(B, HKV, HD), self.cos_sin, self.pos)
            self.k[i][self.rows, :, self.pos] = k
            self.v[i][self.rows, :, self.pos] = v.view(B, HKV, HD)
            o = F.scaled_dot_product_attention(q.view(B, HKV, QPK, HD), self.k[i], self.v[i], scale=HD ** -0.5)
            self.attn_out.copy_(o.view(B, HQ, HD))
            return self.attn_out
        if self.roped:  # glue/latent.py kvc_forward + kvc_attend, roped_keys
            L = self.layout
            k, lat_v = kv.split([HKV * HD, L.groups * L.rank_v], -1)
            k = rope(k.reshape(B, HKV, HD), self.cos_sin, self.pos)
            lat_k = torch.einsum("ngd,gdr->ngr", k.reshape(B, L.groups, L.group_size * HD), self.a_k[i])
            lat = torch.cat([lat_k.flatten(1), lat_v], -1)
            q_t = torch.einsum("nhd,hdr->nhr", q, self.q_keys[i])
            return tk.latent_step(q_t, lat, self.cache[i], L, self.slots, self.block_table, self.seq_lens,
                                  self.qsl, self.b_k[i], self.b_v[i], None, None, self.cos_sin, HD ** -0.5, True,
                                  out=self.attn_out, max_query_len=1, query_start_loc_cpu=self.qsl_cpu,
                                  inv_freq=self.inv_freq, config=self.config, roped_keys=True)
        return tk.latent_step(q, kv, self.cache[i], self.layout, self.slots, self.block_table, self.seq_lens,
                              self.qsl, self.b_k[i], self.b_v[i], None, None, self.cos_sin, HD ** -0.5, True,
                              out=self.attn_out, max_query_len=1, query_start_loc_cpu=self.qsl_cpu,
                              inv_freq=self.inv_freq, config=self.config)

    def step(self):
        s, B, x = self.s, self.B, self.x
        for i in range(LAYERS):
            h = F.rms_norm(x, (HIDDEN,), s.n1[i])
            qkv = h @ self.wqkv[i].t()
            q = rope(qkv[:, : HQ * HD].view(B, HQ, HD), self.cos_sin, self.pos)
            a = self.attention(i, q.contiguous(), qkv[:, HQ * HD:].contiguous())
            x = x + a.view(B, HQ * HD) @ s.wo[i].t()
            g, u = (F.rms_norm(x, (HIDDEN,), s.n2[i]) @ s.w13[i].t()).chunk(2, -1)
            x = x + (F.silu(g) * u) @ s.w2[i].t()
        return F.rms_norm(x, (HIDDEN,), s.nf) @ s.lm.t()

    def attention_only(self):
        q = torch.zeros(self.B, HQ, HD, device=DEV, dtype=torch.bfloat16)
        kv = torch.zeros(self.B, self.wqkv[0].shape[0] - HQ * HD, device=DEV, dtype=torch.bfloat16)
        for i in range(LAYERS):
            self.attention(i, q, kv)


def graph_ms(fn, reps: int) -> float:
    """Median ms of replays of a CUDA graph of ``fn`` (warmed up eagerly on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del g
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kv-gib", type=float, default=64.0)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--formats", default="default")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "gpu_model_decode.json"))
    a = ap.parse_args()
    formats = (DEFAULT_FORMATS if a.formats == "default" else a.formats).split(",")
    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(0)
    res = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), device=props.name,
               torch=torch.__version__, kv_gib=a.kv_gib, context=a.context, argv=sys.argv[1:], runs=[])
    print(f"{res['date']} {props.name}, torch {torch.__version__}; KV budget {a.kv_gib} GiB, {a.context}-token "
          f"sequences, {LAYERS} layers", flush=True)
    gen = torch.Generator(device=DEV).manual_seed(0)
    shared = Shared(gen)
    dense_bpt = bytes_per_token(None)
    for spec in formats:
        fmt, _, cfg_text = spec.partition("|")  # 'int4@g32:112|maxnreg=168+tile_rotation=0': launch options
        fmt, roped = split_roped(fmt)  # 'bfloat16:64:roped': roped keys
        layout = parse_format(fmt)
        bpt = bytes_per_token(layout)
        per_seq = bpt * LAYERS * (-(-a.context // BLOCK) * BLOCK)
        batch = min(a.max_batch, int(a.kv_gib * 2 ** 30 // per_seq))
        m = Model(shared, layout, batch, a.context, gen, roped)
        if cfg_text:
            m.config = tk.LaunchConfig.parse(cfg_text, sep="+")
        step_ms = graph_ms(m.step, a.reps)
        attn_ms = graph_ms(m.attention_only, a.reps)
        run = dict(format=spec, bytes_per_token_layer=bpt, fraction_of_bf16=bpt / dense_bpt, batch=batch,
                   kv_gib_used=batch * per_seq / 2 ** 30, step_ms=step_ms, attention_ms=attn_ms,
                   tokens_per_s=batch / step_ms * 1e3)
        if roped:
            run["keys"] = "roped"
        res["runs"].append(run)
        print(f"{spec:>16}: {bpt / dense_bpt:6.1%} of bf16, batch {batch:4d}, step {step_ms:7.2f} ms "
              f"(attention {attn_ms:6.2f} ms), {run['tokens_per_s']:8.0f} tokens/s", flush=True)
        del m
        torch.cuda.empty_cache()
        with open(a.json, "w") as f:  # the runs so far (a call stopped at its limit keeps them)
            json.dump(res, f, indent=1)
    base = next((r for r in res["runs"] if r["format"] == "dense"), None)
    print("\n| format | % of bf16 KV bytes | sequences in budget | step ms | attention ms | tokens/s | vs dense |")
    print("|---|---|---|---|---|---|---|")
    for r in res["runs"]:
        rel = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        print(f"| {r['format']} | {r['fraction_of_bf16']:.1%} | {r['batch']} | {r['step_ms']:.2f} | "
              f"{r['attention_ms']:.2f} | {r['tokens_per_s']:.0f} | {rel} |")
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nJSON: {a.json}")


if __name__ == "__main__":
    main()
