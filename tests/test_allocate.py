"""Allocator, schedules, int4/int2 latents and byte accounting: plain torch / numpy, no vLLM (fast)."""
import numpy as np
import pytest
import torch

from vllm_kvc.allocate import Allocation, Sensitivity, _knapsack, allocate_budget
from vllm_kvc.config import CompressionConfig
from vllm_kvc.methods.lowrank import LayerRanks
from vllm_kvc.layout import LatentLayout, dequantize, quantize, roundtrip
from vllm_kvc.plan import ModelShape, latent_row_bytes, schedule_ranks
from vllm_kvc.methods import build_plan

SHAPE = ModelShape("LlamaForCausalLM", 30, 576, 9, 3, 64, "bfloat16")


# ------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.625, 1.0])
def test_uniform_schedule(ratio):
    plan = build_plan(CompressionConfig(ratio=ratio, group_size=3, latent_dtype="int8"), SHAPE)
    assert len(set(plan.ranks_k)) == 1 and plan.ranks_k[0] == round(ratio * 192)


def test_progressive_schedule_keeps_the_uniform_budget_and_falls_with_depth():
    r = schedule_ranks(0.5, 30, 192, "progressive", 0.4)
    assert sum(r) == 96 * 30 and r[0] > r[-1] and all(a >= b for a, b in zip(r, r[1:]))


def test_explicit_ranks_schedule_with_mixed_kv_widths():
    cfg = CompressionConfig(group_size=3, latent_dtype="int8", latent_dtype_v="int4",
                            ranks=LayerRanks(k=list(range(10, 40)), v=[192] * 30))
    plan = build_plan(cfg, SHAPE)
    assert plan.latent_dtype == "int8/int4" and plan.ranks_k[3] == 13
    assert plan.layer_bytes_per_token(3) == 13 + 96 + 2 * 2


def test_quant_method_plan_is_full_rank_identity_group32():
    plan = build_plan(CompressionConfig(method="quant", bits=4, group_size=3), SHAPE)
    assert plan.identity and not plan.rotate and plan.latent_dtype == "int4@g32"
    assert set(plan.ranks_k) == {192}
    # 192 int4 values = 96 bytes + 6 fp16 scales, K and V: 216 of 768 bf16 bytes
    assert plan.layer_bytes_per_token(0) == 216
    assert build_plan(CompressionConfig(method="quant", bits=2, group_size=3), SHAPE).layer_bytes_per_token(0) == 120
    assert build_plan(CompressionConfig(method="quant", bits=8, group_size=3), SHAPE).layer_bytes_per_token(0) == 408


def test_int8_plan_bytes_unchanged():  # the original int8 layout: values + one fp16 scale per group and K/V
    plan = build_plan(CompressionConfig(ratio=0.625, ratio_v=1.0, group_size=3, latent_dtype="int8"), SHAPE)
    assert plan.layer_bytes_per_token(0) == 120 + 192 + 4 and plan.latent_dtype == "int8"


