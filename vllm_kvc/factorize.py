"""Low-rank factors of K/V projection weights per head group. Plain torch; importable without vLLM.

For a projection ``y = x W^T`` (``W``: [out, hidden], HF Linear layout) and the covariance ``C = E[x x^T]`` of
its inputs on calibration text, the rank-r factors ``A`` [hidden, r], ``B`` [r, out] minimise
``E || x W^T - x A B ||^2``: with ``C = L L^T`` (Cholesky), take the SVD ``L^T W^T = U S V^T`` and keep r
terms: ``A = L^{-T} U_r S_r``, ``B = V_r^T``. ``plain`` uses ``C = I`` (SVD of the weight alone).

For quantized latents the factors are rotated, ``A R`` and ``R^T B`` with R orthogonal (a normalised Hadamard
matrix where r is a power of two, a seeded random rotation otherwise): the product is unchanged, and the
latent's energy, which SVD piles into its first coordinates, is spread evenly so that one absmax scale per
vector suits all of them (Palu's trick, folded into the weights at no run-time cost).
"""
from __future__ import annotations

import math

import torch


def _cholesky_factor(cov: torch.Tensor, damp: float = 1e-5) -> torch.Tensor:
    c = cov.double()
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    scale = c.diagonal().mean().clamp_min(1e-12)
    for k in range(6):
        try:
            return torch.linalg.cholesky(c + eye * scale * damp * (10**k))
        except RuntimeError:
            continue
    raise RuntimeError("covariance is not positive definite even after damping")


def lowrank_factors(w: torch.Tensor, rank: int, cov: torch.Tensor | None = None):
    """w [out, hidden] -> (A [hidden, rank], B [rank, out]) in float64."""
    wt = w.double().t()  # [hidden, out]
    if cov is None:
        u, s, vh = torch.linalg.svd(wt, full_matrices=False)
        return u[:, :rank] * s[:rank], vh[:rank]
    lchol = _cholesky_factor(cov)
    m = lchol.t() @ wt
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    a = torch.linalg.solve_triangular(lchol.t(), u[:, :rank] * s[:rank], upper=True)
    return a, vh[:rank]


def rotation(n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """An orthogonal [n, n] matrix: normalised Hadamard for powers of two, else seeded random orthogonal."""
    if n & (n - 1) == 0:
        h = torch.ones(1, 1, dtype=dtype)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h / math.sqrt(n)
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def group_factors(w: torch.Tensor, group_size: int, head_dim: int, rank: int,
                  cov: torch.Tensor | None = None, rotate: bool = False):
    """Factor each head group of w [num_kv_heads*head_dim, hidden] separately.

    Returns A [hidden, G*rank] (group g's latent in columns g*rank:(g+1)*rank) and B [G, rank, group_size*head_dim].
    """
    gdim = group_size * head_dim
    groups = w.shape[0] // gdim
    a_list, b_list = [], []
    for g in range(groups):
        a, b = lowrank_factors(w[g * gdim:(g + 1) * gdim], rank, cov)
        if rotate:
            r = rotation(rank, seed=g)
            a, b = a @ r, r.t() @ b
        a_list.append(a)
        b_list.append(b)
    return torch.cat(a_list, dim=1), torch.stack(b_list)


def identity_factors(w: torch.Tensor, group_size: int, head_dim: int):
    """Full-rank identity "factors" of w [num_kv_heads*head_dim, hidden]: A = W^T, B = I per head group.

    The latent is K (or V) itself; with integer latents this is plain per-token(-group) K/V quantization
    (the KIVI-style baseline, method ``quant``) through the same latent cache path."""
    gdim = group_size * head_dim
    groups = w.shape[0] // gdim
    eye = torch.eye(gdim, dtype=torch.float64)
    return w.double().t().contiguous(), eye.expand(groups, gdim, gdim).contiguous()


def _sym_sqrt_pair(cov: torch.Tensor, damp: float = 1e-6):
    """(C^{1/2}, C^{-1/2}) of a symmetric PSD matrix, eigenvalues floored at damp * their mean."""
    c = cov.double()
    w, v = torch.linalg.eigh((c + c.t()) / 2)
    w = w.clamp_min(w.mean().clamp_min(1e-30) * damp)
    return (v * w.sqrt()) @ v.t(), (v * w.rsqrt()) @ v.t()


def score_factors(cov_q: torch.Tensor, cov_k: torch.Tensor, rank: int, rotate: bool = False, seed: int = 0):
    """Factors of keys stored *after* RoPE and scored in the latent (MLA-style absorption): the cache keeps
    ``c = k A`` (A [D, r], k the roped key of one head group, D = group_size * head_dim) and a query scores it
    as ``(q B) . c`` (B [D, r]), so no key is ever rebuilt. A and B minimise ``E[(q.k - (q B).(k A))^2]`` for
    independent queries and keys with second moments ``cov_q`` (block-diagonal: per KV head, the sum over the
    query heads that read it) and ``cov_k`` [D, D]: with symmetric square roots, the SVD
    ``Cq^{1/2} Ck^{1/2} = U S V^T`` gives ``A = Ck^{-1/2} V_r S_r^{1/2}``, ``B = Cq^{-1/2} U_r S_r^{1/2}``
    (the balanced split: one shared absmax scale then costs the least score error after a rotation).
    ``rotate``: ``A R``, ``B R`` with R orthogonal (Hadamard / seeded), for quantized latents. float64."""
    q_half, q_inv = _sym_sqrt_pair(cov_q)
    k_half, k_inv = _sym_sqrt_pair(cov_k)
    u, s, vh = torch.linalg.svd(q_half @ k_half)
    root = s[:rank].sqrt()
    a = k_inv @ (vh[:rank].t() * root)
    b = q_inv @ (u[:, :rank] * root)
    if rotate:
        r = rotation(rank, seed=seed)
        a, b = a @ r, b @ r
    return a, b
