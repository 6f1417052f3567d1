#!/usr/bin/env sh
# The measurements of docs/deploy.md, one after the other (~70 min on 2 cores): the int8 and bf16 paths (ONNX
# Runtime, PT2E, OpenVINO, our fused graph in OpenVINO) against our fused fp32 and timm compiled (PoolFormer-S12 224,
# batch 32 and 1, interleaved) and their load times; the digits model's int8 file
# beside its fp32 modes; the server under 1, 8 and 32 clients (the digits model, its int8 file, and PoolFormer-S12
# 224 with random weights) and under hostile clients. Needs runs/digits/best.pth (bash scripts/demo.sh).
# Results land in benchmarks/results/ (git-ignored).
set -eu
cd "$(dirname "$0")/.."
M=.venv/bin/metaformer
mkdir -p benchmarks/results
test -f runs/digits/best_int8.onnx || $M quantize runs/digits/best.pth -o runs/digits/best_int8.onnx
test -f runs/digits/best_int8.xml || $M quantize runs/digits/best.pth -o runs/digits/best_int8.xml
MODES=fused,fused_bf16,timm_compile,int8_ort,int8_pt2e,ov_fp32,ov_bf16,ov_int8,ov_fused_fp32,ov_fused_bf16,ov_fused_int8
$M bench --variant poolformer_s12 --batch-size 32,1 --img-size 224 --modes $MODES --repeats 10 --no-memory \
    --output benchmarks/results/int8.json --md benchmarks/results/int8.md
# per core: one thread each, the comparison that other processes' load on the 2 cores does not skew
OMP_NUM_THREADS=1 $M bench --variant poolformer_s12 --batch-size 32,1 --img-size 224 --modes $MODES --repeats 10 \
    --no-memory --output benchmarks/results/int8_1thread.json --md benchmarks/results/int8_1thread.md
# the int8 files' load time in a fresh process, per backend
.venv/bin/python benchmarks/deploy_load.py --img-size 224 > benchmarks/results/int8_load.md
$M bench --exported runs/digits/best_int8.onnx --modes fused,ort,int8_ort --batch-size 32,1 --repeats 10 \
    --output benchmarks/results/int8_digits.json --md benchmarks/results/int8_digits.md
.venv/bin/python benchmarks/serve_load.py runs/digits/best.pth runs/digits/best_int8.onnx runs/digits/best_int8.xml \
    --md benchmarks/results/serve.md
test -f runs/s12_random.safetensors || .venv/bin/python -c "import torch, metaformer; torch.manual_seed(0); \
metaformer.save_weights(metaformer.create_model('poolformer_s12'), 'runs/s12_random.safetensors')"
.venv/bin/python benchmarks/serve_load.py runs/s12_random.safetensors --img-size 224 --md benchmarks/results/serve_s12.md
# hostile clients: 50 stalled connections of two kinds, 50 that leave mid-body, 16 concurrent 36 M pixel JPEGs
.venv/bin/python benchmarks/serve_load.py runs/s12_random.safetensors --img-size 224 --no-load --hostile \
    --md benchmarks/results/serve_hostile.md
.venv/bin/python benchmarks/int8_layers.py > benchmarks/results/int8_layers.md
