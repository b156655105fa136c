#!/bin/bash
# round 8, call 1: seg: rows read as constexpr pieces (config.segment_pieces, tiles.load_piece): the GPU segment
# and capture tests, then the segment formats against int4 and dense, 4 and 8 warps
date -u
export PYTHONUNBUFFERED=1
timeout 250 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 8 -k "seg or segment or graph or capture" \
  > $OUT/gpu_r8_tests1.txt 2>&1
tail -5 $OUT/gpu_r8_tests1.txt
date -u
timeout 300 python3 benchmarks/gpu_decode.py --precompile 12 --cases 64x4096,16x16384 \
  --formats "int4@g32:0.5,seg:8x8+16x4+56x2/40x4+64x2|gs1,seg:8x8+40x4+56x2/72x4+56x2|gs1,seg:16x8+80x4+112x2/160x4+96x2|gs2" \
  --configs "num_warps=4;num_warps=8" --json $OUT/gpu_r8_decode1.json > $OUT/gpu_r8_decode1.txt 2>&1
tail -30 $OUT/gpu_r8_decode1.txt
date -u
