"""The CPU kernels (cpu_latent.c): attention for roped keys (decodes, prompts and chunked prefills) and the row
encoder; build, layout description, and the dispatch that the vLLM glue calls on CPUs.

``encode_rows`` writes a step's new latent rows for every integer layout (layout.pack's bytes, byte for byte in
the tests: one C pass per row instead of ~80 small torch operations per part; the int4 scale search was the
largest single cost of a CPU decode step once the attention ran in C).

``latent_attention`` has ``reference.latent_attention``'s arguments and results (to float32 rounding): the
decode requests of a batch (one query token each) go to the decode kernel, one pass per request and head group
over its cached rows, decoding each latent in register-sized buffers; prompts and chunks to the prefill kernel
(their rows decoded once, then causal attention per query token). Both apply B_v and write the layer's output
rows themselves. Only keys stored after RoPE are read this way (their scores need no per-token rebuild); a
layout the kernels cannot read, or a machine without a C compiler, keeps the reference path (``available``
says why).

The shared object is compiled once per source, flags and machine with the system C compiler (``cc``, about a
second) into ``$VLLM_KVC_CACHE/cpu_kernels`` and loaded with ctypes: no torch extension build, no headers.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from vllm_kvc.kernels import reference
from vllm_kvc.layout import GAUSS_LEVELS, SCALE_FACTORS, UNIFORM_LEVELS, LatentLayout

log = logging.getLogger("vllm_kvc")

SOURCE = Path(__file__).with_name("cpu_latent.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros",
         "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]  # IEEE division and products: the encoder = torch's
_FLOAT_BITS = {torch.bfloat16: 16, torch.float16: 17, torch.float32: 32}
_LIB: dict = {}
DECODES = [0]  # decode requests served by the kernel in this process, per layer call (tests read it)
_LOCK = threading.Lock()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def library():
    """The loaded kernel, or None with the reason logged once (no compiler, a failed build)."""
    with _LOCK:
        if "fn" in _LIB:
            return _LIB["fn"]
        _LIB["fn"] = fn = None
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if os.environ.get("VLLM_KVC_CPU_KERNEL", "1") == "0":
            _LIB["why"] = "disabled by VLLM_KVC_CPU_KERNEL=0"
        elif not cc:
            _LIB["why"] = "no C compiler (cc) on this machine"
        else:
            try:
                fn = _build(cc)
            except (OSError, subprocess.CalledProcessError) as e:
                _LIB["why"] = f"building {SOURCE.name} failed: {e}"
        if fn is None:
            log.warning("vllm_kvc: CPU latent kernel unavailable (%s): the torch reference path serves", _LIB["why"])
        else:
            log.info("vllm_kvc: CPU latent kernel loaded (roped-key attention, integer row encoder)")
        _LIB["fn"] = fn
        return fn


def _build(cc: str):
    from vllm_kvc.artifacts import cache_root

    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), *version, platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    out = cache_root() / "cpu_kernels" / f"cpu_latent-{key}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    fn = lib.kvc_roped_decode
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    ci, f32 = ctypes.c_int, ctypes.c_float
    fn.argtypes = [p, p, i64, i64, p, i64, i64, i64, p, i64, p, p, ci, p, ci, i64, i64, i64, i64, p, p, f32,
                   p, p, i64, p, i64, ci, ci]
    fn.restype = ctypes.c_int
    pre = lib.kvc_roped_prefill
    pre.argtypes = [p, p, p, p, p, i64, i64, i64, p, i64, i64, i64, p, i64, p, p, p, ci, p, ci, i64, i64, i64, i64,
                    p, p, f32, p, p, p, p, i64, p, i64, ci, ci]
    pre.restype = ctypes.c_int
    _LIB["prefill"] = pre
    enc = lib.kvc_encode_rows
    enc.argtypes = [p, i64, i64, i64, p, i64, i64, i64, p, p, ctypes.c_int, p, ctypes.c_int, i64, i64, i64, p, p, p]
    enc.restype = ctypes.c_int
    _LIB["encode"] = enc
    return fn


def segment_table(layout: LatentLayout, cache_dtype: torch.dtype):
    """(K segments [nk, 6], V segments [nv, 6] int64, byte offset of the scales): the row as the kernel reads it
    (see cpu_latent.c), or None when the layout has no such description."""
    g, rk, rv = layout.groups, layout.rank_k, layout.rank_v
    if not layout.quantized:
        bits = _FLOAT_BITS.get(cache_dtype)
        if bits is None:
            return None
        size = cache_dtype.itemsize
        return (torch.tensor([[0, rk, bits, 0, 0, 0]]), torch.tensor([[g * rk * size, rv, bits, 0, 0, 0]]), 0)
    if layout.segmented:
        rows, byte, j = ([], []), 0, 0
        for part, segs in enumerate((layout.segments_k, layout.segments_v)):
            for w, b in segs:
                rows[part].append([byte, w, b, j * g, 1, 0])
                byte += g * w * b // 8
                j += 1
        return torch.tensor(rows[0]), torch.tensor(rows[1]), layout.scale_offset
    if layout.is_int8:
        return (torch.tensor([[0, rk, 8, 0, 1, 0]]), torch.tensor([[g * rk, rv, 8, g, 1, 0]]), layout.width)
    qg = layout.quant_group
    nsk = g * layout.scales_per_group_k
    return (torch.tensor([[0, rk, layout.bits_k, 0, layout.scales_per_group_k, qg]]),
            torch.tensor([[layout.k_bytes, rv, layout.bits_v, nsk, layout.scales_per_group_v, qg]]),
            layout.scale_offset)


_SEGS: dict = {}


def _segments(layout: LatentLayout, cache_dtype: torch.dtype):
    key = (layout, cache_dtype)
    if key not in _SEGS:
        _SEGS[key] = segment_table(layout, cache_dtype)
    return _SEGS[key]


def available(layout: LatentLayout, cache: torch.Tensor, roped_keys: bool, sink=None) -> bool:
    """Whether ``latent_attention`` below serves this layer's decodes (else: the reference)."""
    return (roped_keys and sink is None and cache.device.type == "cpu" and cache.dim() == 3
            and layout.head_dim <= MAX_HEAD_DIM
            and cache.stride(-1) == 1 and _segments(layout, cache.dtype) is not None and library() is not None)


