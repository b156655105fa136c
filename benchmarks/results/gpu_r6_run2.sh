#!/bin/bash
# round 6, call 2: the new decode defaults (maxnreg 128 for roped integer latents at one KV head per program, splits
# by resident programs) against the old ones; maxnreg 96, loop unrolling, vector block ids; the split sweep
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
export PYTHONUNBUFFERED=1 PYTHONPATH=$PYTHONPATH:benchmarks
python3 benchmarks/results/gpu_r6_probe.py --out $OUT --sass 1 > $OUT/gpu_r6_probe2.txt 2>&1
mv $OUT/gpu_r6_probe.json $OUT/gpu_r6_probe2.json
grep -E "^\||compiled|\{" $OUT/gpu_r6_probe2.txt | grep -v "'K_BITS': 4, 'V_BITS': 4, 'QUANT': True, 'SPLIT': True" | tail -80
date -u
n=r6i84
timeout 100 ncu --clock-control none -k 'regex:_latent_decode_heads' -s 2 -c 1 --section SpeedOfLight \
    --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \
    --section InstructionStats -f -o /tmp/ncu_$n \
    python3 benchmarks/gpu_decode.py --profile B=64,S=4096,gs=1,roped=1,ratio=1,lat=int8/int4@g32 > /tmp/ncu_log.txt 2>&1; tail -1 /tmp/ncu_log.txt
ncu -i /tmp/ncu_$n.ncu-rep --page details > $OUT/gpu_r6_ncu_int8int4_new.txt 2>&1
grep -E "Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issue Slots Busy|Eligible Warps|DRAM Throughput|Executed Instructions  " $OUT/gpu_r6_ncu_int8int4_new.txt | head -12
date -u
