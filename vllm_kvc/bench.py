"""``vllm-kvc bench pareto``: KV memory vs perplexity for every method, all through vLLM, in one run.

For each method and memory point (about 50, 35, 25, 20, 15 % of the bf16 KV bytes, scales included) one vLLM
engine runs in a child process (``evaluate.run_engine``) over the same token chunks and the same KV budget;
the uncompressed baseline runs once. Each method contributes its points (``Method.bench_points``):

- ``kvc-alloc`` (ours): per-layer, per-K/V rank and latent width from measured sensitivity (allocate.py), at
  each memory point; ``kvc-alloc-q<X>``: the quality-budget mode (smallest memory whose calibration
  perplexity rise is <= X %);
- ``kvc-tcode`` (ours): method tcode at each memory point (bits per latent coordinate as segments, the first
  token of every sequence exact; ``vllm-kvc allocate --method tcode``);
- baselines: ``quant-int8/int4/int2`` (KIVI-style: K and V themselves, one fp16 scale per 32 values, full
  rank, through the same latent cache path), ``svd-whitened`` (uniform rank, int8 latents, rotated),
  ``svd-plain`` (uniform rank, plain SVD of the weights, int8 latents);
- ``lexico`` at each memory point and ``pod`` with a third, half and two thirds of the layers as followers;
- ``vllm-<dtype>``: vLLM 0.32's own KV cache formats (int8/int4_per_token_head, fp8, nvfp4, turboquant_*),
  emulated byte for byte through this plugin's cache path (method ``vllmfmt``; the CPU build runs none of them
  itself), with keys stored after RoPE as vLLM caches them;
- ``kivi-2`` / ``kivi-4``: KIVI as published (keys per channel, values per token, group 32, 128 full-precision
  recent tokens; method ``kivi``), its bytes per token counted at ``--seq-len`` tokens, residual included;
- ``deployment`` (only when named in ``--methods``): the config's own ``compression:`` setting.

With ``--retrieval N`` (default 9) every engine also answers N passkey-retrieval prompts (``retrieval.py``:
a 5-7 digit number hidden in eval-corpus prose at 10/50/90 % depth of 1k/4k/7k-token prompts, greedy); the
baseline and every point report ``retrieval_acc``. ``--retrieval 0`` skips it.

``dominance`` checks ``kvc-alloc`` against the baselines, ``dominance_by_method`` each of our methods; its
``vs_larger_memory`` applies issue 16's rule: every baseline at the same or a larger memory fraction has a
perplexity rise no lower and a retrieval accuracy no higher than ours.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

from vllm_kvc.artifacts import progress
from vllm_kvc.config import CompressionConfig
from vllm_kvc.methods import all_methods, build_plan, prepare

log = logging.getLogger("vllm_kvc")

POINTS = (0.50, 0.35, 0.25, 0.20, 0.15)
QUALITY_BUDGET_PCT = 3.0


def build_methods(base, shape, model_dir: str, points=POINTS, quality_pct: float | None = QUALITY_BUDGET_PCT,
                  include=None, seq_len: int = 1024) -> list[dict]:
    """[{method, is_baseline, target, compression[, allocation]}] in the order they run: every registered
    method's points (``Method.bench_points``; ``seq_len``: the perplexity chunks' length, where a format whose
    bytes per token depend on the sequence length counts them)."""
    out = []
    for m in all_methods():
        out += m.bench_points(base, shape, model_dir, points, include, quality_pct=quality_pct, seq_len=seq_len)
    return out


def _acc(p: dict) -> str:
    a = p.get("retrieval_acc")
    return "-" if a is None else f"{100 * a:.0f} ({round(a * p['retrieval_cases'])}/{p['retrieval_cases']})"


def _table(points: list[dict], base: dict) -> str:
    ret = base.get("retrieval_acc") is not None
    head = (f"baseline (bf16 KV, {base['kv_bytes_per_token']} B/token): ppl {base['ppl']:.3f}, "
            f"capacity {base['kv_capacity_tokens']} tokens" + (f", retrieval {_acc(base)} %" if ret else ""))
    lines = [head, "",
             "| method | baseline? | latent | K ranks (mean) | V ranks (mean) | B/token | memory % of bf16 | "
             "capacity tokens | ppl | rise % |" + (" retrieval % |" if ret else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if ret else "")]
    for p in sorted(points, key=lambda p: (p["is_baseline"], p["method"], -p["memory_fraction"])):
        lines.append(f"| {p['method']} | {'yes' if p['is_baseline'] else 'no (ours)'} | {p['latent_dtype']} | "
                     f"{p['rank_k_mean']:.1f} | {p['rank_v_mean']:.1f} | {p['kv_bytes_per_token']} | "
                     f"{100 * p['memory_fraction']:.1f} | {p['kv_capacity_tokens']} | {p['ppl']:.3f} | "
                     f"{p['ppl_rise_pct']:+.2f} |" + (f" {_acc(p)} |" if ret else ""))
    return "\n".join(lines)


def retrieval_lengths(max_model_len: int | None, lengths=None) -> tuple[int, ...]:
    """The retrieval prompt lengths that fit the engine's context (prompt plus the answer's tokens)."""
    from vllm_kvc.retrieval import LENGTHS, MAX_NEW_TOKENS

    lengths = tuple(lengths or LENGTHS)
    return tuple(n for n in lengths if max_model_len is None or n + MAX_NEW_TOKENS <= int(max_model_len))


def _retrieval_fields(res: dict) -> dict:
    if "retrieval_acc" not in res:
        return {}
    return {"retrieval_acc": res["retrieval_acc"], "retrieval_cases": len(res["retrieval"]),
            "retrieval_cells": res["retrieval_cells"], "retrieval_seconds": res["retrieval_seconds"],
            "retrieval": [{k: r[k] for k in ("length", "depth", "answer", "output", "correct")}
                          for r in res["retrieval"]]}


def _grid_point(frac: float, grid, tol: float = 0.005):
    """The memory point a setting buys: the largest grid point at or below its memory (0.5 pp tolerance)."""
    below = [g for g in grid if g <= frac + tol]
    return max(below) if below else None


def check_dominance(points: list[dict], ours: str = "kvc-alloc", grid=POINTS) -> dict:
    """Acceptance checks of ours against the baselines.

    ``holds`` / ``strict_points``: at every memory point of ours, its rise is <= that of every baseline at the
    same or larger memory that belongs to the same point (memory in [point, next point), 0.5 pp tolerance:
    e.g. int4 at 28% of bf16 is compared at the 25% point, int8 at 53% at the 50% point), strictly lower at
    ``strict_points`` points. ``undominated_baselines``: baseline settings that no point of ours beats outright
    (ours at <= memory and <= rise); ``dominated_ours``: our points some baseline beats outright."""
    res = {"holds": True, "strict_points": 0, "violations": [], "compared": []}
    bases = [p for p in points if p["is_baseline"]]
    mine = [p for p in points if p["method"] == ours]
    for p in mine:
        g = _grid_point(p["memory_fraction"], grid)
        peers = [b for b in bases if _grid_point(b["memory_fraction"], grid) == g
                 and b["memory_fraction"] >= p["memory_fraction"] - 0.005]
        if not peers:
            continue
        res["compared"].append({"point": g, "ours": round(p["ppl_rise_pct"], 3),
                                "baselines": [(b["method"], round(b["memory_fraction"], 4),
                                               round(b["ppl_rise_pct"], 3)) for b in peers]})
        if not all(p["ppl_rise_pct"] <= b["ppl_rise_pct"] for b in peers):
            res["holds"] = False
            res["violations"].append({"memory_fraction": p["memory_fraction"], "rise": p["ppl_rise_pct"],
                                      "beaten_by": [(b["method"], b["memory_fraction"], b["ppl_rise_pct"])
                                                    for b in peers if b["ppl_rise_pct"] < p["ppl_rise_pct"]]})
        elif all(p["ppl_rise_pct"] < b["ppl_rise_pct"] for b in peers):
            res["strict_points"] += 1
    # the issue-16 rule: every baseline at the same or larger memory (any grid point), perplexity and retrieval
    larger = {"holds": True, "violations": []}
    for p in mine:
        for bl in bases:
            if bl["memory_fraction"] < p["memory_fraction"] - 0.005:
                continue
            worse = [k for k, better in (("ppl_rise_pct", bl["ppl_rise_pct"] < p["ppl_rise_pct"]),
                                         ("retrieval_acc", bl.get("retrieval_acc", -1) > p.get("retrieval_acc", 1e9)))
                     if better]
            if worse:
                larger["holds"] = False
                larger["violations"].append({"ours": (round(p["memory_fraction"], 4), round(p["ppl_rise_pct"], 3),
                                                      p.get("retrieval_acc")),
                                             "baseline": (bl["method"], round(bl["memory_fraction"], 4),
                                                          round(bl["ppl_rise_pct"], 3), bl.get("retrieval_acc")),
                                             "worse_in": worse})
    res["vs_larger_memory"] = larger
    ours_all = [p for p in points if not p["is_baseline"]]
    res["undominated_baselines"] = [
        (b["method"], round(b["memory_fraction"], 4), round(b["ppl_rise_pct"], 3)) for b in bases
        if not any(o["memory_fraction"] <= b["memory_fraction"] + 1e-9 and o["ppl_rise_pct"] <= b["ppl_rise_pct"]
                   for o in ours_all)]
    res["dominated_ours"] = [
        (o["method"], round(o["memory_fraction"], 4), round(o["ppl_rise_pct"], 3)) for o in ours_all
        if any(b["memory_fraction"] <= o["memory_fraction"] + 1e-9 and b["ppl_rise_pct"] < o["ppl_rise_pct"]
               for b in bases)]
    return res


def plot(points: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    methods = []
    for p in points:
        if p["method"] not in methods:
            methods.append(p["method"])
    markers = "os^vD<>ph*"
    for i, m in enumerate(methods):
        ps = sorted([p for p in points if p["method"] == m], key=lambda p: p["memory_fraction"])
        xs = [100 * p["memory_fraction"] for p in ps]
        ys = [max(p["ppl_rise_pct"], 0.01) for p in ps]
        ours = not ps[0]["is_baseline"]
        ax.plot(xs, ys, marker=markers[i % len(markers)], lw=2.5 if ours else 1.2, ls="-" if ours else "--",
                label=m + (" (ours)" if ours else ""), ms=8 if ours else 6)
    ax.set_yscale("log")
    ax.set_xlabel("KV memory, % of bf16 (scales included)")
    ax.set_ylabel("perplexity rise, % (log scale)")
    ax.axhline(3.0, color="gray", lw=0.8, ls=":")
    ax.axvline(25.0, color="gray", lw=0.8, ls=":")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pareto(config_path: str, corpus: str = "default", tokens: int = 6144, seq_len: int = 1024,
           kv_space_gib: str = "1", include=None, points=POINTS, quality_pct: float | None = QUALITY_BUDGET_PCT,
           log_dir: Path | None = None, partial: Path | None = None, retrieval: int = 0,
           retrieval_lengths_: tuple[int, ...] | None = None) -> dict:
    """``retrieval``: number of passkey prompts each engine also answers (0: none); ``retrieval_lengths_``:
    their lengths in tokens (default ``retrieval.LENGTHS``, those that fit ``max_model_len``)."""
    from vllm_kvc.evaluate import engine_kwargs, eval_chunks, run_engine
    from vllm_kvc.validate import check_file, engine_dtype

    c = check_file(config_path)
    dep, model_dir = c.deployment, c.model_dir
    base_cfg = dep.compression or CompressionConfig(group_size=c.shape.num_kv_heads)
    shape = dataclasses.replace(c.shape, dtype=engine_dtype(dep, c.shape))
    dtype_bytes = 4 if shape.dtype == "float32" else 2
    t0 = time.time()
    methods = build_methods(base_cfg, shape, model_dir, points=points, quality_pct=quality_pct, include=include,
                            seq_len=seq_len)
    if include is not None and "deployment" in include and dep.compression is not None:
        methods.insert(0, {"method": "deployment", "is_baseline": False, "target": None,
                           "compression": dep.compression})
    log.info("pareto: %d settings planned (%.0f s of allocation)", len(methods), time.time() - t0)
    chunks = eval_chunks(model_dir, corpus, tokens, seq_len)
    cases = []
    if retrieval:
        from vllm_kvc.retrieval import load_cases

        lens = retrieval_lengths(dep.engine.get("max_model_len"), retrieval_lengths_)
        if lens:
            cases = [c.to_json() for c in load_cases(model_dir, corpus, retrieval, lengths=lens)]
            log.info("pareto: %d retrieval prompts, %s tokens", len(cases), "/".join(map(str, lens)))
        else:
            log.warning("pareto: no retrieval prompt length fits max_model_len %s: retrieval skipped",
                        dep.engine.get("max_model_len"))
    logs = log_dir or Path(tempfile.mkdtemp(prefix="vllm_kvc_pareto_"))
    logs.mkdir(parents=True, exist_ok=True)
    base_plan_bytes = build_plan(base_cfg, shape).baseline_bytes_per_token(dtype_bytes=dtype_bytes)
    base = run_engine(engine_kwargs(dep, model_dir, None), chunks, kv_space_gib, logs / "baseline.log",
                      retrieval=cases)
    base["kv_bytes_per_token"] = base_plan_bytes
    log.info("pareto: baseline ppl %.3f, capacity %d tokens%s", base["ppl"], base["kv_capacity_tokens"],
             f", retrieval {100 * base['retrieval_acc']:.0f} %" if cases else "")
    pts, failed = [], []
    for i, m in enumerate(progress(methods, "pareto", unit="point")):
        comp = m["compression"]
        log_file = logs / f"{i:02d}_{m['method']}.log"
        try:
            plan, _ = prepare(model_dir, comp, shape)
            res = run_engine(engine_kwargs(dep, model_dir, comp), chunks, kv_space_gib, log_file, retrieval=cases)
        except Exception as e:  # noqa: BLE001 (one failed point is reported, the others still run)
            failed.append({"method": m["method"], "target_fraction": m["target"], "log": str(log_file),
                           "error": f"{type(e).__name__}: {e}"[:2000], "compression": comp.model_dump(mode="json")})
            log.error("pareto: %s (target %s) failed: %s; log %s", m["method"], m["target"], e, log_file)
            continue
        frac = plan.counted_bytes_per_token(seq_len) / base_plan_bytes  # exact side rows at the chunk length
        ranks_k, ranks_v = plan.reported_ranks()
        p = {"method": m["method"], "is_baseline": m["is_baseline"], "memory_fraction": frac, "ppl": res["ppl"],
             "ppl_rise_pct": 100.0 * (res["ppl"] / base["ppl"] - 1.0),
             "kv_capacity_tokens": res["kv_capacity_tokens"], "target_fraction": m["target"],
             "kv_bytes_per_token": plan.bytes_per_token(), "sequence_bytes": plan.sequence_bytes(),
             "latent_dtype": plan.latent_dtype,
             "rank_k_mean": sum(ranks_k) / len(ranks_k), "rank_v_mean": sum(ranks_v) / len(ranks_v),
             "ranks_k": ranks_k, "ranks_v": ranks_v,
             "factorization": "identity" if getattr(plan, "identity", False) else comp.factorization,
             "seconds": res["seconds"], **_retrieval_fields(res)}
        if "allocation" in m and m["allocation"].get("measured_rise_pct") is not None:
            p["calibration_rise_pct"] = m["allocation"]["measured_rise_pct"]
        pts.append(p)
        if partial is not None:
            partial.write_text(json.dumps({"baseline": base, "points": pts}, indent=1))
        log.info("pareto: %-16s %5.1f%% of bf16  ppl %.3f (%+.2f%%)  capacity %d%s  [%d/%d]", p["method"],
                 100 * frac, p["ppl"], p["ppl_rise_pct"], p["kv_capacity_tokens"],
                 f"  retrieval {100 * p['retrieval_acc']:.0f} %" if cases else "", i + 1, len(methods))
    return {"model": dep.model, "config": config_path, "corpus": corpus, "tokens_evaluated": base["tokens_evaluated"],
            "baseline": {"ppl": base["ppl"], "kv_capacity_tokens": base["kv_capacity_tokens"],
                         "kv_bytes_per_token": base_plan_bytes, **_retrieval_fields(base)},
            "points": pts, "failures": failed, "dominance": check_dominance(pts),
            "dominance_by_method": {m: check_dominance(pts, m)
                                    for m in sorted({p["method"] for p in pts if not p["is_baseline"]})},
            "seconds": time.time() - t0}


def run_bench(args) -> int:
    if getattr(args, "bench", "pareto") != "pareto":
        raise SystemExit(f"unknown bench {args.bench!r}")
    include = getattr(args, "methods", None)
    res = pareto(args.config, corpus=args.corpus, tokens=args.tokens, seq_len=args.seq_len,
                 kv_space_gib=args.kv_space, include=include,
                 quality_pct=None if getattr(args, "no_quality", False) else QUALITY_BUDGET_PCT,
                 points=tuple(getattr(args, "points", None) or POINTS),
                 log_dir=Path(args.log_dir) if getattr(args, "log_dir", None) else None,
                 partial=Path(args.plot + ".partial.json") if args.plot else None,
                 retrieval=getattr(args, "retrieval", 0) or 0)
    if args.plot:
        title = f"{res['model']} KV memory vs perplexity rise through vLLM ({Path(res['corpus']).name})"
        plot(res["points"], args.plot, title)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(_table(res["points"], res["baseline"]))
        for m, d in res["dominance_by_method"].items():
            print(f"dominance of {m} over the baselines: {d}")
    return 0
