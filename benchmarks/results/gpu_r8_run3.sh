#!/bin/bash
# round 8, call 3: 4 / 2-bit pieces read as contiguous byte runs (vector loads; tiles.load_piece), 4 warps: the GPU
# segment tests, then the segment formats (defaults) next to int4@g32 and dense
date -u
export PYTHONUNBUFFERED=1
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 8 -k "seg or segment" \
  > $OUT/gpu_r8_tests3.txt 2>&1
tail -3 $OUT/gpu_r8_tests3.txt
date -u
timeout 240 python3 benchmarks/gpu_decode.py --precompile 12 --cases 64x4096,16x16384 --no-sweep \
  --formats "int4@g32:0.5,seg:8x8+16x4+56x2/40x4+64x2|gs1,seg:8x8+40x4+56x2/72x4+56x2|gs1,seg:16x8+80x4+112x2/160x4+96x2|gs2" \
  --json $OUT/gpu_r8_decode3.json > $OUT/gpu_r8_decode3.txt 2>&1
tail -11 $OUT/gpu_r8_decode3.txt
date -u
