"""Deployment validation: a bad setting fails before any engine starts, one line naming the field, exit 2."""
import textwrap

import pytest
from conftest import vllm_kvc

from vllm_kvc.config import CompressionConfig, ConfigError, load_deployment, parse_compression
from vllm_kvc.plan import ModelShape, build_plan, schedule_ranks

GOOD = """
model: smollm2
engine: {dtype: bfloat16, max_model_len: 2048, enforce_eager: true}
compression: {method: lowrank, ratio: 0.5, group_size: 3}
"""


def _write(tmp_path, text):
    p = tmp_path / "dep.yaml"
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize("text, field", [
    (GOOD.replace("ratio: 0.5", "ratio: 0.5, colour: red"), "compression.colour"),
    (GOOD.replace("ratio: 0.5", "ratio: 1.5"), "compression.ratio"),
    (GOOD.replace("ratio: 0.5", "ratio: 0"), "compression.ratio"),
    (GOOD.replace("ratio: 0.5, group_size: 3", "ratio: 0.5, group_size: 2"), "compression.group_size"),
    (GOOD.replace("max_model_len: 2048", "max_model_lenn: 2048"), "engine.max_model_lenn"),
    (GOOD.replace("method: lowrank", "method: magic"), "compression.method"),
    (GOOD + "extra_top: 1\n", "extra_top"),
])
def test_bad_config_exits_2_naming_the_field(tmp_path, text, field, model_dir):
    r = vllm_kvc("validate", "--config", str(_write(tmp_path, text)), timeout=120)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {field}:"), last


def test_rank_larger_than_group_dimension(tmp_path, model_dir):
    ranks = "{k: [" + ",".join(["64"] * 29 + ["65"]) + "], v: [" + ",".join(["8"] * 30) + "]}"
    text = GOOD.replace("ratio: 0.5, group_size: 3", f"group_size: 1, ranks: {ranks}")
    r = vllm_kvc("validate", "--config", str(_write(tmp_path, text)), timeout=120)
    assert r.returncode == 2
    assert "error: compression.ranks.k[29]: rank 65 is larger than the head-group dimension 64" in r.stderr


def test_unsupported_architecture(tmp_path, model_dir):
    import json
    import shutil
    d = tmp_path / "gpt2ish"
    d.mkdir()
    cfg = json.load(open(f"{model_dir}/config.json"))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    r = vllm_kvc("validate", "--config", str(_write(tmp_path, GOOD.replace("model: smollm2", f"model: {d}"))),
                 timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: model: architecture GPT2LMHeadModel is not supported")
    shutil.rmtree(d)


def test_good_config_validates(tmp_path, model_dir):
    r = vllm_kvc("validate", "--config", str(_write(tmp_path, GOOD)), timeout=120)
    assert r.returncode == 0, r.stderr
    assert '"kv_bytes_per_token": 11520' in r.stdout


def test_shipped_configs_load():
    from pathlib import Path
    for p in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        load_deployment(p)


SHAPE = ModelShape("LlamaForCausalLM", 30, 576, 9, 3, 64)


@pytest.mark.parametrize("ratio", [0.25, 0.35, 0.5, 0.75])
def test_progressive_gives_shallow_layers_more_rank_same_budget(ratio):
    uni = schedule_ranks(ratio, 30, 192, "uniform", 0.4)
    prog = schedule_ranks(ratio, 30, 192, "progressive", 0.4)
    assert prog[0] > uni[0] > prog[-1]
    assert all(a >= b for a, b in zip(prog, prog[1:]))  # non-increasing with depth
    assert sum(prog) == sum(uni)
    assert all(1 <= r <= 192 for r in prog)


def test_plan_bytes_and_tp_alignment():
    plan = build_plan(CompressionConfig(ratio=0.5, group_size=1, latent_dtype="int8"), SHAPE)
    assert plan.bytes_per_token() == 30 * (3 * (32 + 32) + 4 * 3)
    assert plan.baseline_bytes_per_token() == 30 * 2 * 3 * 64 * 2
    with pytest.raises(ConfigError, match="tensor-parallel"):
        build_plan(CompressionConfig(ratio=0.5, group_size=3), SHAPE, tp_size=3)
    plan = build_plan(CompressionConfig(ratio=0.5, group_size=1), SHAPE, tp_size=3)
    assert plan.layer_bytes_per_token(0, 3) == (32 + 32) * 2


def test_parse_compression_names_nested_field():
    with pytest.raises(ConfigError) as e:
        parse_compression({"ratio": 0.5, "calibration": {"tokens": -1}})
    assert e.value.field == "compression.calibration.tokens"
