"""Keys cached after RoPE and scored in the latent (``keys: roped``): factors, the transformers emulation, the
config. The vLLM path: tests/test_core_vllm.py (full rank, greedy equal to the baseline); the reference
attention: tests/test_kernels.py (``roped_keys``)."""
import pytest
import torch

from vllm_kvc.calibrate import roped_key_factors
from vllm_kvc.config import CompressionConfig
from vllm_kvc.factorize import identity_factors, rotation
from vllm_kvc.methods import build_plan, get_method
from vllm_kvc.plan import ModelShape

SMOL = ModelShape("LlamaForCausalLM", 30, 576, 9, 3, 64)


def _moments(d, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    return m @ m.t() / d + 0.01 * torch.eye(d, dtype=torch.float64)


def test_roped_key_factors_layout_and_full_rank_identity():
    gdim, groups, layers = 8, 2, 3
    ck = torch.stack([_moments(gdim * groups, i) for i in range(layers)])
    cq = torch.stack([_moments(gdim * groups, 10 + i) for i in range(layers)])
    a, b = roped_key_factors((ck, cq), 1, groups, gdim, gdim, rotate=True)
    assert a.shape == (gdim, groups * gdim) and b.shape == (groups, gdim, gdim)
    for g in range(groups):  # full rank: the latent scores exactly (B_k A_k^T = I per group)
        torch.testing.assert_close(a[:, g * gdim:(g + 1) * gdim] @ b[g], torch.eye(gdim, dtype=a.dtype))
    a, b = roped_key_factors((ck, cq), 1, groups, gdim, 5, rotate=False)
    assert a.shape == (gdim, groups * 5) and b.shape == (groups, 5, gdim)
    a, b = roped_key_factors(None, 0, groups, gdim, gdim, rotate=False)  # method quant: the roped key itself
    assert torch.equal(a[:, gdim:], torch.eye(gdim, dtype=a.dtype)) and torch.equal(b[1], torch.eye(gdim, dtype=a.dtype))


def test_plan_and_description():
    comp = CompressionConfig(method="lowrank", ratio=1.0, group_size=3, latent_dtype="int4", quant_group=32,
                             keys="roped")
    plan = build_plan(comp, SMOL)
    assert plan.roped_keys and plan.bytes_per_token() == 30 * 2 * (96 + 12)  # 28.1% of bf16
    assert get_method("lowrank").describe(plan)["keys"] == "roped"
    assert not build_plan(CompressionConfig(method="lowrank", ratio=0.5), SMOL).roped_keys
    assert build_plan(CompressionConfig(method="quant", keys="roped"), SMOL).roped_keys


def test_emulation_scores_the_roped_latent(model_dir, tmp_path):
    """install_factors(roped_keys=True) replaces each roped key by what its latent scores as: with an orthogonal
    full-rank A_k and float32 latents the logits are the model's; rounded to int4 they move, and moving the
    K factors of one layer out of RoPE order (a permutation that is not its inverse) breaks them."""
    from safetensors.torch import save_file

    from vllm_kvc.artifacts import load_hf_model
    from vllm_kvc.emulate import install_factors

    tok, model = load_hf_model(model_dir)
    ids = torch.tensor([tok("The capital of France is Paris, and the capital of Italy is")["input_ids"]])
    with torch.no_grad():
        want = model(ids).logits
    gdim = 3 * 64
    tensors = {}
    for i, layer in enumerate(model.model.layers):
        q = rotation(gdim, seed=i).float()
        tensors[f"{i}.a_k"], tensors[f"{i}.b_k"] = q.contiguous(), q.t().contiguous()[None]
        a, b = identity_factors(layer.self_attn.v_proj.weight.detach(), 3, 64)
        tensors[f"{i}.a_v"], tensors[f"{i}.b_v"] = a.float().contiguous(), b.float().contiguous()
    path = tmp_path / "f.safetensors"
    save_file(tensors, str(path))

    def logits(spec, file=path):
        undo = install_factors(model, str(file), spec, roped_keys=True)
        try:
            with torch.no_grad():
                return model(ids).logits
        finally:
            for u in undo:
                u()

    torch.testing.assert_close(logits("float32"), want, rtol=1e-4, atol=1e-3)
    int4 = logits("int4@g32")
    assert not torch.allclose(int4, want, atol=1e-3)
    assert (int4[0, -1].argmax() == want[0, -1].argmax()).item()
    tensors["3.b_k"] = tensors["3.b_k"].flip(-1).contiguous()
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    assert not torch.allclose(logits("float32", tmp_path / "bad.safetensors"), want, atol=1e-2)
    torch.testing.assert_close(model(ids).logits, want)  # undone


def test_allocator_refuses_roped_keys():
    import pytest

    from vllm_kvc.settings import ConfigError

    base = CompressionConfig(method="lowrank", group_size=3, keys="roped")
    with pytest.raises(ConfigError) as e:
        get_method("lowrank").allocate("/nonexistent", base, 23040, memory=0.25)
    assert e.value.field == "compression.keys" and "pre_rope" in str(e.value)


def test_bench_roped_points_by_name():
    """``bench pareto --methods kvc-roped-k8v4`` asks for that point alone; ``kvc-roped`` for the defaults."""
    from vllm_kvc.methods.lowrank import ROPED_POINTS, roped_points

    assert roped_points(["kvc-roped-k8v4", "vllm-fp8"]) == [(8, 4)]
    assert roped_points(["kvc-roped-k8v8", "kvc-roped-k4v4", "kvc-roped-k8v8"]) == [(8, 8), (4, 4)]
    assert roped_points(["kvc-roped"]) == list(ROPED_POINTS)
    assert roped_points(None) == list(ROPED_POINTS)
    assert roped_points(["vllm-fp8", "kvc-alloc"]) == []
    with pytest.raises(ValueError, match="kvc-roped-k3v4"):
        roped_points(["kvc-roped-k3v4"])
