"""Method ``quant`` (a KIVI-style baseline): K and V themselves, quantized per token with one fp16 scale per
``quant_group`` values (default 32), full rank, no rotation. It is method ``lowrank`` with identity factors
(A = W, B = I), so it shares lowrank's cache rows, attention layer, kernels and emulation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from vllm_kvc.methods.base import register
from vllm_kvc.methods.lowrank import LatentPlan, LowRank, LowRankFields, check_groups, make_spec


@dataclass(frozen=True)
class QuantPlan(LatentPlan):
    method = "quant"


class QuantFields(LowRankFields):
    bits: Literal[8, 4, 2] = Field(4, description="method quant: bits per K/V value")


@register
class Quant(LowRank):
    name = "quant"
    summary = ("quant: K/V themselves quantized per token group (KIVI-style baseline, full rank, no rotation)")
    fields = QuantFields
    rank_meaning = "latent rank per head group (full: K/V themselves)"
    allocatable = False
    cuda_graphs = True  # glue/latent.py: kernels.triton_latent.latent_step
    modules = ()  # lowrank's modules serve it (identity factors)

    def plan(self, cfg, shape, tp_size: int = 1) -> QuantPlan:
        check_groups(cfg.group_size, shape, tp_size)
        full = cfg.group_size * shape.head_dim
        qg = cfg.quant_group if cfg.quant_group is not None else 32
        spec = make_spec(f"int{cfg.bits}", f"int{cfg.bits}", qg)
        n = shape.num_layers
        return QuantPlan(shape, spec, cfg.group_size, (full,) * n, (full,) * n, identity=True,
                         roped_keys=cfg.keys == "roped")

    def bench_points(self, base, shape, model_dir, points, include, **_) -> list[dict]:
        common = dict(group_size=base.group_size, calibration=base.calibration.model_dump())
        return [{"method": f"quant-int{bits}", "is_baseline": True, "target": None,
                 "compression": base.model_validate({**common, "method": self.name, "bits": bits,
                                                     "quant_group": 32})}
                for bits in (8, 4, 2) if include is None or any(f"quant-int{bits}".startswith(i) for i in include)]
