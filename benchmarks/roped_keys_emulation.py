"""Keys compressed after RoPE and scored in the latent (issue 14 item 5, MLA-style absorption), against today's
pre-RoPE whitened key factors, at the same rank and latent dtype: K only (values exact), plain transformers
(float32, CPU), SmolLM2 on held-out text. The first token's key stays exact in both (the sink).

Roped keys: per layer, the second moments of the roped keys (one head group: all KV heads jointly) and of the
roped queries (block-diagonal per KV head) on the calibration text, positions 1.. (``calibrate.roped_moments``),
then ``factorize.score_factors`` (rotated); ``emulate.install_roped_keys`` replaces each roped key by what its
latent scores as (``B c``, ``c = k A`` rounded to the latent dtype). Pre-RoPE: lowrank's factor file at
``ratio = rank / 192`` (configs/default.yaml otherwise), applied to k_proj's output.

    .venv/bin/python benchmarks/roped_keys_emulation.py [--ranks 192,144,120,96] [--dtypes fp32,int8,int4@g32] \
        [--tokens 2048] [--corpus heldout] [--code-first] [--skip-pre-rope]

Prints one JSON line per (kind, rank, dtype).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _round(c: torch.Tensor, spec: str) -> torch.Tensor:
    from vllm_kvc.layout import roundtrip
    from vllm_kvc.plan import parse_latent_spec

    if spec == "fp32":
        return c
    dt, _, qg = parse_latent_spec(spec)
    return roundtrip(c[..., None, :], dt, qg)[..., 0, :]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--ranks", default="192,144,120,96")
    ap.add_argument("--dtypes", default="fp32,int8,int4@g32")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--corpus", default="heldout")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-pre-rope", action="store_true")
    ap.add_argument("--segments", default="", help="comma-separated tcode-style K rows for roped keys, e.g. "
                                                   "'48x4+112x2,192x2': coordinates in the order of the score "
                                                   "factors' singular values, each segment rotated, one fp16 "
                                                   "scale per segment and token (instead of --ranks/--dtypes)")
    ap.add_argument("--code-first", action="store_true", help="code the first token's key too (what lowrank "
                                                             "serves; default: kept exact, as tcode's sink)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from safetensors.torch import load_file

    from vllm_kvc.artifacts import load_hf_model
    from vllm_kvc.calibrate import roped_moments
    from vllm_kvc.emulate import install_roped_keys, perplexity
    from vllm_kvc.evaluate import eval_chunks
    from vllm_kvc.factorize import score_factors
    from vllm_kvc.methods import get_method
    from vllm_kvc.validate import check_file

    c = check_file(a.config, check_engine=False)
    shp = c.shape
    tok, model = load_hf_model(c.model_dir)
    ck, cq = roped_moments(c.model_dir, c.deployment.compression.calibration, model, tok)
    chunks = eval_chunks(c.model_dir, a.corpus, a.tokens, 1024)
    with torch.no_grad():
        dense = perplexity(model, chunks)
    ranks = [int(r) for r in a.ranks.split(",")]
    dtypes = a.dtypes.split(",")
    full = shp.num_kv_heads * shp.head_dim

    def report(kind, rank, spec, ppl):
        print(json.dumps({"keys": kind, "rank": rank, "ratio": round(rank / full, 4), "latent": spec,
                          "corpus": a.corpus, "first_exact": not a.code_first, "tokens": sum(map(len, chunks)),
                          "dense_ppl": round(dense, 4), "ppl": round(ppl, 4),
                          "rise_pct": round(100 * (ppl / dense - 1), 2)}), flush=True)

    def install(factors, code_lat):
        def coder(fa, fb):
            def code(k):
                kh = code_lat(k @ fa) @ fb.t()
                if not a.code_first:
                    kh[..., :1, :] = k[..., :1, :]
                return kh
            return code
        return install_roped_keys(model, [coder(fa, fb) for fa, fb in factors])

    for text in filter(None, a.segments.split(",")):
        from vllm_kvc.bitalloc import roundtrip_bits
        from vllm_kvc.factorize import rotation
        from vllm_kvc.plan import parse_segments

        segs = parse_segments(text)
        width = sum(w for w, _ in segs)
        rots = torch.block_diag(*[rotation(w, seed=j) for j, (w, _) in enumerate(segs)])
        factors = []
        for i in range(len(model.model.layers)):
            fa, fb = score_factors(cq[i], ck[i], width)
            factors.append(((fa @ rots).float(), (fb @ rots).float()))

        def code_lat(lat, segs=segs):
            out, off = [], 0
            for w, bits in segs:
                out.append(roundtrip_bits(lat[..., off:off + w], bits, 0))
                off += w
            return torch.cat(out, -1)

        undo = install(factors, code_lat)
        try:
            with torch.no_grad():
                ppl = perplexity(model, chunks)
        finally:
            for u in undo:
                u()
        nbytes = sum(w * b // 8 for w, b in segs) + 2 * len(segs)
        print(json.dumps({"keys": "roped", "segments": text, "k_bytes_per_layer": nbytes, "corpus": a.corpus,
                          "first_exact": not a.code_first, "tokens": sum(map(len, chunks)),
                          "dense_ppl": round(dense, 4), "ppl": round(ppl, 4),
                          "rise_pct": round(100 * (ppl / dense - 1), 2)}), flush=True)
    if a.segments:
        return
    for rank in ranks:
        factors = [tuple(t.float() for t in score_factors(cq[i], ck[i], rank, rotate=True))
                   for i in range(len(model.model.layers))]
        for spec in dtypes:
            undo = install(factors, lambda lat, spec=spec: _round(lat, spec))
            try:
                with torch.no_grad():
                    report("roped", rank, spec, perplexity(model, chunks))
            finally:
                for u in undo:
                    u()
    if a.skip_pre_rope:
        return
    method = get_method("lowrank")
    base = c.deployment.compression
    for rank in ranks:
        comp = base.model_validate({**base.model_dump(), "method": "lowrank", "ratio": rank / full})
        _, path = method.prepare(c.model_dir, comp, shp)
        f = load_file(str(path))
        for spec in dtypes:
            hs = []
            for i, layer in enumerate(model.model.layers):
                fa, fb = f[f"{i}.a_k"].float(), f[f"{i}.b_k"].float()

                def hook(mod, args, out, fa=fa, fb=fb):
                    lat = _round((args[0].float() @ fa).reshape(*args[0].shape[:-1], fb.shape[0], -1)
                                 .flatten(-2), spec)
                    y = torch.einsum("...gr,grd->...gd", lat.reshape(*lat.shape[:-1], fb.shape[0], -1), fb)
                    y = y.reshape(out.shape).to(out.dtype)
                    if not a.code_first:
                        y[..., :1, :] = out[..., :1, :]
                    return y

                hs.append(layer.self_attn.k_proj.register_forward_hook(hook))
            with torch.no_grad():
                ppl = perplexity(model, chunks)
            for h in hs:
                h.remove()
            report("pre_rope", rank, spec, ppl)


if __name__ == "__main__":
    main()
