"""``vllm-kvc bench serve``: budget arithmetic, metrics parsing, argument errors, and one real tiny run (two live
servers, dense and the default deployment, in the same KV bytes)."""
import dataclasses
import json

import pytest
from conftest import vllm_kvc

from vllm_kvc.bench_serve import (BLOCK_SIZE, ServeBenchArgs, cache_info, kv_budget_bytes, max_model_len_for,
                                  metric_sum, parse_metrics, percentile, sequences_that_fit, serve_bench)
from vllm_kvc.settings import ConfigError

DENSE_BPT = 23040  # SmolLM2-135M, bf16: 30 layers x 2 x 3 heads x 64 x 2 bytes


def test_budget_holds_exactly_the_dense_sequences():
    for seqs, seq_tokens in ((16, 384), (2, 128), (5, 1000), (1, 1)):
        budget = kv_budget_bytes(DENSE_BPT, seqs, seq_tokens)
        assert budget % (BLOCK_SIZE * DENSE_BPT) == 0  # whole blocks
        assert sequences_that_fit(DENSE_BPT, budget, seq_tokens) == seqs
        assert sequences_that_fit(DENSE_BPT, budget - 1, seq_tokens) == seqs - 1
    # the same bytes at a quarter of the bytes per token hold about 4x the sequences (whole blocks, null block)
    budget = kv_budget_bytes(DENSE_BPT, 16, 384)
    assert sequences_that_fit(DENSE_BPT // 4, budget, 384) == (4 * (16 * 3 + 1) - 1) // 3
    assert max_model_len_for(384) == 384 and max_model_len_for(385) == 512
    with pytest.raises(ValueError):
        kv_budget_bytes(DENSE_BPT, 0, 384)


def test_percentile_and_metrics_parsing():
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile(list(range(1, 101)), 0.99) == 99
    assert percentile(list(range(1, 101)), 1.0) == 100
    text = ('# HELP vllm:num_preemptions_total x\n# TYPE vllm:num_preemptions_total counter\n'
            'vllm:num_preemptions_total{engine="0",model_name="smollm2"} 7.0\n'
            'vllm:num_requests_running{engine="0",model_name="smollm2"} 3.0\n'
            'vllm:cache_config_info{block_size="128",num_gpu_blocks="49",engine="0"} 1.0\n')
    m = parse_metrics(text)
    assert metric_sum(m, "vllm:num_preemptions_total") == 7.0
    assert metric_sum(m, "vllm:missing") is None
    assert cache_info(m, "num_gpu_blocks") == 49 and cache_info(m, "block_size") == 128


@pytest.mark.parametrize("change,field", [
    ({"requests": 0}, "--requests"),
    ({"output_tokens": -3}, "--output-tokens"),
    ({"kv_memory": "12XB"}, "--kv-memory"),
    ({"kv_memory": "1KiB"}, "--kv-memory"),
    ({"unbounded_kv_space": "0.5"}, "--unbounded-kv-space"),
    ({"unbounded": -1}, "--unbounded"),
    ({"configs": ["configs/smollm2-dense.yaml"]}, "--configs"),
    ({"configs": ["configs/nope.yaml"]}, "--configs"),
    ({"dense_config": "configs/default.yaml"}, "--dense-config"),
])
def test_bad_arguments_name_the_field(change, field):
    """Every bad input is an error naming the option, before any server starts."""
    with pytest.raises(ConfigError) as e:
        serve_bench(dataclasses.replace(ServeBenchArgs(), **change))
    assert e.value.field == field


def test_bad_argument_exit_code():
    r = vllm_kvc("bench", "serve", "--requests", "0", timeout=180)
    assert r.returncode == 2 and "error: --requests: 0: expected a positive integer" in r.stderr


@pytest.mark.slow
def test_tiny_kv_bound_run(tmp_path):
    """Two real servers (dense, default) in the same KV bytes: 2 dense sequences fit, 6 requests in flight."""
    r = vllm_kvc("bench", "serve", "--configs", "configs/default.yaml", "--requests", "6", "--concurrency", "6",
                 "--prompt-tokens", "24", "--output-tokens", "40", "--dense-sequences", "2", "--json",
                 "--log-dir", str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout)
    (run,) = res["runs"]
    for key in ("config", "memory_fraction", "requests_per_s", "baseline_requests_per_s", "failures"):
        assert key in run, key
    assert run["config"] == "configs/default.yaml" and run["load"] == "kv-bound"
    assert 0.3 < run["memory_fraction"] < 0.5
    assert run["failures"] == 0 and run["baseline_failures"] == 0
    assert run["requests_per_s"] > 0 and run["baseline_requests_per_s"] > 0
    kb = res["kv_bound"]
    assert kb["settings"]["dense_sequences_that_fit"] == 2
    assert kb["settings"]["sequences_that_fit"]["configs/default.yaml"] > 2
    for row in (kb["dense"], *kb["compressed"]):
        assert row["requests"] == 6 and row["failures"] == 0
        assert row["output_tokens"] == 6 * 40 and row["short_outputs"] == 0  # ignore_eos: every token generated
        assert row["ttft_p50_s"] is not None and row["latency_p99_s"] >= row["latency_p50_s"]
        assert row["preemptions"] >= 0
    # the same bytes: the compressed cache holds more tokens, and vLLM reports it
    assert kb["compressed"][0]["kv_capacity_tokens"] > kb["dense"]["kv_capacity_tokens"]
    assert kb["dense"]["max_running"] <= 2
