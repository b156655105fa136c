#!/bin/bash
# round 10, call 2: two blocks per step on the explicit kernel (pairs: the second block's loads in flight while the
# first is decoded; no bytes carried between steps): GPU tests, one layer (pairs with register caps 128 / 168 / the
# compiler's) for 4- and 8-bit keys at ranks 128 and 112, the whole model
# (run on a tree with a "pairs" launch option, since removed: RESULTS.md, round 10, "Tried and not kept")
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
export PYTHONUNBUFFERED=1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 12 \
  -k "pairs or int8_int4 or explicit_r112 or explicit_rk48" > $OUT/gpu_r10_tests2.txt 2>&1
tail -3 $OUT/gpu_r10_tests2.txt
grep -E "FAILED|Error|assert" $OUT/gpu_r10_tests2.txt | head -20
date -u
timeout 200 python3 benchmarks/gpu_decode.py --precompile 12 \
  --formats "int4@g32:1,int4@g32:0.875,int8/int4@g32:1,int8/int4@g32:0.875" \
  --cases 64x4096,64x16384 --no-sweep --roped --roped-configs "pairs=1;pairs=1,maxnreg=168;pairs=1,maxnreg=0" \
  --json $OUT/gpu_r10_decode2.json > $OUT/gpu_r10_decode2.txt 2>&1
grep "roped r=\|dense SDPA\|ms, err" $OUT/gpu_r10_decode2.txt
date -u
timeout 150 python3 benchmarks/gpu_model_decode.py \
  --formats "dense,int4@g32:112:roped,int4@g32:112:roped|pairs=1+maxnreg=168,int8/int4@g32:128:roped,int8/int4@g32:128:roped|pairs=1+maxnreg=168" --reps 10 \
  --json $OUT/gpu_r10_model_decode2.json > $OUT/gpu_r10_model_decode2.txt 2>&1
tail -8 $OUT/gpu_r10_model_decode2.txt
date -u
