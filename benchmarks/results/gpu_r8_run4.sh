#!/bin/bash
# round 8, call 4: the three ways tiles.load_piece reads 4 / 2-bit pieces (KVC_SEG_LOAD, a measurement switch):
# 0 one byte load per code, 1 the byte run read once per code (stride-0 axis), 2 the byte run once, split in
# registers; 4 and 8 warps; the three segment formats at 64 x 4096
date -u
export PYTHONUNBUFFERED=1
for m in 0 1 2; do
  KVC_SEG_LOAD=$m timeout 150 python3 benchmarks/gpu_decode.py --precompile 12 --cases 64x4096 \
    --formats "seg:8x8+16x4+56x2/40x4+64x2|gs1,seg:8x8+40x4+56x2/72x4+56x2|gs1,seg:16x8+80x4+112x2/160x4+96x2|gs2" \
    --configs "num_warps=4;num_warps=8" --json $OUT/gpu_r8_decode4_m$m.json > $OUT/gpu_r8_decode4_m$m.txt 2>&1
  echo "mode $m"; grep "^  seg" $OUT/gpu_r8_decode4_m$m.txt
done
date -u
