"""Rank-and-bits allocation per layer and per K/V from measured sensitivity. Plain torch + transformers, no vLLM.

The search space, per layer and separately for K and V: a rank ``r`` (multiples of ``rank_step`` up to full
rank, i.e. the whole head group) of the whitened, rotated group factors (factorize.py) and the integer width of
the latent (int8 / int4, one fp16 scale per token, head group and K/V). Full rank int8 (lossless here) and full
rank int4 (pure quantization) are points of that space, so the allocator can always fall back to them.

Sensitivity (``measure_sensitivity``), on a short calibration slice (2048 tokens from the end of the
calibration text) in plain transformers: one forward + backward pass gives the gradient of the loss at every
layer's K and V projection output (diagonal empirical Fisher weights g**2, as in Palu); the output error of
every (rank, bits) option on the recorded inputs is weighted by them, ``cost = sum g**2 dy**2`` (the
second-order estimate of the loss increase): the truncation error of the whitened factors exactly, plus the
rounding error of the rotated latent (measured per token, spread evenly over its r rotated coordinates, which
is what the rotation is for, and mapped through B_r). One pass prices all ~60 x 25 x 3 options.

``allocate_budget``: for a byte budget per token (all layers, scales included), an exact multiple-choice
knapsack (dynamic programming over bytes) minimises the summed predicted KL; K bits and V bits are each one
value for the whole model (the glue builds every layer's layout from the plan's one latent spec), tried over
the menu and the best kept. Bytes never exceed the budget.

``allocate_quality``: the smallest budget whose allocation keeps the *measured* perplexity rise on the
calibration slice (all layers replaced at once, through the same emulation) within ``max_rise_pct``
(bisection over the budget).

Results are cached under ``$VLLM_KVC_CACHE/alloc`` keyed by checkpoint, calibration, settings and probe;
sensitivities and allocations also by the int4/int2 quantizer version (``layout.QUANT_VERSION``: every option's
rounding error is priced through ``layout.roundtrip``), the Fisher weights and recorded inputs are not.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vllm_kvc.artifacts import (cache_key, cache_root, cached_json, cached_tensors, checkpoint_fingerprint,
                                discard, file_lock, load_hf_model, progress, save_tensors_atomic,
                                write_text_atomic)
from vllm_kvc.plan import latent_part_bytes

log = logging.getLogger("vllm_kvc")
ALLOC_FORMAT = 1
BITS_MENU = (8, 4)


@dataclass
class Sensitivity:
    """Measured sensitivity of one model (per layer, K then V)."""
    num_layers: int
    groups: int  # head groups per layer
    full_rank: int  # group_size * head_dim
    ranks: list[int]  # rank grid
    variants: list  # [[bits, quant_group], ...] latent widths and scale groups priced
    cost: list  # [layer][kind][rank index][bits index]: predicted loss increase (Fisher-weighted error)
    probe: dict = field(default_factory=dict)
    seconds: float = 0.0

    def predicted(self) -> np.ndarray:
        """Predicted loss increase, array [layer, kind (K, V), rank index, bits index]."""
        return np.asarray(self.cost, dtype=np.float64)

    def option_bytes(self, rank: int, bits: int, quant_group: int = 0) -> int:
        vb, ns = latent_part_bytes(self.groups, rank, f"int{bits}", quant_group)
        return vb + 2 * ns

    def variant(self, bits: int, quant_group: int) -> int:
        return [list(v) for v in self.variants].index([bits, quant_group])


@dataclass
class Allocation:
    ranks_k: list[int]
    ranks_v: list[int]
    bits_k: int
    bits_v: int
    quant_group: int  # 0: one scale per token, head group and K/V; else values per scale
    bytes_per_token: int  # all layers, scales included
    budget_bytes: int
    predicted_kl: float  # summed predicted loss increase (Fisher-weighted error), arbitrary but additive units
    measured_rise_pct: float | None = None  # on the calibration slice (quality mode)

    def compression(self, base):
        """The deployment settings of this allocation (explicit per-layer ranks, K/V latent widths) on top of
        ``base`` (a CompressionConfig of an allocatable method)."""
        d = base.model_dump()
        d.update(ranks={"k": list(self.ranks_k), "v": list(self.ranks_v)},
                 latent_dtype=f"int{self.bits_k}", latent_dtype_k=f"int{self.bits_k}",
                 latent_dtype_v=f"int{self.bits_v}", quant_group=self.quant_group)
        return base.model_validate(d)


# ----------------------------------------------------------------------------------------------- allocation
def _knapsack(costs: np.ndarray, sizes: np.ndarray, budget: int):
    """Multiple-choice knapsack: one option per item. costs, sizes [items, options] -> (choice [items], cost).

    Exact dynamic programme over integer sizes (bytes); None when even the smallest options do not fit."""
    n_items, _ = costs.shape
    if int(sizes.min(axis=1).sum()) > budget:
        return None, math.inf
    inf = np.inf
    best = np.zeros(budget + 1)  # best[b]: min cost of the items so far using at most b bytes
    choice = np.zeros((n_items, budget + 1), dtype=np.int16)
    for i in range(n_items):
        new = np.full(budget + 1, inf)
        for o in range(costs.shape[1]):
            s = int(sizes[i, o])
            if s > budget:
                continue
            cand = np.full(budget + 1, inf)
            cand[s:] = best[: budget + 1 - s] + costs[i, o]
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = o
        best = new
    b = budget
    picks = []
    total = best[b]
    for i in range(n_items - 1, -1, -1):
        o = int(choice[i, b])
        picks.append(o)
        b -= int(sizes[i, o])
    return picks[::-1], float(total)


def allocate_budget(sens: Sensitivity, budget_bytes: int, bits_menu=BITS_MENU, groups_menu=None,
                    top: int = 1):
    """Least predicted loss for at most ``budget_bytes`` per token (all layers, scales included).

    One (K bits, V bits, scale group) for the whole model, every layer's K and V rank chosen by an exact
    knapsack; ``top`` > 1 returns the best ``top`` allocations (one per width combination), best first."""
    pred = sens.predicted()
    L = sens.num_layers
    if groups_menu is None:
        groups_menu = sorted({int(v[1]) for v in sens.variants})
    found = []
    for qg in groups_menu:
        for bk in bits_menu:
            for bv in bits_menu:
                try:
                    vi = {b: sens.variant(b, qg) for b in (bk, bv)}
                except ValueError:  # not priced
                    continue
                costs, sizes = [], []
                for layer in range(L):
                    for kind, b in ((0, bk), (1, bv)):
                        costs.append(pred[layer, kind, :, vi[b]])
                        sizes.append([sens.option_bytes(r, b, qg) for r in sens.ranks])
                picks, total = _knapsack(np.asarray(costs), np.asarray(sizes), budget_bytes)
                if picks is None:
                    continue
                rk = [sens.ranks[picks[2 * i]] for i in range(L)]
                rv = [sens.ranks[picks[2 * i + 1]] for i in range(L)]
                used = sum(sens.option_bytes(r, bk, qg) for r in rk) + sum(sens.option_bytes(r, bv, qg) for r in rv)
                assert used <= budget_bytes
                found.append(Allocation(rk, rv, bk, bv, qg, used, budget_bytes, total))
    if not found:
        raise ValueError(f"budget {budget_bytes} B/token is below the smallest option of every layer")
    found.sort(key=lambda a: a.predicted_kl)
    return found[0] if top == 1 else found[:top]


# ---------------------------------------------------------------------------------------------- measurement
def _kl(base_logp: torch.Tensor, logits: torch.Tensor) -> float:
    lp = torch.log_softmax(logits.float(), -1)
    return float((base_logp.exp() * (base_logp - lp)).sum(-1).mean())


class _Probe:
    """The calibration slice, and the model's perplexity on it with whatever hooks are installed."""

    def __init__(self, model, chunks: list[list[int]]):
        self.model = model
        self.ids = [torch.tensor([c]) for c in chunks]

    @torch.no_grad()
    def ppl_full(self) -> float:
        nll, n = 0.0, 0
        for ids in self.ids:
            lp = torch.log_softmax(self.model(ids, use_cache=False).logits[0, :-1].float(), -1)
            nll -= lp.gather(1, ids[0, 1:, None]).sum().item()
            n += ids.shape[1] - 1
        return math.exp(nll / n)


