"""Fault injection on the calibration caches, with real processes (`vllm-kvc compress` on the real default model):
killed mid-write, truncated, corrupted, written by two processes at once. Every fault must end in the same files
an undisturbed run writes, with no crash loop and nothing lost. The tally of faults injected / survived / data
lost is printed at the end of the module (benchmarks/RESULTS.md, "Fault injection")."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CALIB = {"tokens": 512, "seq_len": 256}  # two chunks: the resume test stops after the first
# one deployment per cache file type; small settings, so each build takes seconds on 2 cores
DEPLOYMENTS = {
    "factors": ({"method": "lowrank", "ratio": 0.5, "group_size": 3, "latent_dtype": "int8",
                 "calibration": CALIB}, ["factors", "cov"]),
    "lexico": ({"method": "lexico", "lexico": {"atoms": 64, "iters": 1, "sparsity_k": 4, "sparsity_v": 4},
                "calibration": CALIB}, ["lexico"]),
    "pod": ({"method": "pod", "pod": {"followers": 10, "window": 16, "sinks": 2}, "calibration": CALIB}, ["pod"]),
}
TALLY = {"injected": 0, "survived": 0, "data_lost": 0}
RAW: dict[str, dict[str, bytes]] = {}  # the undisturbed files' bytes


def _config(tmp_path: Path, model_dir: str, kind: str) -> Path:
    p = tmp_path / f"{kind}.yaml"
    p.write_text(yaml.safe_dump({"model": model_dir, "engine": {"max_model_len": 2048},
                                 "compression": DEPLOYMENTS[kind][0]}))
    return p


def _compress(cfg: Path, cache: Path, failpoint: str | None = None, wait: bool = True, **extra_env):
    env = dict(os.environ, VLLM_KVC_CACHE=str(cache), **extra_env)
    env.pop("VLLM_KVC_FAILPOINT", None)
    if failpoint:
        env["VLLM_KVC_FAILPOINT"] = failpoint
    cmd = [str(Path(sys.executable).parent / "vllm-kvc"), "compress", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=900)
    return proc.returncode, out, err


def _content(f: Path):
    """What a cache file holds: a safetensors file's metadata and the sha256 of its tensors as loaded (the
    header's byte order of the metadata is not stable across writes), any other file's bytes."""
    if f.suffix != ".safetensors":
        return f.read_bytes()
    from safetensors import safe_open

    from vllm_kvc.artifacts import tensors_digest

    with safe_open(str(f), framework="pt") as h:
        return sorted((h.metadata() or {}).items()), tensors_digest({k: h.get_tensor(k) for k in h.keys()})


def _artifacts(cache: Path, folders) -> dict:
    """Every finished cache file (no temporaries, no lock files) of these folders: relative path -> content."""
    files = {}
    for folder in folders:
        for f in sorted((cache / folder).glob("*")):
            if f.is_file() and not f.name.startswith(".") and not f.name.endswith(".lock"):
                files[f"{folder}/{f.name}"] = _content(f)
    return files


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """Each deployment's cache files from an undisturbed run."""
    refs = {}
    for kind, (_, folders) in DEPLOYMENTS.items():
        cache = tmp_path_factory.mktemp(f"ref-{kind}")
        cfg = _config(cache, model_dir, kind)
        rc, out, err = _compress(cfg, cache)
        assert rc == 0, err[-3000:]
        refs[kind] = _artifacts(cache, folders)
        assert refs[kind], f"{kind}: nothing written"
        RAW[kind] = {rel: (cache / rel).read_bytes() for rel in refs[kind]}
    yield refs
    print(f"\nfault injection: {TALLY['injected']} faults injected, {TALLY['survived']} survived, "
          f"{TALLY['data_lost']} with data lost")


def _record(ok: bool, lost: bool = False) -> None:
    TALLY["injected"] += 1
    TALLY["survived"] += ok
    TALLY["data_lost"] += lost


@pytest.mark.parametrize("kind, target", [("factors", "factors/"), ("pod", "pod/")])
def test_killed_mid_write_then_restart_gives_the_undisturbed_result(reference, model_dir, tmp_path, kind, target):
    cfg = _config(tmp_path, model_dir, kind)
    cache = tmp_path / "cache"
    rc, _, err = _compress(cfg, cache, failpoint=f"kill-mid-write:{target}")
    assert rc == -9, f"the failpoint did not fire (rc {rc}): {err[-2000:]}"
    leftovers = list(cache.rglob("*.partial"))
    assert leftovers, "the killed write left no partial temporary file"
    rc, _, err = _compress(cfg, cache)  # the restart: no crash loop
    ok = rc == 0 and _artifacts(cache, DEPLOYMENTS[kind][1]) == reference[kind]
    _record(ok, lost=rc == 0 and not ok)
    assert rc == 0, err[-3000:]
    assert _artifacts(cache, DEPLOYMENTS[kind][1]) == reference[kind]


