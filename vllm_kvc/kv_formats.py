"""vLLM 0.32's own KV cache formats (``--kv-cache-dtype``), emulated byte for byte as cache rows. Plain torch;
importable without vLLM.

Each format turns one token's K and V of one layer ``[N, H, d]`` (keys after RoPE, in the model's dtype, as
vLLM's attention backends receive them) into the bytes vLLM stores for that token, and back. A row holds every
KV head of the layer, laid out as vLLM's page holds that token's slot (NHD order):

==========================  =================================================================  ===============
format                      per KV head (what vLLM writes)                                      bytes per head
==========================  =================================================================  ===============
``int8_per_token_head``     ``[K int8 (d) | K scale f32 | V int8 (d) | V scale f32]``; scale    ``2 d + 8``
                            = absmax / 127, values rounded half away from zero
``int4_per_token_head``     keys and values rotated by a random-sign Hadamard transform (RHT)   ``d + 8``
                            and rounded to the model dtype, then ``[K nibbles (d/2) | K scale
                            | V nibbles | V scale]``: asymmetric min/max over 15 levels, the
                            4-bit zero point in the low 4 mantissa bits of the f32 scale
``fp8``                     ``[K e4m3 (d) | V e4m3 (d)]`` with per-tensor scales (1.0 without   ``2 d``
                            checkpoint scales)
``nvfp4``                   the row is ``H`` K slots then ``H`` V slots, each ``[E2M1 nibbles   ``2 (d/2 + d/16)``
                            (d/2) | E4M3 scale per 16 values (d/16)]`` (global scale 1.0)
``turboquant_*``            ``[key | value | pad to even]``: key = FP8 (k8v4) or Lloyd-Max       ``slot_size_aligned``
                            codes of the Hadamard-rotated unit key (3/4 bits) + fp16 norm;
                            value = 3/4-bit uniform min/max codes + fp16 scale + fp16 min
``native``                  ``[K (d) | V (d)]`` in the model dtype (TurboQuant keeps its first   ``2 d * dtype``
                            and last two layers so)
==========================  =================================================================  ===============

Read from the installed vLLM (``v1/attention/ops/int4_per_token_head.py``,
``triton_reshape_and_cache_flash.py``, ``triton_turboquant_store.py``, ``triton_turboquant_decode.py``,
``v1/attention/backends/{triton_attn,flashinfer,turboquant_attn}.py``, ``model_executor/layers/quantization/
turboquant/{config,centroids}.py``, ``utils/nvfp4_emulation_utils.py``); the code here is written anew.
The RHT signs (a torch generator seeded 0x9E3779B9) and TurboQuant's Lloyd-Max codebook (N(0, 1/d),
trapezoid rule) are reproduced exactly, so rows match vLLM's bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from vllm_kvc.plan import FORMATS, TURBOQUANT, tq_key_bytes, tq_value_bytes, vllm_format_head_bytes  # noqa: F401

PER_TOKEN_HEAD = ("int8_per_token_head", "int4_per_token_head")
TQ_BOUNDARY_LAYERS = 2  # TurboQuant keeps the first and last 2 attention layers in the model dtype
TQ_CONTINUATION_DECODE_THRESHOLD = 128  # vLLM's TurboQuant reads chunks of <= this many tokens from its cache
FP8_MAX = 448.0
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_EDGES = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------------------------
# bytes
# ----------------------------------------------------------------------------------------------------------------
def head_bytes(kv_dtype: str, d: int, native_dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one token's K and V of one KV head take in vLLM's page for ``kv_dtype`` (scales included)."""
    if kv_dtype == "native":
        return 2 * d * _dtype_size(native_dtype)
    return vllm_format_head_bytes(kv_dtype, d)


def check_head_dim(kv_dtype: str, d: int) -> str | None:
    """Why ``kv_dtype`` cannot store heads of ``d`` values (None if it can)."""
    if kv_dtype == "int4_per_token_head" and d % 2:
        return "int4_per_token_head packs two values per byte: head_dim must be even"
    if kv_dtype == "nvfp4" and d % 16:
        return "nvfp4 scales blocks of 16 values: head_dim must be a multiple of 16"
    if kv_dtype in TURBOQUANT and (d & (d - 1) or d < 8):
        return "TurboQuant's Hadamard rotation needs a power-of-two head_dim >= 8"
    return None


