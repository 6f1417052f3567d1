"""Which layers run in int8 and which stay fp32, per family, after `metaformer quantize --backend B`.

Each family's smallest variant at 224 with random weights is quantized (calibrated on a few random images: the
graph does not depend on the ranges) and its graph read back: for ort, convs and matrix products whose input and
weight come from a DequantizeLinear run as int8 kernels in ONNX Runtime, every other compute node in fp32; for
openvino, the precision each layer of the graph the CPU plugin compiled runs in.

    python benchmarks/int8_layers.py                      # the markdown table (ONNX Runtime)
    python benchmarks/int8_layers.py --backend openvino   # OpenVINO + NNCF
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import metaformer
from metaformer.tools.quantize import BACKENDS, onnx_ops, openvino_ops, quantize_to_file

FAMILIES = ["poolformer_s12", "poolformerv2_s12", "identityformer_s12", "randformer_s12", "convformer_s18",
            "caformer_s18", "metaformer_ppaa_s12"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(FAMILIES))
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--backend", choices=["ort", "openvino"], default="ort")
    args = p.parse_args()
    runtime = {"ort": "ONNX Runtime", "openvino": "OpenVINO"}[args.backend]
    print(f"| variant | int8 ({runtime} kernels) | kept in fp32 |")
    print("|---|---|---|")
    for name in args.variants.split(","):
        torch.manual_seed(0)
        model = metaformer.create_model(name, img_size=args.img_size).eval()
        calib = torch.randn(4, 3, args.img_size, args.img_size)
        with tempfile.TemporaryDirectory() as tmp:
            path = quantize_to_file(model, calib, Path(tmp) / f"m{BACKENDS[args.backend]}")
            ops = (onnx_ops if args.backend == "ort" else openvino_ops)(path)

        def show(c):
            return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])) or "none"

        print(f"| {name} | {show(ops['int8'])} | {show(ops['fp32'])} |", flush=True)


if __name__ == "__main__":
    main()
