#!/bin/bash
# round 9, call 4: the explicit kernel's code bytes through shared-memory rings filled by cp.async (stages=4, the
# default; stages=2; stages=0: loads straight into registers as before), GPU tests, one layer, the whole model, and
# an ncu profile of the ring kernel
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
export PYTHONUNBUFFERED=1
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 12 \
  -k "explicit or r112 or r128 or qpk8 or graph or capture" > $OUT/gpu_r9_tests4.txt 2>&1
tail -3 $OUT/gpu_r9_tests4.txt
date -u
timeout 170 python3 benchmarks/gpu_decode.py --precompile 12 --formats "int4@g32:1,int4@g32:0.875" \
  --cases 64x4096,64x16384,16x16384 --no-sweep --roped --roped-configs "stages=0;stages=2" \
  --json $OUT/gpu_r9_decode4.json > $OUT/gpu_r9_decode4.txt 2>&1
grep "roped r=\|dense SDPA" $OUT/gpu_r9_decode4.txt
date -u
timeout 200 python3 benchmarks/gpu_model_decode.py \
  --formats "dense,int4@g32:128:roped|stages=0,int4@g32:128:roped,int4@g32:112:roped|stages=0,int4@g32:112:roped" \
  --reps 10 --json $OUT/gpu_r9_model_decode4.json > $OUT/gpu_r9_model_decode4.txt 2>&1
tail -9 $OUT/gpu_r9_model_decode4.txt
date -u
timeout 100 ncu --clock-control none -k 'regex:_roped_int4_decode' -s 2 -c 1 --section SpeedOfLight \
  --section Occupancy --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
  --section SourceCounters -f -o /tmp/ncu_r \
  python3 benchmarks/gpu_decode.py --profile B=64,S=4096,gs=1,roped=1,ratio=1,lat=int4@g32 > /tmp/ncu_r_log.txt 2>&1
ncu -i /tmp/ncu_r.ncu-rep --page details > $OUT/gpu_r9_ncu_ring.txt 2>&1
ncu -i /tmp/ncu_r.ncu-rep --page source --csv --print-source sass > $OUT/gpu_r9_ncu_ring_sass.csv 2>&1
grep -E "Duration|Achieved Occupancy|Issue Slots|Eligible|DRAM Throughput" $OUT/gpu_r9_ncu_ring.txt | head
date -u
