"""int4 / int2 latent quantizer (version 2: two level tables picked by the scale's sign) and the unchanged
int8 layout. Plain torch, fast."""
import pytest
import torch

from vllm_kvc.layout import (GAUSS_LEVELS, QUANT_VERSION, UNIFORM_LEVELS, LatentLayout, dequantize, quantize,
                             quantize_int8, roundtrip)
from vllm_kvc.plan import latent_row_bytes


def _old_uniform(x, bits, group):
    """The version-1 quantizer (uniform mid-rise, scale = absmax / 2**(bits-1) rounded up), as a reference."""
    r = x.shape[-1]
    xg = x.float().unsqueeze(-2) if not group else torch.nn.functional.pad(x.float(), (0, -r % group)).reshape(
        *x.shape[:-1], -1, group)
    half = 2 ** (bits - 1)
    s = (xg.abs().amax(-1) / half * (1 + 2 ** -10)).clamp_min(1e-6).to(torch.float16).float()
    u = (torch.floor(xg / s[..., None]) + half).clamp_(0, 2 * half - 1)
    return ((u - half + 0.5) * s[..., None]).reshape(*x.shape[:-1], -1)[..., :r]


def _old_int8(x, group):
    """The int8 quantizer as it was (reference for bit-identity)."""
    r = x.shape[-1]
    xg = x.float().unsqueeze(-2) if not group else torch.nn.functional.pad(x.float(), (0, -r % group)).reshape(
        *x.shape[:-1], -1, group)
    scale = (xg.abs().amax(dim=-1) / 127.0).clamp_min(1e-6).to(torch.float16).float()
    q = torch.round(xg / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(*x.shape[:-1], -1)[..., :r], scale


@pytest.mark.parametrize("bits,group,ratio", [(4, 32, 0.8), (4, 0, 0.8), (2, 32, 0.9), (2, 0, 0.9)])
@pytest.mark.parametrize("r", [32, 96, 192])
def test_gaussian_mse_below_the_old_uniform_quantizer(bits, group, ratio, r):
    x = torch.randn(4000, 1, r, generator=torch.Generator().manual_seed(r))
    new = ((roundtrip(x, f"int{bits}", group) - x) ** 2).mean()
    old = ((_old_uniform(x, bits, group) - x) ** 2).mean()
    assert new < ratio * old  # measured: int4 g32 0.0059 vs 0.0079, per-vector r=192 0.0088 vs 0.0117


def test_level_tables():
    for b in (4, 2):
        for lv in (GAUSS_LEVELS[b], UNIFORM_LEVELS[b]):
            assert lv.numel() == 2 ** b and float(lv[-1]) == 1.0 and torch.equal(lv, -lv.flip(0))
            assert bool((lv[1:] > lv[:-1]).all())
    assert QUANT_VERSION == 2


def test_scale_sign_selects_the_table():
    codes = torch.arange(16, dtype=torch.uint8)[None]
    g = dequantize(codes, torch.tensor([[2.0]]), 4)
    u = dequantize(codes, torch.tensor([[-2.0]]), 4)
    assert torch.allclose(g[0], GAUSS_LEVELS[4] * 2) and torch.allclose(u[0], UNIFORM_LEVELS[4] * 2)
    # a flat (+-1) latent, as some Hadamard rotations give, is coded exactly on the uniform table's outer levels
    x = torch.tensor([[1.0, -1.0] * 16])
    c, s = quantize(x, 4, 32)
    assert torch.equal(dequantize(c, s, 4, 32), x)


@pytest.mark.parametrize("group", [0, 32])
def test_int8_bit_identical_to_before(group):
    x = torch.randn(50, 2, 70) * torch.logspace(0, -2, 70)
    q, s = quantize(x, 8, group)
    q0, s0 = _old_int8(x, group)
    assert q.dtype == torch.int8 and torch.equal(q, q0) and torch.equal(s, s0)
    q1, s1 = quantize_int8(x)
    assert torch.equal(q1, _old_int8(x, 0)[0]) and torch.equal(s1, _old_int8(x, 0)[1][..., 0])


def test_int8_rows_byte_for_byte():
    lay = LatentLayout(groups=1, group_size=3, head_dim=64, rank_k=120, rank_v=192, dtype="int8")
    k, v = torch.randn(5, 1, 120), torch.randn(5, 1, 192)
    qk, sk = _old_int8(k, 0)
    qv, sv = _old_int8(v, 0)
    want = torch.cat([qk.reshape(5, -1).view(torch.uint8), qv.reshape(5, -1).view(torch.uint8),
                      torch.cat([sk, sv], 1).half().contiguous().view(torch.uint8).reshape(5, -1)], 1)
    assert torch.equal(lay.pack(k, v), want)


@pytest.mark.parametrize("spec,rk,rv,nbytes", [("int4@g32", 192, 192, 96 + 96 + 2 * 12),
                                                ("int4@g32", 184, 160, 92 + 80 + 2 * (6 + 5)),
                                                ("int4", 192, 192, 96 + 96 + 4), ("int2@g32", 192, 192, 48 + 48 + 24),
                                                ("int8/int4@g32", 64, 64, 64 + 32 + 2 * 4)])
def test_pack_unpack_bytes_unchanged(spec, rk, rv, nbytes):
    lay = LatentLayout(groups=1, group_size=3, head_dim=64, rank_k=rk, rank_v=rv, dtype=spec)
    assert lay.row_bytes == latent_row_bytes(1, rk, rv, spec) == nbytes
    k, v = torch.randn(9, 1, rk), torch.randn(9, 1, rv)
    rows = lay.pack(k, v)
    assert rows.shape == (9, nbytes) and rows.dtype == torch.uint8
    k2, v2 = lay.unpack(rows)
    dk, _, dv = spec.split("@")[0].partition("/")
    qg = 32 if "@g32" in spec else 0
    assert torch.equal(k2, roundtrip(k, dk, qg)) and torch.equal(v2, roundtrip(v, dv or dk, qg))


def test_sensitivity_key_carries_the_quantizer_version(tmp_path, monkeypatch):
    import vllm_kvc.allocate as al
    from vllm_kvc.config import CompressionConfig

    monkeypatch.setattr(al, "checkpoint_fingerprint", lambda d: "ckpt")
    cfg = CompressionConfig(group_size=3)
    fk, sk = al._fisher_key("m", cfg, al.DEFAULT_PROBE), al.sensitivity_key("m", cfg, al.DEFAULT_PROBE)
    assert fk != sk  # allocations priced with the version-1 quantizer are not reused


@pytest.mark.parametrize("bits,group,groups,r", [(4, 32, 1, 192), (4, 32, 1, 120), (4, 0, 2, 64), (2, 32, 3, 96),
                                                 (2, 16, 1, 40), (4, 8, 2, 24)])
def test_byte_table_decoder_is_bitwise_the_elementwise_one(bits, group, groups, r):
    """layout.decode_packed (one embedding lookup per byte, whole scale groups or a partial last one) returns
    exactly ``dequantize(unpack_codes(...))``, both level tables (either scale sign) included."""
    from vllm_kvc.layout import decode_packed, pack_codes, unpack_codes

    g = torch.Generator().manual_seed(bits * 100 + r)
    x = torch.randn(37, groups, r, generator=g) * torch.logspace(0, -1, r)
    codes, scales = quantize(x, bits, group)
    scales[::3] = -scales[::3]  # both level tables in use whatever the quantizer chose
    packed = pack_codes(codes.reshape(37, groups * r), bits)
    want = dequantize(unpack_codes(packed, bits, groups * r).reshape(37, groups, r), scales, bits, group)
    got = decode_packed(packed, scales, bits, group, groups, r)
    assert torch.equal(got, want)
