"""What a plan is, for every method: a model's shape (:class:`ModelShape`) and, per layer, what one token costs
in the KV cache (:class:`Plan`); plus the byte arithmetic of latent rows and the LoRC rank schedules.

Each method's plan class (a :class:`Plan` subclass with explicit fields) lives in its module under
``vllm_kvc/methods/``; ``vllm_kvc.methods.build_plan`` turns a compression config into one.
Plain Python (reads a HF config.json); importable without vLLM or torch.
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from vllm_kvc.settings import SUPPORTED_ARCHITECTURES, ConfigError

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "int8": 1}
FLOAT_LATENTS = ("bfloat16", "float16", "float32")
INT_LATENTS = {"int8": 8, "int4": 4, "int2": 2}


@functools.lru_cache(maxsize=1024)
def latent_spec(dtype_k: str, dtype_v: str | None = None, quant_group: int = 0) -> str:
    """Canonical latent dtype spec (what ``LatentLayout.dtype`` holds): ``"bfloat16"``, ``"int8"`` (one scale per
    token, head group and K/V: the original int8 layout), ``"int4"``, ``"int8/int4"`` (K int8, V int4), and any of
    the integer ones with ``"@g32"`` (one scale per 32 latent values) appended."""
    dtype_v = dtype_v or dtype_k
    for d in (dtype_k, dtype_v):
        if d not in FLOAT_LATENTS and d not in INT_LATENTS:
            raise ValueError(f"latent dtype {d!r}: expected one of {list(FLOAT_LATENTS) + list(INT_LATENTS)}")
    if dtype_k in FLOAT_LATENTS or dtype_v in FLOAT_LATENTS:
        if dtype_k != dtype_v:
            raise ValueError(f"K latents {dtype_k} and V latents {dtype_v}: mixed dtypes must both be integer")
        if quant_group:
            raise ValueError("quant_group applies to integer latents only")
        return dtype_k
    s = dtype_k if dtype_k == dtype_v else f"{dtype_k}/{dtype_v}"
    return s + (f"@g{quant_group}" if quant_group else "")


SEGMENT_BITS = (8, 4, 2)  # widths a segment may have (issue 16: int3 measured no gain)


def parse_segments(text: str, where: str = "segments") -> tuple[tuple[int, int], ...]:
    """``"64x4+96x2"`` -> ((64, 4), (96, 2)): one row part (K or V of one layer) as segments of ``width``
    latent coordinates per head group at ``bits`` each (8: int8, 4 / 2: the level tables of layout.py), one
    fp16 scale per segment, head group and token. Widths are multiples of 4 (a segment's codes end on a byte
    for any number of head groups); bits non-increasing (coordinates are sorted by importance)."""
    segs = []
    for item in str(text).split("+"):
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", item)
        if not m:
            raise ValueError(f"{where}: {text!r}: expected segments like '64x4+96x2' (width x bits, joined by '+')")
        w, b = int(m.group(1)), int(m.group(2))
        if b not in SEGMENT_BITS:
            raise ValueError(f"{where}: {text!r}: bits {b}: expected one of {list(SEGMENT_BITS)}")
        if w < 4 or w % 4:
            raise ValueError(f"{where}: {text!r}: width {w}: expected a positive multiple of 4")
        segs.append((w, b))
    if any(b2 > b1 for (_, b1), (_, b2) in zip(segs, segs[1:])):
        raise ValueError(f"{where}: {text!r}: bits must not increase from one segment to the next")
    return tuple(segs)


def format_segments(segs) -> str:
    return "+".join(f"{w}x{b}" for w, b in segs)


def segment_spec(segs_k, segs_v) -> str:
    """The latent spec of a transform-coded layer: ``"seg:<K segments>/<V segments>"``."""
    return f"seg:{format_segments(segs_k)}/{format_segments(segs_v)}"


@functools.lru_cache(maxsize=1024)
def parse_segment_spec(spec: str):
    """``"seg:64x4+96x2/72x4"`` -> (K segments, V segments); ValueError for anything else. Cached: a layout
    reads it on every attention call (its bytes, offsets and segments)."""
    if not spec.startswith("seg:") or spec.count("/") != 1:
        raise ValueError(f"latent dtype {spec!r}: expected 'seg:<K segments>/<V segments>'")
    k, v = spec[4:].split("/")
    return parse_segments(k, "K segments"), parse_segments(v, "V segments")


def segment_part_bytes(groups: int, segs) -> tuple[int, int]:
    """(value bytes, scale count) of one part of a transform-coded row."""
    return sum(groups * w * b // 8 for w, b in segs), groups * len(segs)


@functools.lru_cache(maxsize=1024)
def parse_latent_spec(spec: str) -> tuple[str, str, int]:
    """``spec`` -> (K dtype, V dtype, quant_group); quant_group 0 = one scale per token, head group and K/V.
    Transform-coded specs (``"seg:..."``) give ("seg", "seg", 0). Cached, as the byte formulas below: a layout's
    properties read them on every attention call."""
    if spec.startswith("seg:"):
        parse_segment_spec(spec)
        return "seg", "seg", 0
    base, _, g = spec.partition("@g")
    qg = int(g) if g else 0
    dk, _, dv = base.partition("/")
    dv = dv or dk
    if latent_spec(dk, dv, qg) != spec:
        raise ValueError(f"latent dtype {spec!r}: expected e.g. 'bfloat16', 'int8', 'int4', 'int8/int4', 'int4@g32'")
    return dk, dv, qg


@functools.lru_cache(maxsize=1024)
def latent_part_bytes(groups: int, rank: int, dtype: str, quant_group: int) -> tuple[int, int]:
    """(value bytes, scale count) of one K or V part of a row: integer values are packed 8/bits per byte over
    the part's ``groups * rank`` values (the last byte zero-padded); one fp16 scale per head group (quant_group
    0) or per ``quant_group`` values of each head group's latent."""
    if dtype in FLOAT_LATENTS:
        return groups * rank * _DTYPE_BYTES[dtype], 0
    bits = INT_LATENTS[dtype]
    nvals = groups * rank
    vbytes = (nvals * bits + 7) // 8
    nscales = groups * (-(-rank // quant_group) if quant_group else 1)
    return vbytes, nscales


@functools.lru_cache(maxsize=1024)
def latent_row_bytes(groups: int, rank_k: int, rank_v: int, spec: str) -> int:
    """Bytes of one token's latent row of one layer (scales included); the single formula of layout and plan."""
    if spec.startswith("seg:"):
        (kb, ks), (vb, vs) = (segment_part_bytes(groups, s) for s in parse_segment_spec(spec))
        return kb + vb + 2 * (ks + vs)
    dk, dv, qg = parse_latent_spec(spec)
    kb, ks = latent_part_bytes(groups, rank_k, dk, qg)
    vb, vs = latent_part_bytes(groups, rank_v, dv, qg)
    return kb + vb + 2 * (ks + vs)


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelShape":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else "<none>"
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError("model", f"architecture {arch} is not supported: expected one of "
                                       f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        missing = [k for k in ("num_attention_heads", "hidden_size", "num_hidden_layers") if not cfg.get(k)]
        if missing:
            raise ConfigError("model", f"the checkpoint's config.json lacks {', '.join(missing)}: expected a "
                                       "Hugging Face Llama-family config")
        heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
        return cls(arch, int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]), heads,
                   int(cfg.get("num_key_value_heads") or heads), int(head_dim), str(dtype))

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "ModelShape":
        p = Path(path) / "config.json"
        if not p.exists():
            raise ConfigError("model", f"{p} not found: expected a Hugging Face checkpoint folder")
        try:
            cfg = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError("model", f"{p} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise ConfigError("model", f"{p} must hold a JSON object")
        return cls.from_hf_config(cfg)


def dtype_bytes(dtype: str, default: int = 2) -> int:
    return _DTYPE_BYTES.get(dtype, default)


def kv_heads_per_rank(shape: "ModelShape", tp_size: int = 1) -> int:
    """KV heads one tensor-parallel rank holds (vLLM replicates them when there are fewer than ranks)."""
    return max(1, shape.num_kv_heads // tp_size)


def dense_bytes_per_token(shape: "ModelShape", tp_size: int = 1, dtype_bytes: int | None = None) -> int:
    """vLLM's own (uncompressed) KV bytes per token on one TP rank, in the model dtype unless given."""
    db = dtype_bytes or _DTYPE_BYTES.get(shape.dtype, 2)
    return shape.num_layers * 2 * kv_heads_per_rank(shape, tp_size) * shape.head_dim * db


@dataclass(frozen=True)
class Plan:
    """One deployment's plan for one model: what each layer caches per token. Subclasses (one per method) add
    explicit fields and define ``layer_bytes_per_token`` and ``layer_ranks``."""

    shape: ModelShape
    latent_dtype: str  # the cache's storage format as reported (a latent spec for latent plans: layout.py)

    method = "?"  # class attribute set by each method's plan class (not a dataclass field)

    def layer_bytes_per_token(self, layer: int, tp_size: int = 1) -> int:
        """Bytes one token costs in this layer's paged cache on one TP rank (scales included)."""
        raise NotImplementedError

    def layer_ranks(self, layer: int) -> tuple[int, int]:
        """(rank_k, rank_v) this layer reports on /v1/kv_compression and ``vllm_kvc_layer_rank`` (each method
        says what they mean: ``Method.rank_meaning``)."""
        raise NotImplementedError

    def reported_ranks(self) -> tuple[list[int], list[int]]:
        """(rank_k of every layer, rank_v of every layer), see ``layer_ranks``."""
        ranks = [self.layer_ranks(i) for i in range(self.shape.num_layers)]
        return [r[0] for r in ranks], [r[1] for r in ranks]

    def bytes_per_token(self, tp_size: int = 1) -> int:
        return sum(self.layer_bytes_per_token(i, tp_size) for i in range(self.shape.num_layers))

    def baseline_bytes_per_token(self, tp_size: int = 1, dtype_bytes: int | None = None) -> int:
        return dense_bytes_per_token(self.shape, tp_size, dtype_bytes)

    def sequence_bytes(self, tp_size: int = 1) -> int:
        """Bytes each running sequence holds outside the paged cache (exact sink / recent-token rows), all
        layers, one TP rank."""
        return 0

    def counted_bytes_per_token(self, context: int, tp_size: int = 1) -> float:
        """Bytes per token with the per-sequence bytes spread over a sequence of ``context`` tokens: what a
        memory fraction reports (``bench pareto``: at its perplexity chunk length)."""
        return self.bytes_per_token(tp_size) + self.sequence_bytes(tp_size) / context

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["shape"] = asdict(self.shape)
        d["method"] = self.method
        return d


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'40GiB', '512 MiB', '1.5GB', '1073741824' -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r}: expected a size such as 40GiB, 512MiB or 1.5GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def kv_capacity(bytes_per_token: int, kv_memory: int, block_size: int, context: int) -> dict:
    """What vLLM's allocator fits in ``kv_memory`` bytes of KV cache (one TP rank): every layer's page lives
    in one block table (``UniformTypeKVCacheSpecs``: a block costs ``block_size`` x the bytes per token of all
    layers), so ``blocks = kv_memory // (block_size * bytes_per_token)``; a sequence of ``context`` tokens
    holds ``ceil(context / block_size)`` blocks."""
    blocks = kv_memory // (block_size * bytes_per_token)
    per_seq = -(-context // block_size)
    return {"kv_bytes_per_token": bytes_per_token, "num_blocks": blocks, "tokens": blocks * block_size,
            "sequences_at_context": blocks // per_seq}


def _clip(r: float, full: int) -> int:
    return int(min(full, max(1, round(r))))


def schedule_ranks(ratio: float, num_layers: int, full: int, schedule: str, spread: float) -> list[int]:
    """Rank per layer for a mean rank of ``ratio * full``.

    ``uniform``: every layer the same. ``progressive`` (LoRC): ranks fall linearly with depth, layer 0 keeping
    ``(1+spread)`` and the last ``(1-spread)`` times the mean; what clipping at full rank removes from shallow
    layers is given back to the deepest ones that have room, so the total matches the uniform budget.
    """
    mean = ratio * full
    if schedule == "uniform" or num_layers == 1:
        return [_clip(mean, full)] * num_layers
    if schedule != "progressive":
        raise ConfigError("compression.schedule", f"unknown schedule {schedule!r}")
    weights = [1 + spread - 2 * spread * i / (num_layers - 1) for i in range(num_layers)]
    ranks = [_clip(mean * w, full) for w in weights]
    budget = _clip(mean, full) * num_layers
    # rebalance to the uniform budget: add to the shallowest layers with room, remove from the deepest
    i = 0
    while sum(ranks) < budget and any(r < full for r in ranks):
        if ranks[i % num_layers] < full:
            ranks[i % num_layers] += 1
        i += 1
    j = num_layers - 1
    while sum(ranks) > budget and any(r > 1 for r in ranks):
        if ranks[j % num_layers] > 1:
            ranks[j % num_layers] -= 1
        j -= 1
    return ranks


# ----- vLLM 0.32's own KV cache formats (method vllmfmt emulates them): bytes per KV head and token -----
TURBOQUANT = {  # preset: (key bits: 8 = fp8 keys, value bits, norm correction)
    "turboquant_k8v4": (8, 4, False),
    "turboquant_4bit_nc": (4, 4, True),
    "turboquant_k3v4_nc": (3, 4, True),
    "turboquant_3bit_nc": (3, 3, True),
}
FORMATS = ("int8_per_token_head", "int4_per_token_head", "fp8", "nvfp4", *TURBOQUANT)

def tq_key_bytes(kv_dtype: str, d: int) -> int:
    kb = TURBOQUANT[kv_dtype][0]
    return d if kb == 8 else math.ceil(d * kb / 8) + 2


def tq_value_bytes(kv_dtype: str, d: int) -> int:
    return math.ceil(d * TURBOQUANT[kv_dtype][1] / 8) + 4


def vllm_format_head_bytes(kv_dtype: str, d: int) -> int:
    """Bytes one token's K and V of one KV head take in vLLM's page for ``kv_dtype`` (scales included)."""
    if kv_dtype == "int8_per_token_head":
        return 2 * (d + 4)
    if kv_dtype == "int4_per_token_head":
        return 2 * (d // 2 + 4)
    if kv_dtype == "fp8":
        return 2 * d
    if kv_dtype == "nvfp4":
        return 2 * (d // 2 + d // 16)
    if kv_dtype in TURBOQUANT:
        s = tq_key_bytes(kv_dtype, d) + tq_value_bytes(kv_dtype, d)
        return s + s % 2
    raise ValueError(f"kv cache dtype {kv_dtype!r}: expected one of {', '.join(FORMATS)}")
