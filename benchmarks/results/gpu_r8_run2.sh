#!/bin/bash
# round 8, call 2: ncu of the 15 % segment kernel (4 warps, the new default), and the generic kernel's own cost at
# the same ranks with int4@g32 / int8 rows (heads=0: the generic kernel, as seg: rows take), next to the seg defaults
date -u
export PYTHONUNBUFFERED=1
n=r8seg
timeout 150 ncu --clock-control none -k 'regex:_latent_attn_fwd' -s 2 -c 1 --section SpeedOfLight \
    --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \
    --section ComputeWorkloadAnalysis --section InstructionStats --section MemoryWorkloadAnalysis \
    -f -o /tmp/ncu_$n \
    python3 benchmarks/gpu_decode.py --profile "B=64,S=4096,gs=1,ratio=0.5,lat=seg:8x8+16x4+56x2/40x4+64x2" > /tmp/ncu_log.txt 2>&1; tail -2 /tmp/ncu_log.txt
ncu -i /tmp/ncu_$n.ncu-rep --page details > $OUT/gpu_r8_ncu_seg.txt 2>&1
grep -E "Duration|Registers Per|Achieved Occupancy|Eligible Warps|Issue Slots Busy|DRAM Throughput|Executed Instructions  |L1/TEX Hit|L2 Hit|Block Limit Reg|Stall" $OUT/gpu_r8_ncu_seg.txt | head -30
date -u
timeout 240 python3 benchmarks/gpu_decode.py --precompile 12 --cases 64x4096 \
  --formats "int4@g32:0.625,int8:0.625,int4@g32:0.5,seg:8x8+16x4+56x2/40x4+64x2|gs1,seg:8x8+40x4+56x2/72x4+56x2|gs1" \
  --configs "heads=0,num_warps=4" --json $OUT/gpu_r8_decode2.json > $OUT/gpu_r8_decode2.txt 2>&1
tail -9 $OUT/gpu_r8_decode2.txt
date -u
