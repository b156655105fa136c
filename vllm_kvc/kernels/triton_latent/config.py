"""Launch configuration of the latent attention kernels, and the host-side facts it is resolved from.

:class:`LaunchConfig` is the one object that tunes a launch: tile sizes, warps, pipeline stages, KV splits, and
the two switches of the decode kernel that stay measurable (``tile_rotation``, ``lazy_max``), plus the thresholds
of the rebuild-then-flash path for long prompts. A field left ``None`` takes the measured default of the path
the dispatch picks (:func:`decode_defaults` for decode; see ``dispatch.plan_launch`` for the others). Sweeps
build variants with ``dataclasses.replace``. Measurements: benchmarks/RESULTS.md, "GPU kernels".
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from vllm_kvc.layout import LatentLayout

# requests with at least this many query tokens and query x key pairs take the rebuild-then-flash path (measured
# on an H100: benchmarks/RESULTS.md, GPU kernels, "Long prompts") ...
REBUILD_MIN_QUERIES = 256
REBUILD_MIN_WORK = 1 << 24
# ... and at most this many cached tokens: the dense keys and values exist only while the request's attention
# runs, and vLLM's memory profiling does not see them (~12 KB per token for a Llama-3-8B layer: 400 MB here)
REBUILD_MAX_TOKENS = 32768


@dataclass(frozen=True)
class LaunchConfig:
    """How to launch the kernels; ``None``: the measured default of the path taken.

    heads: KV heads per program of the multi-head decode kernel (gs == 1 float latents; a power of two dividing
        the group count, rounded down); 0 sends decode to the generic kernel.
    block_t: KV tokens per tile. block_q: query tokens per program of the generic kernel (varlen / prefill).
    num_warps, num_stages: as in Triton. pieces: the generic kernel rebuilds the keys in 1 or 2 column pieces.
    num_splits: KV splits per program (flash decoding; combined by the reduce kernel).
    tile_rotation: decode kernel: RoPE as R(t0 + i) = R(t0) R(i) with cos / sin computed in the kernel (needs
        the factors' inv_freq, see ``angles_match``); False: the cos / sin table.
    lazy_max: decode kernel: the first tile's max is the softmax reference, with an exact second pass for the
        programs where that could overflow; explicit kernel (without rings) likewise, the first block's max per warp
        (None there: ``explicit.LAZY_MAX``).
    maxnreg: decode kernel: registers per thread at most (Triton's ``maxnreg``; more programs per SM, spilling
        what does not fit); 0: the compiler's choice; None: the measured default (:func:`decode_defaults`).
    scale_ahead: decode kernel, integer latents, one KV head per program: the fp16 scales of each tile are loaded
        one tile ahead; None: on for roped keys (measured there, round 5), off for pre-RoPE keys.
    k_grouped: decode kernel, roped keys, 4-bit K of rank 97..128 with 32 values per scale: K tiles read one scale
        group (16 bytes) per thread and token (``tiles.load_nibbles_grouped``); None: on.
    explicit: decode batches of the layouts the explicit-layout kernel serves (``explicit.serves``: roped int4@g32
        or int8/int4@g32 of even ranks up to 256, at most 8 query heads per head group, 64-token blocks, sm_90)
        take it; None: on, False: the Triton kernels.
    stages: explicit kernel: blocks of code bytes in flight per program (shared-memory rings filled by cp.async;
        a power of two, 0: straight loads into registers); None: ``explicit.STAGES`` (0).
    rebuild_*: long prompts (see ``dispatch.plan_launch``)."""
    heads: int | None = None
    block_t: int | None = None
    block_q: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    pieces: int | None = None
    num_splits: int | None = None
    tile_rotation: bool | None = None
    lazy_max: bool | None = None
    maxnreg: int | None = None
    scale_ahead: bool | None = None
    k_grouped: bool | None = None
    explicit: bool | None = None
    stages: int | None = None
    rebuild_min_queries: int = REBUILD_MIN_QUERIES
    rebuild_min_work: int = REBUILD_MIN_WORK
    rebuild_max_tokens: int = REBUILD_MAX_TOKENS

    @classmethod
    def parse(cls, text: str, sep: str = ",") -> "LaunchConfig":
        """'maxnreg=168,explicit=0' (``sep``-separated field=value; switches as 0 / 1): a LaunchConfig, or ValueError
        naming the field and what it takes."""
        import dataclasses
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        out = {}
        for item in filter(None, text.split(sep)):
            k, eq, v = item.partition("=")
            if k not in kinds or not eq:
                raise ValueError(f"launch option {item!r}: expected field=value with field one of {sorted(kinds)}")
            if "bool" in str(kinds[k]):
                if v not in ("0", "1"):
                    raise ValueError(f"launch option {k}: expected 0 or 1, got {v!r}")
                out[k] = v == "1"
            else:
                try:
                    out[k] = int(v)
                except ValueError:
                    raise ValueError(f"launch option {k}: expected an integer, got {v!r}") from None
        return cls(**out)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def heads_supported(layout: LatentLayout, hq: int) -> bool:
    """Layouts that the multi-head decode kernel serves: group size 1, ranks <= 256, float latents or packed
    integer latents (any layout but the original int8 one, which keeps its measured path: the generic kernel, and
    the transform-coded ``seg:`` rows, which the generic kernel reads as :func:`segment_pieces`)."""
    return (layout.group_size == 1 and not layout.is_int8 and not layout.segmented
            and hq % layout.num_kv_heads == 0 and next_pow2(layout.rank_v) <= 256 and max(16, next_pow2(layout.rank_k)) <= 256)


# ------------------------------------------------------------------------------------------------ row formats
@dataclass(frozen=True)
class PartFormat:
    """Where and how one K or V part of an integer latent row is stored (what the kernels read, as constexprs).

    off: byte offset of the part's first value; bits: 8 (int8 codes, value = code * scale), 4 or 2 (packed
    unsigned codes, little end first, value = table[code] * |scale|, table by the scale's sign); qg: values per
    fp16 scale (0: one per token and head group); soff: byte offset of the part's first scale; spg: scales per
    head group; lut: offset of the part's two level tables (Gauss, then uniform) in :func:`level_tables`;
    aligned: every head group's values start on a whole byte (rank * bits % 8 == 0; informative: the kernels
    read one byte per value either way, see ``tiles.load_dequant``)."""
    off: int
    bits: int
    qg: int
    soff: int
    spg: int
    lut: int
    aligned: bool


LUT_OFFSET = {8: 0, 4: 0, 2: 32}  # level_tables(): int4 Gauss 0..15, uniform 16..31; int2 Gauss 32..35, uniform 36..39


@functools.lru_cache(maxsize=1024)
def row_format(layout: LatentLayout) -> tuple[PartFormat, PartFormat]:
    """The K and V part formats of an integer layout (layout.py is the source of the bytes); cached per layout
    (read on every launch)."""
    qg, G = layout.quant_group, layout.groups
    spg_k, spg_v = layout.scales_per_group_k, layout.scales_per_group_v
    so = layout.scale_offset
    k = PartFormat(0, layout.bits_k, qg, so, spg_k, LUT_OFFSET[layout.bits_k], layout.rank_k * layout.bits_k % 8 == 0)
    v = PartFormat(layout.k_bytes, layout.bits_v, qg, so + 2 * G * spg_k, spg_v, LUT_OFFSET[layout.bits_v],
                   layout.rank_v * layout.bits_v % 8 == 0)
    return k, v


_LUTS: dict = {}
SEG_SLOTS = 4  # piece slots per part that the generic kernel unrolls (segment_pieces)
SEG_PIECE = 128  # the widest piece: wider segments are read as several pieces


@functools.lru_cache(maxsize=256)
def segment_pieces(layout: LatentLayout) -> tuple[tuple, tuple]:
    """A transform-coded (``seg:``) row described for the kernels: per part (K, then V) a tuple of SEG_SLOTS pieces
    ``(C0, W, BITS, BYTE0, GBYTES, SIDX, P)``. A piece is W consecutive latent coordinates C0 .. C0 + W - 1 of one
    segment (segments wider than SEG_PIECE are cut at multiples of it), BITS bits each; head group g's codes start
    at byte ``BYTE0 + g * GBYTES`` of the row and use fp16 scale number ``SIDX + g``; P is the piece's tile width
    (a power of two >= 16). Unused slots have W = 0. The kernels take the tuples as constexprs: each piece is one
    tile with one bit width and one scale per token, so every address, shift and level formula is known when the
    kernel is compiled (the earlier run-time table of per-coordinate entries spilled registers: 3.4 ms against
    int4's 0.26 ms for a Llama layer, benchmarks/results/gpu_r7_notes.md). layout.py is the source of the bytes.
    Cached per layout (read on every launch)."""
    G = layout.groups
    out = []
    bit, sidx = 0, 0
    for segs in (layout.segments_k, layout.segments_v):
        pieces, c = [], 0
        for w, b in segs:
            for i0 in range(0, w, SEG_PIECE):
                pw = min(SEG_PIECE, w - i0)
                pieces.append((c + i0, pw, b, (bit + i0 * b) // 8, w * b // 8, sidx * G, max(16, next_pow2(pw))))
            c += w
            bit += G * w * b
            sidx += 1
        pieces += [(0, 0, 8, 0, 0, 0, 16)] * (SEG_SLOTS - len(pieces))
        out.append(tuple(pieces))
    return out[0], out[1]


@functools.lru_cache(maxsize=256)
def segment_runs(layout: LatentLayout) -> bool:
    """Whether ``tiles.load_piece`` reads the 4 / 2-bit pieces of a ``seg:`` layout as byte runs (vector loads, each
    byte staged once per code) rather than one byte load per code: where the pieces' padded widths total at most
    256 columns (K + V). Measured on the H200 at 64 x 4096 (benchmarks/results/gpu_r8_decode4_m*.txt, best of 4 / 8
    warps): K 80 / V 104 (224 columns) 1.26 -> 0.83 ms with runs; K 104 / V 128 (336) 1.44 -> 1.76 ms and the
    group-size-2 K 208 / V 256 (560) 2.21 -> 3.86 ms (the staged bytes cost occupancy)."""
    return sum(p[6] for part in segment_pieces(layout) for p in part if p[1] > 0) <= 256


def level_tables(device: torch.device) -> torch.Tensor:
    """The level tables of layout.py as one small fp32 tensor (40 values), one copy per device."""
    key = str(device)
    if key not in _LUTS:
        from vllm_kvc.layout import GAUSS_LEVELS, UNIFORM_LEVELS
        t = torch.cat([GAUSS_LEVELS[4], UNIFORM_LEVELS[4], GAUSS_LEVELS[2], UNIFORM_LEVELS[2]]).float()
        assert t.numel() == 40
        _LUTS[key] = t.to(device)
    return _LUTS[key]


def quant_kwargs(layout: LatentLayout, kv_cache: torch.Tensor) -> dict:
    """The constexprs of the packed-integer path (QUANT) for a launch; QUANT=False for float and original int8."""
    if not layout.quantized or layout.is_int8 or layout.segmented:
        # (segmented rows: the generic kernel's SEG path reads segment_pieces(); K_SOFF / V_SOFF give the scales)
        z = dict(OFF=0, BITS=16, QG=0, SOFF=0, SPG=1, LUT=0)
        if layout.segmented:
            even = (kv_cache.data_ptr() % 2 == 0 and kv_cache.stride(0) % 2 == 0 and kv_cache.stride(1) % 2 == 0
                    and layout.scale_offset % 2 == 0)
            return dict(QUANT=True, SCALE16=even, **{f"K_{a}": b for a, b in z.items() if a != "SOFF"},
                        **{f"V_{a}": b for a, b in z.items() if a != "SOFF"},
                        K_SOFF=layout.scale_offset, V_SOFF=layout.scale_offset)
        return dict(QUANT=False, SCALE16=False, **{f"K_{a}": b for a, b in z.items()},
                    **{f"V_{a}": b for a, b in z.items()})
    k, v = row_format(layout)
    # fp16 scales read as fp16 where every scale sits on an even byte address; else as two bytes
    even = (kv_cache.data_ptr() % 2 == 0 and kv_cache.stride(0) % 2 == 0 and kv_cache.stride(1) % 2 == 0
            and layout.scale_offset % 2 == 0)
    out = dict(QUANT=True, SCALE16=even)
    for name, p in (("K", k), ("V", v)):
        out.update({f"{name}_OFF": p.off, f"{name}_BITS": p.bits, f"{name}_QG": p.qg, f"{name}_SOFF": p.soff,
                    f"{name}_SPG": p.spg, f"{name}_LUT": p.lut})
    return out


def decode_defaults(layout: LatentLayout, hq: int | None = None, roped: bool = False) -> LaunchConfig:
    """Decode launch options measured best on an H100 (benchmarks/RESULTS.md, GPU kernels), every field set.

    Where ``hq`` is given and the multi-head decode kernel serves the layout: 1 KV head per program at rank 64,
    2 at rank <= 32; 64-token tiles, 4 warps, 3 stages. ``tile_rotation`` at one KV head per program (2% faster
    than computing cos / sin per position; with two heads the shared table tile is 4% faster). ``lazy_max``:
    1-6% faster. Otherwise the generic kernel: 64-token tiles, 4 warps; small ranks rebuild the keys in two column
    pieces (fewer live registers, more programs per SM). ``num_splits`` stays ``None``: it depends on the batch.
    ``maxnreg``: 128 for roped keys with packed integer latents of ranks <= 128 at one KV head per program (4
    programs of 4 warps per SM: the int8 / int4 kernel of rank 128 took 167 registers, 3 programs, and runs 11-12 %
    faster capped, without spills; H200, benchmarks/results/gpu_r6_notes.md); 0 (the compiler's choice) elsewhere
    (larger ranks were not measured)."""
    if hq is not None and heads_supported(layout, hq):
        two = layout.rank_k <= 32
        cap = 128 if (roped and layout.quantized and not layout.is_int8 and not two
                      and max(layout.rank_k, layout.rank_v) <= 128) else 0
        return LaunchConfig(heads=2 if two else 1, block_t=64, num_warps=4, num_stages=3, pieces=1,
                            tile_rotation=not two, lazy_max=True, maxnreg=cap)
    small = layout.rank_k <= 32 and layout.head_dim >= 64
    # transform-coded rows read as constexpr pieces: 4 warps, as the other formats (H200, K 80 / V 104 at 64 x 4096:
    # 1.26 ms with 4 warps, 2.07 with 8; no spills either way: benchmarks/results/gpu_r8_decode1.txt)
    return LaunchConfig(heads=0, block_t=64, num_warps=4,
                        num_stages=2 if small else 3, pieces=2 if small else 1,
                        tile_rotation=False, lazy_max=False, maxnreg=0)


def pick_heads(layout: LatentLayout, heads: int) -> int:
    """KV heads per program: the largest power of two <= heads that divides the group count."""
    n = 1
    while n * 2 <= heads and layout.groups % (n * 2) == 0:
        n *= 2
    return n


def check_supported(layout: LatentLayout) -> None:
    """Raise NotImplementedError for layouts the kernels do not handle. Every latent dtype the plan produces
    (float, int8, int4, int2, mixed K/V widths, per-token or power-of-two group scales) is read; what remains are
    head dims and ranks whose tiles do not fit on chip. The vLLM glue checks this once at start-up (a layout the
    kernels cannot read is a configuration error on GPUs, not a silent fallback)."""
    if layout.segmented:
        for part, segs in (("K", layout.segments_k), ("V", layout.segments_v)):
            for w, b in segs:
                if b not in (8, 4, 2) or (w * b) % 8:
                    raise NotImplementedError(f"latent dtype {layout.dtype!r}: {part} segment {w}x{b}: the kernels "
                                              "read 8, 4 and 2-bit segments whose head groups start on whole bytes")
            n = sum(-(-w // SEG_PIECE) for w, _ in segs)
            if n > SEG_SLOTS:
                raise NotImplementedError(f"latent dtype {layout.dtype!r}: the {part} part is {n} pieces (segments "
                                          f"cut at {SEG_PIECE} coordinates); the kernels read at most {SEG_SLOTS}")
    qg = layout.quantized and layout.quant_group
    if qg and qg & (qg - 1):
        raise NotImplementedError(f"latent dtype {layout.dtype!r}: the kernels need a power-of-two quant group")
    if layout.quantized and not layout.segmented and (layout.bits_k not in (8, 4, 2) or layout.bits_v not in (8, 4, 2)):
        raise NotImplementedError(f"latent dtype {layout.dtype!r}: the kernels read 8, 4 and 2-bit latents only")
    hd = layout.head_dim
    if hd & (hd - 1) or hd < 32:
        raise NotImplementedError(f"head_dim={hd}: the kernels need a power of two >= 32")
    if max(16, next_pow2(layout.rank_k)) * layout.group_size > 512 or next_pow2(layout.rank_v) > 256:
        # the per-tile key factors and the latent accumulator would not fit on chip (measured on an H100 with
        # triton 3.6: gs=4 at rank 256 needs 413 KB of shared memory; gs=8 at rank 512 spills 62 KB)
        raise NotImplementedError(f"group_size={layout.group_size}, rank_k={layout.rank_k}, rank_v={layout.rank_v}: "
                                  "the kernels need next_pow2(rank_k) * group_size <= 512 and rank_v <= 256")


def default_splits(n_programs: int, max_ctx: int, block_t: int, num_sms: int, per_sm: int = 0) -> int:
    """Split-KV factor, a power of two <= 16 with at least 4 KV tiles per split. Where the programs resident per SM
    are known (``per_sm``, from a register cap): none while the programs fill 90 % of the resident slots, else
    the fewest that fill 90 % of them (H200, roped integer latents, benchmarks/results/gpu_r6_notes.md: 16 x 16384
    4 splits 5-15 % faster than 2, 4 x 16384 16 splits 0-9 % faster than 8; 64 x 4096 one split 0.5-5 % faster than
    2). Otherwise ~2 programs per SM, rounded down."""
    cap = max(1, max_ctx // (4 * block_t))
    if per_sm:
        want = -(-9 * num_sms * per_sm // (10 * max(1, n_programs)))
        s = min(next_pow2(want), cap, 16)
    else:
        want = max(1, -(-2 * num_sms // max(1, n_programs)))
        s = min(want, cap, 16)
    return 1 << (s.bit_length() - 1) if s > 1 else 1


def programs_per_sm(cfg: LaunchConfig) -> int:
    """Decode programs resident per SM where a register cap fixes it (65536 registers per SM); 0: unknown."""
    if not cfg.maxnreg or not cfg.num_warps:
        return 0
    return min(65536 // (cfg.maxnreg * 32 * cfg.num_warps), 32 // cfg.num_warps)


# ------------------------------------------------------------------------------------------------ device facts
_PROPS: dict = {}


def device_props(device: torch.device):
    """The CUDA device's properties, looked up once per device (they are read on every launch)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PROPS:
        _PROPS[idx] = torch.cuda.get_device_properties(idx)
    return _PROPS[idx]


def num_sms(device: torch.device) -> int:
    return device_props(device).multi_processor_count if device.type == "cuda" else 8


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def compute_dtype(q: torch.Tensor) -> torch.dtype:
    """Tensor-core operand dtype: q's half type; fp32 otherwise. Under TRITON_INTERPRET the interpreter's tl.dot
    multiplies bf16 operands as their raw uint16 bits (triton 3.9), so bf16 is computed in fp32 there."""
    if q.dtype == torch.bfloat16 and interpreting():
        return torch.float32
    return q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.float32
