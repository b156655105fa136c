"""Qwen2 (K/V biases) and Mistral through the plugin: tiny random checkpoints built here, real vLLM."""
import json
import shutil

import pytest
from conftest import run_engine

pytestmark = pytest.mark.slow


def _tiny(tmp_path_factory, model_dir, arch):
    import torch
    import transformers

    d = tmp_path_factory.mktemp(arch)
    common = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  initializer_range=0.25, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    if arch == "Qwen2ForCausalLM":
        cfg = transformers.Qwen2Config(**common)
    else:
        cfg = transformers.MistralConfig(**common, sliding_window=None)
    torch.manual_seed(0)
    model = getattr(transformers, arch)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # non-zero K/V biases exercise the bias path
    model.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{model_dir}/{f}", d / f)
    assert json.load(open(d / "config.json"))["architectures"] == [arch]
    return str(d)


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "MistralForCausalLM"])
def test_full_rank_greedy_equals_baseline(tmp_path_factory, model_dir, arch):
    path = _tiny(tmp_path_factory, model_dir, arch)
    eng = {"model": path, "dtype": "float32", "enforce_eager": True, "max_model_len": 512, "seed": 0}
    prompts = ["The capital of France is", "One two three four", "def main():"]
    base = run_engine(eng, prompts, max_tokens=32)
    comp = {"ratio": 1.0, "group_size": 2, "latent_dtype": "float32",
            "calibration": {"tokens": 2048, "seq_len": 512}}
    ours = run_engine({**eng, "additional_config": {"kv_compression": comp}}, prompts, max_tokens=32,
                      inspect=True)
    assert ours["token_ids"] == base["token_ids"]
    assert all(v["row_bytes"] == (64 + 64) * 4 for v in ours["layers"].values())
