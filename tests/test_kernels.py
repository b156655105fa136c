"""Latent paged attention: the torch reference against plain dense attention, and the Triton kernels against the
reference, on fresh random inputs.

Without a GPU the Triton kernels run under ``TRITON_INTERPRET=1`` on CPU tensors (small shapes, CI). With a GPU
(``torch.cuda.is_available()``) the same tests run the compiled kernels, plus larger shapes.
"""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch

from vllm_kvc.kernels import reference as ref
from vllm_kvc.layout import LatentLayout

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton_latent
DEV = torch.device("cuda" if CUDA else "cpu")

_seed = [1234]


def fresh_gen() -> torch.Generator:
    _seed[0] += 1
    return torch.Generator().manual_seed(_seed[0] * 7919 + int.from_bytes(os.urandom(2), "little"))


def rope_cache(max_pos: int, rot: int, base: float = 10000.0, dtype=torch.float32) -> torch.Tensor:
    inv = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([ang.cos(), ang.sin()], -1).to(dtype)


def rope_inv_freq(rot: int, base: float = 10000.0) -> torch.Tensor:
    """vLLM's inverse frequencies (fp32)."""
    return 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float) / rot)


def rope_complex(x: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Independent RoPE (complex multiply) for checking the reference: x [T, H, hd] float64."""
    rot = cache.shape[-1]
    c = cache.double()[pos]
    rotor = torch.complex(c[:, : rot // 2], c[:, rot // 2:])[:, None, :]  # cos + i sin
    xr = x[..., :rot]
    if is_neox:
        z = torch.complex(xr[..., : rot // 2], xr[..., rot // 2:]) * rotor
        out = torch.cat([z.real, z.imag], -1)
    else:
        z = torch.complex(xr[..., 0::2], xr[..., 1::2]) * rotor
        out = torch.stack([z.real, z.imag], -1).flatten(-2)
    return torch.cat([out, x[..., rot:]], -1)


def make_case(seq_lens, q_lens, *, G, gs, qpk, hd, rk, rv, bs, lat_dtype="bfloat16", dtype=torch.bfloat16,
              bias=False, is_neox=True, rot=None, device=DEV, gen=None):
    """Random latent paged KV for len(seq_lens) requests; unused cache slots hold NaN (or NaN scales for int8)."""
    gen = gen or fresh_gen()
    layout = LatentLayout(G, gs, hd, rk, rv, lat_dtype)
    R = len(seq_lens)
    hq = G * gs * qpk
    nblk = [(s + bs - 1) // bs for s in seq_lens]
    total = sum(nblk) + 3
    phys = torch.randperm(total, generator=gen)
    bt = torch.zeros(R, max(nblk) + 2, dtype=torch.int32)
    k = 0
    for r, n in enumerate(nblk):
        bt[r, :n] = phys[k:k + n].int()
        k += n
    if layout.quantized:
        cache = torch.full((total, bs, layout.row_elems), 0xFF, dtype=torch.uint8)  # NaN fp16 scales
    else:
        cache = torch.full((total, bs, layout.row_elems), float("nan"), dtype=layout.cache_dtype)
    lat = []
    for r, s in enumerate(seq_lens):
        ck = torch.randn(s, G, rk, generator=gen)
        cv = torch.randn(s, G, rv, generator=gen)
        pos = torch.arange(s)
        slots = bt[r, pos // bs].long() * bs + pos % bs
        ref.write_latents(cache, slots, layout, ck, cv)
        lat.append((ck, cv))
    b_k = (torch.randn(G, rk, gs * hd, generator=gen) / math.sqrt(rk)).to(dtype)
    b_v = (torch.randn(G, rv, gs * hd, generator=gen) / math.sqrt(rv)).to(dtype)
    bias_k = (0.5 * torch.randn(G * gs * hd, generator=gen)).to(dtype) if bias else None
    bias_v = (0.5 * torch.randn(G * gs * hd, generator=gen)).to(dtype) if bias else None
    rot = rot or hd
    cs = rope_cache(max(seq_lens) + 7, rot, dtype=dtype)
    n_tok = sum(q_lens)
    q = torch.randn(n_tok, hq, hd, generator=gen).to(dtype)
    qsl = torch.zeros(R + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    args = dict(q=mv(q), kv_cache=mv(cache), layout=layout, block_table=mv(bt), seq_lens=mv(sl),
                query_start_loc=mv(qsl), b_k=mv(b_k), b_v=mv(b_v), bias_k=mv(bias_k), bias_v=mv(bias_v),
                cos_sin_cache=mv(cs), scale=hd ** -0.5, is_neox=is_neox)
    return args, lat


def ref_out(args) -> torch.Tensor:
    a = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in args.items()}
    out = torch.empty(a["q"].shape, dtype=torch.float64)  # keep the oracle's output unrounded
    return ref.latent_attention(**a, out=out, compute_dtype=torch.float64)


def rel_err(out, expect) -> float:
    out, expect = out.detach().double().cpu(), expect.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output (unwritten element or NaN read)"
    return float((out - expect).norm() / expect.norm())


# ------------------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize("is_neox,rot,bias,gs,qpk", [(True, None, False, 1, 2), (False, None, True, 2, 1),
                                                     (True, 16, True, 2, 3), (False, 16, False, 1, 4)])
def test_reference_matches_dense_attention(is_neox, rot, bias, gs, qpk):
    """Reference latent attention == dense causal attention on keys/values rebuilt independently (fp64)."""
    G, hd = 2, 32
    gen = fresh_gen()
    seq_lens, q_lens = [9, 23, 17], [9, 1, 6]
    args, lat = make_case(seq_lens, q_lens, G=G, gs=gs, qpk=qpk, hd=hd, rk=gs * hd, rv=gs * hd, bs=4,
                          lat_dtype="float32", dtype=torch.float32, bias=bias, is_neox=is_neox, rot=rot,
                          device=torch.device("cpu"), gen=gen)
    out = ref_out(args)
    qsl = args["query_start_loc"].tolist()
    hkv = G * gs
    for r, (ck, cv) in enumerate(lat):
        s = seq_lens[r]
        k = torch.einsum("tgr,grd->tgd", ck.double(), args["b_k"].double()).reshape(s, hkv, hd)
        v = torch.einsum("tgr,grd->tgd", cv.double(), args["b_v"].double()).reshape(s, hkv, hd)
        if bias:
            k = k + args["bias_k"].double().view(hkv, hd)
            v = v + args["bias_v"].double().view(hkv, hd)
        k = rope_complex(k, torch.arange(s), args["cos_sin_cache"], is_neox)
        qr = args["q"][qsl[r]:qsl[r + 1]].double()
        expect = ref.dense_reference(qr, k, v, args["scale"])
        assert rel_err(out[qsl[r]:qsl[r + 1]], expect) < 1e-6  # out is stored in q.dtype (fp32)


def test_reference_full_rank_identity_factor_is_dense():
    """With gs*hd = rank and B = I, the latents are the dense K/V: reference == dense attention."""
    G, gs, hd, qpk = 2, 1, 32, 2
    args, lat = make_case([13, 30], [13, 1], G=G, gs=gs, qpk=qpk, hd=hd, rk=hd, rv=hd, bs=8, lat_dtype="float32",
                          dtype=torch.float32, device=torch.device("cpu"))
    eye = torch.eye(hd).expand(G, hd, hd).contiguous()
    args["b_k"], args["b_v"] = eye, eye.clone()
    out = ref_out(args)
    qsl = args["query_start_loc"].tolist()
    for r, (ck, cv) in enumerate(lat):
        k = rope_complex(ck.double(), torch.arange(ck.shape[0]), args["cos_sin_cache"], True)
        expect = ref.dense_reference(args["q"][qsl[r]:qsl[r + 1]].double(), k, cv.double(), args["scale"])
        assert rel_err(out[qsl[r]:qsl[r + 1]], expect) < 1e-6  # out is stored in q.dtype (fp32)


@pytest.mark.parametrize("lens,nqs", [([9, 23, 17, 30], [9, 1, 1, 1]), ([12, 12], [1, 1]), ([20], [5])])
def test_reference_roped_keys_score_the_latents(lens, nqs):
    """Roped keys: the cached K latent is scored by each head's ``q B_k^T`` (no rebuild, no RoPE at attention):
    equal to dense attention over the keys ``c_k B_k`` as they are (ragged decode batch, equal-length batch and
    a chunk of a prompt alike), values with B_v and bias."""
    G, gs, qpk, hd, rk = 2, 2, 3, 16, 20
    args, lat = make_case(lens, nqs, G=G, gs=gs, qpk=qpk, hd=hd, rk=rk, rv=24, bs=4, lat_dtype="float32",
                          dtype=torch.float32, bias=True, device=torch.device("cpu"))
    a = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in args.items()}
    lay, hq = a["layout"], a["q"].shape[1]
    views = ref.head_key_views(a["b_k"], lay, hq)
    assert views.shape == (hq, hd, rk)
    qt = torch.einsum("nhd,hdr->nhr", a["q"].double(), views.double())
    a["q"] = qt
    out = ref.latent_attention(**a, out=torch.empty(qt.shape[0], hq, hd, dtype=torch.float64),
                               compute_dtype=torch.float64, roped_keys=True)
    qsl = a["query_start_loc"].tolist()
    for r, (ck, cv) in enumerate(lat):
        s = lens[r]
        k = torch.einsum("tgr,grd->tgd", ck.double(), a["b_k"].double()).reshape(s, G * gs, hd)
        v = torch.einsum("tgr,grd->tgd", cv.double(), a["b_v"].double()).reshape(s, G * gs, hd)
        v = v + a["bias_v"].double().view(G * gs, hd)
        expect = ref.dense_reference(args["q"][qsl[r]:qsl[r + 1]].double(), k, v, a["scale"])
        assert rel_err(out[qsl[r]:qsl[r + 1]], expect) < 1e-6


# ------------------------------------------------------------------------------------------------ Triton kernels
tl_mod = None


def kernels():
    global tl_mod
    if tl_mod is None:
        pytest.importorskip("triton")
        from vllm_kvc.kernels import triton_latent
        tl_mod = triton_latent
    return tl_mod


TOL = 1e-2


def split_kw(call_kw):
    """A case's keyword arguments -> (those of latent_attention, the LaunchConfig of the launch options)."""
    tk = kernels()
    names = {f.name for f in dataclasses.fields(tk.LaunchConfig)}
    cfg = tk.LaunchConfig(**{k: v for k, v in call_kw.items() if k in names})
    return {k: v for k, v in call_kw.items() if k not in names}, cfg


def plan_of(args, cfg, max_query_len=None, inv_freq=None, long_prompts=False, roped=False):
    """The plan latent_attention follows for a case (the same sizes and config it passes to plan_launch)."""
    tk = kernels()
    q, R = args["q"], args["seq_lens"].shape[0]
    qsl = args["query_start_loc"].tolist()
    angles_ok = inv_freq is not None and tk.angles_match(args["cos_sin_cache"].cpu(), inv_freq.cpu())
    return tk.plan_launch(args["layout"], q.shape[1], q.shape[0], R, max_query_len=max_query_len, config=cfg,
                          angles_ok=angles_ok,
                          query_lens=[qsl[r + 1] - qsl[r] for r in range(R)] if long_prompts else None,
                          seq_lens=args["seq_lens"].tolist() if long_prompts else None,
                          block_size=args["kv_cache"].shape[1], explicit_ok=explicit_kernel().device_ok(q), roped=roped)


def explicit_kernel():
    from vllm_kvc.kernels.triton_latent import explicit
    return explicit

def test_plan_takes_the_explicit_kernel_where_it_serves():
    """One-query-per-request batches of roped int4@g32 or int8/int4@g32 at even ranks up to 256 in 64-token blocks
    take the explicit-layout kernel where the device suits it, with KV splits by the resident-program rule (4 per SM, 5
    under a 96-register cap), head groups of several KV heads included; anything else (pre-RoPE keys, odd ranks,
    other blocks, a sink, 16 query heads per head group, prompts, explicit=False, a device that does not suit) keeps
    the Triton kernels."""
    tk = kernels()
    ex = explicit_kernel()
    lay = LatentLayout(8, 1, 128, 128, 128, "int4@g32")
    kw = dict(max_query_len=1, roped=True, block_size=64, explicit_ok=True, sms=132, max_ctx=16384)
    if not ex.AVAILABLE:
        pytest.skip("this triton has no Gluon")
    assert tk.plan_launch(lay, 32, 64, 64, **kw).config.num_splits == 1  # 512 programs fill 528 slots
    p = tk.plan_launch(lay, 32, 16, 16, **kw)
    assert (p.kernel, p.direct, p.config.num_splits, p.config.block_t, p.config.num_warps) == ("explicit", True, 4, 64, 4)
    assert tk.plan_launch(lay, 32, 16, 16, **kw, config=tk.LaunchConfig(num_splits=2)).config.num_splits == 2
    other = [dict(kw, roped=False), dict(kw, block_size=16), dict(kw, sink=True), dict(kw, explicit_ok=False),
             dict(kw, config=tk.LaunchConfig(explicit=False))]
    for k in other:
        assert tk.plan_launch(lay, 32, 16, 16, **k).kernel != "explicit", k
    for rk, rv in ((112, 112), (48, 80), (128, 2)):
        assert tk.plan_launch(LatentLayout(8, 1, 128, rk, rv, "int4@g32"), 32, 16, 16, **kw).kernel == "explicit"
    assert tk.plan_launch(LatentLayout(8, 1, 128, 113, 112, "int4@g32"), 32, 16, 16, **kw).kernel == "decode"
    for spec, kernel in (("int8/int4@g32", "explicit"), ("int8/int4", "decode"), ("int8@g32", "decode")):
        assert tk.plan_launch(LatentLayout(8, 1, 128, 128, 120, spec), 32, 16, 16, **kw).kernel == kernel, spec
    assert ex.per_sm() == 4 and ex.per_sm(96) == 5
    assert tk.plan_launch(LatentLayout(2, 1, 128, 128, 128, "int4@g32"), 32, 16, 16, **kw).kernel == "decode"
    # head groups of 2 KV heads: their 8 query heads are the score tile's 8 columns; of 4: 16, too many
    for gs, spec, kernel in ((2, "int4@g32", "explicit"), (2, "int8/int4@g32", "explicit"), (4, "int4@g32", "generic")):
        assert tk.plan_launch(LatentLayout(8 // gs, gs, 128, 128, 96, spec), 32, 16, 16, **kw).kernel == kernel, gs
    # ranks above 128 (up to 256: two K tiles, two value accumulators) at a register cap of 168: 3 programs per SM
    for rk, rv, kernel in ((256, 256, "explicit"), (224, 136, "explicit"), (255, 256, "generic")):
        lay2 = LatentLayout(4, 2, 128, rk, rv, "int8/int4@g32")
        assert tk.plan_launch(lay2, 32, 16, 16, **kw).kernel == kernel, (rk, rv)
    assert ex.default_maxnreg(LatentLayout(4, 2, 128, 224, 128, "int4@g32")) == 168 and ex.per_sm(168) == 3
    assert ex.default_maxnreg(lay) == 128
    assert tk.plan_launch(lay, 32, 40, 16, **dict(kw, max_query_len=9)).kernel != "explicit"
    # the fragment permutations are permutations of the 128 coordinates, and each thread's are contiguous bytes
    assert sorted(ex.k_rank(k) for k in range(128)) == list(range(128))
    assert sorted(ex.v_rank(m) for m in range(128)) == list(range(128))
    for a in range(4):  # K: thread lane % 4 = a holds positions 2a + {0, 1} + 8 j: bytes 16a .. 16a + 15
        pos = [2 * a + r0 + 8 * j for j in range(16) for r0 in (0, 1)]
        assert sorted(ex.k_rank(k) // 2 for k in pos) == sorted(list(range(16 * a, 16 * a + 16)) * 2)
    for c in range(8):  # V: thread lane // 4 = c holds rows c + 8 t: bytes 8c .. 8c + 7
        assert sorted(ex.v_rank(c + 8 * t) // 2 for t in range(16)) == sorted(list(range(8 * c, 8 * c + 8)) * 2)


_COMPILE_EXPLICIT = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from vllm_kvc.kernels.triton_latent import explicit as ex
from vllm_kvc.kernels.triton_latent.config import row_format
from vllm_kvc.layout import LatentLayout
rk, rv, stages, lazy, gs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[5] == "1", int(sys.argv[6])
lay = LatentLayout(8 // gs, gs, 128, rk, rv, sys.argv[4])
kf, vf = row_format(lay)
types = {"q_ptr": "*bf16", "cache_ptr": "*u8", "bt_ptr": "*i32", "seq_lens_ptr": "*i32", "pm_ptr": "*fp32",
         "pl_ptr": "*fp32", "pacc_ptr": "*fp32", "qk_scale": "fp32"}
const = dict(G=8 // gs, QPK=4 * gs, RK=rk, RV=rv, RV_P=max(16, 1 << (rv - 1).bit_length()), K_SOFF=kf.soff, V_OFF=vf.off,
             V_SOFF=vf.soff, BS=64, STAGES=stages, K_BITS=lay.bits_k, LAZY_MAX=lazy)
fn = ex._roped_int4_decode
sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in fn.arg_names}
names = list(sig)  # 16-byte aligned pointers and strides, as a launch on a cache of 16-byte rows specialises it
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or n.startswith("stride_")}
ck = triton.compile(GluonASTSource(fn, signature=sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                    options=dict(num_warps=4))
ptx = ck.asm["ptx"]
print("SHARED", ck.metadata.shared, "MMA", ptx.count("mma.sync.aligned.m16n8k16"), "LDS", ptx.count("ld.shared"),
      "CPASYNC", ptx.count("cp.async.cg") + ptx.count("cp.async.ca"))
"""


@pytest.mark.parametrize("rk,rv,stages,dtype,lazy,gs", [
    (128, 128, 0, "int4@g32", 0, 1), (120, 72, 0, "int4@g32", 0, 1), (128, 128, 4, "int4@g32", 0, 1),
    (120, 72, 2, "int4@g32", 0, 1), (128, 128, 0, "int8/int4@g32", 0, 1), (120, 72, 0, "int8/int4@g32", 0, 1),
    (112, 112, 0, "int4@g32", 1, 1), (128, 96, 0, "int8/int4@g32", 1, 1), (224, 224, 0, "int4@g32", 0, 2),
    (256, 136, 0, "int8/int4@g32", 0, 2), (200, 240, 0, "int4@g32", 1, 2)])
def test_explicit_kernel_compiles_for_hopper(rk, rv, stages, dtype, lazy, gs):
    """The explicit-layout kernel compiles for sm_90 with the installed Triton (no GPU needed; outside the
    interpreter, in a subprocess), at full rank and at ranks below it: its layout conversions between the decoded
    tiles and the mma operands are register renames (``assert_trivial``, checked by the compiler); with stages=0 it
    uses no shared memory, with rings of 2 or 4 blocks their bytes (8 KB a block) filled by cp.async; 4- and 8-bit
    keys (the latter as fp16 operands); with the first block's max as the softmax reference (lazy); head groups of
    2 KV heads at ranks above 128 (two K tiles, two value accumulators)."""
    if not explicit_kernel().AVAILABLE:
        pytest.skip("this triton has no Gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _COMPILE_EXPLICIT, str(rk), str(rv), str(stages), dtype, str(lazy),
                        str(gs)],
                       env=env, cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    _, shared, _, mma, _, lds, _, cp_async = r.stdout.split()[-8:]
    # (lazy_max: the one cross-warp reduction, whether to sweep again, takes a few bytes)
    assert (int(shared) <= 64 if lazy else int(shared) == 8192 * stages) and int(mma) >= 16 * (1 + (rk > 128)), r.stdout
    assert (int(lds) > 0, int(cp_async) > 0) == (stages > 0 or bool(lazy), stages > 0), r.stdout


def test_plan_gives_nibble_tiles_32_tokens():
    """Decode plans of layouts read as even / odd nibble tiles never use 16-token tiles (wrong results on the H200
    with triton 3.6); other layouts keep the tiles they ask for."""
    tk = kernels()
    nib = LatentLayout(2, 1, 64, 48, 32, "int4")
    bf = LatentLayout(2, 1, 64, 48, 32, "bfloat16")
    for lay, want in ((nib, 32), (bf, 16)):
        plan = tk.plan_launch(lay, 6, 2, 2, max_query_len=1, config=tk.LaunchConfig(block_t=16))
        assert plan.kernel == "decode" and plan.config.block_t == want, (lay.dtype, plan)
    plan = tk.plan_launch(nib, 6, 2, 2, max_query_len=1, config=tk.LaunchConfig(block_t=64))
    assert plan.config.block_t == 64


def test_plan_roped_integer_decode_caps_registers_and_fills_slots():
    """Roped keys with packed integer latents of ranks <= 128 at one KV head per program: registers capped at 128 (4
    programs of 4 warps per SM) and KV splits that fill 90 % of those slots (132 SMs: 528); pre-RoPE keys, float
    latents, two heads per program, rank 256 and an explicit cap keep the compiler's registers or the asked cap
    (splits: ~2 programs per SM without a cap)."""
    tk = kernels()
    lay = LatentLayout(8, 1, 128, 128, 128, "int8/int4@g32")
    want = {(64, 4096): 1, (157, 8192): 1, (48, 16384): 2, (32, 4096): 2, (16, 16384): 4, (8, 4096): 8,
            (4, 16384): 16, (1, 16384): 16, (1, 512): 2}
    for (b, s), n in want.items():
        plan = tk.plan_launch(lay, 32, b, b, max_query_len=1, max_ctx=s, sms=132, roped=True)
        assert (plan.kernel, plan.config.maxnreg, plan.config.num_splits) == ("decode", 128, n), (b, s, plan)
    others = ((lay, False, None, 0, 2), (LatentLayout(8, 1, 128, 64, 64, "bfloat16"), True, None, 0, 2),
              (lay, True, tk.LaunchConfig(heads=2), 0, 4), (lay, True, tk.LaunchConfig(maxnreg=0), 0, 2),
              (lay, True, tk.LaunchConfig(maxnreg=96), 96, 8), (LatentLayout(4, 1, 256, 256, 256, "int4@g32"), True,
                                                                 None, 0, 4))
    for lay2, roped, cfg, reg, n in others:
        plan = tk.plan_launch(lay2, 32, 16, 16, max_query_len=1, max_ctx=16384, sms=132, roped=roped, config=cfg)
        assert (plan.config.maxnreg, plan.config.num_splits) == (reg, n), (lay2.dtype, roped, cfg, plan)


# (name, seq_lens, q_lens, case kwargs, call kwargs); small enough for the CPU interpreter
CASES = [
    ("decode_gs1", [1, 37, 70], [1, 1, 1], dict(G=2, gs=1, qpk=2, hd=32, rk=16, rv=24, bs=16), dict(max_query_len=1)),
    ("decode_split_bs5", [3, 61, 90], [1, 1, 1], dict(G=2, gs=1, qpk=4, hd=32, rk=32, rv=16, bs=5),
     dict(max_query_len=1, num_splits=4, block_t=16)),
    ("decode_generic_split", [45, 8, 33], [1, 1, 1], dict(G=1, gs=2, qpk=3, hd=32, rk=48, rv=40, bs=8, bias=True),
     dict(num_splits=2, block_t=16)),
    ("prefill_chunked_mixed", [5, 40, 50, 21], [5, 1, 19, 0], dict(G=2, gs=1, qpk=2, hd=32, rk=24, rv=32, bs=16),
     dict()),
    ("prefill_gs2_gptj_partial_bias", [29, 18], [29, 7], dict(G=1, gs=2, qpk=2, hd=32, rk=40, rv=64, bs=8,
                                                              bias=True, is_neox=False, rot=16), dict(block_t=16)),
    ("int8_decode", [2, 77, 40], [1, 1, 1], dict(G=2, gs=1, qpk=2, hd=32, rk=32, rv=32, bs=16, lat_dtype="int8"),
     dict(max_query_len=1, num_splits=2, block_t=32)),
    ("int8_prefill_gs2", [33, 12], [9, 12], dict(G=1, gs=2, qpk=1, hd=32, rk=48, rv=24, bs=4, lat_dtype="int8",
                                                 bias=True), dict(block_t=16)),
    ("fp16_fp32lat_gqa1", [26, 19], [3, 1], dict(G=2, gs=1, qpk=1, hd=64, rk=16, rv=16, bs=16,
                                                 lat_dtype="float32", dtype=torch.float16), dict()),
    ("gs4_rank_chunked", [41], [1], dict(G=1, gs=4, qpk=1, hd=32, rk=96, rv=32, bs=16), dict(max_query_len=1)),
    # blocks holding whole tiles (one block id per tile; two tiles per block)
    ("decode_whole_tile_blocks_split", [3, 61, 90], [1, 1, 1], dict(G=2, gs=1, qpk=4, hd=32, rk=32, rv=16, bs=32),
     dict(max_query_len=1, num_splits=3, block_t=16)),
    ("int8_prefill_whole_tile_blocks", [33, 70], [9, 1], dict(G=1, gs=2, qpk=1, hd=32, rk=48, rv=24, bs=32,
                                                              lat_dtype="int8"), dict(block_t=16)),
]
if CUDA:  # larger shapes only with a GPU (too slow for the interpreter)
    CASES += [
        ("gpu_llama_decode_r05", [4096, 1, 777, 3001], [1] * 4, dict(G=8, gs=1, qpk=4, hd=128, rk=64, rv=64, bs=16),
         dict(max_query_len=1)),
        ("gpu_llama_decode_r025_gs2", [2049, 513, 100], [1] * 3, dict(G=4, gs=2, qpk=4, hd=128, rk=64, rv=64, bs=16),
         dict(max_query_len=1)),
        ("gpu_llama_prefill_chunked", [1000, 300, 517], [1000, 1, 77], dict(G=8, gs=1, qpk=4, hd=128, rk=64, rv=64,
                                                                           bs=16), dict()),
        ("gpu_int8_decode", [3000, 17], [1, 1], dict(G=8, gs=1, qpk=4, hd=128, rk=32, rv=32, bs=16,
                                                     lat_dtype="int8"), dict(max_query_len=1)),
        ("gpu_gs4_r025_prefill", [700, 129], [1, 129], dict(G=2, gs=4, qpk=4, hd=128, rk=128, rv=128, bs=16), dict()),
        ("gpu_llama_prefill_chunked_bs64", [1000, 300, 517], [1000, 1, 77], dict(G=8, gs=1, qpk=4, hd=128, rk=64,
                                                                                rv=64, bs=64), dict()),
        ("gpu_int8_decode_bs64", [3000, 17], [1, 1], dict(G=8, gs=1, qpk=4, hd=128, rk=32, rv=32, bs=64,
                                                          lat_dtype="int8"), dict(max_query_len=1)),
    ]


VARIANTS = [dict(), dict(pieces=2)]
VARIANT_IDS = ["default", "p2"]


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("name,seq_lens,q_lens,case_kw,call_kw", CASES, ids=[c[0] for c in CASES])
def test_triton_matches_reference(name, seq_lens, q_lens, case_kw, call_kw, variant):
    tk = kernels()
    args, _ = make_case(seq_lens, q_lens, **case_kw)
    expect = ref_out(args)
    out = torch.full_like(args["q"], float("nan"))
    kw, cfg = split_kw(dict(call_kw, **variant))
    tk.latent_attention(**args, out=out, config=cfg, **kw)
    err = rel_err(out, expect)
    assert err < TOL, f"{name}: rel err {err:.3e}"


# the multi-head decode kernel (_latent_decode_heads: gs == 1 float latents, one query per program)
HEADS_CASES = [
    ("heads4_decode", [1, 37, 70], [1, 1, 1], dict(G=4, gs=1, qpk=4, hd=32, rk=16, rv=24, bs=16),
     dict(max_query_len=1, heads=4, block_t=16)),
    ("heads2_split_bias", [3, 61, 90], [1, 1, 1], dict(G=4, gs=1, qpk=2, hd=32, rk=32, rv=16, bs=5, bias=True),
     dict(max_query_len=1, heads=2, num_splits=4, block_t=16)),
    ("heads2_varlen_gptj_partial", [5, 40, 50, 21], [2, 1, 3, 0], dict(G=2, gs=1, qpk=3, hd=32, rk=24, rv=32, bs=16,
                                                                      is_neox=False, rot=16),
     dict(heads=2, block_t=16)),
    # RoPE as R(t0 + i) = R(t0) R(i): keys turned by their offset in the tile, queries back by the tile's start
    ("tile_rot_heads2_split_bias", [3, 61, 90], [1, 1, 1], dict(G=4, gs=1, qpk=2, hd=32, rk=32, rv=16, bs=5,
                                                                 bias=True),
     dict(max_query_len=1, heads=2, num_splits=4, block_t=16, tile_rotation=True, lazy_max=True)),
    ("tile_rot_heads1_varlen_gptj_partial", [5, 40, 50, 21], [2, 1, 3, 0], dict(G=2, gs=1, qpk=3, hd=32, rk=24,
                                                                               rv=32, bs=16, is_neox=False, rot=16),
     dict(heads=1, block_t=16, tile_rotation=True)),
    ("late_sum_heads2_split_bias", [3, 61, 90], [1, 1, 1], dict(G=4, gs=1, qpk=2, hd=32, rk=32, rv=16, bs=5,
                                                                 bias=True),
     dict(max_query_len=1, heads=2, num_splits=4, block_t=16)),
    ("late_sum_heads2_split_varlen", [3, 61, 90, 40], [1, 1, 2, 1], dict(G=4, gs=1, qpk=2, hd=32, rk=32, rv=16,
                                                                          bs=5),
     dict(heads=2, num_splits=2, block_t=16)),
    ("lazy_max_heads2_split_varlen", [3, 61, 90, 40], [1, 1, 2, 1], dict(G=4, gs=1, qpk=2, hd=32, rk=32, rv=16,
                                                                          bs=5, bias=True),
     dict(heads=2, num_splits=2, block_t=16, lazy_max=True)),
    ("lazy_max_heads2_whole_tile_blocks", [3, 61, 90, 40], [1, 1, 2, 1], dict(G=4, gs=1, qpk=2, hd=32, rk=32,
                                                                               rv=16, bs=32, bias=True),
     dict(heads=2, num_splits=2, block_t=16, lazy_max=True)),
]
if CUDA:
    HEADS_CASES += [
        # the defaults (decode_defaults) on 64- and 128-token blocks (the latent backend's preferred size on GPUs)
        ("gpu_defaults_llama_r025_bs64", [4096, 1, 777, 3001], [1] * 4, dict(G=8, gs=1, qpk=4, hd=128, rk=32,
                                                                            rv=32, bs=64), dict(max_query_len=1)),
        ("gpu_defaults_llama_r05_bs128_split", [4096, 1, 777, 3001], [1] * 4, dict(G=8, gs=1, qpk=4, hd=128,
                                                                                  rk=64, rv=64, bs=128),
         dict(max_query_len=1, num_splits=3)),
        ("gpu_heads4_llama_r05", [4096, 1, 777, 3001], [1] * 4, dict(G=8, gs=1, qpk=4, hd=128, rk=64, rv=64, bs=16),
         dict(max_query_len=1, heads=4)),
        ("gpu_heads8_llama_r025_split", [2049, 513, 100], [1] * 3, dict(G=8, gs=1, qpk=4, hd=128, rk=32, rv=32,
                                                                        bs=16), dict(max_query_len=1, heads=8,
                                                                                     num_splits=4)),
        ("gpu_heads2_llama_varlen", [1000, 300, 517], [1, 2, 1], dict(G=8, gs=1, qpk=4, hd=128, rk=64, rv=64, bs=16),
         dict(heads=2, num_stages=3)),
        ("gpu_tile_rot_heads2_llama_r025_long", [16384, 1, 9001, 4097], [1] * 4, dict(G=8, gs=1, qpk=4, hd=128,
                                                                                    rk=32, rv=32, bs=16),
         dict(max_query_len=1, heads=2, tile_rotation=True, lazy_max=True)),
        ("gpu_tile_rot_llama_r05_split", [16384, 1, 777, 3001], [1] * 4, dict(G=8, gs=1, qpk=4, hd=128, rk=64,
                                                                             rv=64, bs=16),
         dict(max_query_len=1, heads=1, tile_rotation=True, num_splits=3)),
        ("gpu_late_sum_llama_r05", [4096, 1, 777, 3001], [1] * 4, dict(G=8, gs=1, qpk=4, hd=128, rk=64, rv=64,
                                                                      bs=16), dict(max_query_len=1)),
        ("gpu_late_sum_llama_r025", [4096, 1, 777, 3001], [1] * 4, dict(G=8, gs=1, qpk=4, hd=128, rk=32, rv=32,
                                                                       bs=16), dict(max_query_len=1)),
        ("gpu_lazy_max_llama_r05_split", [4096, 1, 777, 3001], [1] * 4, dict(G=8, gs=1, qpk=4, hd=128, rk=64,
                                                                            rv=64, bs=16),
         dict(max_query_len=1, lazy_max=True, num_splits=2)),
    ]


@pytest.mark.parametrize("name,seq_lens,q_lens,case_kw,call_kw", HEADS_CASES, ids=[c[0] for c in HEADS_CASES])
def test_triton_heads_kernel_matches_reference(name, seq_lens, q_lens, case_kw, call_kw):
    tk = kernels()
    args, _ = make_case(seq_lens, q_lens, **case_kw)
    expect = ref_out(args)
    out = torch.full_like(args["q"], float("nan"))
    kw, cfg = split_kw(call_kw)
    if cfg.tile_rotation:
        kw["inv_freq"] = rope_inv_freq(args["cos_sin_cache"].shape[-1]).to(DEV)
    tk.latent_attention(**args, out=out, config=cfg, **kw)
    plan = plan_of(args, cfg, kw.get("max_query_len"), kw.get("inv_freq"))
    assert plan.kernel == "decode"
    assert plan.tile_rotation == bool(cfg.tile_rotation)
    err = rel_err(out, expect)
    assert err < TOL, f"{name}: rel err {err:.3e}"


def test_angles_match_only_plain_tables():
    """The kernels compute cos / sin from inv_freq only where that reproduces the table: plain and partial RoPE
    yes; a magnitude-scaled (YaRN) or position-scaled (linear) table, or the wrong frequencies, no."""
    tk = kernels()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for rot in (32, 16):
            inv = rope_inv_freq(rot)
            cs = rope_cache(5000, rot, dtype=dtype)
            assert tk.angles_match(cs, inv), (dtype, rot)
            assert not tk.angles_match((cs.float() * 1.07).to(dtype), inv)  # YaRN mscale
            t = torch.arange(5000, dtype=torch.float)[:, None] / 2.0  # linear scaling: t / factor
            assert not tk.angles_match(torch.cat([(t * inv).cos(), (t * inv).sin()], -1).to(dtype), inv)
            assert not tk.angles_match(cs, rope_inv_freq(rot, base=500000.0))
            assert not tk.angles_match(cs, inv[:-1])
    args, _ = make_case([9], [1], G=1, gs=1, qpk=1, hd=32, rk=16, rv=16, bs=4, rot=16)
    f = tk.prepare_factors(args["layout"], args["b_k"], args["b_v"], None, None, args["cos_sin_cache"], True,
                           inv_freq=rope_inv_freq(16))
    assert f.inv_freq.tolist() == rope_inv_freq(16).tolist() + [0.0] * 8  # dims not rotated: angle 0


# long prompts: rebuilt densely and attended by torch's SDPA; the other requests of the batch by the kernels
REBUILD_CASES = [
    ("mixed_prefill_decode_chunk", [40, 37, 50, 21, 9], [40, 1, 19, 0, 1], dict(G=2, gs=1, qpk=2, hd=32, rk=16,
                                                                                rv=24, bs=16), 16, [0, 2]),
    ("gs2_gptj_partial_bias_chunk", [29, 18, 33], [29, 7, 1], dict(G=1, gs=2, qpk=2, hd=32, rk=40, rv=64, bs=8,
                                                                    bias=True, is_neox=False, rot=16), 8, [0]),
    ("int8_whole_tile_blocks", [70, 33], [20, 1], dict(G=2, gs=1, qpk=2, hd=32, rk=32, rv=32, bs=32,
                                                       lat_dtype="int8"), 16, [0]),
    ("all_long", [24, 40], [24, 17], dict(G=2, gs=1, qpk=4, hd=32, rk=32, rv=16, bs=5), 16, [0, 1]),
]
if CUDA:
    REBUILD_CASES += [
        # the default thresholds: 1000 x 1000, 2048 x 4096 and 512 x 4096 (query, key) pairs stay on the kernels
        ("gpu_llama_prompt_decodes_chunk", [4100, 300, 1000, 4096], [4100, 1, 1000, 1],
         dict(G=8, gs=1, qpk=4, hd=128, rk=32, rv=32, bs=64), None, [0]),
        ("gpu_llama_chunked_prompts", [8192, 4096, 700, 4096], [2048, 2048, 1, 512],
         dict(G=8, gs=1, qpk=4, hd=128, rk=64, rv=64, bs=16), None, [0]),
    ]


@pytest.mark.parametrize("name,seq_lens,q_lens,case_kw,min_q,rebuilt", REBUILD_CASES,
                         ids=[c[0] for c in REBUILD_CASES])
def test_triton_long_prompts_rebuilt_then_flash(name, seq_lens, q_lens, case_kw, min_q, rebuilt):
    """With max_query_len and the host query offsets, requests of >= rebuild_min_queries queries are rebuilt and
    attended by SDPA (last positions of the sequence when chunked), the rest by the kernels in one launch."""
    tk = kernels()
    args, _ = make_case(seq_lens, q_lens, **case_kw)
    expect = ref_out(args)
    out = torch.full_like(args["q"], float("nan"))
    cfg = tk.LaunchConfig()
    if min_q is not None:  # small shapes: no minimum (query, key) pairs
        cfg = tk.LaunchConfig(rebuild_min_queries=min_q, rebuild_min_work=0)
    tk.latent_attention(**args, out=out, max_query_len=max(q_lens), query_start_loc_cpu=args["query_start_loc"].cpu(),
                        config=cfg)
    assert list(plan_of(args, cfg, max(q_lens), long_prompts=True).rebuilt) == rebuilt
    err = rel_err(out, expect)
    assert err < TOL, f"{name}: rel err {err:.3e}"


def test_triton_long_context_stays_on_kernels():
    """Requests with more cached tokens than rebuild_max_tokens (REBUILD_MAX_TOKENS by default) are not rebuilt
    densely (transient memory)."""
    tk = kernels()
    cfg = tk.LaunchConfig(rebuild_min_queries=16, rebuild_min_work=0, rebuild_max_tokens=30)
    args, _ = make_case([24, 40], [24, 17], G=2, gs=1, qpk=4, hd=32, rk=32, rv=16, bs=5)
    out = torch.full_like(args["q"], float("nan"))
    tk.latent_attention(**args, out=out, max_query_len=24, query_start_loc_cpu=args["query_start_loc"].cpu(),
                        config=cfg)
    assert list(plan_of(args, cfg, 24, long_prompts=True).rebuilt) == [0]
    assert rel_err(out, ref_out(args)) < TOL


def test_reference_rebuild_attention_matches_latent_attention():
    """reference.rebuild_attention (dense keys and values, SDPA) equals the latent reference in float64 terms:
    a whole prompt (causal) and a chunk (its last positions), GQA, bias, GPT-J partial rotary."""
    for kw, q_lens in [(dict(G=2, gs=1, qpk=3, hd=32, rk=16, rv=24, bs=8), [30, 12]),
                       (dict(G=1, gs=2, qpk=2, hd=32, rk=40, rv=64, bs=4, bias=True, is_neox=False, rot=16), [5, 19])]:
        args, _ = make_case([30, 19], q_lens, **kw, dtype=torch.float32, lat_dtype="float32", device="cpu")
        expect = ref_out(args)
        qsl = args["query_start_loc"].tolist()
        for r, s in enumerate([30, 19]):
            o = ref.rebuild_attention(args["q"][qsl[r]:qsl[r + 1]], args["kv_cache"], args["layout"],
                                      args["block_table"][r], s, args["b_k"], args["b_v"], args["bias_k"],
                                      args["bias_v"], args["cos_sin_cache"], args["scale"], args["is_neox"])
            assert rel_err(o, expect[qsl[r]:qsl[r + 1]]) < 1e-5


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the lazy pass (interpreter)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("split", [1, 2])
def test_triton_lazy_max_runs_again_when_a_later_score_jumps(split):
    """lazy_max takes each program's first-tile max as the softmax reference: keys far above it later (scaled by
    300 here, logits ~1e3 higher, so exp2 would overflow) must send those programs through the exact pass. Compared
    with the same kernel without lazy_max: logits of ~1e3 in bf16 are off by units, so no reference agrees with
    either to 1e-2, but the two passes must agree with each other (and be finite)."""
    tk = kernels()
    seq_lens, bs = [70, 100], 8
    args, _ = make_case(seq_lens, [1, 1], G=2, gs=1, qpk=2, hd=32, rk=16, rv=16, bs=bs)
    lay, cache, bt = args["layout"], args["kv_cache"], args["block_table"].cpu()
    rows = cache.view(-1, cache.shape[-1])
    for r, n in enumerate(seq_lens):
        for pos in [p for p in range(40, 64)] + [p for p in range(90, n)]:
            slot = int(bt[r, pos // bs]) * bs + pos % bs
            rows[slot, : lay.groups * lay.rank_k] *= 300.0
    cfg = tk.LaunchConfig(block_t=16, num_splits=split)
    exact = tk.latent_attention(**args, max_query_len=1, config=dataclasses.replace(cfg, lazy_max=False))
    lazy = tk.latent_attention(**args, max_query_len=1, config=dataclasses.replace(cfg, lazy_max=True))
    assert plan_of(args, dataclasses.replace(cfg, lazy_max=True), 1).kernel == "decode"
    assert rel_err(lazy, exact) < TOL


def test_triton_decode_entry_and_factor_cache():
    """latent_decode with prepared factors == reference; the factor cache notices in-place weight updates."""
    tk = kernels()
    args, _ = make_case([50, 9], [1, 1], G=2, gs=1, qpk=2, hd=32, rk=32, rv=32, bs=8, bias=True)
    f = tk.prepare_factors(args["layout"], args["b_k"], args["b_v"], args["bias_k"], args["bias_v"],
                           args["cos_sin_cache"], True, dtype=tk.compute_dtype(args["q"]))
    out = tk.latent_decode(args["q"], args["kv_cache"], args["layout"], args["block_table"], args["seq_lens"], f,
                           args["scale"], config=tk.LaunchConfig(num_splits=2, block_t=16))
    assert rel_err(out, ref_out(args)) < TOL
    tk.latent_attention(**args, max_query_len=1)
    args["b_v"].mul_(-1.0)  # in-place change: cached factors must be rebuilt
    out2 = tk.latent_attention(**args, max_query_len=1)
    assert rel_err(out2, ref_out(args)) < TOL


# every integer latent layout the plan can produce, read by the kernels (dequantized in registers): int4 / int2
# codes with per-token or per-32-value scales, mixed K/V widths, odd ranks (a part ends, or a head group starts, on
# a half byte: the unaligned path), different rank_k / rank_v; the multi-head decode kernel (gs 1, one query per
# program), the generic kernel (gs 2, or varlen / prefill batches) and rank chunking (rank_k > 128, GPU only)
QUANT_CASES = [
    ("int4_decode_heads", "int4", [3, 37, 70], [1, 1, 1], dict(G=2, gs=1, qpk=2, hd=32, rk=16, rv=32, bs=16),
     dict(max_query_len=1, block_t=16)),
    ("int4_g32_decode_split_odd_rank", "int4@g32", [3, 61, 90], [1, 1, 1], dict(G=2, gs=1, qpk=2, hd=32, rk=31,
                                                                               rv=24, bs=5, bias=True),
     dict(max_query_len=1, num_splits=2, block_t=16)),
    ("int8_int4_decode_heads2", "int8/int4", [2, 77, 40], [1, 1, 1], dict(G=4, gs=1, qpk=2, hd=32, rk=24, rv=30,
                                                                         bs=16), dict(max_query_len=1, heads=2,
                                                                                      block_t=16)),
    ("int8_int4_g32_varlen_half_bytes", "int8/int4@g32", [5, 40, 50, 21], [2, 1, 3, 0],
     dict(G=2, gs=1, qpk=3, hd=32, rk=29, rv=7, bs=16, is_neox=False, rot=16), dict(block_t=16)),
    ("int2_decode_lazy_rot", "int2", [3, 61, 90], [1, 1, 1], dict(G=2, gs=1, qpk=2, hd=32, rk=16, rv=24, bs=8),
     dict(max_query_len=1, block_t=16, tile_rotation=True, lazy_max=True)),
    ("int2_g32_odd_ranks_prefill", "int2@g32", [29, 18], [29, 7], dict(G=2, gs=1, qpk=2, hd=32, rk=13, rv=22, bs=8),
     dict(block_t=16)),
    ("int4_g32_gs2_prefill_bias", "int4@g32", [33, 12], [9, 12], dict(G=1, gs=2, qpk=1, hd=32, rk=40, rv=24, bs=4,
                                                                      bias=True), dict(block_t=16)),
    ("int8_g32_gs2_decode", "int8@g32", [45, 8, 33], [1, 1, 1], dict(G=2, gs=2, qpk=1, hd=32, rk=40, rv=33, bs=8),
     dict(max_query_len=1, num_splits=2, block_t=16)),
    ("int4_fp16_generic_decode", "int4", [26, 19], [1, 1], dict(G=2, gs=1, qpk=1, hd=64, rk=15, rv=17, bs=16,
                                                                 dtype=torch.float16), dict(heads=0)),
    # even / odd nibble tiles (decode kernel, 4-bit parts on whole bytes, >= 32 columns): K and V, two heads per
    # program, split-KV partials, a padded V rank (48 of 64 columns), bias; per-token scales with lazy max and
    # tile rotation
    ("int4_g32_decode_nibbles", "int4@g32", [3, 70, 130], [1, 1, 1], dict(G=4, gs=1, qpk=2, hd=64, rk=64, rv=48,
                                                                          bs=16, bias=True),
     dict(max_query_len=1, heads=2, block_t=16, num_splits=2)),
    ("int4_decode_nibbles_lazy_rot", "int4", [5, 66], [1, 1], dict(G=2, gs=1, qpk=3, hd=64, rk=32, rv=32, bs=16),
     dict(max_query_len=1, block_t=16, lazy_max=True, tile_rotation=True)),
]
if CUDA:
    QUANT_CASES += [
        ("gpu_llama_int4_g32_r05", "int4@g32", [4096, 1, 777, 3001], [1] * 4,
         dict(G=8, gs=1, qpk=4, hd=128, rk=64, rv=64, bs=64), dict(max_query_len=1)),
        ("gpu_llama_int8_int4_r05", "int8/int4", [4096, 1, 777, 3001], [1] * 4,
         dict(G=8, gs=1, qpk=4, hd=128, rk=64, rv=64, bs=64), dict(max_query_len=1)),
        ("gpu_llama_int8_int4_g32_r05_split", "int8/int4@g32", [16384, 1, 777, 3001], [1] * 4,
         dict(G=8, gs=1, qpk=4, hd=128, rk=64, rv=64, bs=64), dict(max_query_len=1, num_splits=3)),
        ("gpu_llama_int4_g32_r025_heads2", "int4@g32", [4096, 1, 777, 3001], [1] * 4,
         dict(G=8, gs=1, qpk=4, hd=128, rk=32, rv=32, bs=16), dict(max_query_len=1)),
        ("gpu_llama_int2_g32_odd", "int2@g32", [2049, 513, 100], [1] * 3,
         dict(G=8, gs=1, qpk=4, hd=128, rk=45, rv=37, bs=16), dict(max_query_len=1)),
        ("gpu_llama_int4_per_layer_ranks_prefill", "int4@g32", [1000, 300, 517], [1000, 1, 77],
         dict(G=8, gs=1, qpk=4, hd=128, rk=48, rv=80, bs=64), dict()),
        ("gpu_gs2_rank_chunked_int4_g32", "int4@g32", [700, 129], [1, 129],
         dict(G=2, gs=2, qpk=4, hd=128, rk=162, rv=96, bs=16), dict()),
        ("gpu_gs2_int8_int4_decode", "int8/int4", [2049, 513, 100], [1] * 3,
         dict(G=4, gs=2, qpk=4, hd=128, rk=64, rv=64, bs=16), dict(max_query_len=1)),
    ]


@pytest.mark.parametrize("name,lat,seq_lens,q_lens,case_kw,call_kw", QUANT_CASES, ids=[c[0] for c in QUANT_CASES])
def test_triton_reads_integer_layouts(name, lat, seq_lens, q_lens, case_kw, call_kw):
    """Packed integer latents against the fp64 oracle (the same bytes, unpacked by layout.py); the plan must
    keep them on the kernels (gs 1 decode on the multi-head decode kernel unless heads=0 asks otherwise)."""
    tk = kernels()
    args, _ = make_case(seq_lens, q_lens, lat_dtype=lat, **case_kw)
    tk.check_supported(args["layout"])
    expect = ref_out(args)
    out = torch.full_like(args["q"], float("nan"))
    kw, cfg = split_kw(call_kw)
    if cfg.tile_rotation:
        kw["inv_freq"] = rope_inv_freq(args["cos_sin_cache"].shape[-1]).to(DEV)
    tk.latent_attention(**args, out=out, config=cfg, **kw)
    plan = plan_of(args, cfg, kw.get("max_query_len"), kw.get("inv_freq"))
    if case_kw["gs"] == 1 and cfg.heads != 0 and kw.get("max_query_len") == 1:
        assert plan.kernel == "decode"
    err = rel_err(out, expect)
    assert err < TOL, f"{name}: rel err {err:.3e}"


def test_nibble_levels_reproduce_the_tables():
    """The decode kernel's 4-bit levels (an odd polynomial instead of a table gather) stay within 1e-4 of layout.py's
    Gauss table (its steps are ~0.1), and the float built from the code's bits is exactly u - 7.5."""
    import numpy as np
    from vllm_kvc.kernels.triton_latent.tiles import gauss_poly4
    from vllm_kvc.layout import GAUSS_LEVELS
    x = np.arange(16) - 7.5
    c = gauss_poly4()
    poly = sum(ci * x ** p for ci, p in zip(c, (1, 3, 5, 7, 9)))
    assert np.abs(poly - GAUSS_LEVELS[4].double().numpy()).max() < 1e-4
    bits = torch.tensor([(2 * u) | 0x4A800001 for u in range(16)], dtype=torch.int32).view(torch.float32)
    assert torch.equal(bits - 4194312.0, torch.tensor(x, dtype=torch.float32))


def _run_ptx(asm: str, regs: dict) -> dict:
    """A tiny interpreter for the integer / bf16x2 / f16x2 PTX of ``tiles._nibble_asm`` and ``explicit.INT8_ASM``
    (32-bit registers as ints)."""
    env = dict(regs)

    def val(t):
        return int(t, 16) if t.startswith("0x") else int(t) if t.isdigit() else env[t]

    def prmt(a, b, c):
        out, src = 0, (b << 32) | a
        for k in range(4):
            s = (c >> (4 * k)) & 0xF
            byte = (src >> (8 * (s & 7))) & 0xFF
            out |= ((0xFF if byte & 0x80 else 0) if s & 8 else byte) << (8 * k)  # bit 3: replicate the sign
        return out

    def lop3(a, b, c, f):
        return sum(((f >> ((((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1))) & 1) << i
                   for i in range(32))

    def x2(dt, fn):  # an elementwise op on two 16-bit floats per register, rounded once (exact in fp32 here)
        def op(a, b):
            x, y = (torch.tensor([w & 0xFFFF, w >> 16], dtype=torch.int32).to(torch.int16).view(dt) for w in (a, b))
            z = fn(x.float(), y.float()).to(dt).view(torch.int16).to(torch.int32) & 0xFFFF
            return int(z[0]) | int(z[1]) << 16
        return op

    ops = {"and.b32": lambda a, b: a & b, "or.b32": lambda a, b: a | b, "xor.b32": lambda a, b: a ^ b,
           "not.b32": lambda a: ~a, "shr.u32": lambda a, b: a >> b, "shl.b32": lambda a, b: a << b,
           "sub.u32": lambda a, b: a - b, "mul.lo.u32": lambda a, b: a * b, "lop3.b32": lop3, "prmt.b32": prmt, "mov.b32": lambda a: a,
           "mul.rn.bf16x2": x2(torch.bfloat16, torch.mul), "mul.rn.f16x2": x2(torch.float16, torch.mul),
           "sub.rn.f16x2": x2(torch.float16, torch.sub)}
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}.":
            continue
        op, args = line.split(None, 1)
        a = [x.strip() for x in args.split(",")]
        env[a[0]] = ops[op](*[val(x) for x in a[1:]]) & 0xFFFFFFFF
    return env


def test_nibble_asm_reproduces_the_tables():
    """The GPU's 4-bit decode (``tiles._nibble_asm``: prmt lookups of the 8 positive levels by magnitude index,
    sign mask, Gauss / uniform table by the scale's sign, times |scale|), run by a PTX interpreter on every code
    byte in every position: bf16 of table[code] * |scale| bit for bit, for both tables."""
    kernels()
    from vllm_kvc.kernels.triton_latent.tiles import _nibble_asm
    from vllm_kvc.layout import GAUSS_LEVELS, UNIFORM_LEVELS
    asm = _nibble_asm()
    bits = lambda v: int(torch.tensor([v], dtype=torch.bfloat16).view(torch.int16)) & 0xFFFF  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    codes = torch.cat([torch.randperm(256, generator=gen) for _ in range(4)]).view(-1, 4).tolist()
    for trial, xb in enumerate(codes):  # every byte 4 times, at every position, with random neighbours
        sc = ((torch.rand(4, generator=gen) + 0.1) * torch.tensor([1.0, -1.0, -0.01, 3.0])).tolist()
        sc = [float(torch.tensor(s).to(torch.bfloat16)) for s in sc[trial % 3:] + sc[:trial % 3]]
        sb = [bits(s) for s in sc]
        env = _run_ptx(asm, {"$4": xb[0] | xb[1] << 8 | xb[2] << 16 | xb[3] << 24, "$5": sb[0] | sb[1] << 16,
                             "$6": sb[2] | sb[3] << 16})
        for reg, (i0, high) in {"$0": (0, False), "$1": (2, False), "$2": (0, True), "$3": (2, True)}.items():
            for k, i in enumerate((i0, i0 + 1)):
                code = xb[i] >> 4 if high else xb[i] & 15
                table = GAUSS_LEVELS[4] if sc[i] > 0 else UNIFORM_LEVELS[4]
                want = float(table[code].to(torch.bfloat16).float() * abs(sc[i]))
                assert (env[reg] >> (16 * k)) & 0xFFFF == bits(want), (reg, k, code, sc[i])


@pytest.mark.parametrize("by_byte", [False, True])
def test_grouped_nibble_asm_reproduces_the_tables(by_byte):
    """The GPU's 4-bit decode for 2 + 2 bytes of two scale groups (``tiles._nibble_asm_group``: each pair's
    table words chosen by its scale's sign before the call, its |scale| as a bf16 pair), run by the PTX interpreter
    on every code byte in every position: bf16 of table[code] * |scale| bit for bit, both tables, mixed pairs;
    output registers as (low, high nibbles of bytes 0, 1), or ``by_byte`` (low, high nibble of one byte)."""
    kernels()
    from vllm_kvc.kernels.triton_latent import tiles
    from vllm_kvc.layout import GAUSS_LEVELS, UNIFORM_LEVELS
    asm = tiles._nibble_asm_group(by_byte)
    assert asm is not None and tiles.GROUP_ASM_OK
    bits = lambda v: int(torch.tensor([v], dtype=torch.bfloat16).view(torch.int16)) & 0xFFFF  # noqa: E731
    gen = torch.Generator().manual_seed(1)
    codes = torch.cat([torch.randperm(256, generator=gen) for _ in range(4)]).view(-1, 4).tolist()
    mags = (1.0, -1.0, -0.01, 3.0)
    for trial, xb in enumerate(codes):  # bytes 0, 1 under one scale, bytes 2, 3 under another (all sign pairs)
        sc = [float(torch.tensor((float(torch.rand(1, generator=gen)) + 0.1) * mags[(trial + d) % 4])
                    .to(torch.bfloat16)) for d in (0, trial // 4 % 3 + 1)]
        regs = {"$4": xb[0] | xb[1] << 8 | xb[2] << 16 | xb[3] << 24}
        for p, (t0, t1, sa) in enumerate((("$5", "$9", "$13"), ("$7", "$11", "$14"))):
            words = (tiles.U_LO0, tiles.U_LO1) if sc[p] < 0 else (tiles.G_LO0, tiles.G_LO1)
            regs.update({t0: words[0].value & 0xFFFFFFFF, t1: words[1].value & 0xFFFFFFFF,
                         sa: bits(abs(sc[p])) | bits(abs(sc[p])) << 16})
        env = _run_ptx(asm, regs)
        # register -> its two values as (byte, high nibble)
        layout = ({"$0": ((0, 0), (0, 1)), "$2": ((1, 0), (1, 1)), "$1": ((2, 0), (2, 1)), "$3": ((3, 0), (3, 1))}
                  if by_byte else
                  {"$0": ((0, 0), (1, 0)), "$1": ((2, 0), (3, 0)), "$2": ((0, 1), (1, 1)), "$3": ((2, 1), (3, 1))})
        for reg, vals in layout.items():
            for k, (i, high) in enumerate(vals):
                code = xb[i] >> 4 if high else xb[i] & 15
                s = sc[i // 2]
                table = GAUSS_LEVELS[4] if s > 0 else UNIFORM_LEVELS[4]
                want = float(table[code].to(torch.bfloat16).float() * abs(s))
                assert (env[reg] >> (16 * k)) & 0xFFFF == bits(want), (reg, k, code, s)


def test_int8_asm_reproduces_code_times_scale():
    """The explicit kernel's 8-bit key decode (``explicit.INT8_ASM``: the biased byte as the mantissa of 1024 + u by
    a byte permute, minus 1152, times the fp16 scale), run by the PTX interpreter on every code byte in every
    position: fp16 of code * scale bit for bit, as the kernel's operand order wants it (bytes 0, 1 in $0, 2, 3 in
    $1; the 4 bytes share the scale in $3)."""
    from vllm_kvc.kernels.triton_latent import explicit
    bits = lambda v: int(torch.tensor([v], dtype=torch.float16).view(torch.int16)) & 0xFFFF  # noqa: E731
    gen = torch.Generator().manual_seed(2)
    codes = torch.cat([torch.randperm(256, generator=gen) for _ in range(4)]).view(-1, 4).tolist()
    for trial, xb in enumerate(codes):
        sc = float(torch.tensor((float(torch.rand(1, generator=gen)) + 0.01) * (10.0 ** (trial % 5 - 3)))
                   .to(torch.float16))
        env = _run_ptx(explicit.INT8_ASM, {"$2": xb[0] | xb[1] << 8 | xb[2] << 16 | xb[3] << 24,
                                           "$3": bits(sc) | bits(sc) << 16})
        for reg, pair in (("$0", (0, 1)), ("$1", (2, 3))):
            for k, i in enumerate(pair):
                code = xb[i] - 256 if xb[i] > 127 else xb[i]  # int8 codes, two's complement
                assert (env[reg] >> (16 * k)) & 0xFFFF == bits(code * sc), (reg, k, code, sc)


def test_triton_row_format_matches_layout():
    """The part descriptors the kernels read (offsets, bits, scale positions) agree with layout.py's bytes."""
    tk = kernels()
    from vllm_kvc.kernels.triton_latent.config import level_tables, row_format
    from vllm_kvc.layout import GAUSS_LEVELS, UNIFORM_LEVELS
    lut = level_tables(torch.device("cpu"))
    assert torch.equal(lut[:16], GAUSS_LEVELS[4]) and torch.equal(lut[16:32], UNIFORM_LEVELS[4])
    assert torch.equal(lut[32:36], GAUSS_LEVELS[2]) and torch.equal(lut[36:40], UNIFORM_LEVELS[2])
    for spec, rk, rv in [("int4", 15, 17), ("int8/int4@g32", 29, 7), ("int2@g32", 13, 22), ("int4@g32", 32, 32)]:
        lay = LatentLayout(2, 1, 32, rk, rv, spec)
        tk.check_supported(lay)
        k, v = row_format(lay)
        assert (k.off, k.bits, v.off, v.bits) == (0, lay.bits_k, lay.k_bytes, lay.bits_v)
        assert k.soff == lay.scale_offset and v.soff == lay.scale_offset + 2 * lay.groups * lay.scales_per_group_k
        assert v.soff + 2 * lay.groups * lay.scales_per_group_v == lay.row_bytes
        assert k.aligned == (rk * lay.bits_k % 8 == 0) and v.aligned == (rv * lay.bits_v % 8 == 0)


@pytest.mark.skipif(not CUDA, reason="the GPU path only")
def test_gpu_never_reaches_the_reference(monkeypatch):
    """On CUDA tensors no layout goes to reference.latent_attention (the dense fp32 rebuild of every cached K/V):
    decode, varlen and prefill batches of every integer layout run on the kernels."""
    tk = kernels()
    cases = []
    for lat in ("bfloat16", "int8", "int4", "int4@g32", "int8/int4", "int8/int4@g32", "int2", "int2@g32"):
        for seq_lens, q_lens, gs in (([300, 17, 64], [1, 1, 1], 1), ([300, 40], [3, 40], 1), ([129, 20], [1, 1], 2)):
            args, _ = make_case(seq_lens, q_lens, G=8 // gs, gs=gs, qpk=4, hd=128, rk=48, rv=40, bs=64, lat_dtype=lat)
            cases.append((lat, args, ref_out(args), max(q_lens)))

    def boom(*a, **k):
        raise AssertionError("reference.latent_attention reached on the GPU")
    monkeypatch.setattr(ref, "latent_attention", boom)
    for lat, args, expect, mq in cases:
        out = tk.latent_attention(**args, max_query_len=mq)
        assert rel_err(out, expect) < TOL, lat


def test_glue_checks_layout_at_startup():
    """The vLLM glue refuses, at start-up, a layout the kernels cannot read (a ValueError naming the latent dtype)
    and accepts every integer layout of the plan."""
    pytest.importorskip("vllm")
    kernels()
    from vllm_kvc.glue.latent import check_kernel_layout
    for spec in ("bfloat16", "int8", "int4", "int4@g32", "int8/int4", "int8/int4@g32", "int2@g32"):
        check_kernel_layout(LatentLayout(8, 1, 128, 64, 48, spec), "layers.0")
    with pytest.raises(ValueError, match="int4@g32"):
        check_kernel_layout(LatentLayout(1, 8, 32, 128, 16, "int4@g32"), "layers.3")  # 128 * 8 > 512


def test_triton_refuses_layouts_too_large_for_chip():
    tk = kernels()
    args, _ = make_case([5], [1], G=1, gs=8, qpk=1, hd=32, rk=128, rv=16, bs=4)  # 128 * 8 > 512
    with pytest.raises(NotImplementedError):
        tk.latent_attention(**args, max_query_len=1)


# ------------------------------------------------------------------------------------------------ the backend's call
def _step_inputs(args, positions, gen, extra_pad=True):
    """This step's latent rows for one token per request at ``positions`` (+ a padding row with slot -1)."""
    lay = args["layout"]
    bt, bs = args["block_table"].cpu(), args["kv_cache"].shape[1]
    slots = [int(bt[r, p // bs]) * bs + p % bs for r, p in enumerate(positions)] + ([-1] if extra_pad else [])
    lat = torch.randn(len(slots), lay.width, generator=gen).to(args["q"].dtype).to(DEV)
    return lat, torch.tensor(slots, dtype=torch.int64, device=DEV)


def _step_call(tk, args, lat, slots, out):
    a = {k: v for k, v in args.items() if k not in ("q", "kv_cache", "layout")}
    return tk.latent_step(args["q"], lat, args["kv_cache"], args["layout"], slots, a.pop("block_table"),
                          a.pop("seq_lens"), a.pop("query_start_loc"), **a, out=out, max_query_len=1)


def _check_step(args, lat, slots, out, cache_before):
    """The rows at the step's slots are layout.pack of its latents, no other row changed (padding skipped), and
    the output is the oracle's over the cache as written."""
    lay, cache = args["layout"], args["kv_cache"]
    n = lat.shape[0]
    rows = lay.pack(lat[:, : lay.groups * lay.rank_k].reshape(n, lay.groups, lay.rank_k).float(),
                    lat[:, lay.groups * lay.rank_k:].reshape(n, lay.groups, lay.rank_v).float())
    flat, before = cache.reshape(-1, cache.shape[-1]), cache_before.reshape(-1, cache.shape[-1])
    valid = slots >= 0
    got = flat[slots[valid]]
    same = (got.view(torch.uint8) == rows[valid].view(torch.uint8)).all(-1)
    if not bool(same.all()):  # the fused GPU encoder may break a tie between two scales the other way
        assert lay.quantized and float(same.float().mean()) > 0.5, "rows written differ from layout.pack"
        want = lat[valid][~same].float()

        def sq_err(r):
            ck, cv = lay.unpack(r)
            return (torch.cat([ck.flatten(1), cv.flatten(1)], 1) - want).pow(2).sum(1)

        assert torch.allclose(sq_err(got[~same]), sq_err(rows[valid][~same]), rtol=1e-4), \
            "a differing row decodes worse than layout.pack's"
    changed = (flat.view(torch.uint8) != before.view(torch.uint8)).any(-1)
    changed[slots[valid]] = False
    assert not bool(changed.any()), "rows other than the step's slots changed"
    err = rel_err(out, ref_out(args))
    assert err < TOL, f"rel err {err:.3e}"


@pytest.mark.parametrize("spec,rk,rv", [("int4@g32", 64, 48), ("int4", 32, 32), ("int8/int4@g32", 40, 56),
                                         ("int8/int4", 24, 30), ("int2@g32", 36, 20), ("int4@g32", 112, 112),
                                         ("seg:8x8+24x4+32x2/16x4+32x2", 64, 48), ("seg:64x4+48x2/8x8+40x2", 112, 48),
                                         ("seg:8x8/4x2", 8, 4)])
def test_fused_encoder_matches_layout_pack(spec, rk, rv):
    """write.encode_rows (one kernel per K / V part, one per segment for ``seg:`` rows; the GPU path of
    latent_step) writes exactly layout.pack's
    bytes (codes, the scale search's choices, fp16 scales; groups padded past the rank as the torch encoder pads
    them) at the given slots, skipping padding slots."""
    tk = kernels()
    from vllm_kvc.kernels.triton_latent.write import can_encode
    lay = LatentLayout(4, 1, 128, rk, rv, spec)
    assert can_encode(lay)
    gen = fresh_gen()
    n = 7
    lat = (torch.randn(n, lay.width, generator=gen) * 5 * torch.rand(n, 1, generator=gen)).to(torch.bfloat16)
    slots = torch.tensor([0, 5, 3, -1, 9, 15, 2])
    ref_cache = torch.full((4, 4, lay.row_elems), 7, dtype=torch.uint8)
    enc = ref_cache.to(DEV, copy=True)
    tk.encode_rows(enc, slots.to(DEV), lay, lat.to(DEV))
    g = lay.groups
    rows = lay.pack(lat[:, : g * rk].reshape(n, g, rk).float(), lat[:, g * rk:].reshape(n, g, rv).float())
    ref.write_rows(ref_cache, slots, rows)
    assert torch.equal(enc.cpu(), ref_cache)


@pytest.mark.parametrize("lat_dtype", ["bfloat16", "int4@g32", "int8/int4"])
def test_latent_step_writes_and_attends(lat_dtype):
    """kernels.triton_latent.latent_step (the backend's whole call on CUDA): this step's rows are encoded and
    written at their slots on the device (a padding slot -1 skipped), then attention reads them."""
    tk = kernels()
    gen = fresh_gen()
    seq = [40, 7, 66]
    args, _ = make_case(seq, [1] * 3, G=2, gs=1, qpk=2, hd=32, rk=32, rv=32, bs=16, lat_dtype=lat_dtype, gen=gen)
    lat, slots = _step_inputs(args, [s - 1 for s in seq], gen)
    before = args["kv_cache"].clone()
    out = torch.full_like(args["q"], float("nan"))
    _step_call(tk, args, lat, slots, out)
    _check_step(args, lat, slots, out, before)


def capture_graph(step):
    """``step()`` captured in a CUDA graph, after two warm-up calls on a side stream (compiling the kernels and
    caching the factors outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def next_step_in_place(args, lat, slots, new_seq, gen):
    """The next decode step written over a captured one's inputs: this step's latents and slots for the new
    cached lengths, the lengths, a new query."""
    lat2, slots2 = _step_inputs(args, [s - 1 for s in new_seq], gen)
    lat.copy_(lat2)
    slots.copy_(slots2)
    args["seq_lens"].copy_(torch.tensor(new_seq, dtype=torch.int32, device=DEV))
    args["q"].copy_(torch.randn(args["q"].shape, generator=gen).to(args["q"].dtype).to(DEV))


@pytest.mark.skipif(not CUDA, reason="CUDA graphs")
@pytest.mark.parametrize("roped", [False, True], ids=["pre_rope", "roped"])
@pytest.mark.parametrize("lat_dtype", ["bfloat16", "int4@g32", "int8/int4", "int8", "int4@g32-r128",
                                       "int8/int4@g32-r128"])
def test_latent_step_replays_in_a_cuda_graph(lat_dtype, roped):
    """The decode call is captured in a CUDA graph; then the cache contents, the query (roped keys: the latent
    queries), this step's latents, the slots and the cached lengths change in place, and the replay computes the
    new step (oracle: the fp64 reference of the key mode)."""
    tk = kernels()
    gen = fresh_gen()
    seq = [700, 64, 1500, 9]
    rank = 128 if lat_dtype.endswith("-r128") else 64  # rank 128, roped: the explicit-layout kernel
    lat_dtype = lat_dtype.removesuffix("-r128")
    args, _ = make_case(seq, [1] * 4, G=8, gs=1, qpk=4, hd=128, rk=rank, rv=48 if roped and rank == 64 else rank,
                        bs=64, lat_dtype=lat_dtype, gen=gen)
    if roped and rank == 128:
        assert plan_of(args, tk.LaunchConfig(), 1, roped=True).kernel == "explicit"
    if roped:
        qt = roped_query(args)
        call_args, step = roped_call_args(args, qt, bare=True), _step_call_roped
    else:
        call_args, step = args, _step_call
    lat, slots = _step_inputs(args, [s - 1 for s in seq], gen)
    out = torch.empty_like(args["q"])
    graph = capture_graph(lambda: step(tk, call_args, lat, slots, out))
    # the next step, in place: new query and latents, shorter histories (other slots), rewritten cache rows
    next_step_in_place(args, lat, slots, [699, 33, 1400, 9], gen)
    if roped:
        qt.copy_(roped_query(args))
    lay, bs = args["layout"], args["kv_cache"].shape[1]
    blk = int(args["block_table"][2, 3])
    ck, cv = torch.randn(bs, lay.groups, lay.rank_k, generator=gen), torch.randn(bs, lay.groups, lay.rank_v,
                                                                                  generator=gen)
    ref.write_latents(args["kv_cache"], torch.arange(blk * bs, blk * bs + bs, device=DEV), lay, ck.to(DEV),
                      cv.to(DEV))
    before = args["kv_cache"].clone()
    graph.replay()
    torch.cuda.synchronize()
    if roped:
        _check_rows_written(args, lat, slots, before)
        assert rel_err(out, ref_out_roped(args, qt)) < TOL
    else:
        _check_step(args, lat, slots, out, before)


# ------------------------------------------------------------------------------------------------ roped keys
# The K latents code the keys after RoPE (reference.latent_attention(..., roped_keys=True)): the caller passes each
# head's latent query q B_k^T [n, Hq, rank_k] and the kernels score the dequantized K latent tile with it directly
# (no key rebuild, no RoPE, no cos / sin; a ROPED constexpr of both kernels). Oracle: the fp64 reference.


def roped_query(args) -> torch.Tensor:
    """The latent queries of a case: q B_k^T per query head (reference.head_key_views), rounded to q's dtype."""
    lay, q = args["layout"], args["q"]
    views = ref.head_key_views(args["b_k"].float(), lay, q.shape[1])
    return torch.einsum("nhd,hdr->nhr", q.float(), views).to(q.dtype)


def roped_call_args(args, qt, bare=False):
    """latent_attention's arguments with the latent queries; ``bare``: without the inputs roped keys do not read."""
    a = dict(args, q=qt)
    if bare:
        a.update(b_k=None, bias_k=None, cos_sin_cache=None)
    return a


def ref_out_roped(args, qt) -> torch.Tensor:
    a = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in args.items()}
    a["q"] = qt.cpu()
    out = torch.empty(qt.shape[0], qt.shape[1], a["layout"].head_dim, dtype=torch.float64)
    return ref.latent_attention(**a, out=out, compute_dtype=torch.float64, roped_keys=True)


# (name, latent dtype, seq_lens, q_lens, case kwargs, call kwargs); "bare": b_k, bias_k, cos_sin_cache passed as None
ROPED_CASES = [
    # the multi-head decode kernel (gs 1, one query per program): rank_k != rank_v, ranks not powers of two
    ("decode_bf16", "bfloat16", [1, 37, 70], [1, 1, 1], dict(G=2, gs=1, qpk=2, hd=32, rk=16, rv=24, bs=16),
     dict(max_query_len=1, bare=True)),
    ("decode_heads2_split_bias_rank24", "bfloat16", [3, 61, 90], [1, 1, 1],
     dict(G=4, gs=1, qpk=2, hd=32, rk=24, rv=16, bs=5, bias=True), dict(max_query_len=1, heads=2, num_splits=4,
                                                                          block_t=16)),
    ("decode_varlen_lazy_max_tile_rot_ignored", "bfloat16", [3, 61, 90, 40], [1, 1, 2, 1],
     dict(G=4, gs=1, qpk=2, hd=32, rk=32, rv=16, bs=32, bias=True),
     dict(heads=2, num_splits=2, block_t=16, lazy_max=True, tile_rotation=True)),
    ("decode_fp16_fp32_latents", "float32", [26, 19], [1, 1], dict(G=2, gs=1, qpk=1, hd=64, rk=20, rv=16, bs=16,
                                                                     dtype=torch.float16), dict(max_query_len=1)),
    ("decode_generic_heads0_p2", "bfloat16", [45, 8, 33], [1, 1, 1], dict(G=2, gs=1, qpk=3, hd=32, rk=20, rv=28,
                                                                          bs=8, bias=True),
     dict(max_query_len=1, heads=0, num_splits=2, block_t=16, pieces=2, bare=True)),
    # integer latents: the original int8 layout (generic kernel, per-token scales on the scores), packed 4-bit as
    # even / odd nibble tiles (K_SPLIT, also a padded rank 48 of 64), per-value 4-bit (odd rank), int8 / int4
    ("int8_decode_generic", "int8", [2, 77, 40], [1, 1, 1], dict(G=2, gs=1, qpk=2, hd=32, rk=32, rv=32, bs=16),
     dict(max_query_len=1, num_splits=2, block_t=32)),
    ("int4_g32_decode_nibbles", "int4@g32", [3, 70, 130], [1, 1, 1], dict(G=4, gs=1, qpk=2, hd=64, rk=64, rv=48,
                                                                          bs=16, bias=True),
     dict(max_query_len=1, heads=2, block_t=16, num_splits=2, bare=True)),
    # 16-token tiles asked for: with them this layout (4-bit V tile of 16 bytes, one head per program, table RoPE)
    # was wrong on the H200 (triton 3.6) in the pre-RoPE mode too (benchmarks/results/gpu_roped_diag.txt); the
    # launch plan now gives nibble layouts 32-token tiles at least (test_plan_gives_nibble_tiles_32_tokens)
    ("int4_decode_nibbles_rank48", "int4", [5, 66], [1, 1], dict(G=2, gs=1, qpk=3, hd=64, rk=48, rv=32, bs=16),
     dict(max_query_len=1, block_t=16, lazy_max=True)),
    ("int4_g32_decode_odd_rank", "int4@g32", [3, 61, 90], [1, 1, 1], dict(G=2, gs=1, qpk=2, hd=32, rk=31, rv=24,
                                                                          bs=5), dict(max_query_len=1, num_splits=2,
                                                                                      block_t=16)),
    ("int8_int4_decode_heads2", "int8/int4", [2, 77, 40], [1, 1, 1], dict(G=4, gs=1, qpk=2, hd=32, rk=24, rv=30,
                                                                          bs=16),
     dict(max_query_len=1, heads=2, block_t=16)),
    # 4-bit K of rank 97..128 with 32 values per scale: grouped K tiles (tiles.load_nibbles_grouped: one scale
    # group of 16 bytes per thread and token, columns in group_perm's order) and the scales one tile ahead; rank
    # 112 (the last scale group half empty, read past and zeroed), rank 128 with two KV heads per program (no
    # scales ahead), split-KV partials and a partial last tile
    ("int4_g32_decode_grouped_rank112", "int4@g32", [3, 70, 130], [1, 1, 1],
     dict(G=2, gs=1, qpk=2, hd=128, rk=112, rv=40, bs=16, bias=True), dict(max_query_len=1, block_t=32)),
    ("int4_g32_decode_grouped_rank128_heads2", "int4@g32", [33, 100], [1, 1],
     dict(G=2, gs=1, qpk=3, hd=128, rk=128, rv=64, bs=32), dict(max_query_len=1, heads=2, num_splits=2,
                                                               block_t=32)),
    # prefill, chunked prefill and mixed batches (generic kernel): GPT-J / partial rotary factors change nothing
    # (no head-dim permutation of the latent queries), gs 2 (one K latent for the group's KV heads), int layouts
    ("prefill_chunked_mixed", "bfloat16", [5, 40, 50, 21], [5, 1, 19, 0], dict(G=2, gs=1, qpk=2, hd=32, rk=24, rv=32,
                                                                               bs=16), dict(bare=True)),
    ("prefill_gs2_gptj_partial_bias", "bfloat16", [29, 18], [29, 7], dict(G=1, gs=2, qpk=2, hd=32, rk=40, rv=64,
                                                                          bs=8, bias=True, is_neox=False, rot=16),
     dict(block_t=16)),
    ("int8_prefill_gs2", "int8", [33, 12], [9, 12], dict(G=1, gs=2, qpk=1, hd=32, rk=48, rv=24, bs=4, bias=True),
     dict(block_t=16)),
    ("int4_g32_prefill_gs2", "int4@g32", [33, 12], [9, 12], dict(G=1, gs=2, qpk=1, hd=32, rk=40, rv=24, bs=4),
     dict(block_t=16)),
    ("int2_g32_odd_ranks_prefill", "int2@g32", [29, 18], [29, 7], dict(G=2, gs=1, qpk=2, hd=32, rk=13, rv=22, bs=8),
     dict(block_t=16)),
    ("int8_int4_g32_varlen_half_bytes", "int8/int4@g32", [5, 40, 50, 21], [2, 1, 3, 0],
     dict(G=2, gs=1, qpk=3, hd=32, rk=29, rv=7, bs=16), dict(block_t=16)),
]
if CUDA:
    ROPED_CASES += [
        ("gpu_llama_bf16_r64", "bfloat16", [4096, 1, 777, 3001], [1] * 4,
         dict(G=8, gs=1, qpk=4, hd=128, rk=64, rv=64, bs=64), dict(max_query_len=1, bare=True)),
        ("gpu_llama_bf16_r32_long", "bfloat16", [16384, 1, 9001, 4097], [1] * 4,
         dict(G=8, gs=1, qpk=4, hd=128, rk=32, rv=32, bs=16), dict(max_query_len=1)),
        ("gpu_llama_int4_g32_r128", "int4@g32", [4096, 1, 777, 3001], [1] * 4,
         dict(G=8, gs=1, qpk=4, hd=128, rk=128, rv=128, bs=64), dict(max_query_len=1)),
        # the explicit-layout kernel (explicit.py): 8 query heads per KV head, 3 KV splits (12 partials per
        # program), bias_v, partial blocks; and the same layout on the Triton decode kernel (explicit=False)
        ("gpu_explicit_qpk8_split3_bias", "int4@g32", [8191, 65, 1, 1000, 64], [1] * 5,
         dict(G=2, gs=1, qpk=8, hd=128, rk=128, rv=128, bs=64, bias=True), dict(max_query_len=1, num_splits=3)),
        ("gpu_llama_int4_g32_r128_triton", "int4@g32", [4096, 1, 777, 3001], [1] * 4,
         dict(G=8, gs=1, qpk=4, hd=128, rk=128, rv=128, bs=64), dict(max_query_len=1, explicit=False)),
        ("gpu_llama_int4_g32_r112_split", "int4@g32", [16384, 1, 777, 3001], [1] * 4,
         dict(G=8, gs=1, qpk=4, hd=128, rk=112, rv=112, bs=64), dict(max_query_len=1, num_splits=3)),
        ("gpu_llama_int8_r128", "int8", [3000, 17], [1, 1], dict(G=8, gs=1, qpk=4, hd=128, rk=128, rv=128, bs=64),
         dict(max_query_len=1)),
        ("gpu_llama_int8_int4_g32_r128", "int8/int4@g32", [4096, 1, 777, 3001], [1] * 4,
         dict(G=8, gs=1, qpk=4, hd=128, rk=128, rv=128, bs=64), dict(max_query_len=1)),
        ("gpu_llama_int8_int4_rk64_rv48", "int8/int4", [2049, 513, 100], [1] * 3,
         dict(G=8, gs=1, qpk=4, hd=128, rk=64, rv=48, bs=16), dict(max_query_len=1)),
        ("gpu_llama_int4_g32_r112_heads2", "int4@g32", [2049, 513, 100], [1] * 3,
         dict(G=8, gs=1, qpk=4, hd=128, rk=112, rv=112, bs=64), dict(max_query_len=1, heads=2, explicit=False)),
        # the explicit kernel below rank 128 (bytes and scales past the rank masked): K and V ranks apart, one KV
        # head (the V codes of the last group end near the row's end), and the odd scale groups of rank 120 / 72
        ("gpu_explicit_rk48_rv80", "int4@g32", [4096, 1, 777, 3001], [1] * 4,
         dict(G=8, gs=1, qpk=4, hd=128, rk=48, rv=80, bs=64), dict(max_query_len=1)),
        ("gpu_explicit_one_group_rk120_rv72_bias", "int4@g32", [1000, 64, 65, 1], [1] * 4,
         dict(G=1, gs=1, qpk=8, hd=128, rk=120, rv=72, bs=64, bias=True), dict(max_query_len=1, num_splits=2)),
        # its code bytes through shared-memory rings of 2 and 4 blocks (the default loads them straight)
        ("gpu_explicit_r112_ring2", "int4@g32", [4095, 1, 129, 64, 3000], [1] * 5,
         dict(G=8, gs=1, qpk=4, hd=128, rk=112, rv=112, bs=64), dict(max_query_len=1, stages=2)),
        ("gpu_explicit_r128_ring4", "int4@g32", [4095, 1, 129, 64, 3000], [1] * 5,
         dict(G=8, gs=1, qpk=4, hd=128, rk=128, rv=128, bs=64), dict(max_query_len=1, stages=4, num_splits=2)),
        # 8-bit keys (fp16 operands, the query divided by its maximum): ranks apart, one KV head, bias, splits; and
        # the same layout on the Triton decode kernel
        ("gpu_explicit_int8_int4_one_group_rk120_rv72", "int8/int4@g32", [1000, 64, 65, 1], [1] * 4,
         dict(G=1, gs=1, qpk=8, hd=128, rk=120, rv=72, bs=64, bias=True), dict(max_query_len=1, num_splits=2)),
        ("gpu_llama_int8_int4_g32_r128_triton", "int8/int4@g32", [4096, 1, 777, 3001], [1] * 4,
         dict(G=8, gs=1, qpk=4, hd=128, rk=128, rv=128, bs=64), dict(max_query_len=1, explicit=False)),
        # the first block's max as each warp's softmax reference (lazy_max): short and long requests, splits, a
        # request of one token, 4- and 8-bit keys, head groups of 2
        ("gpu_explicit_r112_lazy_split3", "int4@g32", [4095, 1, 129, 64, 3000], [1] * 5,
         dict(G=8, gs=1, qpk=4, hd=128, rk=112, rv=112, bs=64), dict(max_query_len=1, lazy_max=True, num_splits=3)),
        ("gpu_explicit_gs2_int8_int4_lazy", "int8/int4@g32", [4096, 1, 777, 65], [1] * 4,
         dict(G=4, gs=2, qpk=4, hd=128, rk=128, rv=96, bs=64, bias=True), dict(max_query_len=1, lazy_max=True)),
        # head groups of 2 KV heads at ranks above 128 (a second K tile and value accumulator): 4- and 8-bit keys,
        # K / V ranks on either side of 128, splits, bias, one token, the first block's max as the reference
        ("gpu_explicit_gs2_r224", "int4@g32", [4096, 1, 777, 3001], [1] * 4,
         dict(G=4, gs=2, qpk=4, hd=128, rk=224, rv=224, bs=64), dict(max_query_len=1)),
        ("gpu_explicit_gs2_int8_int4_rk256_rv136_bias", "int8/int4@g32", [1000, 64, 65, 1], [1] * 4,
         dict(G=2, gs=2, qpk=2, hd=128, rk=256, rv=136, bs=64, bias=True), dict(max_query_len=1, num_splits=2)),
        ("gpu_explicit_gs2_rk120_rv250_lazy", "int4@g32", [3000, 1, 200], [1] * 3,
         dict(G=4, gs=2, qpk=4, hd=128, rk=120, rv=250, bs=64), dict(max_query_len=1, lazy_max=True)),
        # head groups of 2 KV heads (8 query heads: the score tile's 8 columns), 4- and 8-bit keys, ranks apart
        ("gpu_explicit_gs2_r128", "int4@g32", [4096, 1, 777, 3001], [1] * 4,
         dict(G=4, gs=2, qpk=4, hd=128, rk=128, rv=128, bs=64), dict(max_query_len=1)),
        ("gpu_explicit_gs2_int8_int4_rk120_rv72_bias", "int8/int4@g32", [1000, 64, 65, 1], [1] * 4,
         dict(G=2, gs=2, qpk=2, hd=128, rk=120, rv=72, bs=64, bias=True), dict(max_query_len=1, num_splits=2)),
        ("gpu_llama_prefill_chunked", "bfloat16", [1000, 300, 517], [1000, 1, 77],
         dict(G=8, gs=1, qpk=4, hd=128, rk=64, rv=64, bs=64), dict()),
        ("gpu_llama_int4_g32_prefill_rk48_rv80", "int4@g32", [1000, 300, 517], [1000, 1, 77],
         dict(G=8, gs=1, qpk=4, hd=128, rk=48, rv=80, bs=64), dict()),
        ("gpu_gs2_rank_chunked_int4_g32", "int4@g32", [700, 129], [1, 129],
         dict(G=2, gs=2, qpk=4, hd=128, rk=162, rv=96, bs=16), dict()),
        ("gpu_gs2_int8_decode", "int8", [2049, 513, 100], [1] * 3, dict(G=4, gs=2, qpk=4, hd=128, rk=64, rv=64, bs=16),
         dict(max_query_len=1)),
    ]


@pytest.mark.parametrize("name,lat,seq_lens,q_lens,case_kw,call_kw", ROPED_CASES, ids=[c[0] for c in ROPED_CASES])
def test_triton_roped_keys_match_reference(name, lat, seq_lens, q_lens, case_kw, call_kw):
    """Roped keys on the kernels against the fp64 roped-key oracle (same latent queries, same cache bytes); gs 1
    decode of every layout but the original int8 stays on the multi-head decode kernel."""
    tk = kernels()
    args, _ = make_case(seq_lens, q_lens, lat_dtype=lat, **case_kw)
    qt = roped_query(args)
    expect = ref_out_roped(args, qt)
    call_kw = dict(call_kw)
    bare = call_kw.pop("bare", False)
    kw, cfg = split_kw(call_kw)
    if cfg.tile_rotation:  # asked for, and ignored: roped keys have no RoPE in the kernel
        kw["inv_freq"] = rope_inv_freq(args["cos_sin_cache"].shape[-1]).to(DEV)
    out = torch.full((qt.shape[0], qt.shape[1], case_kw["hd"]), float("nan"), dtype=qt.dtype, device=DEV)
    res = tk.latent_attention(**roped_call_args(args, qt, bare), out=out, config=cfg, roped_keys=True, **kw)
    assert res is out
    plan = plan_of(args, cfg, kw.get("max_query_len"), roped=True)
    ex = explicit_kernel()
    served = (ex.serves(args["layout"], qt.shape[1], case_kw["bs"], True) and ex.device_ok(qt)
              and cfg.explicit is not False and kw.get("max_query_len") == 1)
    if served:  # roped int4@g32 / int8/int4@g32 at even ranks up to 128 on sm_90: the explicit-layout kernel
        assert plan.kernel == "explicit"
    elif tk.heads_supported(args["layout"], qt.shape[1]) and cfg.heads != 0 and kw.get("max_query_len") == 1:
        assert plan.kernel == "decode"
    err = rel_err(out, expect)
    assert err < TOL, f"{name}: rel err {err:.3e}"
    # without an output buffer: allocated as [n, Hq, head_dim]
    out2 = tk.latent_attention(**roped_call_args(args, qt, bare), config=cfg, roped_keys=True, **kw)
    assert out2.shape == out.shape and rel_err(out2, expect) < TOL


@pytest.mark.skipif(not CUDA, reason="GPU kernels")
@pytest.mark.parametrize("lat", ["int4@g32", "int8/int4@g32"])
def test_explicit_lazy_max_sweeps_again_where_scores_outgrow_the_first_block(lat):
    """lazy_max on the explicit kernel: each warp's first-block max is its softmax reference, and a program whose
    later scores exceed it by more than 64 (log2 units: weights past 2^64) sweeps its blocks again against the true
    max. With the query scaled 100x every long request's scores outgrow its first block by far more (computed here
    from the latents), which without the second sweep gives inf / NaN; the result matches the online softmax on the
    same case and, within the sharp softmax's amplified rounding, the fp64 oracle."""
    tk = kernels()
    ex = explicit_kernel()
    args, lats = make_case([4096, 3000, 300, 1], [1] * 4, G=8, gs=1, qpk=4, hd=128, rk=128, rv=128, bs=64,
                           lat_dtype=lat)
    qt = roped_query(args)
    if not (ex.serves(args["layout"], qt.shape[1], 64, True) and ex.device_ok(qt)):
        pytest.skip("the explicit kernel does not serve this device")
    qt = (qt.float() * 100.0).to(qt.dtype)
    scale2 = args["scale"] / math.log(2.0)
    spread = []
    for r, (ck, _) in enumerate(lats):  # per request: max over heads of (its max score - its first block's max)
        s = torch.einsum("hgr,tgr->htg", qt[r].float().cpu().view(8, 4, 128).transpose(0, 1), ck) * scale2
        spread.append(float((s.amax(1) - s[:, :64].amax(1)).max()))
    assert spread[0] > 200 and spread[1] > 200, spread
    expect = ref_out_roped(args, qt)
    outs = [tk.latent_attention(**roped_call_args(args, qt), config=tk.LaunchConfig(lazy_max=lazy), roped_keys=True,
                                max_query_len=1) for lazy in (True, False)]
    # the sharp softmax turns the kernel's rounding of 4-bit keys (bf16 level x scale) at scores of ~300 into weights
    # a few % apart among the top tokens: against the oracle a looser bound; the two kernels agree as usual
    errs = [rel_err(o, expect) for o in outs]  # (non-finite outputs fail here)
    assert max(errs) < 5 * TOL and rel_err(outs[0], outs[1]) < TOL, (errs, rel_err(outs[0], outs[1]))


@pytest.mark.parametrize("lat", ["bfloat16", "int4@g32", "int8"])
def test_triton_roped_keys_rank_chunks_gs2(lat):
    """rank_k > 128 (the generic kernel's rank chunks of 128) with roped keys: a decode and a chunk of a prompt."""
    tk = kernels()
    args, _ = make_case([300 if CUDA else 70, 41], [1, 17], G=1, gs=2, qpk=2, hd=128, rk=160, rv=32, bs=16,
                        lat_dtype=lat)
    qt = roped_query(args)
    out = tk.latent_attention(**roped_call_args(args, qt), roped_keys=True, config=tk.LaunchConfig(block_t=16))
    assert rel_err(out, ref_out_roped(args, qt)) < TOL


ROPED_REBUILD_CASES = [
    ("mixed_prefill_decode_chunk", "bfloat16", [40, 37, 50, 21, 9], [40, 1, 19, 0, 1],
     dict(G=2, gs=1, qpk=2, hd=32, rk=16, rv=24, bs=16), 16, [0, 2]),
    ("gs2_bias_int4_g32_chunk", "int4@g32", [29, 18, 33], [29, 7, 1], dict(G=1, gs=2, qpk=2, hd=32, rk=40, rv=64, bs=8,
                                                                           bias=True), 8, [0]),
    ("int8_ranks_not_multiples_of_8", "int8", [70, 33], [20, 1], dict(G=2, gs=1, qpk=2, hd=32, rk=20, rv=28, bs=32),
     16, [0]),
]
if CUDA:
    ROPED_REBUILD_CASES += [
        ("gpu_llama_prompt_decodes_chunk", "bfloat16", [4100, 300, 1000, 4096], [4100, 1, 1000, 1],
         dict(G=8, gs=1, qpk=4, hd=128, rk=32, rv=32, bs=64), None, [0]),
        ("gpu_llama_int4_g32_r112_chunked_prompts", "int4@g32", [8192, 4096, 700, 4096], [2048, 2048, 1, 512],
         dict(G=8, gs=1, qpk=4, hd=128, rk=112, rv=112, bs=64), None, [0]),
    ]


@pytest.mark.parametrize("name,lat,seq_lens,q_lens,case_kw,min_q,rebuilt", ROPED_REBUILD_CASES,
                         ids=[c[0] for c in ROPED_REBUILD_CASES])
def test_triton_roped_keys_long_prompts(name, lat, seq_lens, q_lens, case_kw, min_q, rebuilt):
    """Roped keys, long prompts: the requests the plan rebuilds attend over their latents by SDPA (latent queries
    on the key latents, value latents then B_v: dispatch.rebuild_roped_attention), the rest by the kernels."""
    tk = kernels()
    args, _ = make_case(seq_lens, q_lens, lat_dtype=lat, **case_kw)
    qt = roped_query(args)
    expect = ref_out_roped(args, qt)
    cfg = tk.LaunchConfig()
    if min_q is not None:  # small shapes: no minimum (query, key) pairs
        cfg = tk.LaunchConfig(rebuild_min_queries=min_q, rebuild_min_work=0)
    out = tk.latent_attention(**roped_call_args(args, qt, bare=True), max_query_len=max(q_lens),
                              query_start_loc_cpu=args["query_start_loc"].cpu(), config=cfg, roped_keys=True)
    assert list(plan_of(args, cfg, max(q_lens), long_prompts=True).rebuilt) == rebuilt
    err = rel_err(out, expect)
    assert err < TOL, f"{name}: rel err {err:.3e}"


def test_triton_roped_keys_decode_entry_and_checks():
    """latent_decode with factors prepared for roped keys (no B_k, no table) == the oracle; wrong query widths and
    mixing roped factors with a pre-RoPE call are refused with a clear message."""
    tk = kernels()
    args, _ = make_case([50, 9], [1, 1], G=2, gs=1, qpk=2, hd=32, rk=24, rv=32, bs=8, bias=True)
    qt = roped_query(args)
    f = tk.prepare_factors(args["layout"], None, args["b_v"], None, args["bias_v"], None,
                           dtype=tk.compute_dtype(qt), roped_keys=True)
    assert f.bk is None and f.cos is None and f.roped_keys
    out = tk.latent_decode(qt, args["kv_cache"], args["layout"], args["block_table"], args["seq_lens"], f,
                           args["scale"], config=tk.LaunchConfig(num_splits=2, block_t=16), roped_keys=True)
    assert out.shape == args["q"].shape
    assert rel_err(out, ref_out_roped(args, qt)) < TOL
    with pytest.raises(ValueError, match="rank_k=24"):  # head-dim queries in roped mode
        tk.latent_attention(**args, max_query_len=1, roped_keys=True)
    with pytest.raises(ValueError, match="roped_keys=True"):  # roped factors, pre-RoPE call
        tk.latent_decode(args["q"], args["kv_cache"], args["layout"], args["block_table"], args["seq_lens"], f,
                         args["scale"])


@pytest.mark.parametrize("lat_dtype", ["bfloat16", "int4@g32", "int8/int4"])
def test_latent_step_roped_keys_writes_and_attends(lat_dtype):
    """latent_step with roped keys: this step's rows are encoded and written as in the pre-RoPE mode (the same
    check), and attention with the latent queries matches the roped-key oracle over the cache as written."""
    tk = kernels()
    gen = fresh_gen()
    seq = [40, 7, 66]
    args, _ = make_case(seq, [1] * 3, G=2, gs=1, qpk=2, hd=32, rk=32, rv=24, bs=16, lat_dtype=lat_dtype, gen=gen)
    qt = roped_query(args)
    lat, slots = _step_inputs(args, [s - 1 for s in seq], gen)
    before = args["kv_cache"].clone()
    out = torch.full_like(args["q"], float("nan"))
    _step_call_roped(tk, roped_call_args(args, qt), lat, slots, out)
    _check_rows_written(args, lat, slots, before)
    assert rel_err(out, ref_out_roped(args, qt)) < TOL


def _step_call_roped(tk, args, lat, slots, out):
    """_step_call with roped keys (``args["q"]``: the latent queries)."""
    a = {k: v for k, v in args.items() if k not in ("q", "kv_cache", "layout")}
    return tk.latent_step(args["q"], lat, args["kv_cache"], args["layout"], slots, a.pop("block_table"),
                          a.pop("seq_lens"), a.pop("query_start_loc"), **a, out=out, max_query_len=1, roped_keys=True)


def _check_rows_written(args, lat, slots, cache_before):
    """_check_step's checks of the rows written (given the pre-RoPE oracle's own output, its output check is
    void)."""
    _check_step(args, lat, slots, ref_out(args), cache_before)


@pytest.mark.skipif(not CUDA, reason="the GPU path only")
def test_gpu_roped_keys_never_reach_the_reference(monkeypatch):
    """Roped keys on CUDA tensors: decode, varlen and prefill batches of every layout run on the kernels."""
    tk = kernels()
    cases = []
    for lat in ("bfloat16", "int8", "int4", "int4@g32", "int8/int4", "int8/int4@g32", "int2", "int2@g32"):
        for seq_lens, q_lens, gs in (([300, 17, 64], [1, 1, 1], 1), ([300, 40], [3, 40], 1), ([129, 20], [1, 1], 2)):
            args, _ = make_case(seq_lens, q_lens, G=8 // gs, gs=gs, qpk=4, hd=128, rk=48, rv=40, bs=64, lat_dtype=lat)
            qt = roped_query(args)
            cases.append((lat, roped_call_args(args, qt, bare=True), ref_out_roped(args, qt), max(q_lens)))

    def boom(*a, **k):
        raise AssertionError("reference.latent_attention reached on the GPU")
    monkeypatch.setattr(ref, "latent_attention", boom)
    for lat, a, expect, mq in cases:
        out = tk.latent_attention(**a, max_query_len=mq, roped_keys=True)
        assert rel_err(out, expect) < TOL, lat


# ------------------------------------------------------------------------------------------------ transform-coded rows
# Method tcode's rows (layout.py ``seg:<K>/<V>``: per part a list of segments width x bits, one fp16 scale per
# segment and head group) read by the generic kernel as config.segment_pieces, and its exact first token
# (``sink``: position 0 attended with exact K / V, merged in the split-KV reduce). Oracle: the fp64 reference with
# the same sink.


def make_sink(args, on, gen):
    """(k0, v0, on) of a case: random exact first-token keys / values per request in q's dtype, on the device."""
    lay, R = args["layout"], args["seq_lens"].shape[0]
    shape = (R, lay.num_kv_heads, lay.head_dim)
    k0 = (2 * torch.randn(shape, generator=gen)).to(args["q"].dtype).to(DEV)
    v0 = (3 * torch.randn(shape, generator=gen)).to(args["q"].dtype).to(DEV)
    return k0, v0, torch.tensor(on, dtype=torch.bool, device=DEV)


def ref_out_sink(args, sink) -> torch.Tensor:
    a = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in args.items()}
    s = None if sink is None else (sink[0].cpu().double(), sink[1].cpu().double(), sink[2].cpu())
    out = torch.empty(a["q"].shape, dtype=torch.float64)
    return ref.latent_attention(**a, out=out, compute_dtype=torch.float64, sink=s)


SEG_CASES = [
    # 3 head groups, one query per request (the direct generic kernel), split-KV (the sink merges as one more
    # split), a dropped tail (rank 24 of 32) with 8-, 4- and 2-bit K segments; request 0 is its sink alone
    ("seg_decode_g3_split_tail", "seg:8x8+8x4+8x2/16x4+16x2", [1, 20, 37], [1, 1, 1],
     dict(G=3, gs=1, qpk=2, hd=32, rk=24, rv=32, bs=16), dict(max_query_len=1, num_splits=2), [True, True, False]),
    ("seg_decode_g1_gs2_bias", "seg:16x8+32x4+16x2/24x4+16x2", [5, 40], [1, 1],
     dict(G=1, gs=2, qpk=2, hd=32, rk=64, rv=40, bs=16, bias=True), dict(max_query_len=1), [True, True]),
    # varlen prefill (query tiles), GPT-J RoPE (q and k0 permuted alike), bias
    ("seg_prefill_varlen_gptj", "seg:16x8+32x4+16x2/24x4+16x2", [9, 23, 17], [9, 1, 6],
     dict(G=1, gs=2, qpk=2, hd=32, rk=64, rv=40, bs=4, bias=True, is_neox=False), dict(), [True, False, True]),
    ("seg_prefill_g3_partial_rot", "seg:24x4+8x2/32x2", [12, 30], [12, 5],
     dict(G=3, gs=1, qpk=1, hd=32, rk=32, rv=32, bs=8, rot=16), dict(block_t=16), [True, True]),
    ("seg_prefill_g3_no_sink", "seg:8x8+16x4/8x4+24x2", [12, 30], [12, 5],
     dict(G=3, gs=1, qpk=2, hd=32, rk=24, rv=32, bs=8), dict(block_t=16), None),
]
if CUDA:
    SEG_CASES += [  # Llama-3-8B shapes, segment lists of the 15% SmolLM2 config scaled to 128-dim heads
        ("gpu_llama_seg_decode", "seg:16x8+48x4+64x2/16x8+96x4+16x2", [4096, 1, 777, 3001], [1] * 4,
         dict(G=8, gs=1, qpk=4, hd=128, rk=128, rv=128, bs=64), dict(max_query_len=1), [True, True, False, True]),
        ("gpu_llama_seg_decode_split", "seg:64x4+40x2/112x4+16x2", [8192, 1, 777, 3001], [1] * 4,
         dict(G=8, gs=1, qpk=4, hd=128, rk=104, rv=128, bs=64), dict(max_query_len=1, num_splits=3),
         [True, True, True, True]),
        ("gpu_llama_seg_gs2_decode", "seg:16x8+96x4+96x2/224x4+32x2", [2049, 513, 100], [1] * 3,
         dict(G=4, gs=2, qpk=4, hd=128, rk=208, rv=256, bs=64), dict(max_query_len=1), [True, False, True]),
        ("gpu_llama_seg_prefill_chunked", "seg:16x8+48x4+64x2/16x8+96x4+16x2", [1000, 300, 517], [1000, 1, 77],
         dict(G=8, gs=1, qpk=4, hd=128, rk=128, rv=128, bs=64), dict(), [True, True, True]),
    ]


@pytest.mark.parametrize("name,spec,seq_lens,q_lens,case_kw,call_kw,on", SEG_CASES, ids=[c[0] for c in SEG_CASES])
def test_triton_reads_segment_rows_with_sink(name, spec, seq_lens, q_lens, case_kw, call_kw, on):
    """Transform-coded rows against the fp64 oracle (the same bytes, unpacked by layout.py), with the exact first
    token where ``on`` (None: no sink): the generic kernel, never the reference."""
    tk = kernels()
    gen = fresh_gen()
    args, _ = make_case(seq_lens, q_lens, lat_dtype=spec, gen=gen, **case_kw)
    assert args["layout"].segmented
    tk.check_supported(args["layout"])
    sink = None if on is None else make_sink(args, on, gen)
    expect = ref_out_sink(args, sink)
    out = torch.full_like(args["q"], float("nan"))
    kw, cfg = split_kw(call_kw)
    tk.latent_attention(**args, out=out, config=cfg, sink=sink, **kw)
    plan = plan_of(args, cfg, kw.get("max_query_len"))
    assert plan.kernel == "generic"
    err = rel_err(out, expect)
    assert err < TOL, f"{name}: rel err {err:.3e}"
    if sink is not None and any(on) and not CUDA:  # the sink changes the result (the test sees a dropped sink)
        assert rel_err(ref_out_sink(args, None), expect) > 5 * TOL


def test_triton_segment_rank_chunks():
    """Key ranks above 128: a 4-bit segment of 64 and a 2-bit one of 88 coordinates, each its own piece, read with
    one byte load per code (config.segment_runs: the wide layouts)."""
    tk = kernels()
    gen = fresh_gen()
    args, _ = make_case([7, 19], [7, 1], G=1, gs=2, qpk=1, hd=128, rk=160, rv=40, bs=8,
                        lat_dtype="seg:8x8+64x4+88x2/40x4", gen=gen)
    from vllm_kvc.kernels.triton_latent.config import segment_runs
    assert not segment_runs(args["layout"])  # one byte load per code (the small cases read byte runs)
    assert segment_runs(LatentLayout(3, 1, 32, 24, 32, "seg:8x8+8x4+8x2/16x4+16x2"))
    sink = make_sink(args, [True, True], gen)
    out = torch.full_like(args["q"], float("nan"))
    tk.latent_attention(**args, out=out, sink=sink)
    assert rel_err(out, ref_out_sink(args, sink)) < TOL


def test_triton_segment_rows_long_prompts_with_sink():
    """A long prompt rebuilt for dense SDPA keeps its exact first token (reference.rebuild_attention's sink); the
    other request runs on the kernel with its own."""
    tk = kernels()
    gen = fresh_gen()
    args, _ = make_case([40, 30], [40, 1], G=2, gs=1, qpk=2, hd=32, rk=32, rv=24, bs=8,
                        lat_dtype="seg:8x8+24x4/8x4+16x2", gen=gen)
    sink = make_sink(args, [True, True], gen)
    cfg = tk.LaunchConfig(rebuild_min_queries=16, rebuild_min_work=0)
    out = torch.full_like(args["q"], float("nan"))
    tk.latent_attention(**args, out=out, max_query_len=40, query_start_loc_cpu=args["query_start_loc"].cpu(),
                        config=cfg, sink=sink)
    assert list(plan_of(args, cfg, 40, long_prompts=True).rebuilt) == [0]
    assert rel_err(out, ref_out_sink(args, sink)) < TOL


@pytest.mark.parametrize("spec,G,rk,rv", [("seg:8x8+16x4+16x2/24x4+24x2", 3, 40, 48),
                                         ("seg:16x8+144x4+96x2/200x4+56x2", 2, 256, 256)])
def test_segment_pieces_describe_layout_bytes(spec, G, rk, rv):
    """config.segment_pieces read the way the kernels read it (per piece: its coordinates, bits, the byte of each
    head group's codes and the scale number) decodes random rows exactly as layout.unpack does, also where a
    segment wider than 128 coordinates is cut into two pieces; a part of more than 4 pieces is refused."""
    tk = kernels()
    from vllm_kvc.kernels.triton_latent.config import SEG_PIECE, segment_pieces
    from vllm_kvc.layout import GAUSS_LEVELS, UNIFORM_LEVELS
    lay = LatentLayout(G, 1, 256, rk, rv, spec)
    gen = fresh_gen()
    rows = lay.pack(torch.randn(2, G, rk, generator=gen), torch.randn(2, G, rv, generator=gen))
    want_k, want_v = lay.unpack(rows)
    for pieces, want in zip(segment_pieces(lay), (want_k, want_v)):
        used = [pc for pc in pieces if pc[1] > 0]
        assert sum(pc[1] for pc in used) == want.shape[-1] and all(pc[1] <= SEG_PIECE for pc in used)
        for n in range(2):
            row = rows[n]
            scales = row[lay.scale_offset:].view(torch.float16).float()
            for g in range(G):
                for c0, w, bits, byte0, gbytes, sidx, p in used:
                    assert p >= max(16, w) and p & (p - 1) == 0
                    s = float(scales[sidx + g])
                    for i in range(w):
                        x = int(row[byte0 + g * gbytes + (i * bits >> 3)])
                        if bits == 8:
                            v = (x - 256 if x > 127 else x) * s
                        else:
                            u = (x >> (i * bits & 7)) & ((1 << bits) - 1)
                            v = float((UNIFORM_LEVELS if s < 0 else GAUSS_LEVELS)[bits][u]) * abs(s)
                        assert v == pytest.approx(float(want[n, g, c0 + i]), rel=1e-6, abs=1e-6), (n, g, c0 + i)
    with pytest.raises(NotImplementedError, match="5 pieces"):
        tk.check_supported(LatentLayout(1, 1, 256, 80, 16, "seg:16x8+16x8+16x4+16x4+16x2/16x4"))


def test_segment_rows_refuse_roped_keys():
    tk = kernels()
    args, _ = make_case([5], [1], G=1, gs=1, qpk=1, hd=32, rk=16, rv=16, bs=4, lat_dtype="seg:16x4/16x4")
    with pytest.raises(ValueError, match="roped"):
        tk.latent_attention(**dict(args, q=args["q"][..., :16].contiguous()), max_query_len=1, roped_keys=True)


def _seg_step(tk, args, lat, slots, out, sink):
    a = {k: v for k, v in args.items() if k not in ("q", "kv_cache", "layout")}
    return tk.latent_step(args["q"], lat, args["kv_cache"], args["layout"], slots, a.pop("block_table"),
                          a.pop("seq_lens"), a.pop("query_start_loc"), **a, out=out, max_query_len=1, sink=sink)


@pytest.mark.parametrize("capture", [False, True] if CUDA else [False], ids=lambda c: "graph" if c else "eager")
def test_latent_step_segment_rows_with_sink(capture):
    """latent_step with ``seg:`` rows: the fused encoder writes this step's rows, attention reads them with the
    sink. On GPUs the call is captured in a CUDA graph, then the query, latents, slots, lengths and the sink
    (exact K / V and which requests have one) change in place and the replay computes the new step."""
    tk = kernels()
    gen = fresh_gen()
    big = CUDA
    seq = [700, 64, 1500, 9] if big else [40, 7, 66]
    kw = (dict(G=8, gs=1, qpk=4, hd=128, rk=64, rv=64, bs=64) if big else
          dict(G=2, gs=1, qpk=2, hd=32, rk=32, rv=32, bs=16))
    spec = "seg:8x8+24x4+32x2/16x4+48x2" if big else "seg:8x8+16x4+8x2/16x4+16x2"
    args, _ = make_case(seq, [1] * len(seq), lat_dtype=spec, gen=gen, **kw)
    sink = make_sink(args, [True] * len(seq), gen)
    lat, slots = _step_inputs(args, [s - 1 for s in seq], gen)
    out = torch.full_like(args["q"], float("nan"))
    if capture:
        graph = capture_graph(lambda: _seg_step(tk, args, lat, slots, out, sink))
        next_step_in_place(args, lat, slots, [699, 33, 1400, 9], gen)
        new_sink = make_sink(args, [True, False, True, True], gen)
        for t, n in zip(sink, new_sink):
            t.copy_(n)
        before = args["kv_cache"].clone()
        graph.replay()
        torch.cuda.synchronize()
    else:
        before = args["kv_cache"].clone()
        _seg_step(tk, args, lat, slots, out, sink)
    _check_rows_written(args, lat, slots, before)
    assert rel_err(out, ref_out_sink(args, sink)) < TOL


@pytest.mark.parametrize("capture", [False, True] if CUDA else [False], ids=lambda c: "graph" if c else "eager")
def test_sink_table_feeds_replayed_decode_steps(capture):
    """Method tcode's CUDA decode step as glue/latent.py runs it (``_sink_step_cuda``): the exact first tokens live
    in a glue/sink.py SinkTable, written eagerly (vLLM runs prefills eagerly) and read inside the step by device
    gathers. On GPUs the read and latent_step are captured in a CUDA graph; a sink rewritten and one written for
    the first time between replays are read by the next replay; a request without one reads its latent row."""
    tk = kernels()
    from vllm_kvc.glue.sink import SinkTable
    gen = fresh_gen()
    seq = [700, 64, 1500, 9] if CUDA else [40, 7, 66, 5]
    kw = (dict(G=8, gs=1, qpk=4, hd=128, rk=64, rv=64, bs=64) if CUDA else
          dict(G=2, gs=1, qpk=2, hd=32, rk=32, rv=32, bs=16))
    spec = "seg:8x8+24x4+32x2/16x4+48x2" if CUDA else "seg:8x8+16x4+8x2/16x4+16x2"
    args, _ = make_case(seq, [1] * len(seq), lat_dtype=spec, gen=gen, **kw)
    lay = args["layout"]
    table = SinkTable(args["kv_cache"].shape[0], (2, lay.num_kv_heads, lay.head_dim), args["q"].dtype, DEV, pages=6)
    first = args["block_table"][:, 0]
    k0, v0, _ = make_sink(args, [True] * 4, gen)
    table.write(first, [0, 1, 2], torch.stack([k0, v0], 1)[:3])  # request 3: no sink yet
    lat, slots = _step_inputs(args, [s - 1 for s in seq], gen)
    out = torch.full_like(args["q"], float("nan"))

    def step():
        vals, found = table.read(first)
        _seg_step(tk, args, lat, slots, out, (vals[:, 0], vals[:, 1], found))

    run = capture_graph(step).replay if capture else step
    run()
    on = torch.tensor([True, True, True, False], device=DEV)
    assert rel_err(out, ref_out_sink(args, (k0, v0, on))) < TOL
    k1, v1, _ = make_sink(args, [True] * 4, gen)  # request 1's sink rewritten, request 3's written (eagerly)
    table.write(first, [1, 3], torch.stack([k1, v1], 1)[[1, 3]])
    k0[[1, 3]], v0[[1, 3]] = k1[[1, 3]], v1[[1, 3]]
    out.fill_(float("nan"))
    run()
    assert rel_err(out, ref_out_sink(args, (k0, v0, torch.ones(4, dtype=torch.bool, device=DEV)))) < TOL
