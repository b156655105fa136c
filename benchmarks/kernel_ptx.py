"""Compile the multi-head decode kernel for sm_90 on this machine (no GPU needed) and count what one KV tile costs.

    .venv/bin/python benchmarks/kernel_ptx.py [NAME=VALUE ...]     e.g. K_SPLIT=False V_SPLIT=False

Defaults: one Llama-3-8B layer's decode launch at rank 64, ``int4@g32`` latents (row format of
``LatentLayout(8, 1, 128, 64, 64, "int4@g32")``), 64-token tiles, 4 warps, 3 stages, tile rotation, lazy max;
``QUANT=False K_BITS=16 V_BITS=16 K_SPLIT=False V_SPLIT=False`` gives the bf16-latent kernel. Prints the shared
memory, the layout conversions in the TTGIR and the PTX instruction mix of the main tile loop (per thread and
tile): with 64 x (rank_k + rank_v) latent values per tile over 128 threads, instructions per value follow.
EXPLICIT=1: the explicit-layout kernel (kernels/triton_latent/explicit.py, Gluon) for a Llama-3-8B layer
instead (RK=, RV=: its ranks, 128 by default; GS=2: head groups of 2 KV heads; DTYPE=int8/int4@g32: 8-bit keys; RING=N: its code bytes through
shared-memory rings of N blocks; LAZY=1: the first block's max as the softmax reference),
compiled as a launch specialises it (16-byte aligned pointers and strides), with the SASS report (its one loop is
the block loop: one warp's 16 tokens, 64 K and 64 V values per thread). SASS_OUT=FILE writes the first loop's SASS
there. SASS=1 also assembles the PTX with the ptxas that Triton's package carries (its PTX version lowered to what
that ptxas reads) and prints registers, spills and the SASS instructions of each loop (the PTX counts miss what
ptxas adds: constants moved into registers for ``prmt``, spill traffic); MAXNREG=N caps the registers as Triton's
``maxnreg`` would.
"""
from __future__ import annotations

import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vllm_kvc.kernels.triton_latent.decode import _latent_decode_heads  # noqa: E402

PTRS = {"cache_ptr": "*u8", "q_ptr": "*bf16", "bk_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16",
        "bv_ptr": "*bf16", "out_ptr": "*bf16", "bt_ptr": "*i32", "seq_lens_ptr": "*i32", "qsl_ptr": "*i32",
        "flag_ptr": "*i32", "qk_scale": "fp32"}
CONST = dict(ROPED=False, AHEAD=False, KGRP=False, G=8, QPK=4, HD=128, RK=64, RK_P=64, RV=64, RV_P=64, NKV=1, M_P=16, BS=64, BLOCK_T=64, SPLIT=False,
             DCH=128, HAS_BK=False, HAS_BV=False, DIRECT=True, OFF64=False, PACKED=True, TILE_ROT=True, LAZY=1,
             PDL=True, QUANT=True, SCALE16=True, K_OFF=0, K_BITS=4, K_QG=32, K_SOFF=512, K_SPG=2, K_LUT=0,
             V_OFF=256, V_BITS=4, V_QG=32, V_SOFF=544, V_SPG=2, V_LUT=0, K_SPLIT=True, V_SPLIT=True, K_OVER=True, V_OVER=True)


