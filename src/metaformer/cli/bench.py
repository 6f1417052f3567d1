"""``metaformer bench``: our inference and training modes beside timm and ONNX Runtime, interleaved."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import os
import sys
import time

from ..ranges import IMG_SIZE, whole
from ..tools import bench as harness
from . import UserError
from .common import add_json, print_json

BATCH = whole(1, 4096)  # a benchmark's input is allocated whole: far beyond this it no longer fits in memory


def _csv(kind=str):
    def parse(text: str) -> list:
        return [kind(v) for v in text.split(",") if v]
    parse.item = kind  # each value's type (a Range for numbers)
    return parse


def _one_of(choices):
    def check(name: str) -> str:
        if name not in choices:
            raise argparse.ArgumentTypeError(f"unknown {name!r}; choose from {', '.join(choices)}")
        return name
    return check


def add_parser(sub) -> None:
    p = sub.add_parser("bench", description="Times every mode of each configuration in one process, interleaved, after "
                                   "warm-up, and prints each configuration's rows of the markdown table as it "
                                   "finishes (median, min-max, latency, max logit difference vs the plain model, "
                                   "peak training memory), with the time left; writes all results as JSON.")
    p.add_argument("--variant", type=_csv(), default=["poolformer_s12"], help="comma-separated variants")
    p.add_argument("--batch-size", "-b", type=_csv(BATCH), default=[1, 32],
                   help=f"comma-separated batch sizes, each {BATCH.describe()}")
    p.add_argument("--img-size", type=_csv(IMG_SIZE), default=[224],
                   help=f"comma-separated resolutions, each {IMG_SIZE.describe()}")
    p.add_argument("--dtype", type=_csv(_one_of(harness.DTYPES)), default=["fp32"],
                   help="fp32, bf16, fp16 (comma-separated)")
    p.add_argument("--modes", type=_csv(_one_of(harness.INFER_MODES)), default=harness.DEFAULT_INFER,
                   help=f"inference modes, from {','.join(harness.INFER_MODES)}")
    p.add_argument("--exported", metavar="FILE", help="also time this file from `metaformer export` or `metaformer "
                   "quantize` (mode 'exported'), beside the other modes run on its architecture with random "
                   "weights, at its input size")
    p.add_argument("--train", action="store_true", help="also benchmark training steps")
    p.add_argument("--train-only", action="store_true", help="only benchmark training steps")
    p.add_argument("--train-modes", type=_csv(_one_of(harness.TRAIN_MODES)), default=harness.DEFAULT_TRAIN,
                   help=f"training modes, from {','.join(harness.TRAIN_MODES)}")
    p.add_argument("--train-batch", type=BATCH, default=32, help="batch size of the training steps")
    p.add_argument("--train-dtype", default="fp32", choices=list(harness.DTYPES),
                   help="training precision: fp32, or bf16/fp16 mixed precision under autocast")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--repeats", type=whole(1, 10_000), default=10, help="timed rounds per mode")
    p.add_argument("--warmup", type=whole(0, 1000), default=3, help="untimed rounds per mode first")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--output", "-o", help="where to write the results as JSON (default: "
                   "runs/bench/bench-DATE-TIME.json under the current folder; the path is printed)")
    p.add_argument("--md", help="also write the markdown table here")
    add_json(p, "print the results as JSON (stdout) instead of the table")
    p.set_defaults(func=run)


def check(args) -> str:
    """Everything a benchmark needs, checked before it runs (it may take an hour): the lists are not empty, the
    variants exist, the device is there, the output files can be written. Returns the JSON path."""
    import torch

    from ..atomic import check_writable
    from ..errors import need
    from ..zoo import get_model_info

    for flag, values in (("--variant", args.variant), ("--batch-size", args.batch_size),
                         ("--img-size", args.img_size), ("--dtype", args.dtype), ("--modes", args.modes),
                         ("--train-modes", args.train_modes)):
        if not values:
            raise UserError(f"{flag} names nothing: give at least one value")
    for variant in args.variant:
        get_model_info(variant)  # an unknown name: the error names close ones
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA GPU is visible on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {args.device}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device!r}: the benchmark runs on cpu or cuda")
    ort = sorted(set(args.modes) & {"ort", "timm_ort"})
    if ort and not args.train_only:  # asked for by name: refused now, not reported as skipped after the run
        for module in ("onnx", "onnxruntime"):  # an ONNX export, run in ONNX Runtime
            need(module, "export", f"--modes {','.join(ort)}")
    ov = sorted(m for m in args.modes if m.startswith("ov_"))
    if ov and not args.train_only:
        for module in ("openvino", *(("nncf",) if any(m.endswith("int8") for m in ov) else ())):
            need(module, "openvino", f"--modes {','.join(ov)}")
    path = args.output or f"runs/bench/bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    check_writable(path, f"--output {path}")
    if args.md:
        check_writable(args.md, f"--md {args.md}")
    return path


def run(args) -> int:
    from ..engine.loop import progress_bar

    path = check(args)
    jobs = []  # (description, thunk), run one at a time, each printed as soon as it is done
    model = None
    if args.exported:
        if args.train or args.train_only or args.device != "cpu":
            raise UserError("--exported times a file on the CPU: drop --train/--train-only/--device")
        model = harness.model_of_file(args.exported)
        args.variant, args.img_size = [model.variant or "model"], [model.img_size[0]]
    if not args.train_only:
        for variant, batch, size, dtype in itertools.product(args.variant, args.batch_size, args.img_size, args.dtype):
            jobs.append((f"inference: {variant} batch {batch} {size}x{size} {dtype}", functools.partial(
                harness.bench_inference, variant, args.modes, batch, size, dtype, args.device, repeats=args.repeats,
                warmup=args.warmup, model=model, exported=args.exported)))
    if args.train or args.train_only:
        for variant, size in itertools.product(args.variant, args.img_size):
            jobs.append((f"training: {variant} batch {args.train_batch} {size}x{size} {args.train_dtype}",
                         functools.partial(harness.bench_training, variant, args.train_modes, args.train_batch, size,
                                           args.device, repeats=max(3, args.repeats // 2), warmup=2,
                                           memory=not args.no_memory, dtype=args.train_dtype)))
    env = harness.environment()
    gpu = f"; {env['cuda']} (driver {env.get('driver')}, CUDA {env.get('cuda_runtime')})" if env["cuda"] else ""
    header = (f"{env['cpu']} ({env['isa']}; torch dispatch {env['onednn']}), {env['threads']} threads{gpu}; "
              f"torch {env['torch']}, timm {env['timm']}, "
              f"triton {env['triton']}, onnxruntime {env['onnxruntime']}; malloc: {env['malloc']}; load average "
              f"{env['loadavg']} at the start\n\n")
    lines = harness.markdown_table([]).splitlines()
    if not args.json:
        print(header + "\n".join(lines), flush=True)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    results, t0 = [], time.time()
    with progress_bar(jobs, desc="bench", unit="config") as bar:
        for k, (what, job) in enumerate(bar, start=1):
            bar.set_postfix_str(what, refresh=True)
            rows = job(log=log)
            results += rows
            lines += harness.markdown_table(rows).splitlines()[2:]
            if not args.json:
                bar.clear()
                print("\n".join(harness.markdown_table(rows).splitlines()[2:]), flush=True)
            elapsed = time.time() - t0
            if bar.disable:  # no terminal: say how far along it is on stderr instead
                log(f"[{k}/{len(jobs)}] {what} done; {elapsed:.0f}s so far, about "
                    f"{elapsed / k * (len(jobs) - k):.0f}s left")
    if hasattr(os, "getloadavg"):
        lines.append(f"\nload average at the end: {[round(v, 2) for v in os.getloadavg()]}")
    harness.save_json(results, path, sys.argv)
    if args.md:
        with open(args.md, "w") as f:
            f.write(header + "\n".join(lines) + "\n")
    if args.json:
        print_json({"environment": env, "results": [dataclasses.asdict(r) for r in results]})
    log(f"wrote {path}")
    return 0
