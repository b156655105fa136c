"""Round-8 probe (H200): two Gluon layouts of the roped int4@g32 r128 decode against the Triton kernel on the same
cache -- heads as the mma M dimension (gdec.roped_int4_decode) and tokens as M (gdec.roped_int4_decode_t, what
vllm_kvc/kernels/triton_latent/explicit.py became), with and without register prefetch -- errors and timings.

    python3 benchmarks/results/gpu_r8_gluon_probe/probe.py     (output of the run: probe_call8.txt)
"""
import os, sys, time
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", ".."))  # benchmarks/ (gpu_decode)
sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))  # the repository
import torch
import gdec
import gpu_decode as gd
from vllm_kvc.kernels.triton_latent.config import level_tables, row_format
from vllm_kvc.kernels.triton_latent.prefill import LOG2E, launch_reduce


def gluon_decode(c, num_splits, prefetch=False, kern=None):
    L, f = c.layout, c.factors_roped
    B, hq = c.qt.shape[:2]
    qpk = hq // L.groups
    nsp = num_splits * 4
    dev = c.qt.device
    pm = torch.empty(B, hq, nsp, dtype=torch.float32, device=dev)
    pl = torch.empty_like(pm)
    pacc = torch.empty(B, hq, nsp, 128, dtype=torch.float32, device=dev)
    kf, vf = row_format(L)
    (kern or gdec.roped_int4_decode_t)[(B, L.groups, num_splits)](
        c.qt, c.qt.stride(0), c.qt.stride(1), c.cache, c.cache.stride(0), c.cache.stride(1), c.block_table,
        c.block_table.stride(0), c.seq_lens, pm, pl, pacc, level_tables(dev), c.scale * LOG2E, num_splits,
        G=L.groups, QPK=qpk, K_SOFF=kf.soff, V_OFF=vf.off, V_SOFF=vf.soff, BS=c.cache.shape[1], PREFETCH=prefetch, num_warps=4)
    out = torch.empty(B, hq, L.head_dim, dtype=c.qt.dtype, device=dev)
    launch_reduce(pm, pl, pacc, f, out, nsp, 1, qpk, f.bv)
    return out


def err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


print(torch.cuda.get_device_name(), flush=True)
for B, S, splits in [(64, 4096, 1), (16, 16384, 4), (64, 16384, 1), (128, 8192, 1)]:
    c = gd.DecodeCase(B, S, 1, 128, 128, "int4@g32")
    c.setup_roped()
    ref = c.run_kernel_roped()
    t0 = time.time()
    out = gluon_decode(c, splits)
    torch.cuda.synchronize()
    e_full = err(out, ref)
    naive = c.run_naive(rope=False)
    e_naive, e_ref_naive = err(out, naive), err(ref, naive)
    # ragged lengths (partial last blocks, a 1-token sequence)
    sl = torch.randint(1, S + 1, (B,), device=c.seq_lens.device, dtype=torch.int32)
    sl[0] = 1
    c.seq_lens.copy_(sl)
    e_rag = err(gluon_decode(c, splits), c.run_kernel_roped())
    c.seq_lens.fill_(S)
    tg = gd.bench(lambda: gluon_decode(c, splits))
    tt = gd.bench(lambda: c.run_kernel_roped())
    paths, _keep = gd.dense_paths(B, S)
    td = min(gd.bench(fn) for fn in paths.values())
    print(f"B={B} S={S} splits={splits}: err vs triton {e_full:.2e} (ragged {e_rag:.2e}), vs naive gluon {e_naive:.2e} "
          f"triton {e_ref_naive:.2e}; gluon {tg:.4f} ms, triton {tt:.4f} ms, dense {td:.4f} ms", flush=True)
    print(f"   prefetch: {gd.bench(lambda: gluon_decode(c, splits, True)):.4f} ms; heads-as-M kernel "
          f"{gd.bench(lambda: gluon_decode(c, splits, False, gdec.roped_int4_decode)):.4f} ms", flush=True)
    for ns in (2, 4, 8):
        if ns != splits:
            print(f"   splits {ns}: {gd.bench(lambda: gluon_decode(c, ns)):.4f} ms", flush=True)
