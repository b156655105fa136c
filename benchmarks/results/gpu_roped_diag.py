"""Variants of the roped-key case that failed on the H200 (int4_decode_nibbles_rank48), one line each."""
import os, sys
sys.path.insert(0, "."); sys.path.insert(0, "tests")
import torch
import test_kernels as T
from vllm_kvc.kernels.triton_latent import decode as D
tk = T.kernels()
base = dict(lat="int4", seq=[5, 66], G=2, qpk=3, hd=64, rk=48, rv=32, bs=16, block_t=16, lazy=True, heads=None)
variants = [("as is", {}), ("block_t 64", dict(block_t=64)), ("block_t 32", dict(block_t=32)),
            ("rk 64", dict(rk=64)), ("int4@g32", dict(lat="int4@g32")), ("lazy off", dict(lazy=False)),
            ("qpk 4", dict(qpk=4)), ("hd 128", dict(hd=128)), ("pre-RoPE", dict(pre=True)),
            ("no K_SPLIT", dict(nosplit=True)), ("no packed", dict(nopacked=True))]
orig_split, orig_packed = D.nibble_split, D.packed_rope_ok
for name, v in variants:
    c = dict(base, **v)
    D.nibble_split = (lambda l, a, b: (False, orig_split(l, a, b)[1])) if c.get("nosplit") else orig_split
    D.packed_rope_ok = (lambda *a, **k: False) if c.get("nopacked") else orig_packed
    try:
        args, _ = T.make_case(c["seq"], [1] * len(c["seq"]), G=c["G"], gs=1, qpk=c["qpk"], hd=c["hd"], rk=c["rk"],
                              rv=c["rv"], bs=c["bs"], lat_dtype=c["lat"])
        cfg = tk.LaunchConfig(block_t=c["block_t"], lazy_max=c["lazy"], heads=c["heads"])
        if c.get("pre"):
            err = T.rel_err(tk.latent_attention(**args, max_query_len=1, config=cfg), T.ref_out(args))
        else:
            qt = T.roped_query(args)
            out = tk.latent_attention(**T.roped_call_args(args, qt), max_query_len=1, config=cfg, roped_keys=True)
            err = T.rel_err(out, T.ref_out_roped(args, qt))
        print(f"{name:>16}: rel err {err:.2e}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"{name:>16}: {type(e).__name__} {str(e)[:200]}", flush=True)
