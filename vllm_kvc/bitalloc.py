"""Transform coding of K/V latents: bits per latent dimension, expressed as a few segments per row part.

Plain torch; importable without vLLM. Research code of issue 16 item 3 (``benchmarks/frontier.py`` measures it);
the deployed byte layout (``layout.py``) is unchanged.

The whitened factors of a projection (``factorize.lowrank_factors`` at full rank) are a Karhunen-Loeve transform:
on the calibration text the latent ``c = x A`` has uncorrelated coordinates of variance ``s_i**2`` and the
reconstruction ``c B`` has orthonormal rows ``B``, so an error in latent coordinate i costs the same squared
error in the projection output. Instead of one rank and one width per layer, every latent coordinate gets its
own width from a menu (e.g. 8/4/3/2/0 bits) by reverse water-filling: for a Lagrange multiplier ``lam`` each
coordinate takes the width minimising ``v_i * e(b) + lam * rate(b)``, where ``v_i`` is its (optionally
loss-weighted) variance, ``e(b)`` the quantizer's relative squared error at ``b`` bits (``e(0) = 1``: dropped)
and ``rate(b)`` its bits including its share of the fp16 scales; ``lam`` is bisected to fill the byte budget.
Coordinates sorted by ``v_i`` take non-increasing widths, so each row part is a short list of
``Segment(width, bits, scale_group)``: contiguous runs of one width, snapped to multiples of ``unit``
coordinates so that every segment starts on a byte and a scale-group boundary. Inside a segment the
coordinates are rotated (normalised Hadamard for powers of two, else a seeded orthogonal matrix, folded into
the factors) so that one scale per ``scale_group`` values suits all of them.

Bytes of a row part (``part_bytes``), per head group and token: for each segment with ``bits > 0``,
``ceil(width * bits / 8)`` value bytes plus 2 bytes per fp16 scale (``ceil(width / scale_group)`` scales;
``scale_group`` 0: one per segment). With widths that are multiples of 8 every segment ends on a byte, so the
sum equals the byte math of ``plan.latent_part_bytes`` applied segment by segment.

int3: ``roundtrip_bits(x, 3, g)`` uses the same encoder rule as layout.py's int4/int2 (two symmetric level
tables picked by the scale's sign, a few clipping scales tried, least squared error kept per scale group) with
``GAUSS3_LEVELS`` (Lloyd-Max on ``x / absmax`` of groups of 32 Gaussian values) and the uniform 8-level grid.
Codes are 3-bit unsigned; 8 codes pack into 3 bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# positive half of the int3 Gaussian table (outermost level 1); seeded Lloyd-Max, see the module docstring
GAUSS3_HALF = (0.1151, 0.3556, 0.6323, 1.0)
SCALE_FACTORS3 = {"gauss": (0.80, 0.85, 0.90, 0.95, 1.0), "uniform": (0.85, 0.9, 0.95, 1.0)}


def _levels3():
    h = torch.tensor(GAUSS3_HALF)
    gauss = torch.cat([-h.flip(0), h])
    uniform = (torch.arange(8, dtype=torch.float32) - 3.5) / 3.5
    return gauss, uniform


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    from vllm_kvc.layout import _grouped as g

    return g(x, group)


def roundtrip3(x: torch.Tensor, group: int = 0) -> torch.Tensor:
    """int3 with one fp16 scale per ``group`` values of the last dim (0: per vector): what the cache reads back."""
    r = x.shape[-1]
    xg = _grouped(x.float(), group)
    amax = xg.abs().amax(dim=-1).clamp_min(1e-6)
    gauss, uniform = _levels3()
    best_err = best = None
    for levels, factors in ((gauss, SCALE_FACTORS3["gauss"]), (uniform, SCALE_FACTORS3["uniform"])):
        mids = (levels[1:] + levels[:-1]) / 2
        for f in factors:
            s = (amax * f).to(torch.float16).float()[..., None]
            y = levels[torch.bucketize(xg / s, mids)] * s
            err = ((y - xg) ** 2).sum(-1)
            if best is None:
                best_err, best = err, y
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better[..., None], y, best)
    return best.reshape(*x.shape[:-1], -1)[..., :r]


def roundtrip_bits(x: torch.Tensor, bits: int, group: int = 0) -> torch.Tensor:
    """What a latent segment x [..., w] reads back as at ``bits`` (8/4/2: layout.py's quantizer; 3: int3 here;
    16: bf16; 0: dropped, zeros)."""
    from vllm_kvc.layout import roundtrip

    if bits == 0:
        return torch.zeros_like(x)
    if bits == 16:
        return x.to(torch.bfloat16).float()
    if bits == 3:
        return roundtrip3(x, group)
    return roundtrip(x, f"int{bits}", group)


# ------------------------------------------------------------------------------------------------- segments
@dataclass(frozen=True)
class Segment:
    width: int  # latent coordinates (per head group)
    bits: int  # 0 (dropped), 2, 3, 4, 8 (16: bf16)
    scale_group: int = 32  # values per fp16 scale; 0: one scale per segment (per head group and token)

    def scales(self) -> int:
        if self.bits in (0, 16):
            return 0
        return -(-self.width // self.scale_group) if self.scale_group else 1

    def value_bytes(self) -> int:
        return (self.width * self.bits + 7) // 8


def part_bytes(segments, groups: int = 1) -> int:
    """Bytes per token of one row part (K or V of one layer), scales included."""
    return sum(groups * s.value_bytes() + 2 * groups * s.scales() for s in segments if s.bits)


def describe(segments) -> str:
    """'64x4 48x3 32x2 (48 dropped)'-style summary."""
    kept = " ".join(f"{s.width}x{s.bits}" for s in segments if s.bits)
    dropped = sum(s.width for s in segments if not s.bits)
    return kept + (f" ({dropped} dropped)" if dropped else "")


_EFF: dict = {}


def relative_error(bits: int, scale_group: int, width: int = 64, n: int = 4096, seed: int = 0) -> float:
    """e(b): mean squared error / variance of ``roundtrip_bits`` on Gaussian vectors of ``width`` values."""
    key = (bits, scale_group if scale_group else width)
    if bits == 0:
        return 1.0
    if key not in _EFF:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, width, generator=g)
        _EFF[key] = float(((roundtrip_bits(x, bits, scale_group) - x) ** 2).mean())
    return _EFF[key]


def _rate(bits: int, scale_group: int, width: int = 64) -> float:
    """Bits per coordinate, the fp16 scales' share included."""
    if bits == 0:
        return 0.0
    if bits == 16:
        return 16.0
    return bits + 16.0 / (scale_group if scale_group else width)


