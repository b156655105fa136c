"""Factorization, rotation and latent quantization: plain torch, no vLLM."""
import pytest
import torch

from vllm_kvc.factorize import group_factors, lowrank_factors, rotation, score_factors
from vllm_kvc.layout import LatentLayout, quantize_int8


def _correlated(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, -3, d, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scales
    x[:, 3] *= 40  # an outlier channel, as in real LLM activations
    return x @ mix


def test_full_rank_factors_reproduce_the_weight():
    w = torch.randn(128, 96, dtype=torch.float64)
    x = _correlated(2000, 96)
    a, b = lowrank_factors(w, 96, x.t() @ x / len(x))
    assert torch.allclose(a @ b, w.t(), atol=1e-8)


@pytest.mark.parametrize("rank", [8, 24, 48])
def test_whitened_beats_plain_on_the_output_error(rank):
    w = torch.randn(64, 96, dtype=torch.float64)
    x = _correlated(4000, 96)
    cov = x.t() @ x / len(x)
    err = {}
    for name, c in (("plain", None), ("whitened", cov)):
        a, b = lowrank_factors(w, rank, c)
        err[name] = ((x @ w.t() - x @ a @ b) ** 2).mean().item()
    assert err["whitened"] < err["plain"]
    assert err["whitened"] < 0.9 * err["plain"]


def test_group_factors_shapes_and_rotation_invariance():
    w = torch.randn(3 * 64, 96, dtype=torch.float64)
    x = _correlated(1000, 96)
    cov = x.t() @ x / len(x)
    a, b = group_factors(w, 1, 64, 16, cov)
    ar, br = group_factors(w, 1, 64, 16, cov, rotate=True)
    assert a.shape == (96, 48) and b.shape == (3, 16, 64)
    for g in range(3):
        prod = a[:, g * 16:(g + 1) * 16] @ b[g]
        prod_r = ar[:, g * 16:(g + 1) * 16] @ br[g]
        assert torch.allclose(prod, prod_r, atol=1e-9)


@pytest.mark.parametrize("n", [8, 12, 64])
def test_rotation_is_orthogonal(n):
    r = rotation(n)
    assert torch.allclose(r @ r.t(), torch.eye(n, dtype=r.dtype), atol=1e-10)


def test_int8_round_trip_error_bound():
    x = torch.randn(500, 4, 40) * torch.logspace(0, -2, 40)
    q, s = quantize_int8(x)
    err = (q.float() * s[..., None] - x).abs()
    # absmax quantization: error at most half a step (the step is the stored fp16 scale)
    assert bool((err <= s[..., None] * 0.5 + 1e-6).all())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "int8"])
def test_layout_pack_unpack(dtype):
    lay = LatentLayout(groups=2, group_size=2, head_dim=16, rank_k=12, rank_v=20, dtype=dtype)
    k, v = torch.randn(7, 2, 12), torch.randn(7, 2, 20)
    rows = lay.pack(k, v)
    assert rows.shape == (7, lay.row_elems) and rows.dtype == lay.cache_dtype
    assert rows.numel() * rows.element_size() == 7 * lay.row_bytes
    k2, v2 = lay.unpack(rows)
    tol = {"float32": 1e-6, "bfloat16": 2e-2, "float16": 2e-3, "int8": 2e-2}[dtype]
    assert torch.allclose(k2, k, atol=tol * 3, rtol=tol) and torch.allclose(v2, v, atol=tol * 3, rtol=tol)
    if dtype == "int8":
        assert lay.row_bytes == 2 * (12 + 20) + 2 * 2 * 2


def test_layout_rejects_rank_above_group_dim():
    with pytest.raises(ValueError, match="rank_k=33"):
        LatentLayout(groups=1, group_size=1, head_dim=32, rank_k=33, rank_v=8)


def _score_error(q, k, a, b):
    exact = q @ k.t()
    return (((q @ b) @ (k @ a).t() - exact) ** 2).mean().item() / (exact ** 2).mean().item()


@pytest.mark.parametrize("rank", [6, 12, 24])
def test_score_factors_beat_the_key_pca_and_are_exact_at_full_rank(rank):
    # queries and keys with different dominant directions: the key PCA keeps what queries do not read
    q = _correlated(4000, 24, seed=1)
    k = _correlated(4000, 24, seed=2)
    cq, ck = q.t() @ q / len(q), k.t() @ k / len(k)
    a, b = score_factors(cq, ck, rank, rotate=True)
    assert a.shape == (24, rank) and b.shape == (24, rank)
    err = _score_error(q[:300], k[:300], a, b)
    if rank == 24:
        assert err < 1e-12
        return
    _, vecs = torch.linalg.eigh(ck)
    pca = vecs[:, -rank:]  # keys projected on their top principal directions, queries unchanged
    assert err < 0.9 * _score_error(q[:300], k[:300], pca, pca)
