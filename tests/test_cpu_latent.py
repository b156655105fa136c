"""The CPU decode kernel for roped keys (vllm_kvc/kernels/cpu_latent.c) against the torch reference: every row
layout it reads (float, int8, packed 4/2-bit with per-token and per-32 scales, K/V of different widths,
segments), ragged requests in shuffled blocks, several head groups, decodes mixed with prompts and chunked
prefills (the prefill kernel)."""
import pytest
import torch

from vllm_kvc.kernels import cpu_latent, reference
from vllm_kvc.layout import LatentLayout

pytestmark = pytest.mark.skipif(cpu_latent.library() is None, reason="no C compiler for the CPU kernel")

LAYOUTS = [  # (groups, group_size, head_dim, rank_k, rank_v, dtype)
    (1, 3, 64, 192, 192, "int4@g32"),
    (1, 3, 64, 192, 192, "int8/int4@g32"),
    (2, 2, 32, 64, 48, "int8"),
    (2, 2, 32, 64, 40, "int4"),
    (1, 3, 64, 160, 96, "int2@g32"),
    (2, 1, 64, 56, 64, "int4/int2@g32"),
    (1, 3, 64, 128, 192, "bfloat16"),
    (2, 2, 32, 64, 64, "float32"),
    (1, 3, 64, 136, 176, "seg:8x8+64x4+64x2/96x4+80x2"),
    (2, 2, 32, 48, 64, "seg:16x4+32x2/8x8+56x4"),
]


