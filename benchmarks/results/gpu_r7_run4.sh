#!/bin/bash
# round 7, call 4 (the session's last device minutes): the 15 % segment format at 64x4096 with 8 warps (offline
# compile for sm_90: 1376 -> 104 bytes of spills per thread) and 8 warps with 32-token tiles, next to the defaults
date -u
export PYTHONUNBUFFERED=1
timeout 190 python3 benchmarks/gpu_decode.py --precompile 12 --cases 64x4096 \
  --formats "seg:8x8+16x4+56x2/40x4+64x2|gs1" --configs "num_warps=8;num_warps=8,block_t=32" \
  --json $OUT/gpu_r7_decode4.json > $OUT/gpu_r7_decode4.txt 2>&1
tail -8 $OUT/gpu_r7_decode4.txt
date -u
