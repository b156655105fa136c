#!/bin/bash
# round 5, final call: before (scale_ahead=0,k_grouped=0: the round-4 code paths, same source) vs after (defaults)
# in ONE gpu_decode run, then the whole kernel test file
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
export PYTHONUNBUFFERED=1
python3 benchmarks/gpu_decode.py --formats "int4@g32:1,int4@g32:0.875,int8/int4@g32:1" --cases 64x4096,64x16384 \
  --no-sweep --roped --roped-configs "scale_ahead=0,k_grouped=0;num_splits=2" \
  --precompile 12 --json $OUT/gpu_r5_decode_final.json > $OUT/gpu_r5_decode_final.txt 2>&1
tail -4 $OUT/gpu_r5_decode_final.txt
python3 - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/gpu_r5_decode_final.json"))
print(d["date"], d["device"], "copy %.2f TB/s" % (d["copy_bw"] / 1e12))
print("| case | latent, rank | dense ms | variant | kernel ms | floor ms | kernel/floor | vs dense | err |")
print("|---|---|---|---|---|---|---|---|---|")
for r in d["formats"]:
    rr = r["roped"]
    for t in rr["tried"]:
        c = {k: v for k, v in t["cfg"].items() if v is not None and not k.startswith("rebuild")}
        name = "after (defaults)" if not c else ("before" if c.get("scale_ahead") is False and "num_splits" not in c
                 else ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in c.items()))
        ms = t.get("ms", float("nan"))
        print(f"| {r['B']}x{r['S']} | {r['spec']} r{r['rank']} | {r['dense_ms']:.4f} | {name} | {ms:.4f} | "
              f"{rr['bytes_floor_ms']:.4f} | {ms / rr['bytes_floor_ms']:.2f} | {r['dense_ms'] / ms:.2f}x | "
              f"{t.get('err', float('nan')):.1e} |")
PY
date -u
timeout 360 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 12 > $OUT/gpu_r5_tests_final.txt 2>&1
tail -6 $OUT/gpu_r5_tests_final.txt
date -u
