#!/bin/bash
# round 9, call 2: the next block's lines hinted into L2 (prefetch=1, the default) against none (prefetch=0) and the
# Triton kernel (explicit=0), one layer and the whole model; GPU tests of the explicit kernel.
# (The `prefetch` LaunchConfig switch and the kernel's PREFETCH constexpr this run used were removed after it, since
# the hint did not pay: a `prefetch.global.L2` of each token's 4 pieces of the next block, 2 per thread per step,
# issued after the softmax. The rest of the code is what was committed with this file.)
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
export PYTHONUNBUFFERED=1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 8 \
  -k "explicit or r128 or qpk8" > $OUT/gpu_r9_tests2.txt 2>&1
tail -3 $OUT/gpu_r9_tests2.txt
date -u
timeout 170 python3 benchmarks/gpu_decode.py --precompile 12 --formats "int4@g32:1" \
  --cases 64x4096,64x16384,16x16384 --no-sweep --roped --roped-configs "prefetch=0;explicit=0" \
  --json $OUT/gpu_r9_decode2.json > $OUT/gpu_r9_decode2.txt 2>&1
grep "roped r=" $OUT/gpu_r9_decode2.txt; grep "prefetch\|explicit" $OUT/gpu_r9_decode2.txt | head
date -u
timeout 200 python3 benchmarks/gpu_model_decode.py \
  --formats "dense,int4@g32:128:roped|explicit=0,int4@g32:128:roped|prefetch=0,int4@g32:128:roped" --reps 10 \
  --json $OUT/gpu_r9_model_decode2.json > $OUT/gpu_r9_model_decode2.txt 2>&1
tail -8 $OUT/gpu_r9_model_decode2.txt
date -u