@pytest.mark.parametrize("kind, failpoint, resumed", [
    ("factors", "kill-after-write:cov/:1", "calibration: resuming after chunk 1"),
    ("lexico", "kill-after-write:lexico/:2", "dictionaries from an interrupted build"),
])
def test_killed_calibration_resumes_where_it_stopped(reference, model_dir, tmp_path, kind, failpoint, resumed):
    """A long calibration saves its finished steps (covariance chunks, lexico layers); killed after them, the
    restart continues from there and ends with the undisturbed result."""
    cfg = _config(tmp_path, model_dir, kind)
    cache = tmp_path / "cache"
    rc, _, err = _compress(cfg, cache, failpoint=failpoint, VLLM_KVC_CHECKPOINT_S="0")
    assert rc == -9, f"the failpoint did not fire (rc {rc}): {err[-2000:]}"
    assert list(cache.rglob("*.parts/*.safetensors")), "no finished step was kept"
    rc, _, err = _compress(cfg, cache, VLLM_KVC_CHECKPOINT_S="0")
    ok = rc == 0 and resumed in err and _artifacts(cache, DEPLOYMENTS[kind][1]) == reference[kind]
    _record(ok, lost=rc == 0 and not ok)
    assert rc == 0, err[-3000:]
    assert resumed in err, err[-3000:]
    assert _artifacts(cache, DEPLOYMENTS[kind][1]) == reference[kind]
    assert not list(cache.rglob("*.parts/*"))  # the parts are gone once the whole file is written


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 3]))
    else:  # flip bytes in the middle of the data (safetensors: past the header, inside the tensors)
        mid = len(data) * 2 // 3
        for i in range(mid, min(len(data), mid + 64)):
            data[i] ^= 0x5A
        path.write_bytes(bytes(data))


# each cache file type once, truncated or corrupted (the covariance and lexico's dictionaries are also killed
# mid-write above and in the resume test)
@pytest.mark.parametrize("kind, folder, how", [("factors", "factors", "truncate"), ("factors", "cov", "corrupt"),
                                               ("lexico", "lexico", "corrupt"), ("pod", "pod", "truncate")])
def test_damaged_cache_file_is_detected_and_rebuilt(reference, model_dir, tmp_path, kind, folder, how):
    cfg = _config(tmp_path, model_dir, kind)
    cache = tmp_path / "cache"
    for rel, data in RAW[kind].items():  # start from the undisturbed files
        (cache / rel).parent.mkdir(parents=True, exist_ok=True)
        (cache / rel).write_bytes(data)
    victims = [cache / rel for rel in reference[kind] if rel.startswith(folder + "/")
               and rel.endswith(".safetensors")]
    assert victims
    for v in victims:
        _damage(v, how)
    if kind == "factors" and folder == "cov":  # the covariance is only read when factors are rebuilt
        for rel in reference[kind]:
            if rel.startswith("factors/"):
                (cache / rel).unlink()
    rc, _, err = _compress(cfg, cache)
    ok = rc == 0 and _artifacts(cache, DEPLOYMENTS[kind][1]) == reference[kind]
    _record(ok, lost=rc == 0 and not ok)
    assert rc == 0, err[-3000:]
    assert "it will be rebuilt" in err, err[-3000:]
    assert _artifacts(cache, DEPLOYMENTS[kind][1]) == reference[kind]


@pytest.mark.parametrize("kind", ["factors"])
def test_two_processes_building_the_same_key_write_one_result(reference, model_dir, tmp_path, kind):
    cfg = _config(tmp_path, model_dir, kind)
    cache = tmp_path / "cache"
    procs = [_compress(cfg, cache, wait=False) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    rcs = [p.returncode for p in procs]
    logs = "".join(o[1] for o in outs)
    written = logs.count("written to")
    ok = rcs == [0, 0] and _artifacts(cache, DEPLOYMENTS[kind][1]) == reference[kind]
    _record(ok, lost=not ok)
    assert rcs == [0, 0], logs[-3000:]
    assert outs[0][0] == outs[1][0]  # both print the same artifact
    assert written == (2 if kind == "factors" else 1), logs[-3000:]  # factors: covariance + factor file, once each
    assert _artifacts(cache, DEPLOYMENTS[kind][1]) == reference[kind]
    assert not list(cache.rglob("*.partial"))


def test_truncated_allocation_record_is_rebuilt_not_loaded(tmp_path, monkeypatch, caplog):
    """JSON caches (allocations, sensitivities): a torn record reads as missing (and is removed), never as a
    crash at start-up."""
    from vllm_kvc.allocate import Allocation, _cached

    good = tmp_path / "budget-x.json"
    good.write_text(json.dumps({"ranks_k": [1], "ranks_v": [1], "bits_k": 4, "bits_v": 4, "quant_group": 32,
                                "bytes_per_token": 10, "budget_bytes": 10, "predicted_kl": 0.0}))
    assert isinstance(_cached(good, Allocation), Allocation)
    good.write_text(good.read_text()[:40])
    assert _cached(good, Allocation) is None and not good.exists()
    good.write_text(json.dumps({"ranks_k": [1]}))  # whole JSON, but not a whole record
    assert _cached(good, Allocation) is None and not good.exists()