_TABLES: dict = {}


def _tables():
    """(4-bit levels [32], 2-bit levels [8]) for the decoder; (levels and midpoints [76], scale factors, their
    counts) for the encoder, computed as layout.quantize computes them."""
    if not _TABLES:
        _TABLES["t"] = (torch.cat([GAUSS_LEVELS[4], UNIFORM_LEVELS[4]]).float().contiguous(),
                        torch.cat([GAUSS_LEVELS[2], UNIFORM_LEVELS[2]]).float().contiguous())
        parts, facs, counts = [], [], []
        for bits in (4, 2):
            lv = [GAUSS_LEVELS[bits].float(), UNIFORM_LEVELS[bits].float()]
            parts += lv + [(t[1:] + t[:-1]) / 2 for t in lv]
            for table in ("gauss", "uniform"):
                f = SCALE_FACTORS[bits][table]
                facs += list(f)
                counts.append(len(f))
        _TABLES["enc"] = (torch.cat(parts).contiguous(), torch.tensor(facs, dtype=torch.float32),
                          torch.tensor(counts, dtype=torch.int32))
    return _TABLES["t"]


def encode_rows(cache: torch.Tensor, slot_mapping: torch.Tensor, layout: LatentLayout, lat_k: torch.Tensor,
                lat_v: torch.Tensor) -> bool:
    """``reference.write_latents`` for integer layouts in C (the quantizer of layout.quantize; see
    cpu_latent.c). Returns False, writing nothing, where it does not apply (float latents, no kernel)."""
    if not (layout.quantized and cache.device.type == "cpu" and cache.dim() == 3 and cache.stride(-1) == 1
            and library() is not None and _segments(layout, cache.dtype) is not None):
        return False
    kseg, vseg, scale_off = _segments(layout, cache.dtype)
    _tables()
    tabs, facs, counts = _TABLES["enc"]
    n = lat_k.shape[0]
    lat = torch.cat([lat_k.reshape(n, -1), lat_v.reshape(n, -1)], 1).float().contiguous()
    slots = slot_mapping[:n].to(torch.int64).contiguous()
    rc = _LIB["encode"](lat.data_ptr(), n, layout.rank_k, layout.rank_v, cache.data_ptr(), cache.stride(0),
                        cache.stride(1), cache.shape[1], slots.data_ptr(), kseg.data_ptr(), kseg.shape[0],
                        vseg.data_ptr(), vseg.shape[0], scale_off, layout.row_bytes, layout.groups, tabs.data_ptr(),
                        facs.data_ptr(), counts.data_ptr())
    if rc == -1:
        raise MemoryError("vllm_kvc CPU latent encoder: cannot allocate its row buffer")
    return rc == 0


MAX_HEAD_DIM = 512  # cpu_latent.c MAX_HD
_OUT_BITS = {torch.float32: 32, torch.bfloat16: 16, torch.float16: 17}