def tq_native_layers(num_layers: int, n: int = TQ_BOUNDARY_LAYERS) -> tuple[int, ...]:
    """Layers vLLM's TurboQuant leaves in the model dtype (``TurboQuantConfig.get_boundary_skip_layers``)."""
    n = min(n, num_layers // 2)
    if n <= 0:
        return ()
    return tuple(sorted(set(range(n)) | set(range(num_layers - n, num_layers))))


# ----------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------
def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """What ``(x +/- 0.5).to(int)`` does in Triton: round half away from zero (truncating cast)."""
    return torch.where(x >= 0, x + 0.5, x - 0.5).trunc()


def _f32_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [...] -> uint8 [..., 4] (little endian)."""
    return x.to(torch.float32).contiguous().view(torch.uint8).view(*x.shape, 4)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).view(*x.shape, 2)


def _from_f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32).squeeze(-1)


def _from_f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _pack4(q: torch.Tensor) -> torch.Tensor:
    """codes [..., d] in 0..15 -> [..., d/2]: even index in the low nibble."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _unpack4(b: torch.Tensor) -> torch.Tensor:
    return torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)


def _pack3(q: torch.Tensor) -> torch.Tensor:
    """codes [..., d] in 0..7 -> [..., 3d/8]: 8 codes per 24 bits, code j at bit 3j, little endian."""
    g = q.to(torch.int32).unflatten(-1, (-1, 8))
    word = (g << (3 * torch.arange(8, dtype=torch.int32, device=q.device))).sum(-1)
    return torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], -1).flatten(-2).to(torch.uint8)


def _unpack3(b: torch.Tensor) -> torch.Tensor:
    t = b.to(torch.int32).unflatten(-1, (-1, 3))
    word = t[..., 0] | (t[..., 1] << 8) | (t[..., 2] << 16)
    return ((word[..., None] >> (3 * torch.arange(8, dtype=torch.int32, device=b.device))) & 7).flatten(-2)


