"""Where the fused model's time goes: each oneDNN conv's share of the forward and its GFLOP/s.

Times every conv call of a fused PoolFormer (the same calls ``metaformer.fuse`` makes) and the
whole forward, with freed memory kept (as the CLI runs), and prints one row per conv kind.

    python benchmarks/profile_fused.py [--variant poolformer_s12] [--batch 32] [--dtype fp32] [--iters 5]
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

import metaformer
from metaformer.fast.alloc import keep_freed_memory
from metaformer.fast.fuse import FusedModule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="poolformer_s12")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    keep_freed_memory()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = metaformer.fuse(metaformer.create_model(args.variant, img_size=args.img_size)).to(dtype)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, dtype=dtype)

    stats = defaultdict(lambda: [0.0, 0.0])  # kind -> [seconds, GFLOP]
    conv = FusedModule._conv

    def timed(self, name, inp, weight, bias, attr="none", other=None):
        t0 = time.perf_counter()
        out = conv(self, name, inp, weight, bias, attr, other)
        dt = time.perf_counter() - t0
        post = "+add" if other is not None else ("" if attr == "none" else f"+{attr}")
        kind = f"{type(self).__name__}.{name}{post} {list(inp.shape[1:])} -> {list(out.shape[1:])}"
        gflop = 2 * out.numel() * weight[0].numel() / 1e9
        stats[kind][0] += dt
        stats[kind][1] += gflop
        return out

    with torch.inference_mode():
        for _ in range(2):
            model(x)
        FusedModule._conv = timed
        try:
            t0 = time.perf_counter()
            for _ in range(args.iters):
                model(x)
            total = (time.perf_counter() - t0) / args.iters
        finally:
            FusedModule._conv = conv
    conv_s = sum(s for s, _ in stats.values()) / args.iters
    print(f"{args.variant} batch {args.batch} {args.img_size}px {args.dtype}: {args.batch / total:.1f} images/s, "
          f"{total * 1e3:.0f} ms per forward, convs {conv_s / total:.0%} of it\n")
    print("| conv (per call: in -> out, C x H x W) | ms per forward | share | GFLOP/s |")
    print("|---|---:|---:|---:|")
    for kind, (s, gflop) in sorted(stats.items(), key=lambda kv: -kv[1][0]):
        print(f"| {kind} | {s / args.iters * 1e3:.1f} | {s / args.iters / total:.1%} | {gflop / s:.0f} |")


if __name__ == "__main__":
    main()
