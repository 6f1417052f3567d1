#!/bin/sh
# The issue-4 target runs, one harness call per table (CPU; results/ is git-ignored).
set -e
metaformer bench --batch 32 --dtype fp32 --repeats 3 --warmup 1 \
  --modes eager,eager_cl,fused,fused_compile,ort,timm_eager,timm_cl,timm_compile,timm_ort,gemm_ceiling \
  --json benchmarks/results/fp32_b32.json --md benchmarks/results/fp32_b32.md
metaformer bench --batch 32 --dtype bf16 --repeats 3 --warmup 1 \
  --modes fused,fused_compile,timm_cl,timm_compile,gemm_ceiling \
  --json benchmarks/results/bf16_b32.json --md benchmarks/results/bf16_b32.md
metaformer bench --train-only --train-batch 32 --repeats 6 \
  --train-modes eager,eager_cl,fast,timm_eager,timm_cl \
  --json benchmarks/results/train_b32.json --md benchmarks/results/train_b32.md
metaformer bench --batch 1 --dtype fp32 --repeats 5 --warmup 2 \
  --modes eager,fused,fused_compile,ort,timm_cl,timm_compile,timm_ort,gemm_ceiling \
  --json benchmarks/results/fp32_b1.json --md benchmarks/results/fp32_b1.md
