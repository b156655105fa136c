"""The CPU kernels (cpu_latent.c): the decode attention for roped keys and the row encoder; build, layout
description, and the dispatch that the vLLM glue calls on CPUs.

``encode_rows`` writes a step's new latent rows for every integer layout (layout.pack's bytes, byte for byte in
the tests: one C pass per row instead of ~80 small torch operations per part; the int4 scale search was the
largest single cost of a CPU decode step once the attention ran in C).

``latent_attention`` has ``reference.latent_attention``'s arguments and results (to float32 rounding): the
decode requests of a batch (one query token each) go to the C kernel, one pass per request and head group over
its cached rows, decoding each latent in registers-sized buffers; prompts and chunked prefills go to the
reference. Only keys stored after RoPE are read this way (their scores need no per-token rebuild); a layout
the kernel cannot read, or a machine without a C compiler, keeps the reference path (``available`` says why).

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
            log.info("vllm_kvc: CPU latent kernel loaded (roped-key decodes)")
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
    fn.argtypes = [p, i64, i64, p, i64, i64, i64, p, i64, p, p, ctypes.c_int, p, ctypes.c_int, i64, i64, i64, i64,
                   p, p, ctypes.c_float, p, ctypes.c_int]
    fn.restype = ctypes.c_int
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


def roped_decode(q: torch.Tensor, cache: torch.Tensor, layout: LatentLayout, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, threads: int | None = None) -> torch.Tensor:
    """One query token per request: q [B, Hq, rank_k] (scored against the cached key latents) ->
    u [B, Hq, rank_v], the attention-weighted sum of the value latents (before B_v)."""
    fn = library()
    kseg, vseg, scale_off = _segments(layout, cache.dtype)
    q = q.float().contiguous()
    b, hq = q.shape[:2]
    bt = block_table.to(torch.int32).contiguous()
    sl = seq_lens.to(torch.int32).contiguous()
    u = torch.empty(b, hq, layout.rank_v, dtype=torch.float32)
    t4, t2 = _tables()
    size = cache.element_size()
    rc = fn(q.data_ptr(), b, hq, cache.data_ptr(), cache.stride(0) * size, cache.stride(1) * size, cache.shape[1],
            bt.data_ptr(), bt.stride(0), sl.data_ptr(), kseg.data_ptr(), kseg.shape[0], vseg.data_ptr(),
            vseg.shape[0], scale_off, layout.groups, layout.rank_k, layout.rank_v, t4.data_ptr(), t2.data_ptr(),
            float(scale), u.data_ptr(), int(threads or torch.get_num_threads()))
    if rc:
        raise MemoryError("vllm_kvc CPU latent kernel: cannot allocate its score buffer")
    return u


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
                     cos_sin_cache, scale, is_neox=True, out=None, roped_keys=True, threads=None):
    """``reference.latent_attention`` for roped keys with the decodes on the C kernel (see the module doc)."""
    n_tok, hq = q.shape[:2]
    if out is None:
        out = torch.empty(n_tok, hq, layout.head_dim, dtype=q.dtype, device=q.device)
    qsl = query_start_loc.tolist()
    lens = [qsl[r + 1] - qsl[r] for r in range(len(qsl) - 1)]
    dec = [r for r, n in enumerate(lens) if n == 1]
    rest = [r for r, n in enumerate(lens) if n > 1]
    if dec:
        DECODES[0] += len(dec)
        idx = torch.tensor(dec)
        qi = torch.tensor([qsl[r] for r in dec])
        u = roped_decode(q.index_select(0, qi), kv_cache, layout, block_table.index_select(0, idx),
                         seq_lens.index_select(0, idx), scale, threads)  # [D, Hq, rv]
        bv_heads = _bv_heads(b_v, layout, hq)  # [Hq, rv, hd]
        o = torch.bmm(u.transpose(0, 1), bv_heads).transpose(0, 1)  # [D, Hq, hd]
        if bias_v is not None:
            o = o + bias_v.float().view(layout.num_kv_heads, -1).repeat_interleave(hq // layout.num_kv_heads, 0)
        out.index_copy_(0, qi, o.to(out.dtype))
    if rest:
        idx = torch.tensor(rest)
        rows = torch.cat([torch.arange(qsl[r], qsl[r + 1]) for r in rest])
        sub_qsl = torch.tensor([0] + [sum(lens[r] for r in rest[:i + 1]) for i in range(len(rest))])
        o = reference.latent_attention(q.index_select(0, rows), kv_cache, layout, block_table.index_select(0, idx),
                                       seq_lens.index_select(0, idx), sub_qsl, b_k, b_v, bias_k, bias_v,
                                       cos_sin_cache, scale, is_neox, compute_dtype=torch.float32,
                                       roped_keys=roped_keys)
        out.index_copy_(0, rows, o.to(out.dtype))
    return out
