"""Calibration artifacts on disk, shared by every method: where they live, how they are keyed and locked, how
the checkpoint is fingerprinted and loaded in plain transformers. Plain Python + torch; no vLLM.

- ``cache_root()``: ``$VLLM_KVC_CACHE`` (default ``~/.cache/vllm_kvc``); each method keeps its files in its own
  folder under it (``factors/``, ``cov/``, ``lexico/``, ``pod/``, ``alloc/``).
- ``cache_key(*parts)``: a short stable hash of JSON-able parts (settings, format versions, fingerprints).
- ``file_lock(path)``: an exclusive ``flock`` on ``<path>.lock`` so that concurrent processes (tensor-parallel
  workers, replicas on a shared volume) build one artifact once; it gives up with a clear error after
  ``timeout`` seconds instead of hanging on a volume whose driver never grants the lock.
- ``save_tensors_atomic`` / ``write_text_atomic``: a temporary file of a unique name, fsynced, then renamed over
  the target: a reader sees the old file or the whole new one, never a torn one. Tensor files carry the sha256
  of their tensors and their own cache key in their metadata; ``cached_tensors`` / ``cached_json`` return a
  file's content only if it is whole and matches (a truncated, corrupted or misplaced file is logged, removed
  and reported as missing, so the caller rebuilds it instead of crash-looping or serving wrong factors).
- ``load_hf_model``: the one transformers loader (tokenizer + causal LM) every method's calibration uses.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["cache_root", "cache_key", "checkpoint_fingerprint", "file_lock", "save_tensors_atomic",
           "write_text_atomic", "cached_tensors", "cached_json", "discard", "progress", "Parts", "load_hf_model", "attn_modules", "LOCK_TIMEOUT_S"]

log = logging.getLogger("vllm_kvc")

# How long a process waits for another one building the same artifact (an 8B model's calibration included).
LOCK_TIMEOUT_S = float(os.environ.get("VLLM_KVC_LOCK_TIMEOUT", 4 * 3600))


def cache_root() -> Path:
    return Path(os.environ.get("VLLM_KVC_CACHE", Path.home() / ".cache" / "vllm_kvc"))


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


FINGERPRINT_SAMPLES = 64  # 64 KiB samples per weight file, evenly spaced (plus each file's first 1 MiB)


def checkpoint_fingerprint(model_dir: str) -> str:
    """Identifies a checkpoint by content, not by file times: its config.json, and for each weight file its
    name, size, first MiB (the safetensors header: every tensor's name, dtype, shape and offset) and 64 evenly
    spaced 64 KiB samples of its data. A copy (``cp``, ``rsync``, a new volume) keeps its calibration caches; a
    fine-tune of the same shapes, even with preserved sizes and times, changes the samples and gets new ones.
    Reads a few MiB per file, however large."""
    p = Path(model_dir)
    h = hashlib.sha256()
    h.update((p / "config.json").read_bytes() if (p / "config.json").exists() else model_dir.encode())
    for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size};".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            for i in range(FINGERPRINT_SAMPLES):
                fh.seek(size * i // FINGERPRINT_SAMPLES)
                h.update(fh.read(1 << 16))
    return h.hexdigest()[:16]


@contextmanager
def file_lock(path: str | Path, timeout: float | None = None, poll: float = 0.2):
    """Exclusive lock on ``<path>.lock`` (created with its folder); TimeoutError after ``timeout`` seconds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    limit = LOCK_TIMEOUT_S if timeout is None else timeout
    with open(str(path) + ".lock", "a") as fh:
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() - t0 >= limit:
                    raise TimeoutError(f"{path}.lock: held by another process for more than {limit:.0f} s "
                                       "(set VLLM_KVC_LOCK_TIMEOUT to wait longer)") from None
                time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


_WRITES: dict[str, int] = {}


def _failpoint(path: Path, tmp: Path | None) -> None:
    """Fault injection for the test suite (tests/test_faults.py), as a node failure or an OOM kill would strike:
    ``VLLM_KVC_FAILPOINT=kill-mid-write:<text>``: a process writing a cache file whose path contains <text> leaves
    half of it in its temporary file and is killed (SIGKILL); ``kill-after-write:<text>:<n>``: killed right after
    its n-th whole write of such a file."""
    fp = os.environ.get("VLLM_KVC_FAILPOINT", "")
    kind, _, rest = fp.partition(":")
    if kind == "kill-mid-write" and tmp is not None and rest and rest in str(path):
        with open(tmp, "r+b") as fh:
            fh.truncate(tmp.stat().st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    where, _, n = rest.rpartition(":")
    if kind == "kill-after-write" and tmp is None and where and where in str(path):
        _WRITES[where] = _WRITES.get(where, 0) + 1
        if _WRITES[where] >= int(n):
            os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def _atomic_target(path: Path):
    """Yields a temporary path next to ``path``; on success it is fsynced and renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _failpoint(path, Path(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
        _failpoint(path, None)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def tensors_digest(tensors: dict) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        t = t.reshape(-1)  # a 0-dim tensor (a count) has no byte view
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors_atomic(tensors: dict, path: str | Path, metadata: dict | None = None) -> Path:
    """Write a safetensors file atomically, with its tensors' sha256 and its name (the cache key) in the
    metadata next to the caller's settings."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {**(metadata or {}), "sha256": tensors_digest(tensors), "name": path.name}
    with _atomic_target(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def write_text_atomic(text: str, path: str | Path) -> Path:
    path = Path(path)
    with _atomic_target(path) as tmp:
        tmp.write_text(text)
    return path


class Parts:
    """The finished steps of a long build (per layer, or a running state), kept next to its final file until that
    is written: a build killed half way resumes after its last whole step instead of starting over. Each part is
    written atomically and verified when read; the caller holds the final file's lock."""

    def __init__(self, out: str | Path):
        out = Path(out)
        self.dir = out.with_name(out.name + ".parts")

    def get(self, step: str) -> dict | None:
        return cached_tensors(self.dir / f"{step}.safetensors")

    def put(self, step: str, tensors: dict) -> None:
        save_tensors_atomic(tensors, self.dir / f"{step}.safetensors")

    def clear(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


# seconds of work between two saved states of a build that saves a running state (covariances, similarity)
CHECKPOINT_S = float(os.environ.get("VLLM_KVC_CHECKPOINT_S", 120))


def discard(path: Path, why: str) -> None:
    log.warning("vllm_kvc: cache file %s is %s: removed, it will be rebuilt", path, why)
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def cached_tensors(path: str | Path) -> dict | None:
    """The tensors of a cache file written by ``save_tensors_atomic``, or None when it is missing, unreadable
    (truncated), carries another name or a sha256 that its tensors do not match (corrupted): such a file is
    removed with a logged warning."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 (safetensors raises several types for a torn file)
        discard(path, f"unreadable ({type(e).__name__}: {e})")
        return None
    if meta.get("name") != path.name:
        discard(path, f"named {meta.get('name')!r} inside (a file of another key)")
        return None
    if meta.get("sha256") != tensors_digest(tensors):
        discard(path, "corrupted (its tensors do not match their sha256)")
        return None
    return tensors


def build_tensors_once(path: str | Path, build, what: str = "artifact") -> Path:
    """The tensor file at ``path``, computed by ``build() -> (tensors, metadata)`` only where no complete copy is
    cached: checked, then built under ``file_lock`` (of concurrent processes one builds, the others wait and read
    it), written atomically and logged ("<what> written to <path>")."""
    path = Path(path)
    if cached_tensors(path) is not None:
        return path
    with file_lock(path):
        if cached_tensors(path) is not None:
            return path
        tensors, metadata = build()
        save_tensors_atomic(tensors, path, metadata=metadata)
        log.info("%s written to %s", what, path)
        return path


def cached_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def cached_json(path: str | Path):
    """The JSON content of a cache file, or None when it is missing or not valid JSON (removed, with a logged
    warning)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        discard(path, f"not valid JSON ({e})")
        return None


def progress(iterable, desc: str, total: int | None = None, unit: str = "it"):
    """A progress bar with rate and ETA (tqdm, as vLLM's own) on a terminal; silent when stderr is not one (logs,
    CI, Kubernetes), where the callers' log lines say how far they are."""
    from tqdm.auto import tqdm

    quiet = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=quiet, dynamic_ncols=True, leave=False)


def load_hf_model(model_dir: str, dtype: torch.dtype | None = None, device: str | None = None):
    """(tokenizer, causal LM in eval mode). Defaults: float32 on the CPU; bfloat16 on a GPU when there is one,
    loaded straight onto the GPU(s) (``device_map``), never whole in host memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    tok = AutoTokenizer.from_pretrained(model_dir)
    if dev == "cpu":
        return tok, AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map="auto" if dev == "cuda" else dev)
    return tok, model.eval()


def free_accelerator_memory() -> None:
    """After a calibration in this process: give its GPU memory back before vLLM measures what is free."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def attn_modules(model):
    """The ``self_attn`` module of every decoder layer of an HF Llama-family causal LM."""
    return [layer.self_attn for layer in model.model.layers]