def _fp8(x: torch.Tensor) -> torch.Tensor:
    """float -> e4m3 (round to nearest even, saturating as the GPU's conversion does) as uint8."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def _from_fp8(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float8_e4m3fn).float()


# ----------------------------------------------------------------------------------------------------------------
# the random-sign Hadamard transform of int4_per_token_head
# ----------------------------------------------------------------------------------------------------------------
def _pow2_block(d: int) -> int:
    return d & -d


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform of the last dim (a power of two), butterfly order."""
    d = x.shape[-1]
    h = 1
    while h < d:
        v = x.reshape(*x.shape[:-1], d // (2 * h), 2, h)
        a, b = v[..., 0, :], v[..., 1, :]
        x = torch.stack([a + b, a - b], dim=-2).reshape(*x.shape[:-1], d)
        h *= 2
    return x


@lru_cache(maxsize=16)
def rht_signs(d: int) -> torch.Tensor:
    """vLLM's +-1 signs of the int4 RHT for a block of d values (a CPU generator seeded 0x9E3779B9)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0x9E3779B9)
    return 2.0 * torch.bernoulli(torch.full((d,), 0.5), generator=gen) - 1.0


def rht(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """H D x per block of b (the largest power-of-two divisor of d) values; ``inverse``: D H x (norm b, not 1)."""
    d = x.shape[-1]
    b = _pow2_block(d)
    xb = x.reshape(*x.shape[:-1], d // b, b)
    s = rht_signs(b).to(device=x.device, dtype=x.dtype)
    y = fwht(xb) * s if inverse else fwht(xb * s)
    return y.reshape(x.shape)


# ----------------------------------------------------------------------------------------------------------------
# TurboQuant's codebook and rotation
# ----------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=32)
def tq_centroids(d: int, bits: int) -> torch.Tensor:
    """Lloyd-Max centroids of N(0, 1/d) with 2**bits levels: the same fixed point vLLM solves (start uniform on
    +-3.5 sigma, 200-point trapezoid integrals over [edges], at most 200 iterations, tolerance 1e-10)."""
    n = 2 ** bits
    var = 1.0 / d
    sd = math.sqrt(var)
    norm = 1.0 / math.sqrt(2 * math.pi * var)

    def pdf(x):
        return norm * math.exp(-x * x / (2 * var))

    def integral(f, a, b, steps=200):
        h = (b - a) / steps
        acc = 0.5 * (f(a) + f(b))
        for i in range(1, steps):
            acc += f(a + i * h)
        return acc * h

    lo, hi = -3.5 * sd, 3.5 * sd
    c = [lo + (hi - lo) * (i + 0.5) / n for i in range(n)]
    for _ in range(200):
        edges = [3 * lo] + [(c[i] + c[i + 1]) / 2.0 for i in range(n - 1)] + [3 * hi]
        new = []
        for i in range(n):
            a, b = edges[i], edges[i + 1]
            mass = integral(pdf, a, b)
            new.append(integral(lambda x: x * pdf(x), a, b) / mass if mass > 1e-15 else c[i])
        done = max(abs(new[i] - c[i]) for i in range(n)) < 1e-10
        c = new
        if done:
            break
    return torch.tensor(c, dtype=torch.float32)


@lru_cache(maxsize=8)
def tq_hadamard(d: int) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix [d, d] (float32; symmetric, its own inverse)."""
    h = torch.tensor([[1.0]])
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


def tq_midpoints(d: int, bits: int) -> torch.Tensor:
    c = tq_centroids(d, bits).sort().values
    return (c[:-1] + c[1:]) / 2


# ----------------------------------------------------------------------------------------------------------------
# the formats
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVFormat:
    """One vLLM KV cache format for ``num_kv_heads`` heads of ``head_dim``: ``encode`` -> uint8 rows, ``decode``
    -> float32 K and V (keys as cached, i.e. after RoPE; rotations undone). ``dtype``: the model's dtype (what
    vLLM's kernels receive; int4 rounds its rotated K/V to it, ``native`` stores it)."""

    kv_dtype: str
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        if self.kv_dtype != "native":
            head_bytes(self.kv_dtype, self.head_dim)
            why = check_head_dim(self.kv_dtype, self.head_dim)
            if why:
                raise ValueError(why)

    @property
    def head_bytes(self) -> int:
        return head_bytes(self.kv_dtype, self.head_dim, self.dtype)

    @property
    def row_bytes(self) -> int:
        return self.num_kv_heads * self.head_bytes

    # ----- encode -----
    def encode(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """k, v [N, H, d] (any float dtype; cast to ``dtype`` first, as vLLM's inputs are) -> uint8 [N, row_bytes]."""
        n, h, d = k.shape
        k, v = k.to(self.dtype), v.to(self.dtype)
        f = self.kv_dtype
        if f == "native":
            parts = [k.contiguous().view(torch.uint8), v.contiguous().view(torch.uint8)]
            return torch.cat(parts, -1).reshape(n, self.row_bytes)
        if f == "int8_per_token_head":
            parts = [*_int8_side(k), *_int8_side(v)]
        elif f == "int4_per_token_head":
            parts = [*_int4_side(k), *_int4_side(v)]
        elif f == "fp8":
            parts = [_fp8(k), _fp8(v)]
        elif f == "nvfp4":
            kd, ks = _nvfp4_side(k)
            vd, vs = _nvfp4_side(v)
            return torch.cat([torch.cat([kd, ks], -1), torch.cat([vd, vs], -1)], 1).reshape(n, self.row_bytes)
        else:
            parts = [*_tq_key(f, k), *_tq_value(f, v)]
            pad = self.head_bytes - sum(p.shape[-1] for p in parts)
            if pad:
                parts.append(torch.zeros(n, h, pad, dtype=torch.uint8, device=k.device))
        return torch.cat(parts, -1).reshape(n, self.row_bytes)

    # ----- decode -----
    def decode(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 rows [..., row_bytes] -> (k, v) float32 [..., H, d]."""
        if rows.dtype != torch.uint8 or rows.shape[-1] != self.row_bytes:
            raise ValueError(f"rows {tuple(rows.shape)} {rows.dtype}: expected [..., {self.row_bytes}] uint8")
        lead, h, d, f = rows.shape[:-1], self.num_kv_heads, self.head_dim, self.kv_dtype
        if f == "nvfp4":
            slots = rows.reshape(*lead, 2, h, d // 2 + d // 16)
            return _nvfp4_decode(slots[..., 0, :, :], d), _nvfp4_decode(slots[..., 1, :, :], d)
        r = rows.reshape(*lead, h, self.head_bytes)
        if f == "native":
            es = _dtype_size(self.dtype)
            kv = r[..., : 2 * d * es].contiguous().view(self.dtype).float()
            return kv[..., :d], kv[..., d:]
        if f == "int8_per_token_head":
            k = r[..., :d].contiguous().view(torch.int8).float() * _from_f32(r[..., d:d + 4])[..., None]
            o = d + 4
            v = r[..., o:o + d].contiguous().view(torch.int8).float() * _from_f32(r[..., o + d:o + d + 4])[..., None]
            return k, v
        if f == "int4_per_token_head":
            half = d // 2
            return _int4_decode(r[..., :half], r[..., half:half + 4]), \
                _int4_decode(r[..., half + 4:2 * half + 4], r[..., 2 * half + 4:2 * half + 8])
        if f == "fp8":
            return _from_fp8(r[..., :d]), _from_fp8(r[..., d:2 * d])
        kps = tq_key_bytes(f, d)
        return _tq_key_decode(f, r[..., :kps], d), _tq_value_decode(f, r[..., kps:kps + tq_value_bytes(f, d)], d)

    def roundtrip(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode(self.encode(k, v))


# ----- int8 / int4 per token and head -----
def _int8_side(x: torch.Tensor):
    xf = x.float()
    scale = torch.clamp_min(xf.abs().amax(-1) / 127.0, 1e-6)
    q = _round_half_away(xf * (1.0 / scale)[..., None]).clamp(-128, 127).to(torch.int8)
    return q.view(torch.uint8), _f32_bytes(scale)


def _int4_side(x: torch.Tensor):
    xr = rht(x.float()).to(x.dtype).float()
    lo, hi = xr.amin(-1), xr.amax(-1)
    scale = torch.clamp_min((hi - lo) / 15.0, 1e-6)
    zp = _round_half_away(-lo / scale).clamp(0, 15)
    q = _round_half_away(xr * (1.0 / scale)[..., None] + zp[..., None]).clamp(0, 15)
    bits = (scale.contiguous().view(torch.int32) & -16) | zp.to(torch.int32)
    return _pack4(q), bits.contiguous().view(torch.uint8).view(*bits.shape, 4)


def _int4_decode(packed: torch.Tensor, scale_bytes: torch.Tensor) -> torch.Tensor:
    bits = scale_bytes.contiguous().view(torch.int32).squeeze(-1)
    zp = (bits & 0xF).float()
    scale = (bits & -16).view(torch.float32)
    xr = (_unpack4(packed).float() - zp[..., None]) * scale[..., None]
    return rht(xr, inverse=True) / _pow2_block(xr.shape[-1])


# ----- nvfp4 -----
def _e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """float32 in [-6, 6] -> 4-bit E2M1 codes (sign bit 3), nearest with ties to the even code."""
    a = x.abs()
    edges = _E2M1_EDGES.to(x.device)
    lo = torch.bucketize(a, edges, right=False)  # ties down
    hi = torch.bucketize(a, edges, right=True)  # ties up
    mag = torch.where(lo == hi, lo, torch.where(lo % 2 == 0, lo, hi))
    return (mag | ((x < 0).to(mag.dtype) << 3)).to(torch.uint8)


def _nvfp4_side(x: torch.Tensor, global_scale: float = 1.0):
    """x [N, H, d] -> (data [N, H, d/2], E4M3 scales [N, H, d/16]) per 16-value block."""
    n, h, d = x.shape
    xb = x.float().reshape(n, h, d // 16, 16)
    vmax = xb.abs().amax(-1, keepdim=True)
    scale = torch.clamp(global_scale * (vmax * (1 / 6.0)), -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    denom = scale * (1.0 / global_scale)
    inv = torch.where(denom == 0, torch.zeros_like(denom), 1.0 / denom)
    codes = _e2m1_codes(torch.clamp(xb * inv, -6.0, 6.0)).reshape(n, h, d)
    return _pack4(codes), scale.squeeze(-1).to(torch.float8_e4m3fn).view(torch.uint8)


def _nvfp4_decode(slot: torch.Tensor, d: int, global_scale: float = 1.0) -> torch.Tensor:
    codes = _unpack4(slot[..., : d // 2]).long()
    val = _E2M1.to(slot.device)[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    scale = _from_fp8(slot[..., d // 2:]) / global_scale
    return (val.unflatten(-1, (d // 16, 16)) * scale[..., None]).flatten(-2)


# ----- TurboQuant -----
def _tq_key(f: str, k: torch.Tensor):
    kb = TURBOQUANT[f][0]
    n, h, d = k.shape
    if kb == 8:
        return [_fp8(k)]
    kf = k.float().reshape(n * h, d)
    norms = kf.norm(dim=1, keepdim=True)
    y = (kf / (norms + 1e-8)) @ tq_hadamard(d).to(k.device)
    idx = torch.bucketize(y, tq_midpoints(d, kb).to(k.device), right=True).clamp_max(2 ** kb - 1)
    packed = _pack4(idx) if kb == 4 else _pack3(idx)
    return [packed.reshape(n, h, -1), _f16_bytes(norms.reshape(n, h))]


def _tq_key_decode(f: str, b: torch.Tensor, d: int) -> torch.Tensor:
    kb, _, nc = TURBOQUANT[f]
    if kb == 8:
        return _from_fp8(b[..., :d])
    mse = math.ceil(d * kb / 8)
    idx = (_unpack4(b[..., :mse]) if kb == 4 else _unpack3(b[..., :mse])).long()
    c = tq_centroids(d, kb).to(b.device)[idx]
    if nc:
        c = c / torch.sqrt((c * c).sum(-1, keepdim=True) + 1e-16)
    return (_from_f16(b[..., mse:mse + 2])[..., None] * c) @ tq_hadamard(d).to(b.device)


def _tq_value(f: str, v: torch.Tensor):
    vb = TURBOQUANT[f][1]
    levels = 2 ** vb - 1
    vf = v.float()
    lo, hi = vf.amin(-1), vf.amax(-1)
    scale = (hi - lo) / float(levels)
    scale = torch.where(scale > 1e-8, scale, torch.full_like(scale, 1e-8))
    q = ((vf - lo[..., None]) / scale[..., None] + 0.5).trunc().clamp(0, levels)
    return [_pack4(q) if vb == 4 else _pack3(q), _f16_bytes(scale), _f16_bytes(lo)]


def _tq_value_decode(f: str, b: torch.Tensor, d: int) -> torch.Tensor:
    vb = TURBOQUANT[f][1]
    nb = math.ceil(d * vb / 8)
    q = (_unpack4(b[..., :nb]) if vb == 4 else _unpack3(b[..., :nb])).float()
    return q * _from_f16(b[..., nb:nb + 2])[..., None] + _from_f16(b[..., nb + 2:nb + 4])[..., None]


# ----------------------------------------------------------------------------------------------------------------
# transformers emulation (tests): every layer's K (after RoPE) and V through its format
# ----------------------------------------------------------------------------------------------------------------
def install_format(model, kv_dtype: str, native_layers=()) -> list:
    """Replace each decoder layer's keys after RoPE and its values by decode(encode(.)) of ``kv_dtype``
    (``native_layers``: rounded to the model dtype only). K and V are coded independently in every format, so
    each side is coded with the other side zero. Wraps the model module's ``apply_rotary_pos_emb`` (the key of
    the layer whose attention is running) and hooks ``v_proj``. Returns undo callables."""
    import sys

    mod = sys.modules[type(model.model).__module__]
    orig = mod.apply_rotary_pos_emb
    hkv = model.config.num_key_value_heads
    current = {"layer": None}
    fmts = {}
    undo = []

    def fmt(i, hd, dtype):
        key = (i, hd, dtype)
        if key not in fmts:
            fmts[key] = KVFormat("native" if i in native_layers else kv_dtype, hkv, hd, dtype)
        return fmts[key]

    def rope(q, k, *a, **kw):
        q2, k2 = orig(q, k, *a, **kw)
        i = current["layer"]
        if i is None:
            return q2, k2
        b, h, t, hd = k2.shape
        x = k2.transpose(1, 2).reshape(b * t, h, hd)
        kk, _ = fmt(i, hd, k2.dtype).roundtrip(x, torch.zeros_like(x))
        return q2, kk.reshape(b, t, h, hd).transpose(1, 2).to(k2.dtype)

    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        hd = attn.head_dim

        def pre(m, args, kwargs, i=i):
            current["layer"] = i

        def post(m, args, out):
            current["layer"] = None

        def vhook(m, args, out, i=i, hd=hd):
            x = out.reshape(-1, hkv, hd)
            _, vv = fmt(i, hd, out.dtype).roundtrip(torch.zeros_like(x), x)
            return vv.reshape(out.shape).to(out.dtype)

        undo.append(attn.register_forward_pre_hook(pre, with_kwargs=True).remove)
        undo.append(attn.register_forward_hook(post).remove)
        undo.append(attn.v_proj.register_forward_hook(vhook).remove)
    mod.apply_rotary_pos_emb = rope
    undo.append(lambda: setattr(mod, "apply_rotary_pos_emb", orig))
    return undo
