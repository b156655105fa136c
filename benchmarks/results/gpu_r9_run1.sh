#!/bin/bash
# round 9, call 1: the explicit kernel with keys decoded as (low, high) nibble pairs of one byte (no re-pairing):
# GPU tests, one layer against the Triton kernel and dense, register caps (96: 5 programs per SM), and an ncu
# profile of the explicit kernel (stall reasons, pipes)
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
export PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 8 \
  -k "explicit or r128 or qpk8 or nibble" > $OUT/gpu_r9_tests1.txt 2>&1
tail -3 $OUT/gpu_r9_tests1.txt
date -u
timeout 170 python3 benchmarks/gpu_decode.py --precompile 12 --formats "int4@g32:1" \
  --cases 64x4096,64x16384 --no-sweep --roped --roped-configs "explicit=0;maxnreg=96;maxnreg=112" \
  --json $OUT/gpu_r9_decode1.json > $OUT/gpu_r9_decode1.txt 2>&1
grep -B2 -A14 "roped" $OUT/gpu_r9_decode1.txt | tail -24
date -u
timeout 150 ncu --clock-control none -k 'regex:_roped_int4_decode' -s 2 -c 1 --section SpeedOfLight \
  --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \
  --section ComputeWorkloadAnalysis --section InstructionStats --section MemoryWorkloadAnalysis \
  --section SourceCounters --import-source yes -f -o /tmp/ncu_x \
  python3 benchmarks/gpu_decode.py --profile B=64,S=4096,gs=1,roped=1,ratio=1,lat=int4@g32 > /tmp/ncu_x_log.txt 2>&1
tail -3 /tmp/ncu_x_log.txt
ncu -i /tmp/ncu_x.ncu-rep --page details > $OUT/gpu_r9_ncu_explicit.txt 2>&1
ncu -i /tmp/ncu_x.ncu-rep --page source --csv --print-source sass > $OUT/gpu_r9_ncu_explicit_sass.csv 2>&1
grep -E "Duration|Registers|Achieved Occupancy|Issue Slots|Eligible|DRAM Throughput|Stall|Warp Cycles|Pipe" $OUT/gpu_r9_ncu_explicit.txt | head -40
date -u
