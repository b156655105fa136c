#!/bin/bash
# round 5, call 2: scales one tile ahead + grouped K tiles, against the old code paths (same kernels, switches off)
date -u
export PYTHONUNBUFFERED=1
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 12 -k "roped or nibble or graph" 2>&1 | tail -5 | tee $OUT/gpu_r5_tests_run2.txt
python3 benchmarks/gpu_decode.py --formats "int4@g32:1,int4@g32:0.875,int8/int4@g32:1" --cases 64x4096 --no-sweep \
  --roped --roped-configs "scale_ahead=0,k_grouped=0;scale_ahead=0;k_grouped=0;num_splits=2;num_splits=2,scale_ahead=0,k_grouped=0" \
  --precompile 12 --json $OUT/gpu_r5_sweep2.json 2>&1 | tail -25
python3 - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/gpu_r5_sweep2.json"))
for r in d["formats"]:
    for t in r["roped"]["tried"]:
        c = {k: v for k, v in t["cfg"].items() if v is not None and not k.startswith("rebuild")}
        print(r["spec"], r["rank"], c, round(t.get("ms", -1), 4), t.get("err"), t.get("error", ""))
PY
n=r5b
timeout 120 ncu --clock-control none -k 'regex:_latent_decode_heads' -s 2 -c 1 --section SpeedOfLight \
    --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \
    --section ComputeWorkloadAnalysis --section InstructionStats --section MemoryWorkloadAnalysis \
    --section SourceCounters --import-source yes -f -o /tmp/ncu_$n \
    python3 benchmarks/gpu_decode.py --profile B=64,S=4096,gs=1,roped=1,ratio=1,lat=int4@g32 > /tmp/ncu_log.txt 2>&1; tail -2 /tmp/ncu_log.txt
ncu -i /tmp/ncu_$n.ncu-rep --page details > $OUT/gpu_r5_ncu_int4g32_r128_new.txt 2>&1
ncu -i /tmp/ncu_$n.ncu-rep --page source --csv --print-source sass > $OUT/gpu_r5_ncu_int4g32_r128_new_sass.csv 2>&1
grep -E "Duration|Registers Per|Achieved Occupancy|Issue Slots Busy|Eligible Warps|DRAM Throughput|Executed Instructions  " $OUT/gpu_r5_ncu_int4g32_r128_new.txt | head -12
date -u
