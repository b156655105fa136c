import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def model_dir() -> str:
    from vllm_kvc.checkpoints import ensure_default_model

    return str(ensure_default_model())


PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "def fibonacci(n):",
    "Explain what a KV cache is in one paragraph.",
]
SHARED = ("You are a careful assistant who answers questions about science, history and programming. "
          "Answer briefly and precisely, in plain English, without lists, and say so when you are not sure "
          "of an answer. Question: ")  # > 32 tokens: one full block shared by every prompt


def engine_spec(model_dir, dtype="float32", comp=None, **kw):
    """LLM kwargs for the engine tests: eager, seeded, the plugin's compression if given."""
    e = {"model": model_dir, "dtype": dtype, "enforce_eager": True, "max_model_len": 2048, "seed": 0}
    e.update(kw)
    if comp is not None:
        e["additional_config"] = {"kv_compression": comp}
    return e


def run_engine(engine: dict, prompts=None, max_tokens: int = 32, inspect: bool = False,
               kv_space_gib: str = "1", timeout: int = 900, prompts_first=None) -> dict:
    """One real vLLM engine in a child process (see engine_child.py)."""
    with tempfile.TemporaryDirectory() as d:
        spec, out, log = Path(d) / "spec.json", Path(d) / "out.json", Path(d) / "log.txt"
        spec.write_text(json.dumps({"engine": engine, "prompts": prompts or [], "max_tokens": max_tokens,
                                    "inspect": inspect, "prompts_first": prompts_first or []}))
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=kv_space_gib)
        if inspect:  # collective_rpc with a test-local function needs pickle transport
            env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        with open(log, "w") as fh:
            p = subprocess.run([sys.executable, str(ROOT / "tests" / "engine_child.py"), str(spec), str(out)],
                               env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT)
        if p.returncode != 0 or not out.exists():
            raise AssertionError(f"engine failed ({p.returncode}):\n" + log.read_text()[-6000:])
        return json.loads(out.read_text())


def vllm_kvc(*args, timeout=600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "vllm-kvc"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)
