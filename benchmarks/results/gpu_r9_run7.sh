#!/bin/bash
# round 9, call 7: 8-bit keys on the explicit kernel (int8/int4@g32: the default deployment's format): GPU tests,
# one layer against the Triton kernel (explicit=0) and dense, the whole model
date -u
export PYTHONUNBUFFERED=1
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 12 \
  -k "int8_int4 or explicit_qpk8 or explicit_rk48 or ring4" > $OUT/gpu_r9_tests7.txt 2>&1
tail -3 $OUT/gpu_r9_tests7.txt
date -u
timeout 70 python3 benchmarks/gpu_decode.py --precompile 12 --formats "int8/int4@g32:1" \
  --cases 64x4096,64x16384 --no-sweep --roped --roped-configs "explicit=0" \
  --json $OUT/gpu_r9_decode7.json > $OUT/gpu_r9_decode7.txt 2>&1
grep "roped r=\|dense SDPA" $OUT/gpu_r9_decode7.txt
date -u
timeout 80 python3 benchmarks/gpu_model_decode.py \
  --formats "dense,int8/int4@g32:128:roped|explicit=0,int8/int4@g32:128:roped" --reps 10 \
  --json $OUT/gpu_r9_model_decode7.json > $OUT/gpu_r9_model_decode7.txt 2>&1
tail -6 $OUT/gpu_r9_model_decode7.txt
date -u
