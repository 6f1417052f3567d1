#!/bin/sh
# The issue-4 target runs, one harness call per table (CPU; results/ is git-ignored), under both
# allocator conditions: "kept" (the metaformer CLI keeps freed memory in the heap,
# metaformer.fast.alloc) and "default" (METAFORMER_MALLOC=default: glibc as it comes). Every
# mode of a table runs in the same process, so each table compares all modes under one allocator.
# Ends with benchmarks/results/targets.md: every table and each target's measured ratio.
set -e
for cond in kept default; do
  out=benchmarks/results/malloc-$cond
  mkdir -p "$out"
  if [ "$cond" = default ]; then export METAFORMER_MALLOC=default; else unset METAFORMER_MALLOC; fi
  metaformer bench --batch-size 32 --dtype fp32 --repeats 3 --warmup 1 \
    --modes eager,eager_cl,fused,fused_compile,ort,timm_eager,timm_cl,timm_compile,timm_ort,gemm_ceiling \
    --output "$out/fp32_b32.json" --md "$out/fp32_b32.md"
  metaformer bench --batch-size 32 --dtype bf16 --repeats 3 --warmup 1 \
    --modes fused,fused_compile,timm_cl,timm_compile,gemm_ceiling \
    --output "$out/bf16_b32.json" --md "$out/bf16_b32.md"
  metaformer bench --train-only --train-batch 32 --repeats 6 \
    --train-modes eager,eager_cl,fast,timm_eager,timm_cl \
    --output "$out/train_b32.json" --md "$out/train_b32.md"
  metaformer bench --batch-size 1 --dtype fp32 --repeats 5 --warmup 2 \
    --modes eager,fused,fused_compile,ort,timm_cl,timm_compile,timm_ort,gemm_ceiling \
    --output "$out/fp32_b1.json" --md "$out/fp32_b1.md"
done
python benchmarks/targets_table.py --out benchmarks/results/targets.md
