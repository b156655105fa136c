#!/bin/bash
# round 10, call 3: head groups of 2 KV heads on the explicit kernel (their 8 query heads fill the score tile's 8
# columns: each decoded latent serves twice the heads), 8-bit keys under a CUDA graph: GPU tests, one layer, the
# whole model
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
export PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 12 \
  -k "gs2 or int8_int4 or cuda_graph or explicit_r112 or never_reach" > $OUT/gpu_r10_tests3.txt 2>&1
tail -3 $OUT/gpu_r10_tests3.txt
grep -E "FAILED|Error|assert" $OUT/gpu_r10_tests3.txt | head -20
date -u
timeout 200 python3 benchmarks/gpu_decode.py --precompile 12 \
  --formats "int4@g32:0.875,int4@g32:0.5|gs2,int4@g32:0.4375|gs2,int8/int4@g32:0.5|gs2" \
  --cases 64x4096,64x16384 --no-sweep --roped --roped-configs "explicit=0" \
  --json $OUT/gpu_r10_decode3.json > $OUT/gpu_r10_decode3.txt 2>&1
grep "roped r=\|dense SDPA\|ms, err\|B/token" $OUT/gpu_r10_decode3.txt
grep -A8 "roped keys vs pre-RoPE" $OUT/gpu_r10_decode3.txt
date -u
timeout 170 python3 benchmarks/gpu_model_decode.py \
  --formats "dense,int4@g32:112:roped,int4@g32:128:gs2:roped,int4@g32:112:gs2:roped,int8/int4@g32:128:gs2:roped,int4@g32:128:gs2:roped|explicit=0" --reps 10 \
  --json $OUT/gpu_r10_model_decode3.json > $OUT/gpu_r10_model_decode3.txt 2>&1
tail -9 $OUT/gpu_r10_model_decode3.txt
date -u
