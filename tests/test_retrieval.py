"""Passkey retrieval: prompt construction (fast) and the retrieval task inside `bench pareto` through vLLM (slow)."""
import random

import pytest

from vllm_kvc import retrieval as R


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def text():
    """Deterministic filler prose (no corpus package needed): sentences of common words, some with digits."""
    rng = random.Random(1)
    words = ("the of and to in is that it for as with was on be by this are from or an at which have not "
             "list string value module function loop file class object name example when you can use").split()
    paras = []
    for _ in range(300):
        sents = []
        for _ in range(rng.randint(2, 6)):
            w = [rng.choice(words) for _ in range(rng.randint(6, 24))]
            if rng.random() < 0.2:
                w.insert(rng.randrange(len(w)), str(rng.randint(0, 999)))
            sents.append(" ".join(w).capitalize() + ".")
        paras.append(" ".join(sents))
    return "\n\n".join(paras)


def test_grid_covers_lengths_then_cells():
    g = R.grid(9)
    assert sorted({n for n, _ in g[:3]}) == sorted(R.LENGTHS) and sorted({d for _, d in g[:3]}) == sorted(R.DEPTHS)
    assert sorted(g) == sorted((n, d) for n in R.LENGTHS for d in R.DEPTHS)
    assert R.grid(18) == g + g and len(R.grid(R.DEFAULT_CASES)) == R.DEFAULT_CASES == 9
    assert R.grid(4, lengths=(512,), depths=(0.25, 0.75)) == [(512, 0.25), (512, 0.75)] * 2


@pytest.mark.parametrize("fmt", R.FORMATS)
def test_needle_depth_length_and_frame(tok, text, fmt):
    cases = R.build_cases(tok, text, 9, fmt=fmt)
    before, after = R._frame(tok, fmt)
    n_before, n_after = len(R._encode(tok, before)), len(R._encode(tok, after))
    for c in cases:
        ids = c.prompt_ids
        # length: at most the target, short of it by less than one filler sentence (+ a few merge tokens)
        assert c.length - 80 <= len(ids) <= c.length + 2, (c.length, len(ids))
        assert 5 <= len(c.answer) <= 7 and c.answer.isdigit() and c.answer[0] != "0"
        # the needle starts at needle_token and holds the answer
        needle = tok.decode(ids[c.needle_token:c.needle_token + 24])
        assert needle.startswith(f"The secret number is {c.answer}."), needle
        assert tok.decode(ids).count(c.answer) == 2  # the needle states it twice, nothing else does
        # its depth in the filler (between the frame's two ends) is the target's, to within a sentence or two
        filler = len(ids) - n_before - n_after
        depth = (c.needle_token - n_before) / filler
        assert abs(depth - c.depth) < 0.05 + 60 / filler, (c.length, c.depth, depth)
        assert tok.decode(ids).endswith(f"{R.QUESTION}" + ("<|im_end|>\n<|im_start|>assistant\n" if fmt == "chat"
                                                           else " ") + R.ANSWER_PREFIX)
    if fmt == "chat":
        assert tok.decode(cases[0].prompt_ids).startswith("<|im_start|>system\n")


def test_deterministic_and_seeded(tok, text):
    a = [c.to_json() for c in R.build_cases(tok, text, 6)]
    b = [c.to_json() for c in R.build_cases(tok, text, 6)]
    assert a == b
    c = R.build_cases(tok, text, 6, seed=1)
    assert [x.answer for x in c] != [x["answer"] for x in a]
    assert len({x["answer"] for x in a}) == 6  # distinct numbers
    assert R.build_cases(tok, text, 0) == []
    with pytest.raises(ValueError):
        R.build_cases(tok, text, 1, fmt="xml")


def test_real_corpus_cases(model_dir):
    from vllm_kvc.corpus import DOC_ROOT

    if not DOC_ROOT.exists():
        pytest.skip("python3.11-doc not installed")
    cases = R.load_cases(model_dir, n=3)
    assert [c.length for c in cases] == list(R.LENGTHS)
    assert all(c.length - 200 <= len(c.prompt_ids) <= c.length for c in cases)


def test_answer_check():
    assert R.is_correct(" 894772.", "894772")
    assert R.is_correct("The secret number is 894,772", "894772")
    assert R.is_correct("it is 894 772!", "894772")
    assert not R.is_correct(" 8947721", "894772")  # a longer number is not the answer
    assert not R.is_correct(" 1894772", "894772")
    assert not R.is_correct(" 89477", "894772")
    assert not R.is_correct(" a special function", "894772")
    s = R.summarize([{"length": 1024, "depth": 0.1, "correct": True}, {"length": 1024, "depth": 0.1, "correct": False},
                     {"length": 4096, "depth": 0.5, "correct": True}])
    assert s == {"acc": 2 / 3, "cells": {"1024@0.1": 0.5, "4096@0.5": 1.0}}


