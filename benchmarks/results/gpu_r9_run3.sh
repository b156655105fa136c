#!/bin/bash
# round 9, call 3: the explicit kernel at every even rank up to 128 (rank 112: the 25 % point): GPU tests (fp64
# oracle, graph capture, plan, offline compile), one layer against the Triton kernel (explicit=0) and dense, the
# whole model
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
export PYTHONUNBUFFERED=1
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 12 \
  -k "explicit or r112 or r128 or qpk8 or nibble or graph or capture" > $OUT/gpu_r9_tests3.txt 2>&1
tail -3 $OUT/gpu_r9_tests3.txt
date -u
timeout 170 python3 benchmarks/gpu_decode.py --precompile 12 --formats "int4@g32:1,int4@g32:0.875" \
  --cases 64x4096,64x16384 --no-sweep --roped --roped-configs "explicit=0" \
  --json $OUT/gpu_r9_decode3.json > $OUT/gpu_r9_decode3.txt 2>&1
grep "roped r=" $OUT/gpu_r9_decode3.txt
date -u
timeout 200 python3 benchmarks/gpu_model_decode.py \
  --formats "dense,int4@g32:128:roped,int4@g32:112:roped|explicit=0,int4@g32:112:roped,bfloat16:32:roped" --reps 10 \
  --json $OUT/gpu_r9_model_decode3.json > $OUT/gpu_r9_model_decode3.txt 2>&1
tail -9 $OUT/gpu_r9_model_decode3.txt
date -u
