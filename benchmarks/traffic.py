"""Bytes a PoolFormer forward moves through GPU memory, per image, by path: the traffic model behind
``docs/fast.md`` and the predictions ``benchmarks/gpu_check.py`` checks.

A block of a stage with C channels on an H x W map handles maps of T = H*W*C elements (the
4C-wide hidden map is 4 T). Each pass reads its inputs once and writes its outputs once (what a
well-written kernel achieves; the 3x3 stencil's neighbours come from cache). Counted passes:

* ``plain`` (eager PyTorch, ours or timm's, channels_last): GroupNorm (statistics read, then read +
  write), pool, subtract, LayerScale, residual add; again GroupNorm, fc1, GELU, fc2, LayerScale, add.
* ``ours`` (``fuse(backend="triton")``): the mixer kernel (read x, write y), fc1 (read y, write the
  hidden map), fc2 (read it and y, write z); the statistics come from the previous kernel's
  epilogue, except for a stage's first block (one more read). Plus fc2's partial-sum buffer (a float32
  pair per token and 128-channel block); the mixer's partial sums, one pair per program, are negligible.
* ``inductor`` is not modelled here: ``gpu_check.py`` reads what inductor's generated kernels
  declare they move, on the device.

Stem, downsampling convolutions and the head are the same for every path and counted once.

    python benchmarks/traffic.py [--img-size 224] [--bandwidth 4.3e12]
"""
from __future__ import annotations

import argparse

# passes of the plain block, in maps of T (reads + writes)
PLAIN_BLOCK = {
    "norm1 (stats read, then read + write)": 3, "pool (read, write)": 2, "subtract (2 reads, write)": 3,
    "layer scale 1 (read, write)": 2, "residual add (2 reads, write)": 3, "norm2": 3,
    "fc1 (read, write 4)": 5, "GELU (read 4, write 4)": 8, "fc2 (read 4, write)": 5,
    "layer scale 2": 2, "residual add": 3,
}
OURS_BLOCK = {"mixer (read x, write y)": 2, "fc1 (read y, write 4)": 5, "fc2 (read 4 and y, write z)": 6}

S12 = dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512))


def _pow2(n: int, lo: int, hi: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return max(lo, min(hi, p))


def per_image_bytes(img_size: int = 224, depths=S12["depths"], dims=S12["dims"], elem: int = 2) -> dict[str, float]:
    """Bytes per image for the ``plain`` and ``ours`` paths and the ``shared`` parts (stem, downsampling
    convolutions, head), with ``elem`` bytes per activation element (2: bf16/fp16)."""
    shared = 3 * img_size * img_size * elem  # the stem reads the image
    plain = ours = 0.0
    size = img_size // 4
    prev = None
    for depth, c in zip(depths, dims):
        if prev is not None:  # downsampling conv: read the previous map, write this one
            shared += prev * elem
            size //= 2
        t = size * size * c
        shared += t * elem  # the stem / downsampling output
        prev = t
        plain += depth * sum(PLAIN_BLOCK.values()) * t * elem
        # fc2's partial sums (a float32 pair per token and 128-channel block), written once and read once
        blocks = -(-c // _pow2(c, 16, 128))
        partial = blocks * size * size * 8 * 2
        ours += depth * (sum(OURS_BLOCK.values()) * t * elem + partial) + t * elem  # + first block's stats
    shared += 2 * prev * elem  # head: GroupNorm statistics, then the normalised mean
    return {"plain": plain, "ours": ours, "shared": shared}


def predictions(img_size: int = 224, bandwidth: float = 4.3e12, **kw) -> dict[str, dict[str, float]]:
    """Images/s each path would reach if it moved exactly its counted bytes at ``bandwidth`` (B/s)."""
    b = per_image_bytes(img_size, **kw)
    out = {}
    for path in ("plain", "ours"):
        total = b[path] + b["shared"]
        out[path] = {"mb_per_image": total / 1e6, "blocks_mb_per_image": b[path] / 1e6,
                     "images_per_s": bandwidth / total}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--bandwidth", type=float, default=4.3e12, help="copy bandwidth, bytes/s (read + write)")
    args = ap.parse_args()
    print(f"PoolFormer-S12, {args.img_size}x{args.img_size}, bf16, per image; bandwidth {args.bandwidth / 1e12:.2f} TB/s")
    print(f"per block, in maps of H*W*C: plain {sum(PLAIN_BLOCK.values())}, ours {sum(OURS_BLOCK.values())} "
          "(+1 for a stage's first block)")
    for path, p in predictions(args.img_size, args.bandwidth).items():
        print(f"{path:6s} {p['mb_per_image']:7.2f} MB/image (blocks {p['blocks_mb_per_image']:6.2f}) -> "
              f"{p['images_per_s']:9.0f} images/s")


if __name__ == "__main__":
    main()
