"""The side pool of exact recent/sink K/V and the two-source attention (plain torch, no vLLM)."""
import torch

from vllm_kvc.glue.window import RecentPool, exact_mask, keep_positions, window_positions
from vllm_kvc.kernels.reference import attend_dense, attend_two_source


def test_pool_write_read_and_missing():
    pool = RecentPool(block_size=4, shape=(2, 3), dtype=torch.float32, device="cpu", pages=2)
    pool.begin_step()
    block_row = torch.tensor([7, 3, 9])
    slots = torch.tensor([28, 29, 30, 12, 13])  # positions 0..4 of a request: block 7 offsets 0-2, block 3 0-1
    vals = torch.randn(5, 2, 3)
    pool.write(torch.tensor([28, 29, 30, 31, 12]), torch.cat([vals[:3], torch.zeros(1, 2, 3), vals[3:4]]))
    got, found = pool.read(block_row, torch.tensor([0, 1, 2, 4, 5, 9]))
    assert found.tolist() == [True, True, True, True, False, False]
    assert torch.equal(got[:3], vals[:3]) and torch.equal(got[3], vals[3])
    assert torch.count_nonzero(got[4:]) == 0
    del slots


def test_pool_never_recycles_a_page_used_in_this_step_and_grows():
    pool = RecentPool(block_size=2, shape=(1,), dtype=torch.float32, device="cpu", pages=2)
    pool.begin_step()
    pool.write(torch.tensor([0, 2]), torch.tensor([[1.0], [2.0]]))  # blocks 0 and 1: both pages used now
    pool.write(torch.tensor([4]), torch.tensor([[3.0]]))  # block 2 in the same step: the pool must grow
    assert pool.data.shape[0] == 4
    got, found = pool.read(torch.tensor([0, 1, 2]), torch.tensor([0, 2, 4]))
    assert found.all() and got.flatten().tolist() == [1.0, 2.0, 3.0]
    # next step: read block 0 (touch), then new blocks take the least recently used untouched pages
    pool.begin_step()
    pool.read(torch.tensor([0]), torch.tensor([0]))
    pool.write(torch.tensor([6, 8, 10]), torch.tensor([[4.0], [5.0], [6.0]]))  # blocks 3, 4, 5
    got, found = pool.read(torch.tensor([0]), torch.tensor([0]))
    assert found.item() and got.item() == 1.0  # block 0 was used this step: kept
    assert pool.data.shape[0] == 4
    _, found = pool.read(torch.tensor([1, 2]), torch.tensor([0, 2]))
    assert found.tolist() == [False, False]  # blocks 1 and 2 were recycled (read from the codes instead)


def test_pool_recycled_block_reads_only_what_its_new_owner_wrote():
    pool = RecentPool(block_size=4, shape=(1,), dtype=torch.float32, device="cpu", pages=1)
    pool.begin_step()
    pool.write(torch.tensor([20, 21, 22, 23]), torch.arange(4.0)[:, None])  # block 5, old request
    pool.begin_step()
    pool.write(torch.tensor([4]), torch.tensor([[9.0]]))  # block 1 takes the page: block 5 forgotten
    pool.begin_step()
    pool.write(torch.tensor([20]), torch.tensor([[7.0]]))  # vLLM gave block 5 to a new request
    got, found = pool.read(torch.tensor([5]), torch.arange(4))
    assert found.tolist() == [True, False, False, False] and got[0].item() == 7.0


def test_window_positions_and_masks():
    # chunk of 3 new tokens at positions 7, 8, 9 (seq_len 10), window 4, 2 sinks
    assert window_positions(10, 3, 4, 2).tolist() == [0, 1, 4, 5, 6]
    assert keep_positions(10, 3, 4, 2).tolist() == [0, 1, 2]  # positions 7, 8, 9: all within the last 4
    assert keep_positions(10, 10, 4, 2).tolist() == [0, 1, 6, 7, 8, 9]
    m = exact_mask(torch.tensor([7, 9]), 10, 4, 2)
    assert m[0].nonzero().flatten().tolist() == [0, 1, 4, 5, 6, 7]
    assert m[1].nonzero().flatten().tolist() == [0, 1, 6, 7, 8, 9]


def test_two_source_attention_reduces_to_plain_attention():
    torch.manual_seed(0)
    nq, s, hq, hkv, d = 3, 11, 6, 2, 8
    q, k, v = torch.randn(nq, hq, d), torch.randn(s, hkv, d), torch.randn(s, hkv, d)
    pos = torch.arange(s - nq, s)
    visible = torch.arange(s)[None, :] <= pos[:, None]
    ref = attend_dense(q[None], k[None], v[None], [s], 0.3)[0]
    use = torch.rand(nq, s) > 0.5
    # the same tensors on both sides: any split gives plain causal attention
    assert torch.allclose(attend_two_source(q, k, v, q, k, v, use, visible, 0.3), ref, atol=1e-5)
    # source B never used: its tensors do not matter
    junk = torch.randn(s, hkv, d) * 100
    allA = torch.ones(nq, s, dtype=torch.bool)
    assert torch.allclose(attend_two_source(q, k, v, q * 5, junk, junk, allA, visible, 0.3), ref, atol=1e-5)
    # source B for distant keys changes the result
    out = attend_two_source(q, k, v, q, junk, v, use, visible, 0.3)
    assert not torch.allclose(out, ref, atol=1e-3)
