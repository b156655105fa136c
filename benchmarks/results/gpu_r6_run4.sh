#!/bin/bash
# round 6, call 4 (after run3, machine warm): whole model, the int8 / int4 roped format before (maxnreg=0) and after
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.
timeout 210 python3 benchmarks/gpu_model_decode.py --formats "dense,int8/int4@g32:128:roped|maxnreg=0,int8/int4@g32:128:roped" \
  --reps 10 --json $OUT/gpu_r6_model_decode.json > $OUT/gpu_r6_model_decode.txt 2>&1
