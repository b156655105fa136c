"""Transform-coding math of vllm_kvc/bitalloc.py: segments, bytes, int3, water-filling, weighted bases. Seconds."""
import torch

from vllm_kvc import bitalloc as ba
from vllm_kvc.plan import latent_part_bytes


def test_part_bytes_match_plan_byte_math_per_segment():
    segs = [ba.Segment(64, 4, 32), ba.Segment(48, 3, 32), ba.Segment(32, 2, 32), ba.Segment(48, 0)]
    got = ba.part_bytes(segs, groups=1)
    want = 0
    for s in segs:
        if s.bits in (2, 4):
            vb, ns = latent_part_bytes(1, s.width, f"int{s.bits}", 32)
            want += vb + 2 * ns
    want += 48 * 3 // 8 + 2 * 2  # int3: 48 values -> 18 bytes, 2 scales
    assert got == want
    assert ba.part_bytes([ba.Segment(192, 4, 0)]) == latent_part_bytes(1, 192, "int4", 0)[0] + 2


def test_int3_error_between_int2_and_int4_and_bounded():
    x = torch.randn(2000, 64, generator=torch.Generator().manual_seed(1))
    errs = {b: float(((ba.roundtrip_bits(x, b, 32) - x) ** 2).mean()) for b in (2, 3, 4)}
    assert errs[4] < errs[3] < errs[2]
    # uniform 8-level grid with |scale| = absmax bounds the error per group of 32
    xg = x.reshape(-1, 32)
    err3 = ((ba.roundtrip3(x, 32).reshape(-1, 32) - xg) ** 2).sum(-1)
    bound = 32 * (xg.abs().amax(-1) / 7) ** 2 * 1.01
    assert bool((err3 <= bound).all())
    assert ba.relative_error(0, 32) == 1.0 and ba.relative_error(3, 32) < 0.04


def test_segments_from_bits_snaps_to_unit_and_covers_all():
    bits = torch.tensor([8] * 5 + [4] * 30 + [3] * 20 + [2] * 40 + [0] * 97)
    segs = ba.segments_from_bits(bits, 16, 32, (8, 4, 3, 2))
    assert sum(s.width for s in segs) == 192
    assert all(s.width % 16 == 0 for s in segs)
    assert [s.bits for s in segs] == sorted([s.bits for s in segs], reverse=True)


def test_water_filling_meets_budget_and_favours_large_variances():
    g = torch.Generator().manual_seed(0)
    items = [torch.sort(torch.rand(192, generator=g) ** 6 * scale, descending=True)[0] for scale in (1.0, 10.0)]
    for budget in (60, 120, 200):
        segs, used = ba.allocate_segments(items, budget)
        assert used <= budget
        assert used == sum(ba.part_bytes(s) for s in segs)
    segs, _ = ba.allocate_segments(items, 120)
    kept = [sum(s.width * s.bits for s in ss) for ss in segs]
    assert kept[1] > kept[0]  # the item of 10x the variance gets more bits
    # more bytes, less predicted distortion
    d = [sum(ba.predicted_distortion(v, s) for v, s in zip(items, ba.allocate_segments(items, b)[0]))
         for b in (60, 120, 200)]
    assert d[0] > d[1] > d[2]


def test_codec_exact_at_high_bits_and_drops_coordinates():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(192, 96, generator=g, dtype=torch.float64) @ torch.randn(96, 256, generator=g, dtype=torch.float64)
    x = torch.randn(600, 256, generator=g, dtype=torch.float64)
    cov = x.t() @ x / 600  # w has rank 96: its last 96 latent coordinates carry nothing
    a, b, s2 = ba.metric_factors(w, cov)
    assert bool((s2[:-1] >= s2[1:] - 1e-9).all())
    y = (x @ w.t()).float()
    codec = ba.SegmentCodec(a, b, [ba.Segment(96, 16, 0), ba.Segment(96, 0)])
    assert torch.allclose(codec(x.float()), y, atol=0.05 * float(y.abs().max()))
    codec8 = ba.SegmentCodec(a, b, [ba.Segment(64, 8, 32), ba.Segment(32, 4, 32), ba.Segment(96, 0)])
    rel = float(((codec8(x.float()) - y) ** 2).mean() / (y ** 2).mean())
    assert rel < 2e-3


def test_metric_factors_reconstruct_in_metric_and_pca_basis_inverts():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 32, generator=g, dtype=torch.float64)
    x = torch.randn(500, 32, generator=g, dtype=torch.float64)
    cov = x.t() @ x / 500
    m = torch.diag(torch.rand(64, generator=g, dtype=torch.float64) + 0.1)
    a, b, s2 = ba.metric_factors(w, cov, m)
    assert torch.allclose(x @ a[:, :32] @ b[:32], x @ w.t(), atol=1e-8)  # rank of w is 32
    y = torch.randn(400, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    e, d, s2 = ba.pca_basis(y.t() @ y / 400, torch.eye(16, dtype=torch.float64) * 2)
    assert torch.allclose(y @ e @ d, y, atol=1e-8)
    c = y @ e
    assert torch.allclose((c.t() @ c / 400).diagonal(), s2, rtol=1e-6, atol=1e-8)


def test_rope_pair_weights_average_rotary_pairs():
    q = torch.arange(8.0)
    assert ba.rope_pair_weights(q).tolist() == [2, 3, 4, 5, 2, 3, 4, 5]


def test_imports_without_vllm():
    import subprocess
    import sys

    code = ("import vllm_kvc.bitalloc, sys; bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]; "
            "sys.exit('imported ' + ', '.join(bad[:5]) if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
