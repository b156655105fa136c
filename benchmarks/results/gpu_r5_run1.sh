#!/bin/bash
# round 5, call 1: baseline of the roped 4-bit kernels, a launch-option sweep, and an ncu profile of roped int4@g32 r128
set -x
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
export PYTHONUNBUFFERED=1
python3 benchmarks/gpu_decode.py --formats "int4@g32:1,int4@g32:0.875,int8/int4@g32:1" --cases 64x4096 --no-sweep \
  --roped --roped-configs "num_warps=8;num_splits=2;num_splits=4;block_t=128;block_t=128,num_warps=8;num_stages=2;num_stages=4;heads=2;heads=2,num_warps=8;block_t=32" \
  --precompile 12 --json $OUT/gpu_r5_sweep1.json 2>&1 | tee $OUT/gpu_r5_sweep1.txt
for case in "ratio=1,lat=int4@g32" "ratio=1,lat=int8/int4@g32"; do
  n=$(echo $case | tr -c 'a-z0-9\n' '_')
  timeout 150 ncu --clock-control none -k 'regex:_latent_decode_heads' -s 2 -c 1 --section SpeedOfLight \
    --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \
    --section ComputeWorkloadAnalysis --section InstructionStats --section MemoryWorkloadAnalysis \
    --section SourceCounters --import-source yes -f -o /tmp/ncu_$n \
    python3 benchmarks/gpu_decode.py --profile B=64,S=4096,gs=1,roped=1,$case > /tmp/ncu_${n}_log.txt 2>&1; tail -3 /tmp/ncu_${n}_log.txt
  ncu -i /tmp/ncu_$n.ncu-rep --page details > $OUT/gpu_r5_ncu_${n}.txt 2>&1
  ncu -i /tmp/ncu_$n.ncu-rep --page source --csv --print-source sass > $OUT/gpu_r5_ncu_${n}_sass.csv 2>&1
  grep -E "Duration|Registers|Achieved Occupancy|Issue Slots|Eligible|DRAM Throughput|Stall|Warp Cycles" $OUT/gpu_r5_ncu_${n}.txt | head -40
done
ls -la $OUT; date -u
