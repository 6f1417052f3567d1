"""How long an int8 file takes to load and answer its first image, per backend, each in a fresh process (as `eval`,
`predict` and `serve` start): PoolFormer-S12 (or --variant) at --img-size, random weights, calibrated on random
images. Prints a markdown table; the files are written to a temporary folder and removed.

    .venv/bin/python benchmarks/deploy_load.py --img-size 224
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import metaformer
from metaformer.tools.quantize import BACKENDS, quantize_to_file

PROBE = """
import json, sys, time
t0 = time.perf_counter()
import torch
from metaformer.tools.exported import load_runtime
t1 = time.perf_counter()
run = load_runtime(sys.argv[1])
t2 = time.perf_counter()
with torch.no_grad():
    run(torch.randn(1, 3, int(sys.argv[2]), int(sys.argv[2])))
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_image_s": t3 - t2}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="poolformer_s12")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--runs", type=int, default=3, help="fresh processes per backend (the median is shown)")
    args = p.parse_args()
    torch.manual_seed(0)
    model = metaformer.create_model(args.variant, img_size=args.img_size).eval()
    calib = torch.randn(16, 3, args.img_size, args.img_size)
    print(f"| backend | file | write s | load s (median of {args.runs}) | first image s | import s |")
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="metaformer-load-") as tmp:
        for backend in args.backends.split(","):
            t0 = time.perf_counter()
            path = quantize_to_file(model, calib, Path(tmp) / f"int8{BACKENDS[backend]}", backend)
            written = time.perf_counter() - t0
            rows = []
            for _ in range(args.runs):
                out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(args.img_size)],
                                     capture_output=True, text=True, check=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
            med = {k: sorted(r[k] for r in rows)[len(rows) // 2] for k in rows[0]}
            print(f"| {backend} | {path.name} | {written:.1f} | {med['load_s']:.2f} | {med['first_image_s']:.2f} | "
                  f"{med['import_s']:.1f} |")


if __name__ == "__main__":
    main()
