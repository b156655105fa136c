#!/bin/bash
# round 7, call 2: the transform-coded row tests again (call 1 timed out at 200 s with 17 of 18 passed: the slow
# GPU cases now skip a second fp64 oracle), then the decode benchmark: tcode segment lists at ~15 % and ~20 % of the
# bf16 bytes (Llama-3-8B shapes, group sizes 1 and 2, exact first token included) next to existing formats and
# dense SDPA, measured defaults, CUDA-graph medians
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
export PYTHONUNBUFFERED=1
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 12 -k "seg or segment" \
  --durations=6 -W ignore::pytest.PytestWarning > $OUT/gpu_r7_tests_seg2.txt 2>&1
grep -v PytestBenchmarkWarning $OUT/gpu_r7_tests_seg2.txt | grep -v "warner(" | tail -12
date -u
timeout 330 python3 benchmarks/gpu_decode.py --no-sweep --precompile 12 --cases 64x4096,16x16384,64x16384 \
  --formats "int4@g32:0.5,int4@g32:1,int8/int4@g32:1,int8:0.5,seg:8x8+16x4+56x2/40x4+64x2|gs1,seg:8x8+40x4+56x2/72x4+56x2|gs1,seg:8x8+48x4+120x2/96x4+128x2|gs2,seg:16x8+80x4+112x2/160x4+96x2|gs2" \
  --json $OUT/gpu_r7_decode.json > $OUT/gpu_r7_decode.txt  # stored as gpu_r7_decode2.* 2>&1
tail -32 $OUT/gpu_r7_decode.txt
date -u