def _replace_hook(proj, a: torch.Tensor, b: torch.Tensor, dtype: str | None, quant_group: int = 0):
    """Forward hook: proj output := roundtrip(x A) B per head group (dtype None: float latents)."""
    from vllm_kvc.layout import roundtrip

    groups = b.shape[0]

    def hook(mod, args, out):
        x = args[0].float()
        c = x @ a
        c = c.reshape(*c.shape[:-1], groups, -1)
        if dtype is not None:
            c = roundtrip(c, dtype, quant_group)
        y = torch.einsum("...gr,grd->...gd", c, b).reshape(*x.shape[:-1], -1)
        if mod.bias is not None:
            y = y + mod.bias.float()
        return y.to(out.dtype)

    return proj.register_forward_hook(hook)


def _factors(w, gs, hd, rank, cov, rotate=True):
    from vllm_kvc.factorize import group_factors

    a, b = group_factors(w, gs, hd, rank, cov, rotate)
    return a.float(), b.float()


def _fisher_key(model_dir: str, cfg, probe: dict) -> str:
    """Key of the Fisher weights and recorded inputs (independent of the latent quantizer)."""
    return cache_key(ALLOC_FORMAT, checkpoint_fingerprint(model_dir), cfg.calibration.model_dump(), cfg.factorization,
                cfg.group_size, probe)


