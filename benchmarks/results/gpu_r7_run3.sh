#!/bin/bash
# round 7, call 3: after call 2 measured the first segment reader ~100x slower than int4 (27.5 ms at 64x4096: a
# [tokens, columns] gather of scales and of level tables per tile), the reader loads one scale per segment slot and
# computes the levels: decode benchmark (defaults, CUDA-graph medians, dense SDPA alongside), then the segment tests
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
export PYTHONUNBUFFERED=1
timeout 210 python3 benchmarks/gpu_decode.py --no-sweep --precompile 12 --cases 64x4096,16x16384 \
  --formats "int4@g32:0.5,seg:8x8+16x4+56x2/40x4+64x2|gs1,seg:8x8+40x4+56x2/72x4+56x2|gs1,seg:16x8+80x4+112x2/160x4+96x2|gs2" \
  --json $OUT/gpu_r7_decode3.json > $OUT/gpu_r7_decode3.txt 2>&1
tail -14 $OUT/gpu_r7_decode3.txt
date -u
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 12 -k "seg or segment" \
  --durations=6 -W ignore::pytest.PytestWarning > $OUT/gpu_r7_tests_seg3.txt 2>&1
grep -v PytestBenchmarkWarning $OUT/gpu_r7_tests_seg3.txt | grep -v "warner(" | tail -12
date -u
