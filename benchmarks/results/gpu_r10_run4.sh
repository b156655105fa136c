#!/bin/bash
# round 10, call 4: the first block's max as the softmax reference on the explicit kernel (lazy_max: no rescaling and
# no cross-lane reductions per block, a second sweep where scores outgrow it): GPU tests (with call 3's selection,
# cut there by its time limit), one layer and the whole model against the online softmax
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
export PYTHONUNBUFFERED=1
timeout 250 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 14 -rA \
  -k "lazy or gs2 or int8_int4 or cuda_graph or explicit or never_reach" > $OUT/gpu_r10_tests4.txt 2>&1
tail -2 $OUT/gpu_r10_tests4.txt; grep -c "^PASSED" $OUT/gpu_r10_tests4.txt
grep -E "^FAILED|Error|assert" $OUT/gpu_r10_tests4.txt | head -20
date -u
timeout 130 python3 benchmarks/gpu_decode.py --precompile 14 \
  --formats "int4@g32:1,int4@g32:0.875,int8/int4@g32:1" \
  --cases 64x4096,64x16384 --no-sweep --roped --roped-configs "lazy_max=1" \
  --json $OUT/gpu_r10_decode4.json > $OUT/gpu_r10_decode4.txt 2>&1
grep "roped r=\|dense SDPA\|ms, err\|B/token" $OUT/gpu_r10_decode4.txt
date -u
timeout 150 python3 benchmarks/gpu_model_decode.py \
  --formats "dense,int4@g32:112:roped,int4@g32:112:roped|lazy_max=1,int8/int4@g32:128:roped,int8/int4@g32:128:roped|lazy_max=1,int4@g32:128:gs2:roped,int4@g32:128:gs2:roped|lazy_max=1" --reps 10 \
  --json $OUT/gpu_r10_model_decode4.json > $OUT/gpu_r10_model_decode4.txt 2>&1
tail -10 $OUT/gpu_r10_model_decode4.txt
date -u
