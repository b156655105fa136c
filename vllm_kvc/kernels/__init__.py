"""Attention kernels over latent paged KV.

``reference`` is plain torch (CPU path and test oracle). ``triton_latent`` holds the Triton kernels (CUDA path;
also runs on CPU tensors under ``TRITON_INTERPRET=1``). Triton is imported lazily: this package imports without it.
"""
from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """True if Triton can be imported (it says nothing about a GPU being present)."""
    return importlib.util.find_spec("triton") is not None


def __getattr__(name):  # lazy submodule access: vllm_kvc.kernels.triton_latent imports triton only when used
    if name in ("reference", "triton_latent"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(name)
