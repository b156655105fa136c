"""Triton kernels for attention over latent paged KV (the CUDA path of the latent backend).

Same semantics as :func:`vllm_kvc.kernels.reference.latent_attention` (read its docstring for the conventions).
Keys are rebuilt per KV tile from their latents with a tensor-core dot against ``B_k``, RoPE'd and scored;
values stay latent until ``B_v`` is applied once to the softmax-weighted sum. Modules:

- ``config``: :class:`LaunchConfig` (tile sizes, warps, stages, splits, the decode kernel's switches, the
  rebuild thresholds) and :func:`decode_defaults` (the measured defaults of a layout);
- ``dispatch``: factor preparation and caching, :func:`plan_launch` (which requests are rebuilt, which kernel
  serves the rest, with which resolved config) and the entry points :func:`latent_attention`, :func:`latent_decode`;
- ``decode``: the multi-head decode kernel (group size 1, float latents, one query per program);
- ``prefill``: the generic kernel (any group size, int8, prefill) and the split-KV reduce;
- ``explicit``: the explicit-layout decode kernel (Gluon, mma.sync) for roped int4@g32 and int8/int4@g32 latents
  of even ranks up to 256, up to 8 query heads per head group, in 64-token blocks on sm_90 (``explicit.serves``; ``plan_launch`` picks it, ``LaunchConfig.explicit``);
- ``tiles``: Triton helpers (tile addressing through the block table, loads, RoPE, 4-bit levels);
- ``write``: the cache-row writer and the fused encoder of packed integer rows (padding slots skipped on the
  device: capturable in CUDA graphs);
  ``dispatch.latent_step`` = encode + write + attention, the backend's whole call on CUDA.

Roped keys (``roped_keys=True`` on :func:`latent_attention`, :func:`latent_decode`, :func:`latent_step`): the K
latents code the keys after RoPE and ``q`` holds each head's latent query ``q B_k^T [n, Hq, rank_k]``; the kernels
(a ``ROPED`` constexpr of both) score the dequantized K latent tile against it directly: no key rebuild, no RoPE,
no cos / sin. Long prompts attend over the latents by SDPA (``dispatch.rebuild_roped_attention``).

Every latent dtype of layout.py is read: float latents, the original int8 layout (generic kernel, per-token
scales applied to the rebuilt keys and the weights), and packed integer layouts (int4, int2, mixed K/V widths,
per-token or per-32-value scales), described per K/V part by ``config.row_format`` and dequantized in registers
per tile (``tiles.load_dequant``). Layouts whose tiles do not fit on chip raise NotImplementedError
(:func:`check_supported`); the vLLM glue turns that into a start-up error on GPUs. Importable without vLLM; runs on CPU tensors under ``TRITON_INTERPRET=1`` (bf16 is then
computed in fp32, see :func:`compute_dtype`). Measurements: benchmarks/RESULTS.md, "GPU kernels".
"""
from __future__ import annotations

from .config import (REBUILD_MAX_TOKENS, REBUILD_MIN_QUERIES, REBUILD_MIN_WORK, LaunchConfig, check_supported,
                     compute_dtype, decode_defaults, default_splits, heads_supported)
from .dispatch import (LatentFactors, LaunchPlan, angles_match, cached_factors, check_roped, latent_attention,
                       latent_decode, latent_step, plan_launch, prepare_factors, rebuild_candidates,
                       rebuild_roped_attention)
from .write import can_encode, encode_rows, write_rows

__all__ = [
    "REBUILD_MAX_TOKENS", "REBUILD_MIN_QUERIES", "REBUILD_MIN_WORK", "LatentFactors", "LaunchConfig", "LaunchPlan",
    "angles_match", "cached_factors", "check_supported", "compute_dtype", "decode_defaults", "default_splits",
    "heads_supported", "latent_attention", "latent_decode", "latent_step", "plan_launch", "prepare_factors",
    "rebuild_candidates", "write_rows", "can_encode", "encode_rows", "check_roped", "rebuild_roped_attention",
]
