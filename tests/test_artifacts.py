"""Cache plumbing shared by every method (vllm_kvc/artifacts.py): locks with timeouts, content fingerprints,
verified cache files; and the server middleware's isolation from vLLM's /metrics (real processes and a real
Starlette app, no mocks)."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vllm_kvc import artifacts


def test_lock_held_by_another_process_times_out_with_a_clear_error(tmp_path):
    target = tmp_path / "x.safetensors"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom vllm_kvc.artifacts import file_lock\n"
        f"with file_lock({str(target)!r}):\n    print('held', flush=True)\n    time.sleep(30)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as e:
            with artifacts.file_lock(target, timeout=1.0):
                pass
        assert 0.9 < time.monotonic() - t0 < 10
        assert "VLLM_KVC_LOCK_TIMEOUT" in str(e.value) and str(target) in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    with artifacts.file_lock(target, timeout=5.0):  # free once its holder is gone
        pass


def _checkpoint(d: Path, data: bytes) -> Path:
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (d / "model.safetensors").write_bytes(data)
    return d


def test_fingerprint_follows_content_not_file_times(tmp_path):
    data = os.urandom(3 << 20)
    a = _checkpoint(tmp_path / "a", data)
    fp = artifacts.checkpoint_fingerprint(str(a))
    os.utime(a / "model.safetensors", (1, 1))  # touched or copied: same weights, same caches
    assert artifacts.checkpoint_fingerprint(str(a)) == fp
    assert artifacts.checkpoint_fingerprint(str(_checkpoint(tmp_path / "b", data))) == fp  # a copy elsewhere
    st = (a / "model.safetensors").stat()
    tuned = bytearray(data)
    for i in range(len(tuned) // 2, len(tuned), 4096):  # a fine-tune: new values, same size, same mtime
        tuned[i] ^= 0xFF
    (a / "model.safetensors").write_bytes(bytes(tuned))
    os.utime(a / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert artifacts.checkpoint_fingerprint(str(a)) != fp


def test_cached_tensors_verifies_name_and_content(tmp_path, caplog):
    path = tmp_path / "k1.safetensors"
    t = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, 4, dtype=torch.bfloat16)}
    artifacts.save_tensors_atomic(t, path, metadata={"setting": "x"})
    got = artifacts.cached_tensors(path)
    assert got is not None and torch.equal(got["a"], t["a"]) and torch.equal(got["b"], t["b"])
    assert artifacts.cached_metadata(path)["setting"] == "x"
    other = tmp_path / "k2.safetensors"  # a whole file under another key's name
    other.write_bytes(path.read_bytes())
    assert artifacts.cached_tensors(other) is None and not other.exists()
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # one flipped bit in the tensors
    path.write_bytes(bytes(data))
    assert artifacts.cached_tensors(path) is None and not path.exists()
    assert "corrupted" in caplog.text and "rebuilt" in caplog.text
    assert not list(tmp_path.glob("*.partial"))


def test_metrics_survive_a_failing_describe():
    """The plugin's middleware never breaks vLLM's own /metrics (nor any other route)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from vllm_kvc.server.app import kv_compression_middleware

    app = FastAPI()
    app.state.vllm_config = object()  # describe() fails on it
    app.middleware("http")(kv_compression_middleware)

    @app.get("/metrics")
    def metrics():
        return {"vllm": "metrics"}

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/metrics")
        assert r.status_code == 200 and r.json() == {"vllm": "metrics"}
        assert client.get("/v1/kv_compression").status_code == 500
        assert client.get("/metrics").status_code == 200
