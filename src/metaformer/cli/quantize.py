"""``metaformer quantize``: static int8 calibrated on the training split of ``--data``, its accuracy cost measured on
the validation split, and the file refused when the cost exceeds ``--max-drop``."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import need
from ..ranges import NUM_CLASSES, real, whole
from . import UserError
from .common import add_batch_size, add_checkpoint, add_json, add_workers, logs_to_stderr, print_json


def model_or_checkpoint(first: str | None, checkpoint: str | None) -> tuple[str | None, str | None]:
    """``[MODEL|CHECKPOINT]``: a positional that names a file is the checkpoint (``metaformer quantize
    runs/digits/best.pth``); otherwise it is the variant, and ``--checkpoint`` the weights."""
    if first and (Path(first).expanduser().is_file() or first.endswith((".pth", ".tar", ".safetensors"))):
        if checkpoint:
            raise UserError(f"{first} is a checkpoint and so is --checkpoint {checkpoint}: give one of them")
        return None, first
    return first, checkpoint


def add_parser(sub) -> None:
    from ..tools.quantize import BACKENDS, DEFAULT_BACKEND

    p = sub.add_parser(
        "quantize",
        description="Calibrate on --calib-images images of --data's training split, write the int8 model "
                    "(OpenVINO IR quantized by NNCF, ONNX Runtime's static quantization of our ONNX export, or "
                    "PyTorch's PT2E flow with the x86 Inductor quantizer), then run the written file on the validation split beside the fp32 model "
                    "and report fp32 top-1, int8 top-1, their difference and the share of images on which both "
                    "predict the same class. Over --max-drop points the file is not written unless --force. "
                    "`eval`, `predict`, `bench` and `serve` run the file (--exported FILE).")
    p.add_argument("model", nargs="?", metavar="MODEL|CHECKPOINT", help="a checkpoint of ours (it names its "
                   "model), or a variant name with --checkpoint (or its published weights)")
    add_checkpoint(p, what="weights in any layout metaformer loads, when MODEL is a variant name")
    p.add_argument("--data", help="where the calibration (train split) and validation images come from: the "
                                  "sources `eval --data` takes; 'builtin' or omitted: the built-in digits")
    p.add_argument("--output", "-o", help="the int8 file, or a folder to write NAME_int8.xml into (.onnx for "
                                          "--backend ort, .pt2 for pt2e); default: CHECKPOINT_int8.xml beside the "
                                          "checkpoint, or MODEL_int8.xml here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file (else refused)")
    p.add_argument("--backend", choices=list(BACKENDS), default=None,
                   help=f"default: the one --output's extension names, else {DEFAULT_BACKEND} (docs/deploy.md says "
                        "why). ort: ONNX Runtime static quantization (.onnx); pt2e: torchao's X86InductorQuantizer "
                        "(.pt2, compiled by Inductor when loaded); openvino: NNCF's post-training quantization "
                        "(OpenVINO IR .xml + .bin; the openvino extra)")
    p.add_argument("--calib-images", type=whole(1, 1_000_000), default=256, help="training images the activation ranges come from")
    p.add_argument("--max-drop", type=real(-100, 100), default=1.0,
                   help="largest top-1 loss in points the file may have (negative: int8 must beat fp32 by that much)")
    p.add_argument("--force", action="store_true", help="write the file even when its top-1 drop exceeds "
                                                        "--max-drop")
    p.add_argument("--num-classes", type=NUM_CLASSES, help="classifier width of a checkpoint without stored config")
    p.add_argument("--allow-nonfinite", action="store_true", help="load weights holding NaN or inf")
    add_batch_size(p, 32, "images per calibration and validation batch")
    add_workers(p, 0)
    add_json(p, "print the result (file, accuracy, ops per precision) as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import data as D
    from ..tasks.inference import eval_dataset, load_for_inference
    from ..tools.exported import files_of
    from ..tools.quantize import EXTRA, FORMAT, backend_for, check_output, describe_ops, quantize

    model, checkpoint = model_or_checkpoint(args.model, args.checkpoint)
    args.backend = backend_for(args.output, args.backend)
    # what the chosen backend needs, checked before the model loads (a missing one named with its extra)
    modules = {"ort": ("onnx", "onnxruntime"), "pt2e": ("torchao",), "openvino": ("openvino", "nncf")}
    for module in modules[args.backend]:
        need(module, EXTRA[args.backend], f"int8 quantization with --backend {args.backend}")
    default = (str(Path(checkpoint).with_name(Path(checkpoint).stem + "_int8")) if checkpoint
               else f"{model or 'model'}_int8")
    if args.output is not None:  # inside a folder --output: the default's name
        default = Path(default).name
    output = check_output(args.output, args.backend, args.overwrite, default)  # before the model loads
    with logs_to_stderr(args.json):
        loaded = load_for_inference(model, checkpoint, args.num_classes, "cpu", args.allow_nonfinite)
        val = eval_dataset(loaded, args.data)
        calib = D.open_source(args.data, loaded.transform, loaded.transform, loaded.img_size).train
        result = quantize(loaded, calib, val, output, args.backend, args.calib_images, args.max_drop, args.force,
                          args.batch_size, args.workers, progress=not args.json, log=print,
                          overwrite=args.overwrite)
    a = result.accuracy
    if args.json:
        print_json({"path": str(result.path), "written": result.written, "backend": result.backend,
                    "calib_images": result.calib_images, "val_images": a.images, "fp32_top1": a.fp32_top1,
                    "int8_top1": a.int8_top1, "drop": a.drop, "agreement": a.agreement, "max_drop": result.max_drop,
                    "ops": result.ops})
    else:
        files = files_of(result.path, FORMAT[result.backend])
        size = f", {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB" if result.written else ""
        print(f"{'wrote' if result.written else 'refused'} {result.path} (int8, {result.backend}, calibrated on "
              f"{result.calib_images} images{size})")
        print(f"on {a.images} validation images: fp32 top-1 {a.fp32_top1:.2f}%  int8 top-1 {a.int8_top1:.2f}%  "
              f"drop {a.drop:+.2f} points  agreement {a.agreement:.2f}%")
        print(f"  {describe_ops(result.ops)}")
    if not result.written:
        print(f"metaformer quantize: error: {result.refusal}", file=sys.stderr)
        return 2
    return 0
