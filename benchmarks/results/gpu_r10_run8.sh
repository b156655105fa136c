#!/bin/bash
# round 10, call 8: ranks above 128 on the explicit kernel (head groups of 2 KV heads at up to 256: a second K tile
# and a second value accumulator; register cap 168 by default, 3 programs per SM): GPU tests, one layer (caps 168 /
# 200 / the compiler's), the whole model at 24.6 % (int4@g32 rank 224, group size 2) and 28.1 % (rank 256)
# (run as: cp -r .r256/vllm_kvc .r256/tests .r256/benchmarks . && python3 -m pip install ...; bash .r256/gpu_r10_run8.sh,
# with the change not yet committed: its files carried in .r256/, the tree of commit "explicit kernel: ranks up to 256")
date -u
export PYTHONUNBUFFERED=1
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 14 -rf -W ignore \
  -k "gs2 or explicit_r128 or explicit_rk48 or int8_int4_one_group" 2>&1 | grep -v "^  warner\|PytestBenchmarkWarning" > $OUT/gpu_r10_tests8.txt
grep -E "passed|failed|^FAILED|^E  " $OUT/gpu_r10_tests8.txt | head -12
date -u
timeout 100 python3 benchmarks/gpu_decode.py --precompile 14 \
  --formats "int4@g32:0.875|gs2,int8/int4@g32:1|gs2" \
  --cases 64x4096,64x16384 --no-sweep --roped --roped-configs "maxnreg=200;maxnreg=0" \
  --json $OUT/gpu_r10_decode8.json > $OUT/gpu_r10_decode8.txt 2>&1
grep "roped r=\|dense SDPA\|ms, err\|B/token" $OUT/gpu_r10_decode8.txt
date -u
timeout 120 python3 benchmarks/gpu_model_decode.py \
  --formats "dense,int4@g32:224:gs2:roped,int4@g32:256:gs2:roped,int4@g32:112:roped" --reps 10 \
  --json $OUT/gpu_r10_model_decode8.json > $OUT/gpu_r10_model_decode8.txt 2>&1
tail -7 $OUT/gpu_r10_model_decode8.txt
date -u