# ------------------------------------------------------------------------------------------- quantizer
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("group", [0, 32])
def test_quantizer_round_trip_error_bound(bits, group):
    x = torch.randn(300, 3, 70) * torch.logspace(0, -2, 70)
    codes, s = quantize(x, bits, group)
    assert int(codes.max()) < 2 ** bits and int(codes.min()) >= 0
    y = dequantize(codes, s, bits, group)
    # never worse than the uniform grid with |scale| = absmax (one of the encoder's candidates): per scale group,
    # sum err**2 <= n (absmax / (2**bits - 1))**2, n values per scale (fp16 rounding of the scale aside)
    n = group or 70
    err2 = (y - x) ** 2
    pad = -70 % n
    err2g = torch.nn.functional.pad(err2, (0, pad)).reshape(300, 3, -1, n).sum(-1)
    amax = torch.nn.functional.pad(x.abs(), (0, pad)).reshape(300, 3, -1, n).amax(-1)
    assert bool((err2g <= n * (amax / (2 ** bits - 1)) ** 2 * 1.01 + 1e-12).all())
    assert s.shape == (300, 3, -(-70 // n))
    assert torch.equal(roundtrip(x, f"int{bits}", group), y)


@pytest.mark.parametrize("spec", ["int4", "int2", "int8/int4", "int4/int8", "int2/int4@g32", "int8@g32",
                                  "int4@g32"])
def test_layout_pack_unpack_mixed_widths(spec):
    lay = LatentLayout(groups=2, group_size=2, head_dim=16, rank_k=11, rank_v=20, dtype=spec)
    k, v = torch.randn(7, 2, 11), torch.randn(7, 2, 20)
    rows = lay.pack(k, v)
    assert rows.dtype == torch.uint8 and rows.shape == (7, lay.row_bytes)
    assert lay.row_bytes == latent_row_bytes(2, 11, 20, spec)
    k2, v2 = lay.unpack(rows)
    dk, _, dv = spec.split("@")[0].partition("/")
    dv = dv or dk
    qg = 32 if "@g32" in spec else 0
    assert torch.equal(k2, roundtrip(k, dk, qg)) and torch.equal(v2, roundtrip(v, dv, qg))
    # unpack through extra leading dims (as the reference attention gathers rows)
    k3, _ = lay.unpack(rows.reshape(7, 1, -1))
    assert torch.equal(k3[:, 0], k2)


def test_packed_bytes_formula():
    # int4: 2 values per byte; int2: 4; odd counts pad the last byte; + fp16 scales
    assert latent_row_bytes(1, 11, 20, "int4") == 6 + 10 + 4
    assert latent_row_bytes(1, 11, 20, "int2") == 3 + 5 + 4
    assert latent_row_bytes(1, 192, 192, "int2@g32") == 48 + 48 + 2 * 12
    assert latent_row_bytes(1, 120, 192, "int8") == 120 + 192 + 4


def test_int8_legacy_layout_byte_for_byte():
    lay = LatentLayout(groups=1, group_size=3, head_dim=64, rank_k=120, rank_v=192, dtype="int8")
    k, v = torch.randn(5, 1, 120), torch.randn(5, 1, 192)
    rows = lay.pack(k, v)
    assert rows.shape[1] == 120 + 192 + 4 and lay.is_int8 and lay.bits_k == 8 and lay.quant_group == 0
    sk = rows[:, 312:314].contiguous().view(torch.float16).float()
    assert torch.allclose(sk[:, 0], (k.abs().amax(-1)[:, 0] / 127).half().float())


def test_layout_rejects_bad_spec():
    with pytest.raises(ValueError):
        LatentLayout(groups=1, group_size=1, head_dim=16, rank_k=4, rank_v=4, dtype="bfloat16/int4")
    with pytest.raises(Exception):
        build_plan(CompressionConfig(latent_dtype="bfloat16", latent_dtype_v="int4"), SHAPE)


# ------------------------------------------------------------------------------------------- allocator
def _synthetic(num_layers=6, seed=0, full=64):
    rng = np.random.default_rng(seed)
    ranks = list(range(8, full + 1, 8))
    variants = [[8, 0], [4, 0], [2, 0], [4, 32]]
    cost = np.zeros((num_layers, 2, len(ranks), len(variants)))
    for layer in range(num_layers):
        for kind in range(2):
            s = rng.uniform(0.1, 3.0) * (4 if kind else 1)
            for ri, r in enumerate(ranks):
                for vi, (b, qg) in enumerate(variants):
                    cost[layer, kind, ri, vi] = s * ((1 - r / full) ** 2 + 4.0 ** -b * (30 if qg else 50))
    return Sensitivity(num_layers, 1, full, ranks, variants, cost.tolist())


@pytest.mark.parametrize("frac", [0.1, 0.2, 0.3, 0.45, 0.6])
def test_allocator_never_exceeds_the_budget(frac):
    sens = _synthetic()
    dense = sens.num_layers * 2 * 64 * 2
    budget = int(frac * dense)
    a = allocate_budget(sens, budget)
    qg = a.quant_group
    used = sum(sens.option_bytes(r, a.bits_k, qg) for r in a.ranks_k) + sum(sens.option_bytes(r, a.bits_v, qg)
                                                                            for r in a.ranks_v)
    assert used == a.bytes_per_token <= budget
    # the deployed plan charges exactly the same bytes
    shape = ModelShape("LlamaForCausalLM", sens.num_layers, 256, 4, 1, 64, "bfloat16")
    plan = build_plan(a.compression(CompressionConfig(group_size=1)), shape)
    assert plan.bytes_per_token() == a.bytes_per_token
    assert plan.baseline_bytes_per_token() == dense


def test_allocator_is_optimal_against_brute_force():
    sens = _synthetic(num_layers=2, full=32)
    pred = sens.predicted()
    budget = 70
    a = allocate_budget(sens, budget, groups_menu=[0])
    import itertools
    best = np.inf
    for bk in (8, 4):
        for bv in (8, 4):
            opts = [[(pred[layer, kind, ri, sens.variant(b, 0)], sens.option_bytes(r, b))
                     for ri, r in enumerate(sens.ranks)] for layer in range(2) for kind, b in ((0, bk), (1, bv))]
            for combo in itertools.product(*opts):
                if sum(c[1] for c in combo) <= budget:
                    best = min(best, sum(c[0] for c in combo))
    assert a.predicted_kl == pytest.approx(best)


def test_allocator_monotone_in_budget_and_reaches_full_rank():
    sens = _synthetic()
    costs = [allocate_budget(sens, int(f * 6 * 256)).predicted_kl for f in (0.15, 0.25, 0.35, 0.5, 0.6)]
    assert all(a >= b - 1e-12 for a, b in zip(costs, costs[1:]))
    top = allocate_budget(sens, 6 * 256)  # room for everything: full rank int8 everywhere
    assert set(top.ranks_k) == {64} and set(top.ranks_v) == {64} and (top.bits_k, top.bits_v) == (8, 8)
    assert top.quant_group == 0


def test_allocator_rejects_an_impossible_budget():
    with pytest.raises(ValueError):
        allocate_budget(_synthetic(), 10)


def test_knapsack_small():
    picks, total = _knapsack(np.array([[5.0, 1.0], [4.0, 0.0]]), np.array([[1, 3], [1, 3]]), 4)
    assert picks in ([1, 0], [0, 1]) and total == 5.0


def test_allocation_to_config_round_trip():
    a = Allocation([8] * 3, [16] * 3, 4, 8, 32, 0, 0, 0.0)
    cfg = a.compression(CompressionConfig(group_size=1))
    assert cfg.ranks.k == [8] * 3 and cfg.latent_dtype_k == "int4" and cfg.latent_dtype_v == "int8"
    assert cfg.quant_group == 32


def test_top_allocations_sorted_and_all_within_budget():
    sens = _synthetic()
    tops = allocate_budget(sens, 400, top=5)
    assert len(tops) == 5 and all(a.bytes_per_token <= 400 for a in tops)
    assert [a.predicted_kl for a in tops] == sorted(a.predicted_kl for a in tops)
