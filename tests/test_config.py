"""Deployment validation: a bad setting fails before any engine starts, one line naming the field, exit 2."""
import textwrap

import pytest
from conftest import vllm_kvc

from vllm_kvc.config import CompressionConfig, ConfigError, load_deployment, parse_compression
from vllm_kvc.plan import ModelShape, schedule_ranks
from vllm_kvc.methods import build_plan

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
    (GOOD.replace("ratio: 0.5", "ratio: 0.5, keys: post_rope"), "compression.keys"),
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


@pytest.mark.parametrize("text, field, words", [
    (GOOD.replace("compression: {method: lowrank, ratio: 0.5, group_size: 3}",
                  "compression:\n  ratio: 0.5\n  ratio: 0.25\n"), "config", "duplicate key 'ratio'"),
    (GOOD + "model: other\n", "config", "duplicate key 'model'"),
])
def test_duplicate_yaml_keys_are_rejected_not_silently_overwritten(tmp_path, text, field, words, model_dir):
    r = vllm_kvc("validate", "--config", str(_write(tmp_path, text)), timeout=120)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {field}:") and words in last, last


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.pop("num_hidden_layers"), "lacks num_hidden_layers"),
    (None, "is not valid JSON"),
])
def test_broken_checkpoint_config_is_a_named_error_not_a_traceback(tmp_path, model_dir, edit, words):
    import json
    d = tmp_path / "ckpt"
    d.mkdir()
    cfg = json.load(open(f"{model_dir}/config.json"))
    if edit is None:
        (d / "config.json").write_text(json.dumps(cfg)[:50])
    else:
        edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    r = vllm_kvc("validate", "--config", str(_write(tmp_path, GOOD.replace("model: smollm2", f"model: {d}"))),
                 timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: model:") and words in r.stderr


def test_pod_groups_disagreeing_with_followers_is_a_named_error(tmp_path):
    from vllm_kvc.methods import prepare

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"num_hidden_layers": 30}')
    groups = [[0, 1]] + [[i] for i in range(2, 30)]
    cfg = parse_compression({"method": "pod", "pod": {"groups": groups, "followers": 3}})
    with pytest.raises(ConfigError) as e:
        prepare(str(model), cfg, ModelShape("LlamaForCausalLM", 30, 576, 9, 3, 64))
    assert e.value.field == "compression.pod.followers" and "disagrees" in e.value.message


def test_serve_rejects_a_bad_vllm_argument_before_calibrating(tmp_path, model_dir):
    """`-- <vLLM args>` are parsed before any calibration runs: a typo costs seconds, not a calibration."""
    import os
    cache = tmp_path / "cache"
    text = GOOD.replace("compression: {method: lowrank, ratio: 0.5, group_size: 3}",
                        "compression: {method: lexico, calibration: {tokens: 4096}}")
    r = vllm_kvc("serve", "--config", str(_write(tmp_path, text)), "--", "--max-model-len", "not-a-number",
                 timeout=300, env=dict(os.environ, VLLM_KVC_CACHE=str(cache)))
    assert r.returncode != 0
    assert "max-model-len" in r.stderr or "max_model_len" in r.stderr, r.stderr[-2000:]
    assert not (cache / "lexico").exists()  # nothing was calibrated


def test_capacity_before_deploying(tmp_path, model_dir):
    """`validate --kv-memory`: vLLM's own arithmetic (1 GiB of bf16 SmolLM2 KV holds 46,592 tokens, measured
    through vLLM in FIELD_NOTES and in test_server's live capacity)."""
    import json
    text = GOOD.replace("ratio: 0.5, group_size: 3", "ratio: 0.625, ratio_v: 1.0, group_size: 3, latent_dtype: int8")
    r = vllm_kvc("validate", "--config", str(_write(tmp_path, text)), "--kv-memory", "1GiB", "--context", "8192",
                 timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    cap = json.loads(r.stdout)["capacity"]
    assert cap["dense"]["tokens"] == 46592 and cap["dense"]["sequences_at_context"] == 46592 // 8192
    assert cap["compressed"]["kv_bytes_per_token"] == 30 * (120 + 192 + 4)
    assert cap["compressed"]["tokens"] == (1 << 30) // (16 * 9480) * 16
    r = vllm_kvc("validate", "--config", str(_write(tmp_path, text)), "--kv-memory", "lots", timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --kv-memory:")


def test_slow_methods_bound_the_tokens_of_one_step():
    from vllm_kvc.config import DeploymentConfig
    from vllm_kvc.evaluate import engine_kwargs

    dep = DeploymentConfig(model="m", engine={"max_model_len": 2048})
    lex = parse_compression({"method": "lexico"})
    assert engine_kwargs(dep, "m", lex)["max_num_batched_tokens"] == 512
    assert "max_num_batched_tokens" not in engine_kwargs(dep, "m", parse_compression({"method": "lowrank"}))
    mine = DeploymentConfig(model="m", engine={"max_num_batched_tokens": 256})
    assert engine_kwargs(mine, "m", lex)["max_num_batched_tokens"] == 256  # the deployment's own setting wins


def test_progress_bars_only_on_a_terminal(tmp_path):
    """tqdm bars with rate and ETA when stderr is a terminal, nothing when it is not (logs, CI, Kubernetes)."""
    import os
    import pty
    import subprocess
    import sys
    code = "from vllm_kvc.artifacts import progress\nfor _ in progress(range(3), 'calibration: test'): pass\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "calibration: test" not in r.stderr
    import fcntl
    import select
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal of 100 columns
    p = subprocess.Popen([sys.executable, "-c", code], stderr=slave, stdout=subprocess.DEVNULL)
    os.close(slave)
    out = b""
    while True:  # read while the child runs: a pty drops what is unread once its last writer exits
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif p.poll() is not None:
            break
    p.wait(60)
    os.close(master)
    assert b"calibration: test" in out and b"/3 [" in out and b"it/s]" in out, out