def test_child_scores_retrieval_outputs():
    """evaluate._retrieval with a stand-in engine: greedy outputs checked against the answers."""
    from types import SimpleNamespace

    from vllm_kvc.evaluate import _retrieval

    class FakeLLM:
        def generate(self, prompts, sp, use_tqdm=False):
            assert sp.temperature == 0 and sp.max_tokens == 12
            texts = [" 123456.", " a function", " 7654321\n"]
            return [SimpleNamespace(outputs=[SimpleNamespace(text=t)]) for t in texts[:len(prompts)]]

    cases = [{"prompt_ids": [1, 2], "answer": a, "length": 1024, "depth": d}
             for a, d in (("123456", 0.1), ("55555", 0.5), ("7654321", 0.9))]
    r = _retrieval(FakeLLM(), cases, 12)
    assert r["retrieval_acc"] == 2 / 3 and [x["correct"] for x in r["retrieval"]] == [True, False, True]
    assert r["retrieval_cells"] == {"1024@0.1": 1.0, "1024@0.5": 0.0, "1024@0.9": 1.0}


def test_bench_lengths_table_and_cli():
    from vllm_kvc.bench import _table, retrieval_lengths
    from vllm_kvc.cli import build_parser

    assert retrieval_lengths(8192) == R.LENGTHS
    assert retrieval_lengths(2048) == (1024,) and retrieval_lengths(1024) == ()
    assert retrieval_lengths(None, (512, 99999)) == (512, 99999)
    p = {"method": "vllm-int4_per_token_head", "is_baseline": True, "latent_dtype": "int4", "rank_k_mean": 64.0,
         "rank_v_mean": 64.0, "kv_bytes_per_token": 216, "memory_fraction": 0.28, "kv_capacity_tokens": 1000,
         "ppl": 7.5, "ppl_rise_pct": 2.0, "retrieval_acc": 7 / 9, "retrieval_cases": 9}
    base = {"kv_bytes_per_token": 768, "ppl": 7.3, "kv_capacity_tokens": 500, "retrieval_acc": 1.0,
            "retrieval_cases": 9}
    t = _table([p], base)
    assert "retrieval 100 (9/9) %" in t and "| retrieval % |" in t and "| 78 (7/9) |" in t
    t = _table([{k: v for k, v in p.items() if not k.startswith("retrieval")}],
               {k: v for k, v in base.items() if not k.startswith("retrieval")})
    assert "retrieval" not in t
    a = build_parser().parse_args(["bench", "pareto", "--config", "c.yaml"])
    assert a.retrieval == R.DEFAULT_CASES
    assert build_parser().parse_args(["bench", "pareto", "--config", "c.yaml", "--retrieval", "0"]).retrieval == 0


@pytest.mark.slow
def test_pareto_reports_retrieval_through_vllm(model_dir, tmp_path):
    """Baseline bf16 and the default deployment's compression, 3 prompts of 1k tokens (10/50/90 % depth) in
    the same engines as the perplexity chunks. Measured (2026-11-30, 2-core CPU): baseline 100 % on every
    1k-4k prompt tried."""
    import json

    import yaml

    from vllm_kvc.bench import pareto

    dep = yaml.safe_load(open(__file__.rsplit("/tests/", 1)[0] + "/configs/default.yaml"))
    cfg = tmp_path / "dep.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": "smollm2", "engine": {"max_model_len": 2048, "enforce_eager": True, "dtype": "bfloat16"},
        "compression": dep["compression"]}))
    res = pareto(str(cfg), tokens=512, seq_len=256, include=["deployment"], points=(0.35,), quality_pct=None,
                 log_dir=tmp_path / "logs", retrieval=3)
    assert not res["failures"], res["failures"]
    b = res["baseline"]
    assert b["retrieval_cases"] == 3 and [r["length"] for r in b["retrieval"]] == [1024] * 3
    assert b["retrieval_acc"] >= 2 / 3, b["retrieval"]
    assert [p["method"] for p in res["points"]] == ["deployment"]
    for p in res["points"]:
        assert p["retrieval_cases"] == 3 and 0.0 <= p["retrieval_acc"] <= 1.0
        assert set(p["retrieval_cells"]) == {"1024@0.1", "1024@0.5", "1024@0.9"}
    json.dumps(res)
