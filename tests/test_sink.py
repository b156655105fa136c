"""The GPU sink pool (glue/sink.py), plain torch on CPU tensors (no vLLM)."""
import torch

from vllm_kvc.glue.sink import SinkTable


def test_sink_table_writes_reads_and_recycles():
    """SinkTable (the GPU sink pool): reads are device gathers by first block id; a start takes the least recently
    written page that no request of its batch holds; a recycled page's old block reads as missing; when every page
    is held, a new first token is not kept (found False) and nothing else changes."""
    t = SinkTable(num_blocks=10, shape=(2,), dtype=torch.float32, device="cpu", pages=2)
    first = torch.tensor([7, 3], dtype=torch.int32)
    t.write(first, [0, 1], torch.tensor([[1.0, 1.5], [2.0, 2.5]]))
    vals, found = t.read(torch.tensor([3, 7, 5], dtype=torch.int32))
    assert found.tolist() == [True, True, False] and vals[:2].tolist() == [[2.0, 2.5], [1.0, 1.5]]
    assert vals[2].tolist() == [1.0, 1.5] or found[2].item() is False  # a missing one reads some page, unflagged
    # a batch holding block 7's request and a new request (block 5): block 3's page (not held) is recycled
    t.write(torch.tensor([7, 5], dtype=torch.int32), [1], torch.tensor([[5.0, 5.5]]))
    vals, found = t.read(torch.tensor([7, 3, 5], dtype=torch.int32))
    assert found.tolist() == [True, False, True] and vals[0].tolist() == [1.0, 1.5] and vals[2].tolist() == [5.0, 5.5]
    # every page held by the batch: the third request's first token is not kept
    t.write(torch.tensor([7, 5, 2], dtype=torch.int32), [2], torch.tensor([[9.0, 9.5]]))
    vals, found = t.read(torch.tensor([7, 5, 2], dtype=torch.int32))
    assert found.tolist() == [True, True, False] and vals[1].tolist() == [5.0, 5.5]
    # a block that starts a sequence again (vLLM reused it) overwrites its own page
    t.write(torch.tensor([5], dtype=torch.int32), [0], torch.tensor([[6.0, 6.5]]))
    assert t.read(torch.tensor([5], dtype=torch.int32))[0].tolist() == [[6.0, 6.5]]
