#!/bin/bash
# round 10, call 1: 8-bit keys on the explicit kernel (int8/int4@g32: the default deployment's format) with the
# corrected K-tile permutation: GPU tests, one layer against the Triton kernel (explicit=0) and dense at ranks 128
# and 112, the whole model
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
export PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 12 \
  -k "int8_int4 or explicit_qpk8 or explicit_rk48 or explicit_r128 or compiles_for_hopper" > $OUT/gpu_r10_tests1.txt 2>&1
tail -3 $OUT/gpu_r10_tests1.txt
grep -E "FAILED|Error|assert" $OUT/gpu_r10_tests1.txt | head -20
date -u
timeout 120 python3 benchmarks/gpu_decode.py --precompile 12 --formats "int8/int4@g32:1,int8/int4@g32:0.875" \
  --cases 64x4096,64x16384 --no-sweep --roped --roped-configs "explicit=0" \
  --json $OUT/gpu_r10_decode1.json > $OUT/gpu_r10_decode1.txt 2>&1
grep "roped r=\|dense SDPA" $OUT/gpu_r10_decode1.txt
date -u
timeout 100 python3 benchmarks/gpu_model_decode.py \
  --formats "dense,int8/int4@g32:128:roped|explicit=0,int8/int4@g32:128:roped,int8/int4@g32:112:roped" --reps 10 \
  --json $OUT/gpu_r10_model_decode1.json > $OUT/gpu_r10_model_decode1.txt 2>&1
tail -8 $OUT/gpu_r10_model_decode1.txt
date -u
