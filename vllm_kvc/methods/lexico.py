"""Method ``lexico`` (Lexico): each KV head's key (before RoPE) and value is a sparse combination of atoms of a
per-layer dictionary learned once from calibration K/V (orthogonal matching pursuit); the cache row holds
(int16 atom index, fp16 coefficient) pairs. One dictionary serves every sparsity, so a deployment picks its
size freely with ``sparsity_k`` / ``sparsity_v``.

Where its parts live: settings and plan here; OMP, dictionary learning, row layout and the dictionary file
vllm_kvc/lexico.py; attention glue/lexico.py (+ glue/window.py for ``recent_window``); emulation emulate.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from vllm_kvc.methods.base import Method, register
from vllm_kvc.plan import ModelShape, Plan, kv_heads_per_rank
from vllm_kvc.settings import ConfigError, Strict

SPARSE_PAIR_BYTES = 4  # one int16 atom index + one fp16 coefficient
# Tokens one engine step may schedule: every new token is coded by OMP over the dictionaries in the step, on 2
# busy CPU cores ~75 ms per token at 1024 atoms (a 4 x 1024-token prefill step ran past vLLM's 300 s execute-model
# timeout); 512 tokens keep a step well inside it (prompts are then prefilled in chunks).
STEP_TOKENS = 512


class LexicoConfig(Strict):
    """Settings under ``compression.lexico``."""

    atoms: int = Field(1024, ge=16, le=32768, description="dictionary atoms per layer and per K/V")
    sparsity_k: int = Field(8, ge=1, le=256, description="non-zero coefficients per key vector")
    sparsity_v: int = Field(8, ge=1, le=256, description="non-zero coefficients per value vector")
    iters: int = Field(6, ge=0, le=100, description="dictionary-learning iterations over calibration K/V")
    train_sparsity: int = Field(8, ge=1, le=256, description="sparsity the dictionaries are learned at; one "
                                                             "dictionary serves every sparsity_k / sparsity_v")
    recent_window: int = Field(0, ge=0, description="newest tokens per sequence attended with exact K/V "
                                                     "(kept in a dense side pool); 0: every token from its code")


@dataclass(frozen=True)
class SparsePlan(Plan):
    """Per layer, the non-zero coefficients per KV head of its keys and values (``latent_dtype``: the
    coefficients' storage, fp16)."""

    sparsity_k: tuple[int, ...]
    sparsity_v: tuple[int, ...]

    method = "lexico"

    def layer_bytes_per_token(self, layer: int, tp_size: int = 1) -> int:
        pairs = self.sparsity_k[layer] + self.sparsity_v[layer]
        return kv_heads_per_rank(self.shape, tp_size) * pairs * SPARSE_PAIR_BYTES

    def layer_ranks(self, layer: int) -> tuple[int, int]:
        return self.sparsity_k[layer], self.sparsity_v[layer]


@register
class Lexico(Method):
    name = "lexico"
    summary = "lexico: sparse codes over a learned dictionary"
    section = LexicoConfig
    modules = ("vllm_kvc.lexico", "vllm_kvc.glue.lexico")
    rank_meaning = "non-zero dictionary coefficients per KV head"

    def plan(self, cfg, shape: ModelShape, tp_size: int = 1) -> SparsePlan:
        lc, hd, n = cfg.lexico, shape.head_dim, shape.num_layers
        for name, s in (("sparsity_k", lc.sparsity_k), ("sparsity_v", lc.sparsity_v)):
            if s > hd:
                raise ConfigError(f"compression.lexico.{name}", f"{s} is larger than head_dim {hd}")
        if lc.atoms < max(lc.sparsity_k, lc.sparsity_v):
            raise ConfigError("compression.lexico.atoms", f"{lc.atoms} atoms: expected at least the sparsity")
        return SparsePlan(shape, "float16", (lc.sparsity_k,) * n, (lc.sparsity_v,) * n)

    def prepare(self, model_dir, cfg, shape, tp_size=1, build=True):
        plan = self.plan(cfg, shape, tp_size)
        if not build:
            return plan, None
        from vllm_kvc.lexico import build_dictionaries

        return plan, build_dictionaries(model_dir, cfg)

    def engine_defaults(self, cfg) -> dict:
        return {"max_num_batched_tokens": STEP_TOKENS, "enable_chunked_prefill": True}

    def attention(self, layer, plan: SparsePlan, cfg, artifact, cache_config, prefix):
        from vllm_kvc.glue.lexico import SparseAttention
        from vllm_kvc.lexico import SparseLayout

        i = layer.layer_idx
        layout = SparseLayout(layer.num_kv_heads, layer.head_dim, plan.sparsity_k[i], plan.sparsity_v[i])
        return SparseAttention(layer.num_heads, layer.head_dim, layer.scaling, layer.num_kv_heads, layout,
                               dictionaries_path=artifact, recent_window=cfg.lexico.recent_window,
                               cache_config=cache_config, prefix=prefix)

    def emulate(self, model, plan: SparsePlan, artifact, cfg) -> list:
        from vllm_kvc.emulate import install_sparse

        return install_sparse(model, artifact, plan.sparsity_k, plan.sparsity_v)

    def bench_points(self, base, shape, model_dir, points, include, **_) -> list[dict]:
        """Sparse codes: (sk + sv) * 4 bytes per KV head vs 4 * head_dim in bf16."""
        if include is not None and not any(self.name.startswith(i) for i in include):
            return []
        out = []
        for f in points:
            total = max(2, round(f * 4 * shape.head_dim / SPARSE_PAIR_BYTES))
            sk = total // 2
            comp = base.model_validate({"group_size": base.group_size, "calibration": base.calibration.model_dump(),
                                        "method": self.name, "lexico": {"sparsity_k": sk, "sparsity_v": total - sk}})
            out.append({"method": self.name, "is_baseline": False, "target": f, "compression": comp})
        return out
