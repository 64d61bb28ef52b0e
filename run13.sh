#!/bin/bash
# session 13, second device call (not committed)
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
(timeout 70 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py 2>&1 | tail -3) | tee $OUT/cuda_tests.txt
timeout 110 python3 bench/kernels.py --no-tune --ms 1,16 --kernels 'bf16,w4a16-g128' \
  > $OUT/m1.txt 2>&1
grep -A8 "summary on.*CUDA-graph" $OUT/m1.txt
grep -E "^  (bf16|w4a16-g128|tinygemm).* M=1 " $OUT/m1.txt | cut -c1-62
grep -E "gemv16-regx [0-9]" $OUT/m1.txt | cut -c1-80
grep "correctness:" $OUT/m1.txt
timeout 120 python3 bench/kernels.py --no-tune --ms 4096 --kernels 'bf16,w4a16-g128,fp8-rowwise,fp8-tensor,int8-w8a8' > $OUT/m4096.txt 2>&1
grep -A16 "summary on.*CUDA-graph" $OUT/m4096.txt
