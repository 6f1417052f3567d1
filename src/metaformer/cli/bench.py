"""``metaformer bench``: our inference and training modes beside timm and ONNX Runtime, interleaved."""
from __future__ import annotations

import itertools
import sys
import time

from ..tools import bench as harness
from . import UserError


def _csv(kind=str):
    return lambda s: [kind(v) for v in s.split(",") if v]


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark inference and training against timm / ONNX Runtime",
                       description="Times every mode of each configuration in one process, interleaved, after "
                                   "warm-up; prints a markdown table (median, min-max, latency, max logit "
                                   "difference vs the plain model, peak training memory) and writes JSON.")
    p.add_argument("--variant", type=_csv(), default=["poolformer_s12"], help="comma-separated variants")
    p.add_argument("--batch", type=_csv(int), default=[1, 32], help="comma-separated batch sizes")
    p.add_argument("--img-size", type=_csv(int), default=[224], help="comma-separated resolutions")
    p.add_argument("--dtype", type=_csv(), default=["fp32"], help="fp32, bf16, fp16 (comma-separated)")
    p.add_argument("--modes", type=_csv(), default=harness.DEFAULT_INFER,
                   help=f"inference modes, from {','.join(harness.INFER_MODES)}")
    p.add_argument("--train", action="store_true", help="also benchmark training steps")
    p.add_argument("--train-only", action="store_true", help="only benchmark training steps")
    p.add_argument("--train-modes", type=_csv(), default=harness.DEFAULT_TRAIN,
                   help=f"training modes, from {','.join(harness.TRAIN_MODES)}")
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="where to write results (default benchmarks/results/bench-*.json)")
    p.add_argument("--md", default=None, help="also write the markdown table here")
    p.set_defaults(func=run)


def run(args) -> int:
    for d in args.dtype:
        if d not in harness.DTYPES:
            raise UserError(f"unknown dtype {d!r}; choose from {', '.join(harness.DTYPES)}")
    results = []
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if not args.train_only:
        for variant, batch, size, dtype in itertools.product(args.variant, args.batch, args.img_size, args.dtype):
            log(f"inference: {variant} batch {batch} {size}x{size} {dtype}")
            results += harness.bench_inference(variant, args.modes, batch, size, dtype, args.device,
                                               repeats=args.repeats, warmup=args.warmup, log=log)
    if args.train or args.train_only:
        for variant, size in itertools.product(args.variant, args.img_size):
            log(f"training: {variant} batch {args.train_batch} {size}x{size} fp32")
            results += harness.bench_training(variant, args.train_modes, args.train_batch, size, args.device,
                                              repeats=max(3, args.repeats // 2), warmup=2,
                                              memory=not args.no_memory, log=log)
    env = harness.environment()
    table = (f"{env['cpu']}, {env['threads']} threads; torch {env['torch']}, timm {env['timm']}, onnxruntime "
             f"{env['onnxruntime']}; malloc: {env['malloc']}\n\n" + harness.markdown_table(results))
    print(table)
    path = args.json or f"benchmarks/results/bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    harness.save_json(results, path, sys.argv)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")
    log(f"wrote {path}")
    return 0
