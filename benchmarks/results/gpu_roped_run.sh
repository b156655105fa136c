#!/bin/bash
# The device call of the roped-key measurements (/work/notes/gpu_roped.md): roped tests, the decode timings,
# then the rest of tests/test_kernels.py, within one ~590 s call. Run from the repository root with $OUT set.
set -o pipefail
end=$((SECONDS + ${BUDGET:-585}))
export PYTHONUNBUFFERED=1
date -u | tee $OUT/gpu_roped_meta.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee -a $OUT/gpu_roped_meta.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $OUT/gpu_roped_meta.txt
echo "== roped tests $(date -u +%T)" | tee -a $OUT/gpu_roped_meta.txt
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 12 -k roped 2>&1 | tee $OUT/gpu_roped_tests_roped.txt | tail -25
echo "rc ${PIPESTATUS[0]}" | tee -a $OUT/gpu_roped_meta.txt
echo "== decode timings $(date -u +%T)" | tee -a $OUT/gpu_roped_meta.txt
timeout 300 python3 benchmarks/gpu_decode.py --formats "${FORMATS:-bfloat16:0.5,bfloat16:0.25,int4@g32:1,int4@g32:0.875,int8:1}" \
    --cases 64x4096,64x16384 --no-sweep --roped --roped-configs "${ROPED_CONFIGS:-heads=2;heads=4}" --precompile 12 \
    --json $OUT/gpu_roped_decode.json 2>&1 | tee $OUT/gpu_roped_decode.txt | grep -v "^\s*$" | tail -40
echo "rc ${PIPESTATUS[0]}" | tee -a $OUT/gpu_roped_meta.txt
left=$((end - SECONDS))
echo "== other tests $(date -u +%T), ${left}s left" | tee -a $OUT/gpu_roped_meta.txt
timeout $left python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 12 -k "not roped" 2>&1 | tee $OUT/gpu_roped_tests_rest.txt | tail -8
echo "rc ${PIPESTATUS[0]} $(date -u +%T)" | tee -a $OUT/gpu_roped_meta.txt