def _cache(layout, lens, bs, seed):
    """A paged cache holding random latents of ``lens`` tokens per request in shuffled blocks."""
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-n // bs) for n in lens]
    total = sum(nblk) + 3
    perm = torch.randperm(total, generator=g)
    cache = torch.zeros(total, bs, layout.row_elems, dtype=layout.cache_dtype)
    table = torch.zeros(len(lens), max(nblk), dtype=torch.int32)
    used = 0
    for r, n in enumerate(lens):
        for j in range(nblk[r]):
            table[r, j] = perm[used]
            used += 1
        ck = torch.randn(n, layout.groups, layout.rank_k, generator=g)
        cv = torch.randn(n, layout.groups, layout.rank_v, generator=g)
        rows = layout.pack(ck, cv)
        for t in range(n):
            cache[table[r, t // bs], t % bs] = rows[t]
    return cache, table


@pytest.mark.parametrize("spec", LAYOUTS, ids=[s[-1] for s in LAYOUTS])
def test_decode_kernel_matches_the_reference(spec):
    groups, gsz, hd, rk, rv, dtype = spec
    layout = LatentLayout(groups, gsz, hd, rk, rv, dtype)
    hq = 3 * layout.num_kv_heads
    lens = [1, 37, 128, 200, 65]
    cache, table = _cache(layout, lens, 16, seed=len(dtype))
    g = torch.Generator().manual_seed(7)
    q = torch.randn(len(lens), hq, rk, generator=g)
    b_v = torch.randn(groups, rv, gsz * hd, generator=g) / rv ** 0.5
    bias_v = torch.randn(layout.num_kv_heads * hd, generator=g)
    qsl = torch.arange(len(lens) + 1)
    sl = torch.tensor(lens)
    args = (cache, layout, table, sl, qsl, None, b_v, None, bias_v, None, 0.125)
    want = reference.latent_attention(q, *args, roped_keys=True)
    for threads in (1, 2):
        got = cpu_latent.latent_attention(q, *args, roped_keys=True, threads=threads)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    out = torch.full((len(lens) + 2, hq, hd), 5.0, dtype=torch.bfloat16)  # rows 1..len written, 0 and last kept
    cpu_latent.roped_decode(q, list(range(len(lens))), cache, layout, table, sl, b_v, bias_v, 0.125, out[1:-1])
    # bf16 written by the kernel's own rounding: equal but for last-bit flips where float32 sums differ
    exact = out[1:-1] == want.to(torch.bfloat16)
    assert exact.float().mean() > 0.99
    torch.testing.assert_close(out[1:-1].float(), want.to(torch.bfloat16).float(), rtol=8e-3, atol=1e-5)
    assert torch.all(out[0] == 5) and torch.all(out[-1] == 5)


def test_decodes_mixed_with_a_prompt_and_a_wrong_row_fails():
    """A batch of decodes around a 5-token chunk (the prefill kernel's); then one corrupted byte of a
    cached row moves exactly the request that owns it."""
    layout = LatentLayout(1, 3, 64, 192, 192, "int4@g32")
    lens = [50, 90, 33]
    cache, table = _cache(layout, lens, 16, seed=3)
    g = torch.Generator().manual_seed(1)
    qlens = [1, 5, 1]
    q = torch.randn(sum(qlens), 9, 192, generator=g)
    b_v = torch.randn(1, 192, 192, generator=g) / 14
    qsl = torch.tensor([0, 1, 6, 7])
    args = (layout, table, torch.tensor(lens), qsl, None, b_v, None, None, None, 0.125)
    want = reference.latent_attention(q, cache, *args, roped_keys=True)
    got = cpu_latent.latent_attention(q, cache, *args, roped_keys=True)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    bad = cache.clone()
    bad[table[2, 1], 3, 7] ^= 0xFF  # request 2, token 19, a K code byte
    moved = cpu_latent.latent_attention(q, bad, *args, roped_keys=True)
    assert torch.equal(moved[:6], got[:6]) and not torch.allclose(moved[6], got[6])


@pytest.mark.parametrize("spec", LAYOUTS, ids=[s[-1] for s in LAYOUTS])
def test_prefill_kernel_matches_the_reference(spec):
    """Whole prompts (query tokens = cached tokens), chunks of a longer prompt (causal from the chunk's
    position), a one-token prompt and decodes in one batch, on 1 and 2 threads."""
    groups, gsz, hd, rk, rv, dtype = spec
    layout = LatentLayout(groups, gsz, hd, rk, rv, dtype)
    hq = 3 * layout.num_kv_heads
    lens = [40, 130, 1, 77, 19, 64]
    qlens = [40, 17, 1, 1, 19, 3]  # prompt, chunk, 1-token prompt, decode, prompt, chunk
    cache, table = _cache(layout, lens, 16, seed=len(dtype) + 1)
    g = torch.Generator().manual_seed(11)
    q = torch.randn(sum(qlens), hq, rk, generator=g)
    b_v = torch.randn(groups, rv, gsz * hd, generator=g) / rv ** 0.5
    bias_v = torch.randn(layout.num_kv_heads * hd, generator=g)
    qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist())
    args = (cache, layout, table, torch.tensor(lens), qsl, None, b_v, None, bias_v, None, 0.125)
    want = reference.latent_attention(q, *args, roped_keys=True)
    for threads in (1, 2):
        got = cpu_latent.latent_attention(q, *args, roped_keys=True, threads=threads)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    # long requests (query x cached tokens above the threshold) rebuild K/V from the decoded rows for dense SDPA:
    # the same attention from the original roped queries
    q_heads = torch.randn(sum(qlens), hq, hd, generator=g)
    b_k = torch.randn(groups, rk, gsz * hd, generator=g) / rk ** 0.5
    q_lat = torch.einsum("nhd,hdr->nhr", q_heads, reference.head_key_views(b_k, layout, hq))
    want2 = reference.latent_attention(q_lat, *args, roped_keys=True)
    for pairs in (0, 40 * 40 - 1, 10 ** 9):  # every prompt rebuilt / the 40-token prompt only / none
        old = cpu_latent.REBUILD_PAIRS
        cpu_latent.REBUILD_PAIRS = pairs
        try:
            got2 = cpu_latent.latent_attention(q_lat, cache, layout, table, torch.tensor(lens), qsl, b_k, b_v, None,
                                               bias_v, None, 0.125, roped_keys=True, q_heads=q_heads)
        finally:
            cpu_latent.REBUILD_PAIRS = old
        torch.testing.assert_close(got2, want2, rtol=1e-4, atol=1e-4)
    # a chunk scores only the rows up to each token's own position: changing a later row moves only later tokens
    bad = cache.clone()
    bad[table[1, 120 // 16], 120 % 16] = layout.pack(torch.randn(1, groups, rk) * 9, torch.randn(1, groups, rv) * 9)[0]
    moved = cpu_latent.latent_attention(q, bad, *args[1:], roped_keys=True)
    chunk = slice(40, 57)  # request 1's 17 tokens at positions 113..129
    diff = (moved[chunk] - got[chunk]).abs().flatten(1).amax(1)
    assert torch.all(diff[:7] == 0) and torch.all(diff[7:] > 0), diff


def test_segment_table_describes_the_rows():
    lay = LatentLayout(2, 2, 32, 48, 64, "seg:16x4+32x2/8x8+56x4")
    k, v, so = cpu_latent.segment_table(lay, lay.cache_dtype)
    assert k.tolist() == [[0, 16, 4, 0, 1, 0], [16, 32, 2, 2, 1, 0]]
    assert v.tolist() == [[32, 8, 8, 4, 1, 0], [48, 56, 4, 6, 1, 0]]
    assert so == lay.scale_offset == 104
    lay = LatentLayout(1, 3, 64, 192, 160, "int8/int4@g32")
    k, v, so = cpu_latent.segment_table(lay, lay.cache_dtype)
    assert k.tolist() == [[0, 192, 8, 0, 6, 32]] and v.tolist() == [[192, 160, 4, 6, 5, 32]]
    assert so == 192 + 80


ENCODE = LAYOUTS[:6] + [(1, 3, 64, 112, 160, "int4/int2@g32"), (2, 2, 32, 40, 56, "int2"), LAYOUTS[8], LAYOUTS[9]]


@pytest.mark.parametrize("spec", ENCODE, ids=[s[-1] for s in ENCODE])
def test_encoder_writes_layout_packs_bytes(spec):
    """cpu_latent.encode_rows = reference.write_latents (layout.pack) byte for byte, at shuffled slots with one
    skipped (-1), latents of very different sizes per row; rows it does not own stay untouched."""
    groups, gsz, hd, rk, rv, dtype = spec
    layout = LatentLayout(groups, gsz, hd, rk, rv, dtype)
    g = torch.Generator().manual_seed(rk + rv)
    for n in (1, 40):
        k = torch.randn(n, groups, rk, generator=g) * torch.rand(n, groups, 1, generator=g) * 4
        v = torch.randn(n, groups, rv, generator=g).to(torch.bfloat16)
        slots = torch.randperm(64, generator=g)[:n]
        slots[0] = -1
        want = torch.full((4, 16, layout.row_elems), 7, dtype=torch.uint8)
        got = want.clone()
        reference.write_latents(want, slots, layout, k, v)
        assert cpu_latent.encode_rows(got, slots, layout, k, v)
        assert torch.equal(got, want)


def test_encoder_leaves_float_layouts_to_the_reference():
    layout = LatentLayout(1, 3, 64, 64, 64, "bfloat16")
    cache = torch.zeros(2, 16, layout.row_elems, dtype=layout.cache_dtype)
    assert not cpu_latent.encode_rows(cache, torch.arange(3), layout, torch.randn(3, 1, 64), torch.randn(3, 1, 64))
    assert not cache.any()
