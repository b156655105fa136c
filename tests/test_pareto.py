"""bench pareto helpers (fast) and the bytes of a mixed allocation in vLLM's real cache (slow)."""
import json
import pytest
from conftest import run_engine

from vllm_kvc.bench import check_dominance, plot
from vllm_kvc.methods.lowrank import uniform_ranks as _uniform_ranks
from vllm_kvc.config import CompressionConfig
from vllm_kvc.methods.lowrank import LayerRanks
from vllm_kvc.plan import ModelShape
from vllm_kvc.methods import build_plan


def _pt(method, frac, rise, base=True):
    return {"method": method, "is_baseline": base, "memory_fraction": frac, "ppl_rise_pct": rise}


def test_dominance_check():
    pts = [_pt("kvc-alloc", 0.25, 1.0, False), _pt("kvc-alloc", 0.15, 5.0, False),
           _pt("quant-int4", 0.28, 2.0), _pt("svd-whitened", 0.25, 9.0), _pt("quant-int2", 0.156, 400.0)]
    d = check_dominance(pts + [_pt("quant-int8", 0.53, 0.0)])  # int8 belongs to the 50% point: not compared
    assert d["holds"] and d["strict_points"] == 2 and not d["dominated_ours"]
    assert d["undominated_baselines"] == [("quant-int8", 0.53, 0.0)]
    d = check_dominance(pts + [_pt("svd-whitened", 0.16, 4.0)])  # same point (15%), more memory, better
    assert not d["holds"] and d["violations"][0]["memory_fraction"] == 0.15


def test_uniform_svd_points_fit_their_budget():
    shape = ModelShape("LlamaForCausalLM", 30, 576, 9, 3, 64, "bfloat16")
    for f in (0.5, 0.35, 0.25, 0.2, 0.15):
        r = _uniform_ranks(1, 192, 30, f, 30 * 768)
        plan = build_plan(CompressionConfig(group_size=3, latent_dtype="int8", ranks=LayerRanks(k=r, v=r)), shape)
        assert plan.bytes_per_token() <= f * plan.baseline_bytes_per_token()
        assert (r[0] + 1) * 2 * 30 + 4 * 30 > f * 30 * 768  # the largest such rank


def test_plot_writes_png(tmp_path):
    pts = [dict(_pt("kvc-alloc", 0.25, 1.0, False)), dict(_pt("quant-int4", 0.28, 2.0))]
    out = tmp_path / "p.png"
    plot(pts, str(out), "t")
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_mixed_allocation_bytes_in_vllm_capacity(model_dir):
    # per-layer ranks differ, K int8 and V int4 (packed two per byte) with one fp16 scale per token and K/V
    rk = [136 + 8 * (i % 7) for i in range(30)]  # mild: the model must still answer
    rv = [192 - (i % 3) for i in range(30)]  # odd V ranks: the packed int4 part ends on a half byte
    comp = {"group_size": 3, "latent_dtype": "int8", "latent_dtype_k": "int8", "latent_dtype_v": "int4",
            "ranks": {"k": rk, "v": rv}}
    e = {"model": model_dir, "dtype": "bfloat16", "enforce_eager": True, "max_model_len": 2048, "seed": 0,
         "additional_config": {"kv_compression": comp}}
    res = run_engine(e, ["The capital of France is"], max_tokens=8, inspect=True)
    plan = build_plan(CompressionConfig(**comp), ModelShape.from_model_dir(model_dir))
    assert plan.latent_dtype == "int8/int4"
    rows = {int(name.split(".")[2]): v["row_bytes"] for name, v in res["layers"].items()}
    assert len(rows) == 30
    for i in range(30):
        assert rows[i] == rk[i] + (rv[i] + 1) // 2 + 4 == plan.layer_bytes_per_token(i), i
    bs = res["block_size"]
    assert res["num_blocks"] == (1 << 30) // (bs * plan.bytes_per_token())
    assert "Paris" in res["texts"][0]


@pytest.mark.slow
def test_quant_int4_method_capacity_and_greedy(model_dir):
    comp = {"method": "quant", "bits": 4, "group_size": 3}
    e = {"model": model_dir, "dtype": "bfloat16", "enforce_eager": True, "max_model_len": 2048, "seed": 0,
         "additional_config": {"kv_compression": comp}}
    res = run_engine(e, ["The capital of France is"], max_tokens=8, inspect=True)
    assert all(v["row_bytes"] == 216 for v in res["layers"].values())
    assert res["num_blocks"] == (1 << 30) // (res["block_size"] * 216 * 30)
    assert "Paris" in res["texts"][0]


@pytest.mark.slow
def test_pareto_survives_a_failed_point_and_reports_it(model_dir, tmp_path):
    """One point that cannot be prepared (its calibration text is missing) is reported under `failures`; the
    run goes on and returns JSON (it used to die with the whole benchmark)."""
    import yaml

    from vllm_kvc.bench import pareto

    cfg = tmp_path / "dep.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": "smollm2", "engine": {"max_model_len": 1024, "enforce_eager": True, "dtype": "bfloat16"},
        "compression": {"group_size": 3, "calibration": {"corpus": str(tmp_path / "missing.txt")}}}))
    res = pareto(str(cfg), tokens=512, seq_len=256, include=["svd-whitened", "svd-plain"], points=(0.5,),
                 quality_pct=None, log_dir=tmp_path / "logs")
    # whitened factors need the (missing) calibration text; plain ones (the weights alone) do not
    assert [f["method"] for f in res["failures"]] == ["svd-whitened"]
    assert [p["method"] for p in res["points"]] == ["svd-plain"] and res["baseline"]["ppl"] > 1
    assert all("missing.txt" in f["error"] for f in res["failures"]), res["failures"]
    json.dumps(res)
