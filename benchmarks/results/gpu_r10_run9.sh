#!/bin/bash
# round 10, call 9 (run inline, recorded here): the whole model at 24.6 % (int4@g32 rank 224, group size 2) with
# the register cap of call 8's fastest one-layer run (200) against the default (168)
export PYTHONPATH=/tmp/site:.
timeout 125 python3 benchmarks/gpu_model_decode.py --formats "dense,int4@g32:224:gs2:roped|maxnreg=200,int4@g32:224:gs2:roped" --reps 10 --json $OUT/gpu_r10_model_decode9.json > $OUT/gpu_r10_model_decode9.txt 2>&1
tail -6 $OUT/gpu_r10_model_decode9.txt
