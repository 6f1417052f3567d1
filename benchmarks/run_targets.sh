#!/bin/sh
# The issue-4 target runs, one harness call per table (CPU; results/ is git-ignored).
# The metaformer CLI keeps freed memory in the heap (metaformer.fast.alloc); run this once as is
# and once with METAFORMER_MALLOC=default for glibc's default allocator. Every mode of a table
# runs in the same process, so both conditions compare all modes under the same allocator.
set -e
out=benchmarks/results/malloc-${METAFORMER_MALLOC:-kept}
mkdir -p "$out"
metaformer bench --batch 32 --dtype fp32 --repeats 3 --warmup 1 \
  --modes eager,eager_cl,fused,fused_compile,ort,timm_eager,timm_cl,timm_compile,timm_ort,gemm_ceiling \
  --json "$out/fp32_b32.json" --md "$out/fp32_b32.md"
metaformer bench --batch 32 --dtype bf16 --repeats 3 --warmup 1 \
  --modes fused,fused_compile,timm_cl,timm_compile,gemm_ceiling \
  --json "$out/bf16_b32.json" --md "$out/bf16_b32.md"
metaformer bench --train-only --train-batch 32 --repeats 6 \
  --train-modes eager,eager_cl,fast,timm_eager,timm_cl \
  --json "$out/train_b32.json" --md "$out/train_b32.md"
metaformer bench --batch 1 --dtype fp32 --repeats 5 --warmup 2 \
  --modes eager,fused,fused_compile,ort,timm_cl,timm_compile,timm_ort,gemm_ceiling \
  --json "$out/fp32_b1.json" --md "$out/fp32_b1.md"
