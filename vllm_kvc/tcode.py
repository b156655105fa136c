"""Method ``tcode``'s math: transform coding of whitened K/V latents, bits per latent coordinate (plain torch;
importable without vLLM).

The whitened full-rank factors of each head group's K / V projection (``bitalloc.metric_factors``) are a
Karhunen-Loeve transform: on calibration text the latent ``c = x A`` has uncorrelated coordinates of variance
``s_i**2`` and ``c B`` has orthonormal rows, so an error in coordinate i costs its own squared size at the
projection output. Each coordinate is weighted by its Fisher weight (the mean squared gradient of the next-token
loss at the projection output, projected through its row of ``B``), and reverse water-filling over every layer's
K and V at once (``bitalloc.allocate_segments``) gives it 8, 4, 2 or 0 bits. Coordinates sorted by weight
take non-increasing widths, so each row part is a few segments (``plan.parse_segments``: "64x4+96x2"); each
segment is rotated (Hadamard / seeded orthogonal, folded into ``A`` and ``B``) so that one fp16 scale per
segment suits all its values. Measured in benchmarks/RESULTS.md ("Below 15%": +0.9% held-out perplexity at 20%
of the bf16 bytes where the rank allocator gives +6.2%).

The first token of every sequence (the attention sink) is kept exact by the attention layer, so the
statistics leave it out: its rows are dropped from the Fisher weights, and its contribution from the
calibration covariances (under causal attention position 0 depends on its own token only, so its projection
input is recomputed from that token alone and subtracted from the cached sums). Those rows carry 20-96% of
the Fisher mass of many layers; left in, they decide the allocation for four tokens.

What the deployment stores: explicit segments per layer (``vllm-kvc allocate --method tcode`` writes them);
the factor file is rebuilt from the same statistics (cached, keyed by the checkpoint, calibration and segments).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from vllm_kvc import bitalloc

log = logging.getLogger("vllm_kvc")

MENU = (8, 4, 2)  # int3 measured no gain (RESULTS.md "Below 15%", lead e)
UNIT = 8  # segment widths are multiples of this
TCODE_FORMAT = 1  # part of every cache key of this module


class Stats:
    """Per layer, kind (0: K, 1: V) and head group: whitened full-rank factors ``a [hidden, gdim]``,
    ``b [gdim, gdim]`` and the Fisher-weighted latent variances ``v [gdim]`` (sink left out)."""

    def __init__(self, items: dict, groups: int, hidden: int, gdim: int):
        self.items = items  # (layer, kind) -> [(a, b, v) per group]
        self.groups, self.hidden, self.gdim = groups, hidden, gdim
        self.num_layers = 1 + max(i for i, _ in items)

    def order(self, layer: int, kind: int, group: int) -> torch.Tensor:
        return torch.argsort(self.items[(layer, kind)][group][2], descending=True, stable=True)

    def part_variances(self, layer: int, kind: int) -> torch.Tensor:
        """The part's sorted weighted variances, averaged over its head groups (they share one segment list)."""
        vs = [g[2][self.order(layer, kind, j)] for j, g in enumerate(self.items[(layer, kind)])]
        return torch.stack(vs).mean(0)


