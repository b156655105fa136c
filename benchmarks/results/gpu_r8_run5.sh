#!/bin/bash
# round 8, call 5 (the committed tree): GPU segment and CUDA-graph tests, then the segment formats with the
# measured defaults next to int4@g32 and dense SDPA
date -u
export PYTHONUNBUFFERED=1
timeout 220 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 8 -k "seg or segment or graph or capture" \
  > $OUT/gpu_r8_tests5.txt 2>&1
tail -3 $OUT/gpu_r8_tests5.txt
date -u
timeout 240 python3 benchmarks/gpu_decode.py --precompile 12 --cases 64x4096,16x16384 --no-sweep \
  --formats "int4@g32:0.5,seg:8x8+16x4+56x2/40x4+64x2|gs1,seg:8x8+40x4+56x2/72x4+56x2|gs1,seg:16x8+80x4+112x2/160x4+96x2|gs2" \
  --json $OUT/gpu_r8_decode5.json > $OUT/gpu_r8_decode5.txt 2>&1
tail -11 $OUT/gpu_r8_decode5.txt
date -u
