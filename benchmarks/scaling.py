"""Cost against input size: pooling (PoolFormer-S12, plain and fused) vs attention mixers.

The paper's claim is that pooling is linear in the number of tokens while attention is
quadratic. For each size, the models are timed interleaved by the shared harness (batch 1,
fp32, CPU), and each call's peak memory is sampled. Writes JSON under benchmarks/results/,
a PNG plot and a markdown table.

    python benchmarks/scaling.py --sizes 224,448,640,1024
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from metaformer import create_model, fuse
from metaformer.tools import bench

MODELS = {
    # label: (variant, overrides, fused)
    "poolformer_s12 (fused)": ("poolformer_s12", {}, True),
    "poolformer_s12 (plain)": ("poolformer_s12", {}, False),
    "ppaa hybrid (attention in stages 3-4)": ("metaformer_ppaa_s12", {}, False),
    "all-attention S12": ("poolformer_s12", {"token_mixers": "attention"}, False),
}


def main() -> None:
    bench.reexec_with_fixed_mmap_threshold()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="224,448,640,1024")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--max-attention-size", type=int, default=448,
                    help="skip the all-attention model above this size (quadratic: minutes per image)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/scaling", help="JSON and markdown (git-ignored)")
    ap.add_argument("--png", default="benchmarks/scaling.png")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    labels = args.models.split(",")
    dev = torch.device("cpu")
    rows = []
    for size in sizes:
        fns = {}
        for label in labels:
            variant, overrides, fused = MODELS[label]
            if "all-attention" in label and size > args.max_attention_size:
                continue
            torch.manual_seed(0)
            m = create_model(variant, **overrides).eval()
            fns[label] = fuse(m) if fused else m
        x = torch.randn(1, 3, size, size)
        with torch.inference_mode():
            times = bench.interleaved_timing(fns, x, dev, args.repeats, warmup=1)
            for label, fn in fns.items():
                med = statistics.median(times[label])
                mem = bench.inference_peak_memory(fn, x, dev)
                rows.append(dict(model=label, size=size, images_per_s=1 / med, latency_ms=med * 1e3,
                                 us_per_kpixel=med * 1e6 / (size * size / 1e3), peak_mem_mib=mem))
                print(rows[-1], flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"environment": bench.environment(), "rows": rows}, f, indent=1)
    table = ["| model | size | images/s | latency ms | us per 1k pixels | per-pixel cost vs 224 | peak MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    base = {r["model"]: r["us_per_kpixel"] for r in rows if r["size"] == sizes[0]}
    for r in rows:
        rel = r["us_per_kpixel"] / base[r["model"]] if r["model"] in base else float("nan")
        table.append(f"| {r['model']} | {r['size']} | {r['images_per_s']:.2f} | {r['latency_ms']:.0f} | "
                     f"{r['us_per_kpixel']:.1f} | {rel:.2f}x | {r['peak_mem_mib']:.0f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))
    plot(rows, args.png)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for label in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == label]
        px = [r["size"] ** 2 / 1e3 for r in rs]
        a.plot(px, [r["latency_ms"] for r in rs], "o-", label=label)
        b.plot(px, [r["peak_mem_mib"] for r in rs], "o-", label=label)
    for ax, name in ((a, "latency per image (ms)"), (b, "peak memory of one call (MiB)")):
        ax.set_xlabel("input pixels (thousands; 224^2 = 50, 1024^2 = 1049)")
        ax.set_ylabel(name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle("Cost vs input size, batch 1, fp32, CPU (pooling is linear in tokens; attention is not)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
