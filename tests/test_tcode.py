"""Method ``tcode``: transform-coded latent rows (layout.py ``seg:`` specs), the exact first token (reference
attention ``sink``, glue/latent.py), the allocation and factors (vllm_kvc/tcode.py), the settings, and one real
vLLM engine against the plain-transformers emulation."""
import pytest
import torch

from vllm_kvc.config import CompressionConfig
from vllm_kvc.kernels import reference
from vllm_kvc.layout import LatentLayout, pack_codes, quantize
from vllm_kvc.methods import build_plan, get_method
from vllm_kvc.plan import (ModelShape, latent_row_bytes, parse_latent_spec, parse_segments, segment_spec)
from vllm_kvc.settings import ConfigError

SMOL = ModelShape("LlamaForCausalLM", 30, 576, 9, 3, 64)


# ------------------------------------------------------------------------------------------------ row layout
def test_segment_spec_parsing_and_errors():
    assert parse_segments("8x8+64x4+96x2") == ((8, 8), (64, 4), (96, 2))
    spec = segment_spec(((64, 4), (96, 2)), ((72, 4), (112, 2)))
    assert spec == "seg:64x4+96x2/72x4+112x2" and parse_latent_spec(spec) == ("seg", "seg", 0)
    # by hand: K 64*4/8 + 96*2/8 = 56 value bytes + 2 scales, V 36 + 28 + 2 scales, fp16 scales
    assert latent_row_bytes(1, 160, 184, spec) == 56 + 64 + 2 * 4
    assert latent_row_bytes(2, 160, 184, spec) == 2 * (56 + 64) + 2 * 8
    for bad, what in (("64x3", "bits 3"), ("6x4", "width 6"), ("8x2+8x4", "must not increase"),
                      ("64-4", "expected segments like")):
        with pytest.raises(ValueError, match=what):
            parse_segments(bad)


@pytest.mark.parametrize("groups", [1, 2])
def test_segment_rows_pack_byte_for_byte(groups):
    """Row = each segment's codes (group-major, packed at its bits) K then V, then one fp16 scale per segment and
    group; the same quantizer as the other integer rows, applied per segment."""
    segs_k, segs_v = ((8, 8), (16, 4), (12, 2)), ((24, 4), (8, 2))
    lay = LatentLayout(groups, 1, 64, rank_k=36, rank_v=32, dtype=segment_spec(segs_k, segs_v))
    torch.manual_seed(groups)
    n = 7
    lk, lv = torch.randn(n, groups, 36), torch.randn(n, groups, 32) * 3
    rows = lay.pack(lk, lv)
    assert rows.dtype == torch.uint8 and rows.shape == (n, lay.row_bytes)
    assert lay.row_bytes == latent_row_bytes(groups, 36, 32, lay.dtype)
    codes, scales = [], []
    for lat, segs in ((lk, segs_k), (lv, segs_v)):
        off = 0
        for w, b in segs:
            c, s = quantize(lat[..., off:off + w], b, 0)
            codes.append(pack_codes(c.reshape(n, -1), b))
            scales.append(s.reshape(n, groups))
            off += w
    want = torch.cat(codes + [torch.cat(scales, 1).half().view(torch.uint8)], 1)
    assert torch.equal(rows, want)
    k, v = lay.unpack(rows)
    assert k.shape == (n, groups, 36) and v.shape == (n, groups, 32)
    # 8-bit coordinates come back within half a step of their absmax scale; 2-bit ones far less exactly
    step8 = lk[..., :8].abs().amax(-1, keepdim=True) / 127
    assert ((k[..., :8] - lk[..., :8]).abs() <= step8 * 0.5 + 1e-6).all()
    assert (k[..., 28:] - lk[..., 28:]).pow(2).mean() > (k[..., :8] - lk[..., :8]).pow(2).mean() * 10


def test_segment_layout_checks_its_ranks():
    with pytest.raises(ValueError, match="cover 24 K and 8 V coordinates"):
        LatentLayout(1, 1, 64, rank_k=32, rank_v=8, dtype="seg:8x8+16x4/8x2")