def choose_bits(v: torch.Tensor, lam: float, menu, scale_group: int) -> torch.Tensor:
    """Per coordinate (v [n] its weighted variance) the width of least ``v e(b) + lam rate(b)``."""
    opts = sorted(set(menu) | {0})
    cost = torch.stack([v * relative_error(b, scale_group) + lam * _rate(b, scale_group) for b in opts])
    return torch.tensor(opts)[cost.argmin(0)]


def segments_from_bits(bits_sorted: torch.Tensor, unit: int, scale_group: int, menu) -> list[Segment]:
    """Non-increasing per-coordinate widths -> segments whose boundaries are snapped to multiples of ``unit``."""
    n = bits_sorted.numel()
    opts = sorted(set(menu) | {0}, reverse=True)
    segs, start = [], 0
    cum = 0
    for b in opts:
        cum += int((bits_sorted == b).sum())
        end = n if b == opts[-1] else min(n, int(round(cum / unit)) * unit)
        end = max(end, start)
        if end > start:
            segs.append(Segment(end - start, b, scale_group if b not in (0, 16) else 0))
        start = end
    return segs


def allocate_segments(variances, budget_bytes: int, menu=(8, 4, 3, 2), unit: int = 16, scale_group: int = 32,
                      groups: int = 1, iters: int = 60):
    """Reverse water-filling over every item (a row part: one layer's K or V) at once.

    ``variances``: one tensor per item of its coordinates' weighted variances, sorted non-increasing.
    Returns (segments per item, bytes per token of all items). Bytes never exceed ``budget_bytes``."""
    for v in variances:
        if v.numel() > 1 and bool((v[1:] > v[:-1] * (1 + 1e-9)).any()):
            raise ValueError("variances must be sorted non-increasing within each item")

    def alloc(lam):
        segs = [segments_from_bits(choose_bits(v, lam, menu, scale_group), unit, scale_group, menu)
                for v in variances]
        return segs, sum(part_bytes(s, groups) for s in segs)

    vmax = max(float(v.max()) for v in variances)
    lo, hi = vmax * 1e-12, vmax * 10.0  # lam small: everything at the widest; large: everything dropped
    best = None
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        segs, used = alloc(mid)
        if used <= budget_bytes:
            hi = mid
            if best is None or used > best[1]:
                best = (segs, used)
        else:
            lo = mid
    if best is None:
        raise ValueError(f"budget {budget_bytes} B/token: nothing fits")
    return best


def predicted_distortion(v: torch.Tensor, segments) -> float:
    """Model of the weighted squared error of one item: dropped coordinates cost their variance; a rotated
    segment spreads e(b) x (its summed variance) over its coordinates."""
    out, off = 0.0, 0
    for s in segments:
        out += float(v[off:off + s.width].sum()) * relative_error(s.bits, s.scale_group)
        off += s.width
    return out


