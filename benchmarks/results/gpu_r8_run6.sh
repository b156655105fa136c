#!/bin/bash
# round 8, call 6: the explicit-layout (Gluon) decode kernel for roped int4@g32 rank 128: GPU tests (oracle, graph
# capture, plan, offline compile), one layer before (explicit=0: the Triton decode kernel) / after in one run, the
# whole model
date -u
export PYTHONUNBUFFERED=1
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 12 \
  -k "roped or explicit or graph or capture or plan" > $OUT/gpu_r8_tests6.txt 2>&1
tail -3 $OUT/gpu_r8_tests6.txt
date -u
timeout 150 python3 benchmarks/gpu_decode.py --precompile 12 --formats "int4@g32:1,int8/int4@g32:1" \
  --cases 64x4096,64x16384,16x16384 --no-sweep --roped --roped-configs "explicit=0" \
  --json $OUT/gpu_r8_decode6.json > $OUT/gpu_r8_decode6.txt 2>&1
grep -A12 "roped" $OUT/gpu_r8_decode6.txt | grep "^|" | tail -8
date -u
timeout 170 python3 benchmarks/gpu_model_decode.py \
  --formats "dense,int4@g32:128:roped|explicit=0,int4@g32:128:roped,bfloat16:32:roped" --reps 10 \
  --json $OUT/gpu_r8_model_decode.json > $OUT/gpu_r8_model_decode.txt 2>&1
tail -8 $OUT/gpu_r8_model_decode.txt
date -u