def sensitivity_key(model_dir: str, cfg, probe: dict) -> str:
    """Key of sensitivities and allocations: the Fisher key plus the int4/int2 quantizer version (layout.py)."""
    from vllm_kvc.layout import QUANT_VERSION

    return cache_key(_fisher_key(model_dir, cfg, probe), "quant", QUANT_VERSION)


def _cached(path: Path, cls):
    """A cached Sensitivity / Allocation, or None (missing, or not a whole record of ``cls``: removed)."""
    d = cached_json(path)
    if d is None:
        return None
    try:
        return cls(**d)
    except TypeError as e:
        discard(path, f"not a {cls.__name__} record ({e})")
        return None


def _alloc_dir() -> Path:
    d = cache_root() / "alloc"
    d.mkdir(parents=True, exist_ok=True)
    return d


DEFAULT_PROBE = {"tokens": 2048, "seq_len": 512, "rank_step": 8, "error_stride": 2}


def _covariances(model_dir: str, cfg, model, tok):
    from vllm_kvc.calibrate import covariances

    return covariances(model_dir, cfg.calibration, model, tok) if cfg.factorization == "whitened" else None


class _Context:
    """Model, calibration slice and covariances, loaded once per process."""

    def __init__(self, model_dir: str, cfg, probe: dict):
        from vllm_kvc.corpus import load_text, token_chunks

        self.model_dir, self.cfg, self.probe_cfg = model_dir, cfg, probe
        self.tok, self.model = load_hf_model(model_dir, dtype=torch.float32, device="cpu")
        self.covs = _covariances(model_dir, cfg, self.model, self.tok)
        text = load_text(cfg.calibration.corpus, "calibration")
        # the slice comes from the end of the calibration text: not the tokens the covariances saw first
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        n, sl = probe["tokens"], probe["seq_len"]
        tail = ids[-(n // sl * sl):]
        chunks = [tail[i:i + sl] for i in range(0, len(tail), sl)]
        self.probe = _Probe(self.model, chunks)
        mc = self.model.config
        self.hd = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        self.gs = cfg.group_size
        self.base_ppl = self.probe.ppl_full()

    def projs(self, i):
        a = self.model.model.layers[i].self_attn
        return a.k_proj, a.v_proj

    def install(self, ranks_k, ranks_v, bits_k, bits_v, quant_group) -> list:
        hs = []
        for i in range(len(self.model.model.layers)):
            cov = self.covs[i] if self.covs is not None else None
            for proj, r, b in zip(self.projs(i), (ranks_k[i], ranks_v[i]), (bits_k, bits_v)):
                a, bb = _factors(proj.weight.detach().float(), self.gs, self.hd, r, cov, True)
                hs.append(_replace_hook(proj, a, bb, f"int{b}", quant_group))
        return hs

    def measured_rise_pct(self, alloc: Allocation) -> float:
        hs = self.install(alloc.ranks_k, alloc.ranks_v, alloc.bits_k, alloc.bits_v, alloc.quant_group)
        try:
            return 100.0 * (self.probe.ppl_full() / self.base_ppl - 1.0)
        finally:
            for h in hs:
                h.remove()


_CTX: dict = {}


def _context(model_dir, cfg, probe) -> _Context:
    key = sensitivity_key(model_dir, cfg, probe)
    if key not in _CTX:
        _CTX.clear()
        _CTX[key] = _Context(model_dir, cfg, probe)
    return _CTX[key]


def _fisher(ctx, probe: dict, path: Path):
    """Per layer: ([K Fisher weights [T, out], V ...], K/V projection inputs [T, hidden]); cached on disk."""
    model, L = ctx.model, len(ctx.model.model.layers)
    t = cached_tensors(path)
    if t is not None:
        return [[t[f"{i}.fk"], t[f"{i}.fv"]] for i in range(L)], [t[f"{i}.x"] for i in range(L)]
    fisher = [[None, None] for _ in range(L)]
    xs = [[] for _ in range(L)]
    outs = []
    handles = []
    for i in range(L):
        for kind, proj in enumerate(ctx.projs(i)):
            def fwd(mod, args, out, i=i, kind=kind):
                out.retain_grad()
                outs.append((i, kind, out))
                if kind == 0:
                    xs[i].append(args[0][0].detach().float()[:: probe["error_stride"]])
            handles.append(proj.register_forward_hook(fwd))
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for ids in ctx.probe.ids:
            outs.clear()
            with torch.enable_grad():
                emb = model.model.embed_tokens(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=emb, use_cache=False).logits[0, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
                loss.backward()
            for i, kind, out in outs:
                g2 = (out.grad[0].float() ** 2)[:: probe["error_stride"]]
                fisher[i][kind] = g2 if fisher[i][kind] is None else torch.cat([fisher[i][kind], g2])
            outs.clear()
    finally:
        for h in handles:
            h.remove()
    xs = [torch.cat(x) for x in xs]
    save_tensors_atomic({**{f"{i}.fk": fisher[i][0].contiguous() for i in range(L)},
                         **{f"{i}.fv": fisher[i][1].contiguous() for i in range(L)},
                         **{f"{i}.x": xs[i].contiguous() for i in range(L)}}, path)
    return fisher, xs


def measure_sensitivity(model_dir: str, cfg, probe: dict | None = None,
                        refresh: bool = False) -> Sensitivity:
    """Measure (or load from the cache) the sensitivity table of this checkpoint, calibration and settings.

    One forward + backward pass over the calibration slice gives, for every layer's K and V projection output
    y, the gradient g of the summed next-token loss; the (diagonal, empirical) Fisher weight of an output
    error is g**2. Every option's output error on the recorded inputs, dy = (truncation to rank r) + (latent
    rounding to b bits, rotated factors exactly as deployed), is computed exactly and weighted:
    cost = sum_t,d g_td**2 dy_td**2, the second-order estimate of the loss increase (up to a factor 1/2)."""
    from vllm_kvc.factorize import rotation
    from vllm_kvc.layout import roundtrip

    probe = {**DEFAULT_PROBE, **(probe or {})}
    path = _alloc_dir() / f"sens-{sensitivity_key(model_dir, cfg, probe)}.json"
    with file_lock(path):
        sens = None if refresh else _cached(path, Sensitivity)
        if sens is not None:
            return sens
        t0 = time.time()
        ctx = _context(model_dir, cfg, probe)
        L = len(ctx.model.model.layers)
        gs, hd = ctx.gs, ctx.hd
        full = gs * hd
        step = probe["rank_step"]
        ranks = sorted(set(list(range(step, full + 1, step)) + [full]))
        variants = [[8, 0], [4, 0], [2, 0], [8, 32], [4, 32], [2, 32]]
        fisher, xs = _fisher(ctx, probe, _alloc_dir() / f"sens-{_fisher_key(model_dir, cfg, probe)}.fisher.safetensors")
        log.info("allocator: Fisher weights from %d calibration tokens (%.0f s)",
                 sum(int(i.shape[1]) for i in ctx.probe.ids), time.time() - t0)
        cost = []
        for i in progress(range(L), "allocator: sensitivity", unit="layer"):
            x = xs[i]  # [T, hidden]
            cov = ctx.covs[i] if ctx.covs is not None else None
            per_kind = []
            for kind, proj in enumerate(ctx.projs(i)):
                w = proj.weight.detach().float()
                groups = w.shape[0] // full
                f2 = fisher[i][kind]  # [T, groups*full]
                a_full, b_full = _factors(w, gs, hd, full, cov, rotate=False)
                y = x @ w.t()
                t_cost = np.zeros(len(ranks))
                q_cost = np.zeros((len(ranks), len(variants)))
                for g in range(groups):
                    sl = slice(g * full, (g + 1) * full)
                    f2g, bg = f2[:, sl], b_full[g]  # [T, gdim], [full, gdim]
                    c = x @ a_full[:, g * full:(g + 1) * full]  # unrotated latent, all ranks
                    # truncation error of every rank: dy(r) = c[:, :r] B[:r] - y, built from the top down
                    dy = c @ bg - y[:, sl]  # full rank: numerical error only
                    errs = {}
                    for r in range(full, 0, -1):
                        if r in ranks:
                            errs[r] = float((f2g * dy ** 2).sum())
                        dy = dy - c[:, r - 1: r] @ bg[r - 1: r]
                    t_cost += np.array([errs[r] for r in ranks])
                    # rounding of the rotated rank-r latent: noise spread evenly over the rotated coordinates
                    # (what the rotation is for), mapped through B_r: per token, variance sigma_t^2 in each of
                    # the r directions of B_r's rows -> cost sum_t sigma_t^2 sum_d f2_td sum_j<r B_jd^2
                    colnorm = torch.cumsum(bg ** 2, dim=0)  # [full, gdim]: row r-1 = sum_{j<r} B_jd^2
                    for ri, r in enumerate(ranks):
                        cr = c[:, :r] @ rotation(r, seed=g).float()
                        wt = f2g @ colnorm[r - 1]  # [T]
                        for bi, (b, qg) in enumerate(variants):
                            sig2 = ((roundtrip(cr[:, None, :], f"int{b}", qg)[:, 0] - cr) ** 2).mean(-1)
                            q_cost[ri, bi] += float((sig2 * wt).sum())
                table = (t_cost[:, None] + q_cost).tolist()
                per_kind.append(table)
            cost.append(per_kind)
            if (i + 1) % 5 == 0 or i == 0:
                c = np.asarray(cost[-1])
                log.info("allocator: sensitivity layer %d/%d: K int8 r=%d %.3g r=%d %.3g | V int8 r=%d %.3g "
                         "r=%d %.3g (%.0f s)", i + 1, L, ranks[-1], c[0, -1, 0], ranks[len(ranks) // 2],
                         c[0, len(ranks) // 2, 0], ranks[-1], c[1, -1, 0], ranks[len(ranks) // 2],
                         c[1, len(ranks) // 2, 0], time.time() - t0)
        sens = Sensitivity(L, groups, full, ranks, variants, cost, probe, time.time() - t0)
        write_text_atomic(json.dumps(asdict(sens)), path)
        return sens


def allocate_quality(model_dir: str, cfg, max_rise_pct: float, baseline_bytes: int,
                     probe: dict | None = None, lo_frac: float = 0.08, hi_frac: float = 0.55,
                     iters: int = 7) -> Allocation:
    """Smallest budget (bisection on the byte fraction) whose allocation's measured perplexity rise on the
    calibration slice is <= max_rise_pct. Cached."""
    probe = {**DEFAULT_PROBE, **(probe or {})}
    key = sensitivity_key(model_dir, cfg, probe)
    path = _alloc_dir() / f"quality-{key}-{max_rise_pct:g}-{baseline_bytes}-{lo_frac:g}-{hi_frac:g}-{iters}.json"
    if (done := _cached(path, Allocation)) is not None:
        return done
    sens = measure_sensitivity(model_dir, cfg, probe)
    ctx = _context(model_dir, cfg, probe)
    lo, hi = lo_frac, hi_frac

    def measured(frac):
        cands = allocate_budget(sens, int(frac * baseline_bytes), top=2)
        for a in cands:
            a.measured_rise_pct = ctx.measured_rise_pct(a)
        a = min(cands, key=lambda a: a.measured_rise_pct)
        log.info("allocator: quality mode, %.3f of bf16 -> calibration rise %+.2f%% (K int%d V int%d group %d)",
                 frac, a.measured_rise_pct, a.bits_k, a.bits_v, a.quant_group)
        return a

    best = measured(hi)
    if best.measured_rise_pct > max_rise_pct:
        raise ValueError(f"even {hi:.2f} of the bf16 bytes rises {best.measured_rise_pct:.2f}% on calibration text")
    for _ in range(iters):
        mid = (lo + hi) / 2
        try:
            a = measured(mid)
        except ValueError:
            lo = mid
            continue
        if a.measured_rise_pct <= max_rise_pct:
            hi, best = mid, a
        else:
            lo = mid
    write_text_atomic(json.dumps(asdict(best)), path)
    return best


def allocate_for_budget(model_dir: str, cfg, fraction: float, baseline_bytes: int,
                        probe: dict | None = None, verify: int = 3) -> Allocation:
    """Memory-budget mode: at most ``fraction`` of the bf16 KV bytes per token (scales included).

    The ``verify`` best width combinations by predicted loss are measured (perplexity on the calibration
    slice, all layers replaced) and the best measured one is kept. Cached."""
    probe = {**DEFAULT_PROBE, **(probe or {})}
    budget = int(math.floor(fraction * baseline_bytes))
    path = _alloc_dir() / f"budget-{sensitivity_key(model_dir, cfg, probe)}-{budget}-{verify}.json"
    if (done := _cached(path, Allocation)) is not None:
        return done
    sens = measure_sensitivity(model_dir, cfg, probe)
    cands = allocate_budget(sens, budget, top=max(1, verify))
    if verify > 0:
        ctx = _context(model_dir, cfg, probe)
        for a in cands:
            a.measured_rise_pct = ctx.measured_rise_pct(a)
            log.info("allocator: %.3f of bf16, K int%d V int%d group %d: predicted %.3g, calibration rise %+.2f%%",
                     fraction, a.bits_k, a.bits_v, a.quant_group, a.predicted_kl, a.measured_rise_pct)
        cands.sort(key=lambda a: a.measured_rise_pct)
    best = cands[0]
    write_text_atomic(json.dumps(asdict(best)), path)
    return best