def _common(cache, layout, block_table, seq_lens, b_v, bias_v, hq, out):
    """The arguments both kernels share after the queries (see cpu_latent.c)."""
    kseg, vseg, scale_off = _segments(layout, cache.dtype)
    bt = block_table.to(torch.int32).contiguous()
    sl = seq_lens.to(torch.int32).contiguous()
    t4, t2 = _tables()
    bias = None
    if bias_v is not None:
        bias = bias_v.float().view(layout.num_kv_heads, -1).repeat_interleave(hq // layout.num_kv_heads, 0)
        bias = bias.contiguous()
    size = cache.element_size()
    head = (cache.data_ptr(), cache.stride(0) * size, cache.stride(1) * size, cache.shape[1], bt.data_ptr(),
            bt.stride(0), sl.data_ptr())
    segs = (kseg.data_ptr(), kseg.shape[0], vseg.data_ptr(), vseg.shape[0], scale_off, layout.groups,
            layout.rank_k, layout.rank_v, t4.data_ptr(), t2.data_ptr())
    bv = _bv_heads(b_v, layout, hq)
    tail = (bv.data_ptr(), None if bias is None else bias.data_ptr(), layout.head_dim, out.data_ptr(),
            out.stride(0), _OUT_BITS[out.dtype])
    return head, segs, tail, (bt, sl, bias, bv)  # the last: kept alive for the call


def roped_decode(q: torch.Tensor, q_rows: list[int], cache: torch.Tensor, layout: LatentLayout,
                 block_table: torch.Tensor, seq_lens: torch.Tensor, b_v: torch.Tensor, bias_v, scale: float,
                 out: torch.Tensor, threads: int | None = None) -> None:
    """One query token per request (request r's is token q_rows[r] of q [n, Hq, rank_k], float32 contiguous):
    the attention output of that token written into out [n, Hq, head_dim] (B_v and its bias applied)."""
    library()
    rows = torch.tensor(q_rows, dtype=torch.int32)
    head, segs, tail, keep = _common(cache, layout, block_table, seq_lens, b_v, bias_v, q.shape[1], out)
    rc = _LIB["fn"](q.data_ptr(), rows.data_ptr(), len(q_rows), q.shape[1], *head, *segs, float(scale), *tail,
                    int(threads or torch.get_num_threads()))
    if rc:
        raise MemoryError("vllm_kvc CPU latent kernel: cannot allocate its score buffer")


REBUILD_PAIRS = 1024  # a request with (query tokens x cached tokens) above this rebuilds K/V for SDPA


def roped_prefill(q: torch.Tensor, q_rows: list[int], q_start: list[int], cache: torch.Tensor,
                  layout: LatentLayout, block_table: torch.Tensor, seq_lens: torch.Tensor, b_v: torch.Tensor, bias_v,
                  scale: float, out: torch.Tensor, threads: int | None = None, q_heads: torch.Tensor | None = None,
                  b_k: torch.Tensor | None = None) -> None:
    """Several query tokens per request, causal: request r's are tokens q_rows[q_start[r]:q_start[r + 1]] of q,
    the last of its seq_lens[r] positions; their attention outputs written into out as in ``roped_decode``.

    Every cached row is decoded once (C). Short requests attend in the latent (the C kernel: no rebuild); with
    ``q_heads`` (the roped queries [n, Hq, head_dim] before ``q B_k^T``) and ``b_k``, a request of more than
    REBUILD_PAIRS query x cached tokens rebuilds its keys ``c_k B_k`` (already roped) and values ``c_v B_v`` per
    KV head and runs dense causal SDPA: scoring in the latent costs rank_k / head_dim times dense's products per
    pair, a rebuild costs two small GEMMs per cached token."""
    library()
    lens = seq_lens.tolist()
    row_start, tok_req, att, long = [0], [], [], []
    for r, t in enumerate(lens):
        row_start.append(row_start[-1] + t)
        nq = q_start[r + 1] - q_start[r]
        tok_req += [r] * nq
        if q_heads is not None and b_k is not None and nq * t > REBUILD_PAIRS:
            long.append(r)
        else:
            att += range(q_start[r], q_start[r + 1])
    rows = torch.tensor(q_rows, dtype=torch.int32)
    qs = torch.tensor(q_start, dtype=torch.int32)
    tr = torch.tensor(tok_req, dtype=torch.int32)
    at = torch.tensor(att, dtype=torch.int32)
    rs = torch.tensor(row_start, dtype=torch.int64)
    g = layout.groups
    kbuf = torch.empty(g, row_start[-1], layout.rank_k, dtype=torch.float32)
    vbuf = torch.empty(g, row_start[-1], layout.rank_v, dtype=torch.float32)
    head, segs, tail, keep = _common(cache, layout, block_table, seq_lens, b_v, bias_v, q.shape[1], out)
    rc = _LIB["prefill"](q.data_ptr(), rows.data_ptr(), qs.data_ptr(), tr.data_ptr(), at.data_ptr(), len(lens),
                         len(att), q.shape[1], *head, rs.data_ptr(), *segs, float(scale), kbuf.data_ptr(),
                         vbuf.data_ptr(), *tail, int(threads or torch.get_num_threads()))
    if rc:
        raise MemoryError("vllm_kvc CPU latent kernel: cannot allocate its score buffer")
    hkv, hd = layout.num_kv_heads, layout.head_dim
    for r in long:
        a, b, t = row_start[r], row_start[r + 1], lens[r]
        k = torch.bmm(kbuf[:, a:b], b_k.float()).view(g, t, layout.group_size, hd)  # [G, T, gsz, hd]
        v = torch.bmm(vbuf[:, a:b], b_v.float()).view(g, t, layout.group_size, hd)
        k = k.permute(0, 2, 1, 3).reshape(1, hkv, t, hd)
        v = v.permute(0, 2, 1, 3).reshape(1, hkv, t, hd)
        if bias_v is not None:
            v = v + bias_v.float().view(1, hkv, 1, hd)
        tok = q_rows[q_start[r]:q_start[r + 1]]
        qh = q_heads[tok[0]:tok[-1] + 1].float().transpose(0, 1)[None]  # [1, Hq, nq, hd]
        nq = qh.shape[2]
        mask = None if nq == t else torch.ones(nq, t, dtype=torch.bool).tril(t - nq)
        o = torch.nn.functional.scaled_dot_product_attention(qh, k, v, attn_mask=mask, is_causal=nq == t,
                                                             scale=scale, enable_gqa=True)
        out[tok[0]:tok[-1] + 1] = o[0].transpose(0, 1).reshape(out[tok[0]:tok[-1] + 1].shape).to(out.dtype)


_BV: dict = {}


def _bv_heads(b_v: torch.Tensor, layout: LatentLayout, hq: int) -> torch.Tensor:
    """Each query head's rows of B_v [Hq, rv, hd] (float32), kept per factor tensor: the entry holds the tensor
    itself (so its storage is never reused under the same key) and its version (an in-place change refreshes)."""
    key = (id(b_v), layout, hq)
    hit = _BV.get(key)
    if hit is None or hit[0] is not b_v or hit[1] != b_v._version:
        if len(_BV) > 512:
            _BV.clear()
        hit = _BV[key] = (b_v, b_v._version, reference.head_factor_views(b_v.float(), layout, hq)[1].contiguous())
    return hit[2]


def latent_attention(q, kv_cache, layout, block_table, seq_lens, query_start_loc, b_k, b_v, bias_k, bias_v,
                     cos_sin_cache, scale, is_neox=True, out=None, roped_keys=True, threads=None, q_heads=None):
    """``reference.latent_attention`` for roped keys on the C kernels (see the module doc): decodes on the
    decode kernel, prompts and chunks on the prefill kernel, each writing its tokens' outputs into ``out``.
    ``q_heads``: the roped queries before ``q B_k^T`` (long prompts then rebuild K/V for SDPA: roped_prefill)."""
    n_tok, hq = q.shape[:2]
    if out is None:
        out = torch.empty(n_tok, hq, layout.head_dim, dtype=q.dtype, device=q.device)
    target = out
    if not (out.dtype in _OUT_BITS and out.shape[0] == n_tok and out[0].is_contiguous()
            and out[0].numel() == hq * layout.head_dim):  # each token's heads one after the other
        target = torch.empty(n_tok, hq, layout.head_dim, dtype=torch.float32)
    q = q.float().contiguous()
    qsl = query_start_loc.tolist()
    dec, rest, q_start, q_rows = [], [], [0], []
    for r in range(len(qsl) - 1):
        n = qsl[r + 1] - qsl[r]
        if n == 1:
            dec.append(r)
        elif n > 1:
            rest.append(r)
            q_rows += range(qsl[r], qsl[r + 1])
            q_start.append(q_start[-1] + n)
    if dec:
        DECODES[0] += len(dec)
        idx = torch.tensor(dec)
        roped_decode(q, [qsl[r] for r in dec], kv_cache, layout, block_table.index_select(0, idx),
                     seq_lens.index_select(0, idx), b_v, bias_v, scale, target, threads)
    if rest:
        idx = torch.tensor(rest)
        roped_prefill(q, q_rows, q_start, kv_cache, layout, block_table.index_select(0, idx),
                      seq_lens.index_select(0, idx), b_v, bias_v, scale, target, threads, q_heads, b_k)
    if target is not out:
        out.copy_(target.view(out.shape))
    return out