def sink_free_covariances(model, tok, calib, covs: torch.Tensor) -> list[torch.Tensor]:
    """``covs`` [layers, hidden, hidden] (E[x x^T] over the calibration chunks) without each chunk's first token."""
    from vllm_kvc.artifacts import attn_modules
    from vllm_kvc.corpus import load_text, token_chunks

    chunks = token_chunks(tok, load_text(calib.corpus, "calibration"), calib.tokens, calib.seq_len)
    count = sum(len(c) for c in chunks)
    sums = [covs[i].double() * count for i in range(covs.shape[0])]
    hooks = []
    for i, a in enumerate(attn_modules(model)):
        def pre(mod, args, i=i):
            x0 = args[0].reshape(-1, args[0].shape[-1])[0].double().cpu()
            sums[i] -= torch.outer(x0, x0)
        hooks.append(a.k_proj.register_forward_pre_hook(pre))
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            for c in chunks:
                model(torch.tensor([c[:1]], device=dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [s / (count - len(chunks)) for s in sums]


def coordinate_stats(model, covs, fisher, probe_chunks: int, group_size: int, head_dim: int) -> Stats:
    """Whitened factors and Fisher-weighted variances of every head group (see the module docstring).
    ``fisher[i][kind]``: [T, kv_heads * head_dim] squared gradients over ``probe_chunks`` equal chunks whose
    first row is the chunk's first token (left out)."""
    from vllm_kvc.artifacts import attn_modules

    gdim = group_size * head_dim
    items = {}
    groups = hidden = None
    for i, at in enumerate(attn_modules(model)):
        for kind, proj in ((0, at.k_proj), (1, at.v_proj)):
            w = proj.weight.detach().double().cpu()
            hidden = w.shape[1]
            groups = w.shape[0] // gdim
            f2 = fisher[i][kind].double()
            per = f2.shape[0] // probe_chunks
            keep = torch.ones(f2.shape[0], dtype=torch.bool)
            keep[::per] = False
            f2 = f2[keep].mean(0)
            out = []
            for g in range(groups):
                sl = slice(g * gdim, (g + 1) * gdim)
                a, b, s2 = bitalloc.metric_factors(w[sl], covs[i])
                wj = (f2[sl][None, :] * b ** 2).sum(1)
                out.append((a, b, s2 * wj))
            items[(i, kind)] = out
    return Stats(items, groups, hidden, gdim)


def allocate(stats: Stats, budget_bytes: int, menu=MENU, unit: int = UNIT):
    """Reverse water-filling over every layer's K and V: (segments_k per layer, segments_v per layer, bytes per
    token). Segments are ((width, bits), ...) without the dropped tail; a part keeps at least ``unit``
    coordinates at the smallest width (the cache row of a layer never has an empty part)."""
    L = stats.num_layers
    keys = [(i, kind) for i in range(L) for kind in (0, 1)]
    segs, _ = bitalloc.allocate_segments([stats.part_variances(*k) for k in keys], budget_bytes, menu, unit,
                                         scale_group=0, groups=stats.groups)
    out = {}
    for k, s in zip(keys, segs):
        kept = tuple((x.width, x.bits) for x in s if x.bits)
        out[k] = kept or ((unit, min(menu)),)
    from vllm_kvc.plan import segment_part_bytes

    used = sum(vb + 2 * ns for vb, ns in (segment_part_bytes(stats.groups, s) for s in out.values()))
    return [out[(i, 0)] for i in range(L)], [out[(i, 1)] for i in range(L)], used


def factors(stats: Stats, segs_k, segs_v) -> dict[str, torch.Tensor]:
    """The factor file's tensors: per layer ``a_k [hidden, G * kept]``, ``b_k [G, kept, gdim]`` (and V): each
    group's coordinates in its weight order, the kept ones segment by segment, each segment rotated."""
    tensors = {}
    for i in range(stats.num_layers):
        for kind, segs in ((0, segs_k[i]), (1, segs_v[i])):
            kept = sum(w for w, _ in segs)
            seg_list = [bitalloc.Segment(w, b, 0) for w, b in segs]
            if kept < stats.gdim:
                seg_list.append(bitalloc.Segment(stats.gdim - kept, 0, 0))
            enc, dec = [], []
            for g, (a, b, _) in enumerate(stats.items[(i, kind)]):
                o = stats.order(i, kind, g)
                codec = bitalloc.SegmentCodec(a[:, o], b[o], seg_list)
                enc.append(codec.enc)
                dec.append(codec.dec)
            name = "k" if kind == 0 else "v"
            tensors[f"{i}.a_{name}"] = torch.cat(enc, 1).float().contiguous()
            tensors[f"{i}.b_{name}"] = torch.stack(dec).float().contiguous()
    return tensors


# ------------------------------------------------------------------------------------ calibration, cached
DEFAULT_PROBE = {"tokens": 2048, "seq_len": 512, "rank_step": 8, "error_stride": 2}  # the allocator's probe

_STATS: dict = {}


def load_stats(model_dir: str, cfg, probe: dict | None = None) -> Stats:
    """The statistics of this checkpoint and calibration (whitened factors, Fisher weights without the sink);
    the Fisher weights are the allocator's (cached on disk), the rest is recomputed per process (seconds)."""
    from vllm_kvc.allocate import _alloc_dir, _context, _fisher, _fisher_key

    probe = {**DEFAULT_PROBE, **(probe or {})}
    if cfg.factorization != "whitened":
        from vllm_kvc.settings import ConfigError
        raise ConfigError("compression.factorization", "method tcode codes whitened factors: expected 'whitened'")
    key = (_fisher_key(model_dir, cfg, probe), TCODE_FORMAT)
    if key in _STATS:
        return _STATS[key]
    t0 = time.time()
    ctx = _context(model_dir, cfg, probe)
    fisher, _ = _fisher(ctx, probe, _alloc_dir() / f"sens-{_fisher_key(model_dir, cfg, probe)}.fisher.safetensors")
    covs = sink_free_covariances(ctx.model, ctx.tok, cfg.calibration, ctx.covs)
    stats = coordinate_stats(ctx.model, covs, fisher, len(ctx.probe.ids), cfg.group_size, ctx.hd)
    log.info("tcode: statistics of %d layers (%.1f s)", stats.num_layers, time.time() - t0)
    _STATS.clear()
    _STATS[key] = stats
    return stats


def allocate_config(model_dir: str, cfg, fraction: float, baseline_bytes: int, menu=MENU, unit: int = UNIT):
    """(segments_k, segments_v, bytes per token) for at most ``fraction`` of the bf16 KV bytes per token."""
    budget = int(math.floor(fraction * baseline_bytes))
    return allocate(load_stats(model_dir, cfg), budget, menu, unit)


def factors_path(model_dir: str, cfg, plan) -> Path:
    from vllm_kvc.artifacts import cache_key, cache_root, checkpoint_fingerprint
    from vllm_kvc.calibrate import FACTOR_FORMAT

    key = cache_key(FACTOR_FORMAT, TCODE_FORMAT, "tcode", checkpoint_fingerprint(model_dir),
                    cfg.calibration.model_dump(), plan.group_size, plan.layer_specs, DEFAULT_PROBE)
    return cache_root() / "factors" / f"{key}.safetensors"


def build_factors(model_dir: str, cfg, plan) -> Path:
    """The factor file of a tcode plan (cached; built under a file lock)."""
    from vllm_kvc.artifacts import build_tensors_once
    from vllm_kvc.plan import parse_segment_spec

    def build():
        specs = [parse_segment_spec(s) for s in plan.layer_specs]
        tensors = factors(load_stats(model_dir, cfg), [s[0] for s in specs], [s[1] for s in specs])
        return tensors, {"plan": json.dumps(plan.to_json())}

    return build_tensors_once(factors_path(model_dir, cfg, plan), build, "tcode factors")


def install(model, factors_file, layer_specs, sink: int = 1, kinds=(0, 1), read_bits=None, window: int = 0) -> list:
    """HF transformers emulation: every layer's k_proj / v_proj output := its transform-coded round trip
    (the same quantizer as layout.py's rows); the first ``sink`` positions of each sequence exact (the
    deployment keeps one). With ``window``, each query also reads the keys and values of its ``window`` newest
    positions (itself included) exactly (emulate.install_window). ``factors_file``: the factor file, or its
    tensors (``factors``). For analysis: ``kinds`` the parts coded (0: K, 1: V), ``read_bits(bits)`` the width a
    segment is rounded at (16: exact). Returns undo callables."""
    from vllm_kvc.plan import parse_segment_spec

    if isinstance(factors_file, dict):
        tensors = factors_file
    else:
        from safetensors.torch import load_file
        tensors = load_file(str(factors_file))
    undo = []
    for i, layer in enumerate(model.model.layers):
        segs = parse_segment_spec(layer_specs[i])
        for kind, proj in ((0, layer.self_attn.k_proj), (1, layer.self_attn.v_proj)):
            if kind not in kinds:
                if window:  # the windowed attention reads exact and coded heads side by side: both exact
                    undo.append(proj.register_forward_hook(lambda mod, args, out: torch.cat([out, out], -1)).remove)
                continue
            name = "k" if kind == 0 else "v"
            a, b = tensors[f"{i}.a_{name}"].float(), tensors[f"{i}.b_{name}"].float()

            def hook(mod, args, out, a=a, b=b, segs=segs[kind]):
                c = (args[0].float() @ a).reshape(*args[0].shape[:-1], b.shape[0], -1)
                parts, off = [], 0
                for w, bits in segs:
                    bits = read_bits(bits) if read_bits else bits
                    parts.append(bitalloc.roundtrip_bits(c[..., off:off + w], bits, 0))
                    off += w
                y = torch.einsum("...gr,grd->...gd", torch.cat(parts, -1), b).reshape(*out.shape)
                if mod.bias is not None:
                    y = y + mod.bias.float()
                y = y.to(out.dtype)
                if window:
                    return torch.cat([out, y], -1)
                if sink:
                    y[..., :int(sink), :] = out[..., :int(sink), :]
                return y

            undo.append(proj.register_forward_hook(hook).remove)
    if window:
        from vllm_kvc.emulate import install_window
        undo += install_window(model, window, int(sink))
    return undo


# ------------------------------------------------------------------------------------ quality mode
VALIDATION = {"corpus": "validation", "chunks": 16, "seq_len": 1024,  # what the quality mode measures on
              "sampling": "spread_chunks-1"}


def quality_config(model_dir: str, cfg, max_rise_pct: float, baseline_bytes: int, lo_frac: float = 0.08,
                   hi_frac: float = 0.5, iters: int = 7, validation: dict | None = None, window: int = 0,
                   sink: bool = True):
    """Quality mode: the smallest memory fraction (bisection) whose allocation's *measured* perplexity rise is
    <= ``max_rise_pct``, measured in the transformers emulation (float32, the exact sink) on a validation text
    that neither the statistics nor any evaluation corpus use (``VALIDATION``: chunks spread over the library
    reference). ``window`` / ``sink``: the exact recent tokens and first token the deployment keeps (measured
    with them; the fractions are of the paged rows). Returns (segments_k, segments_v, bytes per token, info);
    cached per settings."""
    from vllm_kvc.allocate import _alloc_dir, _context, _fisher_key
    from vllm_kvc.artifacts import write_text_atomic
    from vllm_kvc.corpus import load_text, spread_chunks
    from vllm_kvc.emulate import perplexity
    from vllm_kvc.plan import segment_spec

    val = {**VALIDATION, **(validation or {})}
    key = _fisher_key(model_dir, cfg, DEFAULT_PROBE)
    path = _alloc_dir() / (f"tcode-quality-{key}-{TCODE_FORMAT}-{max_rise_pct:g}-{baseline_bytes}-{lo_frac:g}-"
                           f"{hi_frac:g}-{iters}-{val['corpus']}-{val['chunks']}-{val['seq_len']}-{val['sampling']}"
                           f"{f'-w{window}' if window else ''}{'' if sink else '-nosink'}.json")
    if path.is_file():
        d = json.loads(path.read_text())
        return ([tuple(map(tuple, s)) for s in d["segments_k"]], [tuple(map(tuple, s)) for s in d["segments_v"]],
                d["bytes_per_token"], d["info"])
    stats = load_stats(model_dir, cfg)
    ctx = _context(model_dir, cfg, DEFAULT_PROBE)
    chunks = spread_chunks(ctx.tok, load_text(val["corpus"], "eval"), val["chunks"], val["seq_len"])
    with torch.no_grad():
        dense = perplexity(ctx.model, chunks)
    tried = []

    def measure(frac):
        sk, sv, used = allocate(stats, int(math.floor(frac * baseline_bytes)))
        undo = install(ctx.model, factors(stats, sk, sv), [segment_spec(k, v) for k, v in zip(sk, sv)],
                       int(sink), window=window)
        try:
            with torch.no_grad():
                rise = 100.0 * (perplexity(ctx.model, chunks) / dense - 1.0)
        finally:
            for u in undo:
                u()
        tried.append({"fraction": round(used / baseline_bytes, 5), "rise_pct": round(rise, 3)})
        log.info("tcode quality mode: %.4f of bf16 -> validation rise %+.2f%%", used / baseline_bytes, rise)
        return (sk, sv, used), rise

    best, best_rise = measure(hi_frac)
    if best_rise > max_rise_pct:
        from vllm_kvc.settings import ConfigError
        raise ConfigError("--max-rise", f"even {hi_frac:g} of the bf16 bytes rises {best_rise:.2f}% on the validation "
                                        f"text: expected a budget of at least that")
    lo, hi = lo_frac, hi_frac
    for _ in range(iters):
        mid = (lo + hi) / 2
        got, r = measure(mid)
        if r <= max_rise_pct:
            hi, best, best_rise = mid, got, r
        else:
            lo = mid
    info = {"validation": val, "validation_dense_ppl": round(dense, 4), "max_rise_pct": max_rise_pct,
            "tried": tried, "validation_rise_pct": round(best_rise, 3)}
    write_text_atomic(json.dumps({"segments_k": best[0], "segments_v": best[1], "bytes_per_token": best[2],
                                  "info": info}), path)
    return best[0], best[1], best[2], info
