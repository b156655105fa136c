#!/bin/bash
# round 7, call 1: the kernel tests on the H200 (transform-coded rows + sink first, then the whole file)
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
export PYTHONUNBUFFERED=1
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 12 -k "seg or segment" \
  > $OUT/gpu_r7_tests_seg.txt 2>&1
tail -8 $OUT/gpu_r7_tests_seg.txt
date -u
timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 12 > $OUT/gpu_r7_tests_all.txt 2>&1
tail -8 $OUT/gpu_r7_tests_all.txt
date -u
