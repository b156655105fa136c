#!/bin/bash
# round 6, call 1: launch variants (block-id reads, splits, stages), the split sweep over batch sizes, registers,
# SASS; ncu of roped int4@g32 r128 with block ids two tiles ahead
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
export PYTHONUNBUFFERED=1 PYTHONPATH=$PYTHONPATH:benchmarks
python3 benchmarks/results/gpu_r6_probe.py --out $OUT --sass 1 > $OUT/gpu_r6_probe.txt 2>&1
tail -75 $OUT/gpu_r6_probe.txt
date -u
n=r6b2
timeout 150 ncu --clock-control none -k 'regex:_latent_decode_heads' -s 2 -c 1 --section SpeedOfLight \
    --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \
    --section ComputeWorkloadAnalysis --section InstructionStats --section MemoryWorkloadAnalysis \
    --section SourceCounters --import-source yes -f -o /tmp/ncu_$n \
    python3 benchmarks/gpu_decode.py --profile B=64,S=4096,gs=1,roped=1,ratio=1,lat=int4@g32,block_ids=2 > /tmp/ncu_log.txt 2>&1; tail -2 /tmp/ncu_log.txt
ncu -i /tmp/ncu_$n.ncu-rep --page details > $OUT/gpu_r6_ncu_b2.txt 2>&1
ncu -i /tmp/ncu_$n.ncu-rep --page source --csv --print-source sass 2>&1 | gzip > $OUT/gpu_r6_ncu_b2_sass.csv.gz
grep -E "Duration|Registers Per|Achieved Occupancy|Issue Slots Busy|Eligible Warps|DRAM Throughput|Executed Instructions  " $OUT/gpu_r6_ncu_b2.txt | head -12
date -u