# ------------------------------------------------------------------------------------------- exact first token
def _setup(seed=0, groups=1, gs=2, hd=16, rk=12, rv=20, hq=8, bias=True):
    g = torch.Generator().manual_seed(seed)
    lay = LatentLayout(groups, gs, hd, rank_k=rk, rank_v=rv, dtype="seg:4x8+8x4/12x4+8x2")
    b_k = torch.randn(groups, rk, gs * hd, generator=g) / 3
    b_v = torch.randn(groups, rv, gs * hd, generator=g) / 3
    bk = torch.randn(groups * gs * hd, generator=g) if bias else None
    bv = torch.randn(groups * gs * hd, generator=g) if bias else None
    pos = torch.arange(256)[:, None].float() / (10000 ** (torch.arange(0, hd, 2).float() / hd))[None]
    cs = torch.cat([pos.cos(), pos.sin()], -1)
    return lay, b_k, b_v, bk, bv, cs, hq, g


@pytest.mark.parametrize("bias", [True, False])
def test_sink_replaces_position_zero_exactly(bias):
    """Decodes (one padded batch, different lengths) and prefills: attention with ``sink`` equals dense attention
    over the rebuilt keys and values with position 0's exact ones in their place; a request whose sink was not
    found reads its latent row."""
    lay, b_k, b_v, bk, bv, cs, hq, g = _setup(bias=bias)
    hkv, hd, bs = lay.num_kv_heads, lay.head_dim, 4
    lens, nqs = [9, 5, 13, 7], [1, 1, 1, 7]  # three decodes, one whole prompt
    nblk = sum((s + bs - 1) // bs for s in lens)
    cache = torch.zeros(nblk, bs, lay.row_bytes, dtype=torch.uint8)
    perm = torch.randperm(nblk, generator=g)
    table = torch.zeros(len(lens), 4, dtype=torch.long)
    at = 0
    lat = []
    for r, s in enumerate(lens):
        nb = (s + bs - 1) // bs
        table[r, :nb] = perm[at:at + nb]
        at += nb
        lk, lv = torch.randn(s, 1, lay.rank_k, generator=g), torch.randn(s, 1, lay.rank_v, generator=g)
        slots = torch.stack([table[r, j // bs] * bs + j % bs for j in range(s)])
        reference.write_latents(cache, slots, lay, lk, lv)
        lat.append(lay.unpack(lay.pack(lk, lv)))
    k0 = torch.randn(len(lens), hkv, hd, generator=g)
    v0 = torch.randn(len(lens), hkv, hd, generator=g)
    on = torch.tensor([True, False, True, True])
    qsl = torch.tensor([0] + list(torch.tensor(nqs).cumsum(0)))
    q = torch.randn(int(qsl[-1]), hq, hd, generator=g)
    out = reference.latent_attention(q, cache, lay, table, torch.tensor(lens), qsl, b_k, b_v, bk, bv, cs, 0.3,
                                     sink=(k0, v0, on))
    for r, s in enumerate(lens):
        ck, cv = lat[r]
        k = reference.rebuild_keys(ck, b_k, bk, lay, cs, True)
        v = reference.rebuild_values(cv, b_v, bv, lay)
        if on[r]:
            k[0], v[0] = k0[r], v0[r]
        want = reference.dense_reference(q[qsl[r]:qsl[r + 1]], k, v, 0.3)
        torch.testing.assert_close(out[qsl[r]:qsl[r + 1]], want, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------------------------- settings
def _comp(k, v, **kw):
    return CompressionConfig(method="tcode", group_size=3, tcode={"segments": {"k": k, "v": v}, **kw})


def test_plan_bytes_ranks_and_errors():
    k = ["64x4+96x2"] * 30
    v = ["8x8+72x4+104x2"] * 30
    plan = build_plan(_comp(k, v), SMOL)
    assert plan.bytes_per_token() == 30 * (32 + 24 + 8 + 36 + 26 + 5 * 2)  # five segments, one fp16 scale each
    assert plan.reported_ranks() == ([160] * 30, [184] * 30) and plan.sink
    assert get_method("tcode").describe(plan)["segments"][0] == "64x4+96x2/8x8+72x4+104x2"
    cases = [(_comp(k[:29], v[:29]), "compression.tcode.segments.k", "one per layer"),
             (_comp(k[:-1] + ["64x3"], v), r"compression.tcode.segments.k\[29\]", "bits 3"),
             (_comp(k, ["200x4"] * 30), r"compression.tcode.segments.v\[0\]", "at most the head-group dimension 192")]
    for comp, field, what in cases:
        with pytest.raises(ConfigError, match=what) as e:
            build_plan(comp, SMOL)
        assert e.value.field.startswith(field.replace("\\", "")), e.value.field
    plain = build_plan(CompressionConfig(method="tcode", group_size=3), SMOL)  # not allocated: 4 bits everywhere
    assert plain.layer_specs[0] == "seg:192x4/192x4" and plain.bytes_per_token() == 30 * (2 * 96 + 4)
    with pytest.raises(ConfigError, match="group_size"):  # head groups follow tensor parallelism as lowrank's
        build_plan(_comp(k, v), SMOL, tp_size=3)


def test_cuda_checks_segment_rows_at_startup():
    """The Triton kernels read transform-coded rows: a GPU engine accepts tcode layouts whose tiles fit on chip,
    and refuses (a ValueError naming the latent dtype and the sizes) those that do not, e.g. SmolLM2's head groups of
    3 x 64 dims at ranks above 128 (next_pow2(rank_k) x group_size > 512)."""
    pytest.importorskip("triton")
    from vllm_kvc.glue.latent import check_kernel_layout

    check_kernel_layout(LatentLayout(8, 1, 128, 128, 128, "seg:16x8+48x4+64x2/16x8+96x4+16x2"), "layers.0")
    check_kernel_layout(LatentLayout(4, 2, 128, 208, 256, "seg:16x8+96x4+96x2/224x4+32x2"), "layers.1")
    check_kernel_layout(LatentLayout(1, 3, 64, 96, 184, "seg:32x4+64x2/72x4+112x2"))
    with pytest.raises(ValueError, match=r"seg:64x4\+96x2/72x4\+112x2.*rank_k=160"):
        check_kernel_layout(LatentLayout(1, 3, 64, 160, 184, "seg:64x4+96x2/72x4+112x2"))


# -------------------------------------------------------------------------------------------- allocation (real)
@pytest.mark.slow
def test_allocation_fits_the_budget_and_factors_match(model_dir, tmp_path):
    """``vllm-kvc allocate --method tcode``: the written deployment validates, costs at most the budget, and its
    factor file has the plan's shapes with orthonormal-in-the-metric segments (B of each part full row rank)."""
    import subprocess
    import sys

    import yaml
    from safetensors import safe_open

    from vllm_kvc.validate import check_file

    out = tmp_path / "tc.yaml"
    r = subprocess.run([sys.executable, "-m", "vllm_kvc.cli", "allocate", "--config", "configs/default.yaml",
                        "--method", "tcode", "--memory", "0.2", "--out", str(out)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    d = yaml.safe_load(out.read_text())
    assert d["compression"]["method"] == "tcode" and "ratio" not in d["compression"]
    c = check_file(str(out), check_engine=False)
    assert c.plan.bytes_per_token() <= 0.2 * c.plan.baseline_bytes_per_token()
    assert c.plan.bytes_per_token() > 0.19 * c.plan.baseline_bytes_per_token()
    plan, path = get_method("tcode").prepare(c.model_dir, c.deployment.compression, c.shape)
    with safe_open(str(path), framework="pt") as f:
        for i in (0, 15, 29):
            a, b = f.get_tensor(f"{i}.a_k"), f.get_tensor(f"{i}.b_k")
            assert a.shape == (576, plan.ranks_k[i]) and b.shape == (1, plan.ranks_k[i], 192)
            assert torch.linalg.matrix_rank(b[0].double()) == plan.ranks_k[i]


@pytest.mark.slow
@pytest.mark.parametrize("window", [0, 16])
def test_perplexity_through_vllm_matches_transformers_emulation(model_dir, tmp_path, window):
    """A 15% tcode deployment, float32 on both sides, 2 x 512 tokens of held-out text: vLLM's perplexity
    (segment rows in the paged cache, the first token from the sink pool; with ``window``, each query's 16 newest
    tokens from the exact pool, prompts in chunks of 128 tokens so that windows cross chunks) equals plain
    transformers with the same factors and quantizer; without the sink (and window) it is worse."""
    from transformers import AutoModelForCausalLM

    from vllm_kvc.emulate import perplexity
    from vllm_kvc.evaluate import eval_chunks, run_engine
    from vllm_kvc.tcode import allocate_config

    shape = ModelShape.from_model_dir(model_dir)
    base = CompressionConfig(method="tcode", group_size=3, tcode={"window": window, "context": 512})
    comp, _ = get_method("tcode").allocate(model_dir, base, build_plan(CompressionConfig(), shape)
                                           .baseline_bytes_per_token(), memory=0.15)
    assert allocate_config  # (the same allocation the CLI writes)
    chunks = eval_chunks(model_dir, "heldout", 1024, 512)
    engine = {"model": model_dir, "dtype": "float32", "enforce_eager": True, "max_model_len": 1024, "seed": 0,
              "additional_config": {"kv_compression": comp.model_dump(mode="json")}}
    if window:  # chunked prompts: the window's rows before each chunk come from the pool
        engine.update(max_num_batched_tokens=128, enable_chunked_prefill=True, max_num_seqs=2)
    res = run_engine(engine, chunks, "1", tmp_path / "engine.log")
    plan, path = get_method("tcode").prepare(model_dir, comp, shape)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        dense = perplexity(model, chunks)
        undo = get_method("tcode").emulate(model, plan, path, comp)
        emu = perplexity(model, chunks)
        for u in undo:
            u()
        from vllm_kvc.tcode import install
        undo = install(model, str(path), plan.layer_specs, sink=False)
        no_sink = perplexity(model, chunks)
        for u in undo:
            u()
    assert abs(res["ppl"] / emu - 1) < 0.005, (res["ppl"], emu, dense)
    assert dense < emu < no_sink, (dense, emu, no_sink)


@pytest.mark.slow
def test_quality_mode_measures_its_promise_on_validation_text(model_dir):
    """``vllm-kvc allocate --method tcode --max-rise``: bisection on the memory fraction, each candidate's rise
    measured on the validation text; the chosen allocation re-measured independently keeps the budget, every
    smaller fraction tried broke it, and a budget no allocation can keep is an error naming the flag."""
    from vllm_kvc.allocate import _context
    from vllm_kvc.corpus import load_text, spread_chunks
    from vllm_kvc.emulate import perplexity
    from vllm_kvc.tcode import DEFAULT_PROBE, factors, install, load_stats, quality_config

    shape = ModelShape.from_model_dir(model_dir)
    base = CompressionConfig(method="tcode", group_size=3)
    full = build_plan(CompressionConfig(), shape).baseline_bytes_per_token()
    val = {"chunks": 2, "seq_len": 256}
    sk, sv, used, info = quality_config(model_dir, base, 3.0, full, iters=3, validation=val)
    frac = used / full
    assert 0.08 < frac <= 0.5 and info["validation_rise_pct"] <= 3.0, info
    assert all(t["rise_pct"] > 3.0 for t in info["tried"] if t["fraction"] < frac - 1e-4), info["tried"]
    ctx = _context(model_dir, base, DEFAULT_PROBE)
    chunks = spread_chunks(ctx.tok, load_text("validation"), 2, 256)
    with torch.no_grad():
        dense = perplexity(ctx.model, chunks)
        undo = install(ctx.model, factors(load_stats(model_dir, base), sk, sv),
                       [segment_spec(k, v) for k, v in zip(sk, sv)])
        coded = perplexity(ctx.model, chunks)
        for u in undo:
            u()
    assert abs(100 * (coded / dense - 1) - info["validation_rise_pct"]) < 1e-3
    with pytest.raises(ConfigError, match="--max-rise"):
        quality_config(model_dir, base, -1.0, full, iters=1, validation=val)