# ---------------------------------------------------------------------------------------------------- codec
class SegmentCodec:
    """One row part: encoder E [in, n] (latent = x E), decoder D [n, out], coordinates sorted by the allocation,
    each kept segment rotated (rotation folded into E and D) and rounded at its width."""

    def __init__(self, enc: torch.Tensor, dec: torch.Tensor, segments, rotate: bool = True, seed: int = 0):
        from vllm_kvc.factorize import rotation

        self.segments = [s for s in segments]
        kept = sum(s.width for s in segments if s.bits)
        total = sum(s.width for s in segments)
        if total != enc.shape[1] or enc.shape[1] != dec.shape[0]:
            raise ValueError(f"segments cover {total} coordinates, factors have {enc.shape[1]}")
        es, ds, self.kept = [], [], []
        off = 0
        for j, s in enumerate(segments):
            if s.bits:
                e, d = enc[:, off:off + s.width].double(), dec[off:off + s.width].double()
                if rotate and s.width > 1:
                    r = rotation(s.width, seed=seed + j)
                    e, d = e @ r, r.t() @ d
                es.append(e)
                ds.append(d)
                self.kept.append(s)
            off += s.width
        self.enc = torch.cat(es, 1).float() if es else enc[:, :0].float()
        self.dec = torch.cat(ds, 0).float() if ds else dec[:0].float()
        assert self.enc.shape[1] == kept

    def roundtrip_latent(self, c: torch.Tensor) -> torch.Tensor:
        outs, off = [], 0
        for s in self.kept:
            outs.append(roundtrip_bits(c[..., off:off + s.width], s.bits, s.scale_group))
            off += s.width
        return torch.cat(outs, -1) if outs else c

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.kept:
            return torch.zeros(*x.shape[:-1], self.dec.shape[1], dtype=torch.float32)
        return self.roundtrip_latent(x.float() @ self.enc) @ self.dec


# ------------------------------------------------------------------------------------------ weighted bases
def metric_factors(w: torch.Tensor, cov: torch.Tensor | None, metric: torch.Tensor | None = None):
    """Full-rank whitened factors of w [out, hidden] in an output metric ``metric`` [out, out] (symmetric PSD;
    None: the identity): minimises E || (x W^T - x A B) M^{1/2} ||^2 per rank. Returns (A [hidden, out],
    B [out, out], s2 [out]: the latent variances on the calibration covariance, non-increasing); the rows of
    ``B M^{1/2}`` are orthonormal, so a latent error costs the same in the metric."""
    from vllm_kvc.factorize import lowrank_factors

    out = w.shape[0]
    if metric is None:
        mh, mhi = None, None
        a, b = lowrank_factors(w, out, cov)
    else:
        ev, evec = torch.linalg.eigh(metric.double())
        ev = ev.clamp_min(ev.max() * 1e-8)
        mh = (evec * ev.sqrt()) @ evec.t()
        mhi = (evec / ev.sqrt()) @ evec.t()
        a, b = lowrank_factors((mh @ w.double()), out, cov)  # x A b ~ x W^T M^{1/2}
        b = b @ mhi
    if cov is not None:
        s2 = torch.einsum("hr,hk,kr->r", a, cov.double(), a)
    else:
        s2 = (a ** 2).sum(0)
    return a, b, s2


def rope_pair_weights(q_energy: torch.Tensor) -> torch.Tensor:
    """Per key coordinate of one head [head_dim] (rotate-half RoPE: coordinates i and i + d/2 rotate together),
    the query energy averaged over each rotary pair: the diagonal of E[q q^T] averaged over RoPE angles."""
    d = q_energy.shape[-1] // 2
    pair = (q_energy[..., :d] + q_energy[..., d:]) / 2
    return torch.cat([pair, pair], -1)


def pca_basis(cov: torch.Tensor, metric: torch.Tensor | None = None):
    """KLT of vectors y with second moment ``cov`` [n, n] in the metric M: latent c = y E, y ~ c D.

    Returns (E [n, n], D [n, n], s2 [n] non-increasing) with D M^{1/2} orthonormal rows."""
    c = cov.double()
    if metric is None:
        s2, u = torch.linalg.eigh(c)
        idx = s2.argsort(descending=True)
        u = u[:, idx]
        return u, u.t(), s2[idx].clamp_min(0)
    ev, evec = torch.linalg.eigh(metric.double())
    ev = ev.clamp_min(ev.max() * 1e-8)
    mh = (evec * ev.sqrt()) @ evec.t()
    mhi = (evec / ev.sqrt()) @ evec.t()
    s2, u = torch.linalg.eigh(mh @ c @ mh)
    idx = s2.argsort(descending=True)
    u = u[:, idx]
    return mh @ u, u.t() @ mhi, s2[idx].clamp_min(0)
