"""Method tcode's recent window: each query reads its newest ``window`` tokens (and the sink) exactly. The
one-row pool pages, the transformers emulation's attention against the vLLM path's two-source attention, the
bytes a window costs (per sequence, counted at a context), the bench's window points and the allocation's budget.
The vLLM engine itself runs in tests/test_tcode.py (perplexity equal to this emulation with chunked prompts)."""
from types import SimpleNamespace

import pytest
import torch

from vllm_kvc.config import CompressionConfig
from vllm_kvc.emulate import windowed_attention
from vllm_kvc.glue.window import RecentPool, exact_mask
from vllm_kvc.kernels.reference import attend_dense, attend_two_source
from vllm_kvc.methods import build_plan, get_method
from vllm_kvc.methods.tcode import tcode_windows
from vllm_kvc.plan import ModelShape, dense_bytes_per_token
from vllm_kvc.settings import ConfigError

SMOL = ModelShape("LlamaForCausalLM", 30, 576, 9, 3, 64)


def test_one_row_pages_map_positions_through_the_block_table():
    """``page_rows=1``: a page per cache slot, so a sequence holds exactly its window's rows; positions are mapped
    to slots through vLLM's blocks (16 tokens), not the page size."""
    pool = RecentPool(block_size=16, shape=(2,), dtype=torch.float32, device="cpu", pages=2, page_rows=1)
    pool.begin_step()
    block_row = torch.tensor([5, 2])  # positions 0-15 in block 5, 16-31 in block 2
    pos = torch.tensor([0, 14, 15, 16, 17])
    slots = torch.tensor([80, 94, 95, 32, 33])
    vals = torch.randn(5, 2)
    pool.write(slots, vals)
    assert pool.data.shape[:2] == (8, 1)  # grew from 2 to 8 one-row pages for 5 rows, never to blocks
    got, found = pool.read(block_row, torch.tensor([0, 14, 15, 16, 17, 13, 18]))
    assert found.tolist() == [True] * 5 + [False, False]
    assert torch.equal(got[:5], vals) and torch.count_nonzero(got[5:]) == 0
    del pos
    with pytest.raises(ValueError, match="page_rows 3 must divide the block size 16"):
        RecentPool(16, (1,), torch.float32, "cpu", page_rows=3)


@pytest.mark.parametrize("window,sinks", [(1, 1), (4, 1), (5, 0), (64, 1)])
def test_emulation_attention_equals_the_vllm_paths_two_source_attention(window, sinks):
    """emulate.windowed_attention (transformers' layout, exact and coded heads side by side) == the vLLM path's
    reference.attend_two_source with glue/window.exact_mask, for every query of a causal sequence; a window
    covering everything is plain attention over the exact K/V."""
    torch.manual_seed(window)
    t, hq, hkv, d, scale = 12, 6, 2, 8, 0.35
    q = torch.randn(1, hq, t, d)
    k_ex, k_co, v_ex, v_co = (torch.randn(1, hkv, t, d) for _ in range(4))
    mod = SimpleNamespace(kvc_window=(window, sinks))
    got, _ = windowed_attention(mod, q, torch.cat([k_ex, k_co], 1), torch.cat([v_ex, v_co], 1), None, scale)
    pos = torch.arange(t)
    use = exact_mask(pos, t, window, sinks)
    visible = pos[None, :] <= pos[:, None]

    def tok(x):  # [1, H, T, d] -> [T, H, d]
        return x[0].transpose(0, 1)

    want = attend_two_source(tok(q), tok(k_ex), tok(v_ex), tok(q), tok(k_co), tok(v_co), use, visible, scale)
    assert torch.allclose(got[0], want, atol=1e-5)
    if window >= t:
        dense = attend_dense(tok(q)[None], tok(k_ex)[None], tok(v_ex)[None], [t], scale)[0]
        assert torch.allclose(got[0], dense, atol=1e-5)
    else:  # the coded rows are read somewhere: the result differs from exact attention
        dense = attend_dense(tok(q)[None], tok(k_ex)[None], tok(v_ex)[None], [t], scale)[0]
        assert not torch.allclose(got[0], dense, atol=1e-3)


def test_window_bytes_are_per_sequence_and_counted_at_a_context():
    k, v = ["64x4+96x2"] * 30, ["72x4+112x2"] * 30
    comp = CompressionConfig(method="tcode", group_size=3, tcode={"segments": {"k": k, "v": v}, "window": 16})
    plan = build_plan(comp, SMOL)
    full = dense_bytes_per_token(SMOL)
    assert plan.window == 16 and plan.sequence_bytes() == 17 * full  # window + sink, model dtype, all layers
    assert plan.counted_bytes_per_token(1024) == pytest.approx(plan.bytes_per_token() + 17 * full / 1024)
    assert plan.counted_bytes_per_token(8192) < plan.counted_bytes_per_token(1024)
    desc = get_method("tcode").describe(plan)
    assert desc["window"] == 16 and desc["sequence_bytes"] == 17 * full
    no_win = build_plan(CompressionConfig(method="tcode", group_size=3,
                                          tcode={"segments": {"k": k, "v": v}, "sink": False}), SMOL)
    assert no_win.sequence_bytes() == 0 and no_win.counted_bytes_per_token(64) == no_win.bytes_per_token()
    with pytest.raises(Exception, match="window"):
        CompressionConfig(method="tcode", group_size=3, tcode={"window": -1})


def test_bench_window_points():
    assert tcode_windows(None) == [0, 16]
    assert tcode_windows(["kvc"]) == [0, 16] and tcode_windows(["kvc-tcode"]) == [0, 16]
    assert tcode_windows(["kvc-tcode-w32"]) == [32]
    assert tcode_windows(["kvc-tcode-w0", "kvc-tcode-w8"]) == [0, 8]
    assert tcode_windows(["vllm-fp8", "kvc-roped"]) == []


def test_memory_left_for_the_paged_rows_is_checked_before_any_calibration():
    base = CompressionConfig(method="tcode", group_size=3, tcode={"window": 64, "context": 1024})
    with pytest.raises(ConfigError, match="--memory") as e:  # 65 exact rows at 1k tokens are 6.3 % already
        get_method("tcode").allocate("/nonexistent", base, dense_bytes_per_token(SMOL), memory=0.07)
    assert "compression.tcode.context" in str(e.value)


@pytest.mark.slow
def test_allocation_with_a_window_fits_the_whole_budget(model_dir):
    """--memory 0.15 with a 16-token window counted at 1,024 tokens: the paged rows take at most 0.15 - 17/1024 of
    the bf16 bytes, the reported fraction (rows + exact rows at the context) at most 0.15."""
    from vllm_kvc.validate import check_file  # noqa: F401  (the real model's shape, as the CLI)

    shape = ModelShape.from_model_dir(model_dir)
    full = dense_bytes_per_token(shape)
    base = CompressionConfig(method="tcode", group_size=3, tcode={"window": 16, "context": 1024})
    comp, summary = get_method("tcode").allocate(model_dir, base, full, memory=0.15)
    plan = build_plan(comp, shape)
    assert plan.window == 16 and comp.tcode.context == 1024
    assert plan.bytes_per_token() <= (0.15 - 17 / 1024) * full
    assert summary["memory_fraction"] == pytest.approx(plan.counted_bytes_per_token(1024) / full)
    assert 0.14 < summary["memory_fraction"] <= 0.15
