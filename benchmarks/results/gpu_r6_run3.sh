#!/bin/bash
# round 6, call 3: before (maxnreg=0 and the earlier split rule: 1 split at batch 64, 2 at batch 16) vs after (the new
# defaults) in ONE gpu_decode run, then the whole kernel test file
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
export PYTHONUNBUFFERED=1
python3 benchmarks/gpu_decode.py --formats "int4@g32:1,int4@g32:0.875,int8/int4@g32:1" \
  --cases 64x4096,64x16384,16x4096,16x16384 --no-sweep --roped \
  --roped-configs "maxnreg=0,num_splits=1;maxnreg=0,num_splits=2" \
  --precompile 12 --json $OUT/gpu_r6_decode_final.json > $OUT/gpu_r6_decode_final.txt 2>&1
tail -3 $OUT/gpu_r6_decode_final.txt
python3 - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/gpu_r6_decode_final.json"))
print(d["date"], d["device"], "copy %.2f TB/s" % (d["copy_bw"] / 1e12))
print("| case | latent, rank | dense ms | before ms (cfg) | after ms (cfg) | floor ms | after/floor | before vs dense | after vs dense | after/before |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in d["formats"]:
    rr = r["roped"]
    t = {}
    for x in rr["tried"]:
        c = {k: v for k, v in x["cfg"].items() if v is not None and not k.startswith("rebuild")}
        t["after" if not c else "s%d" % c["num_splits"]] = x
    old = 1 if r["B"] * 8 >= 2 * 132 else 2  # the earlier rule: ~2 programs per SM, rounded down
    b, a = t["s%d" % old], t["after"]
    fl = rr["bytes_floor_ms"]
    print(f"| {r['B']}x{r['S']} | {r['spec']} r{r['rank']} | {r['dense_ms']:.4f} | {b['ms']:.4f} (maxnreg 0, s{old}) | "
          f"{a['ms']:.4f} ({rr['plan'].split('num_splits=')[1].split(',')[0]} splits) | {fl:.4f} | {a['ms'] / fl:.2f} | "
          f"{r['dense_ms'] / b['ms']:.2f}x | {r['dense_ms'] / a['ms']:.2f}x | {a['ms'] / b['ms']:.3f} |")
PY
date -u
timeout 420 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 12 > $OUT/gpu_r6_tests_final.txt 2>&1
tail -6 $OUT/gpu_r6_tests_final.txt
date -u
