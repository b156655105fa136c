"""Quality per byte below 15% of the bf16 KV bytes (issue 16, item 3): research harness, HF emulation on CPU.

For each byte budget (fraction of the bf16 KV bytes per token, scales included) and each method, builds every
layer's compressed K/V in plain transformers (forward hooks on k_proj / v_proj, or on the keys after RoPE) and
measures perplexity on held-out text (the built-in ``heldout`` corpus: never used for calibration or allocation)
and on the ``eval`` corpus, plus the calibration probe slice the allocator sees.

Methods (``--methods``; a method name may end in ``:k`` or ``:v``: the allocation is made for both parts as
usual, then only that part is installed and the other stays exact; the bytes reported are the whole
allocation's, the rise is that part's share):

- ``alloc``: the project's allocator (``allocate.allocate_for_budget``: one rank per layer and K/V, one width
  per model, int8/int4), installed exactly as its calibration check does (``allocate._Context.install``).
- ``wf``: transform coding, reverse water-filling of bits per latent coordinate of the whitened full-rank
  factors (``bitalloc.allocate_segments``), coordinates weighted by the allocator's Fisher weights projected
  through each coordinate's reconstruction row.
- ``wfq``: ``wf`` in score space: key factors in the metric of the query energy averaged over RoPE angles
  (``bitalloc.rope_pair_weights`` of diag(W_q C W_q^T), summed over the query heads of each KV head), value
  factors in the metric of o_proj (sum over the query heads of W_o,h^T W_o,h).
- ``wfr``: keys after RoPE, KLT of the roped keys in the metric of the roped queries' second moment (per KV head,
  summed over its query heads), from calibration statistics; values as in ``wfq``.
- suffixes (any order, after the base name): ``-mse`` (no Fisher weights: raw metric variances), ``-layer``
  (one Fisher weight per row part instead of per coordinate), ``-no3`` (menu 8/4/2), ``-u32`` / ``-u8``
  (segment unit), ``-sg0`` (one scale per segment instead of per 32 values), ``-sink`` (the first token of
  every sequence is kept exact, as one bf16 row per sequence outside the per-token bytes, and left out of the
  Fisher weights and of the calibration covariances: ``Bench.sink_covs``).

Command line (``--corpora``: ``heldout``, ``eval``, ``probe``, each optionally ``NAME:TOKENS``)::

    .venv/bin/python benchmarks/frontier.py --budgets 0.2 0.15 0.125 --methods alloc wf wfq wfr \
        [--tokens 4096] [--seq-len 1024] [--corpora heldout:2048 eval:1024 probe] [--threads 2] \
        [--json benchmarks/results/frontier.json]

The run of benchmarks/RESULTS.md ("Below 15%"), with the recommended scheme ``wf-u8-sg0-sink``::

    .venv/bin/python benchmarks/frontier.py --budgets 0.15 0.125 0.2 --methods wf-u8-sg0-sink alloc \
        --corpora heldout:1024 eval:1024 --threads 2 --json benchmarks/results/frontier.json

Bytes per token: ``alloc`` as the plan counts them (``Sensitivity.option_bytes``); segment methods by
``bitalloc.part_bytes`` (packed values + 2 bytes per fp16 scale), summed over 30 layers x K/V, divided by
30 x 2 x 192 x 2 B (bf16 K and V).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_kvc import bitalloc  # noqa: E402


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, config: str, tokens: int, seq_len: int, corpora):
        from vllm_kvc.allocate import DEFAULT_PROBE, _alloc_dir, _context, _fisher, _fisher_key
        from vllm_kvc.corpus import load_text, token_chunks
        from vllm_kvc.config import CompressionConfig
        from vllm_kvc.methods import build_plan
        from vllm_kvc.validate import check_file

        c = check_file(config, check_engine=False)
        self.model_dir = c.model_dir
        self.cfg = c.deployment.compression or CompressionConfig(group_size=c.shape.num_kv_heads)
        self.base_bytes = build_plan(self.cfg, c.shape).baseline_bytes_per_token()
        self.probe_cfg = dict(DEFAULT_PROBE)
        self.ctx = _context(self.model_dir, self.cfg, self.probe_cfg)
        self.model, self.tok = self.ctx.model, self.ctx.tok
        self.L = len(self.model.model.layers)
        self.fisher, self.xs = _fisher(self.ctx, self.probe_cfg,
                                       _alloc_dir() / f"sens-{_fisher_key(self.model_dir, self.cfg, self.probe_cfg)}"
                                                      ".fisher.safetensors")
        self.chunks = {}
        for name in corpora:
            name, _, n = name.partition(":")  # 'heldout:2048': that corpus's own token count
            if name == "probe":
                self.chunks[name] = [ids[0].tolist() for ids in self.ctx.probe.ids]
            else:
                self.chunks[name] = token_chunks(self.tok, load_text(name), int(n or tokens), seq_len)
        self.base = {k: self.ppl(v) for k, v in self.chunks.items()}
        log(f"baseline ppl {self.base}; bf16 bytes/token {self.base_bytes}")
        self._rope = None

    # ------------------------------------------------------------------ measurement
    def ppl(self, chunks):
        from vllm_kvc.emulate import perplexity

        return perplexity(self.model, chunks)

    def measure(self, install):
        undo = install()
        try:
            return {k: 100.0 * (self.ppl(v) / self.base[k] - 1.0) for k, v in self.chunks.items()}
        finally:
            for u in undo:
                u()

    # ------------------------------------------------------------------ statistics
    def attn(self, i):
        return self.model.model.layers[i].self_attn

    def q_heads(self):
        mc = self.model.config
        return mc.num_attention_heads, mc.num_key_value_heads, self.ctx.hd

    def metric_k_pre(self, i):
        """Diagonal score-space metric of pre-RoPE keys: query energy per rotary pair, summed per KV head."""
        nq, nkv, hd = self.q_heads()
        wq = self.attn(i).q_proj.weight.detach().double()
        cov = self.ctx.covs[i].double()
        qe = torch.einsum("oh,hk,ok->o", wq, cov, wq).reshape(nq, hd)
        qe = bitalloc.rope_pair_weights(qe).reshape(nkv, nq // nkv, hd).sum(1)
        return torch.diag(qe.reshape(-1))

    def metric_v(self, i):
        nq, nkv, hd = self.q_heads()
        wo = self.attn(i).o_proj.weight.detach().double()  # [hidden, nq*hd]
        m = torch.zeros(nkv * hd, nkv * hd, dtype=torch.float64)
        rep = nq // nkv
        for j in range(nq):
            h = j // rep
            blk = wo[:, j * hd:(j + 1) * hd]
            m[h * hd:(h + 1) * hd, h * hd:(h + 1) * hd] += blk.t() @ blk
        return m

    def rope_stats(self):
        """Per layer, from the calibration probe slice (forward only): second moment of the roped keys
        [192, 192], and the roped queries' second moment per KV head (block diagonal, summed over its query
        heads). Fisher weights of roped keys are approximated from the pre-RoPE ones (RoPE rotates each pair
        of coordinates by a position-dependent angle: the pair-averaged squared gradient is kept)."""
        if self._rope is not None:
            return self._rope
        import transformers.models.llama.modeling_llama as ml

        nq, nkv, hd = self.q_heads()
        L = self.L
        kk = [torch.zeros(nkv * hd, nkv * hd, dtype=torch.float64) for _ in range(L)]
        qm = [torch.zeros(nkv * hd, nkv * hd, dtype=torch.float64) for _ in range(L)]
        count = [0]
        cur = {"i": 0}
        orig = ml.apply_rotary_pos_emb
        rep = nq // nkv

        def patched(q, k, cos, sin, *a, **kw):
            qr, kr = orig(q, k, cos, sin, *a, **kw)
            i = cur["i"]
            kf = kr.double().transpose(1, 2).reshape(-1, nkv * hd)
            kk[i] += kf.t() @ kf
            qf = qr.double().transpose(1, 2).reshape(-1, nq, hd)
            for h in range(nkv):
                qh = qf[:, h * rep:(h + 1) * rep].reshape(-1, hd)
                qm[i][h * hd:(h + 1) * hd, h * hd:(h + 1) * hd] += qh.t() @ qh
            if i == 0:
                count[0] += kf.shape[0]
            return qr, kr

        hooks = [self.attn(i).register_forward_pre_hook(lambda m, a, i=i: cur.__setitem__("i", i))
                 for i in range(L)]
        ml.apply_rotary_pos_emb = patched
        try:
            with torch.no_grad():
                for ids in self.ctx.probe.ids:
                    self.model(ids, use_cache=False)
        finally:
            ml.apply_rotary_pos_emb = orig
            for h in hooks:
                h.remove()
        n = count[0]
        g2 = []
        for i in range(L):
            f = self.fisher[i][0].double().mean(0).reshape(nkv, hd)
            g2.append(bitalloc.rope_pair_weights(f).reshape(1, -1))
        self._rope = ([k / n for k in kk], [q / n for q in qm], g2)
        return self._rope

    # ------------------------------------------------------------------ methods
    def alloc_install(self, frac, only):
        from vllm_kvc.allocate import allocate_for_budget

        a = allocate_for_budget(self.model_dir, self.cfg, frac, self.base_bytes, self.probe_cfg)
        full = self.ctx.gs * self.ctx.hd
        rk = a.ranks_k if only != "v" else [full] * self.L
        rv = a.ranks_v if only != "k" else [full] * self.L
        bk = a.bits_k if only != "v" else 8
        bv = a.bits_v if only != "k" else 8
        info = {"ranks_k": a.ranks_k, "ranks_v": a.ranks_v, "bits_k": a.bits_k, "bits_v": a.bits_v,
                "quant_group": a.quant_group, "bytes_per_token": a.bytes_per_token,
                "calibration_rise_pct": a.measured_rise_pct}

        def install():
            hs = self.ctx.install(rk, rv, bk, bv, a.quant_group)
            return [h.remove for h in hs]

        return install, a.bytes_per_token, info

    def sink_covs(self):
        """The calibration covariances without the first token of each calibration chunk. Under causal
        attention a chunk's first position depends on its first token id alone, so its K/V projection input is
        recomputed from that one token and its outer product subtracted from the cached sums."""
        if getattr(self, "_sink_covs", None) is not None:
            return self._sink_covs
        from vllm_kvc.corpus import load_text, token_chunks

        calib = self.cfg.calibration
        chunks = token_chunks(self.tok, load_text(calib.corpus, "calibration"), calib.tokens, calib.seq_len)
        count = sum(len(c) for c in chunks)
        sums = [self.ctx.covs[i].double() * count for i in range(self.L)]
        hooks = []
        for i in range(self.L):
            def pre(mod, args, i=i):
                x0 = args[0][0, 0].double()
                sums[i] -= torch.outer(x0, x0)
            hooks.append(self.attn(i).k_proj.register_forward_pre_hook(pre))
        try:
            with torch.no_grad():
                for c in chunks:
                    self.model(torch.tensor([c[:1]]), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        self._sink_covs = [sm / (count - len(chunks)) for sm in sums]
        return self._sink_covs

    def items(self, base: str, weighting: str, sink: bool = False):
        """Per layer and kind: (encoder, decoder, weighted variances, where) with coordinates not yet sorted;
        where: 'pre' (k_proj / v_proj input) or 'post' (roped keys)."""
        out = []
        for i in range(self.L):
            at = self.attn(i)
            cov = self.sink_covs()[i] if sink else self.ctx.covs[i]
            for kind, proj in ((0, at.k_proj), (1, at.v_proj)):
                w = proj.weight.detach().double()
                f2 = self.fisher[i][kind].double()
                if sink:  # the first token of every probe chunk is kept exact: leave its weights out
                    per = f2.shape[0] // len(self.ctx.probe.ids)
                    keep = torch.ones(f2.shape[0], dtype=torch.bool)
                    keep[::per] = False
                    f2 = f2[keep]
                where = "pre"
                if base == "wf":
                    a, b, s2 = bitalloc.metric_factors(w, cov)
                elif kind == 1:
                    a, b, s2 = bitalloc.metric_factors(w, cov, self.metric_v(i))
                elif base == "wfq":
                    a, b, s2 = bitalloc.metric_factors(w, cov, self.metric_k_pre(i))
                else:  # wfr: roped keys
                    kk, qm, g2 = self.rope_stats()
                    a, b, s2 = bitalloc.pca_basis(kk[i], qm[i])
                    f2 = g2[i].double()
                    where = "post"
                # Fisher weight of latent coordinate j: mean_t sum_d f2_td b_jd^2
                wj = (f2.mean(0)[None, :] * b ** 2).sum(1)
                if weighting == "mse":
                    v = s2
                elif weighting == "layer":
                    v = s2 * float((s2 * wj).sum() / s2.sum().clamp_min(1e-30))
                else:
                    v = s2 * wj
                out.append((i, kind, a, b, v, where))
        return out

    def segment_install(self, method, frac, only):
        parts = method.split("-")
        base = parts[0]
        opts = set(parts[1:])
        weighting = "mse" if "mse" in opts else "layer" if "layer" in opts else "fisher"
        menu = (8, 4, 2) if "no3" in opts else (8, 4, 3, 2)
        unit = 32 if "u32" in opts else 8 if "u8" in opts else 16
        sg = 0 if "sg0" in opts else 32
        sink = "sink" in opts
        items = self.items(base, weighting, sink)
        budget = int(math.floor(frac * self.base_bytes))
        order = [torch.argsort(it[4], descending=True) for it in items]
        segs, used = bitalloc.allocate_segments([it[4][o] for it, o in zip(items, order)], budget, menu, unit, sg)
        codecs = {}
        summary = {}
        for it, o, s in zip(items, order, segs):
            i, kind, a, b, v, where = it
            summary[f"{i}.{'kv'[kind]}"] = bitalloc.describe(s)
            if only is None or kind == (0 if only == "k" else 1):  # ':k' / ':v': the other part stays exact
                codecs[(i, kind)] = (bitalloc.SegmentCodec(a[:, o], b[o], s), where, sink)
        info = {"segments": summary, "menu": list(menu), "unit": unit, "scale_group": sg,
                "predicted": sum(bitalloc.predicted_distortion(it[4][o], s) for it, o, s in zip(items, order, segs))}

        def install():
            return self._install_codecs(codecs)

        return install, used, info

    def _install_codecs(self, codecs):
        import transformers.models.llama.modeling_llama as ml

        undo = []
        nq, nkv, hd = self.q_heads()
        post = {i: (c, sink) for (i, kind), (c, where, sink) in codecs.items() if where == "post"}
        for (i, kind), (codec, where, sink) in codecs.items():
            if where != "pre":
                continue
            proj = self.attn(i).k_proj if kind == 0 else self.attn(i).v_proj

            def hook(mod, args, out, codec=codec, sink=sink):
                y = codec(args[0]).to(out.dtype)
                if sink:  # the sequence's first token stays exact (one bf16 row per sequence, not counted)
                    y[:, :1] = out[:, :1]
                return y

            undo.append(proj.register_forward_hook(hook).remove)
        if post:
            cur = {"i": 0}
            orig = ml.apply_rotary_pos_emb

            def patched(q, k, cos, sin, *a, **kw):
                qr, kr = orig(q, k, cos, sin, *a, **kw)
                if cur["i"] not in post:
                    return qr, kr
                c, sink = post[cur["i"]]
                b, h, t, d = kr.shape
                y = c(kr.transpose(1, 2).reshape(b, t, h * d)).reshape(b, t, h, d).transpose(1, 2).to(kr.dtype)
                if sink:
                    y[:, :, :1] = kr[:, :, :1]
                return qr, y

            for i in range(self.L):
                undo.append(self.attn(i).register_forward_pre_hook(
                    lambda m, a, i=i: cur.__setitem__("i", i)).remove)
            ml.apply_rotary_pos_emb = patched
            undo.append(lambda: setattr(ml, "apply_rotary_pos_emb", orig))
        return undo

    def run(self, method, frac):
        only = None
        name = method
        if ":" in method:
            name, only = method.split(":")
        t0 = time.time()
        if name == "alloc":
            install, used, info = self.alloc_install(frac, only)
        else:
            install, used, info = self.segment_install(name, frac, only)
        rise = self.measure(install)
        row = {"method": method, "budget": frac, "bytes_per_token": used, "fraction": used / self.base_bytes,
               **{f"rise_{k}": v for k, v in rise.items()}, "seconds": time.time() - t0, "info": info}
        log(f"{method:>16s} @ {frac:.3f}: {used / self.base_bytes:.4f} of bf16, "
            + ", ".join(f"{k} {v:+.2f}%" for k, v in rise.items()) + f" ({row['seconds']:.0f} s)")
        return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.15, 0.125])
    p.add_argument("--methods", nargs="+", default=["alloc", "wf", "wfq", "wfr"])
    p.add_argument("--tokens", type=int, default=4096, help="tokens of each corpus (chunks of --seq-len); "
                   "a corpus given as NAME:TOKENS has its own")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--corpora", nargs="+", default=["heldout", "eval", "probe"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the rows here (appended to an existing list)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    bench = Bench(a.config, a.tokens, a.seq_len, a.corpora)
    rows = []
    for frac in a.budgets:
        for m in a.methods:
            rows.append(bench.run(m, frac))
            if a.json:
                path = Path(a.json)
                old = json.loads(path.read_text()) if path.exists() else {"runs": []}
                old["runs"].append({"baseline_ppl": bench.base, "bf16_bytes": bench.base_bytes,
                                    "argv": sys.argv[1:], **rows[-1]})
                path.write_text(json.dumps(old, indent=1))
    print(f"{'method':>18s} {'budget':>7s} {'fraction':>8s} " + " ".join(f"{k:>9s}" for k in bench.chunks))
    for r in rows:
        print(f"{r['method']:>18s} {r['budget']:7.3f} {r['fraction']:8.4f} "
              + " ".join(f"{r['rise_' + k]:+8.2f}%" for k in bench.chunks))


if __name__ == "__main__":
    main()
