#!/bin/bash
# round 9, call 6: call 5's test selection was cut by its 200 s limit (28 passed, no failure, while the
# never-reaches-the-reference test ran); the explicit kernel's tests on the final tree alone
date -u
export PYTHONUNBUFFERED=1
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -n 12 \
  -k "explicit or r112 or r128 or qpk8 or graph" > $OUT/gpu_r9_tests6.txt 2>&1
tail -3 $OUT/gpu_r9_tests6.txt
date -u