def explicit_report():
    """EXPLICIT=1: compile the explicit-layout kernel for sm_90a and print its SASS report."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from vllm_kvc.kernels.triton_latent import explicit
    from vllm_kvc.kernels.triton_latent.config import row_format
    from vllm_kvc.layout import LatentLayout
    rk, rv, gs = int(os.environ.get("RK", "128")), int(os.environ.get("RV", "128")), int(os.environ.get("GS", "1"))
    lay = LatentLayout(8 // gs, gs, 128, rk, rv, os.environ.get("DTYPE", "int4@g32"))
    kf, vf = row_format(lay)
    const = dict(G=8 // gs, QPK=4 * gs, RK=rk, RV=rv, RV_P=max(16, 1 << (rv - 1).bit_length()), K_SOFF=kf.soff, V_OFF=vf.off, V_SOFF=vf.soff, BS=64,
                 STAGES=int(os.environ.get("RING", explicit.STAGES)), K_BITS=lay.bits_k,
                 LAZY_MAX=os.environ.get("LAZY", str(int(explicit.LAZY_MAX))) == "1")
    fn = explicit._roped_int4_decode
    sig = {n: "constexpr" if n in const else PTRS.get(n, "*fp32" if n.endswith("_ptr") else "i32")
           for n in fn.arg_names}
    sig["cache_ptr"] = "*u8"
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n.endswith("_ptr") or n.startswith("stride_")}
    ck = triton.compile(GluonASTSource(fn, signature=sig, constexprs=const, attrs=attrs),
                        target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    print(f"explicit-layout kernel: shared memory {ck.metadata.shared} B")
    sass_report(ck.asm["ptx"])


def main():
    if os.environ.get("EXPLICIT"):
        return explicit_report()
    const = dict(CONST)
    for kv in sys.argv[1:]:
        k, v = kv.split("=")
        const[k] = eval(v)  # noqa: S307 (numbers and booleans from the command line)
    sig = {"cache_ptr": "*u8" if const["QUANT"] else "*bf16"}
    for name in inspect.signature(_latent_decode_heads.fn).parameters:
        sig[name] = "constexpr" if name in const else sig.get(name) or PTRS.get(
            name, "*fp32" if name.endswith("_ptr") else "i32")
    # what a real launch specialises on: 16-byte aligned tensors, strides that are multiples of 16
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n.endswith("_ptr") or n.startswith("stride_")}
    ck = triton.compile(ASTSource(fn=_latent_decode_heads, signature=sig, constexprs=const, attrs=attrs),
                        target=GPUTarget("cuda", 90, 32), options=dict(num_warps=int(os.environ.get("WARPS", "4")), num_stages=int(os.environ.get("STAGES", "3"))))
    ttgir, ptx = ck.asm["ttgir"], ck.asm["ptx"]
    if os.environ.get("DUMP"):
        open(os.environ["DUMP"] + ".ttgir", "w").write(ttgir)
        open(os.environ["DUMP"] + ".ptx", "w").write(ptx)
    print(f"shared memory {ck.metadata.shared} B; TTGIR convert_layout {ttgir.count('ttg.convert_layout')}, "
          f"local_alloc {ttgir.count('ttg.local_alloc')}; PTX {len(ptx.splitlines())} lines")
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"^(\$L__BB\d+_\d+):", ln.strip()))}
    loops = []
    for i, ln in enumerate(lines):  # loops: a back-edge to an earlier label; the first is the full-tile loop
        m = re.search(r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", ln)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            loops.append(lines[labels[m.group(1)]:i])
    vals = const["BLOCK_T"] * const["NKV"] * (const["RK_P"] + const["RV_P"]) / (32 * 4)
    for k, body in enumerate(loops[:2]):
        ops = collections.Counter()
        for x in body:
            m = re.match(r"\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)", x)
            if m:
                ops[m.group(1)] += 1
        n = sum(ops.values())
        what = "full tiles (no masks)" if k == 0 else "the partial last tile"
        print(f"tile loop {k} ({what}): {n} instructions per thread per tile, {n / vals:.1f} per latent value")
        for op, v in ops.most_common(int(os.environ.get("TOP", "16"))):
            print(f"  {v:5d} {op}")
    if os.environ.get("SASS"):
        sass_report(ptx)


def sass_report(ptx: str):
    """Registers, spills and per-loop SASS instruction counts of the PTX, assembled for sm_90a."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if os.environ.get("MAXNREG"):
        ptx = re.sub(r"^(\.reqntid .*)$", r"\1\n.maxnreg " + os.environ["MAXNREG"], ptx, count=1, flags=re.M)
    with tempfile.TemporaryDirectory() as d:
        src, obj = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        open(src, "w").write(ptx)
        r = subprocess.run([os.path.join(bindir, "ptxas"), "-arch=sm_90a", "-v", src, "-o", obj],
                           capture_output=True, text=True)
        m = re.search(r"Unsupported \.version [\d.]+; current version is '([\d.]+)'", r.stderr)
        if r.returncode and m:  # a newer Triton's PTX for the ptxas it carries: lower the version it claims
            open(src, "w").write(re.sub(r"^\.version \d+\.\d+", f".version {m.group(1)}", ptx, flags=re.M))
            r = subprocess.run([os.path.join(bindir, "ptxas"), "-arch=sm_90a", "-v", src, "-o", obj],
                               capture_output=True, text=True)
        if r.returncode:
            print("ptxas failed:", r.stderr[-500:])
            return
        info = re.findall(r"Used \d+ registers|\d+ bytes spill stores|\d+ bytes spill loads", r.stderr)
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", obj], capture_output=True,
                              text=True).stdout
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           re.finditer(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, flags=re.M)]
    at = {a: i for i, (a, _) in enumerate(ins)}
    loops = [(at[int(m.group(1), 16)], i) for i, (_, t) in enumerate(ins)
             if (m := re.search(r"BRA.*?0x([0-9a-f]+)", t)) and int(m.group(1), 16) in at
             and at[int(m.group(1), 16)] < i]
    print(f"SASS (sm_90a): {', '.join(info)}; {len(ins)} instructions; loops (instructions): "
          f"{[b - a + 1 for a, b in loops]}")
    if loops:
        a, b = loops[0]
        ops = collections.Counter(t.split()[1] if t.startswith("@") else t.split()[0] for _, t in ins[a:b + 1])
        print("  first loop:", ", ".join(f"{v} {k}" for k, v in ops.most_common(int(os.environ.get("TOP", "16")))))
        if os.environ.get("SASS_OUT"):  # the first loop's SASS, one instruction per line
            open(os.environ["SASS_OUT"], "w").write("\n".join(t for _, t in ins[a:b + 1]) + "\n")


if __name__ == "__main__":
    main()
