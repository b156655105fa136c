#!/bin/bash
# round 9, call 5: the final tree (straight loads by default, rings as an option): GPU tests of the explicit kernel
# and its neighbours, one layer at the defaults
date -u
export PYTHONUNBUFFERED=1
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 12 \
  -k "explicit or r112 or r128 or qpk8 or graph or capture or never_reaches" > $OUT/gpu_r9_tests5.txt 2>&1
tail -3 $OUT/gpu_r9_tests5.txt
date -u
timeout 120 python3 benchmarks/gpu_decode.py --precompile 12 --formats "int4@g32:1,int4@g32:0.875" \
  --cases 64x4096,64x16384 --no-sweep --roped --json $OUT/gpu_r9_decode5.json > $OUT/gpu_r9_decode5.txt 2>&1
grep "roped r=\|dense SDPA" $OUT/gpu_r9_decode5.txt
date -u
