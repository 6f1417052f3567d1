"""``metaformer export``: ONNX / TorchScript / torch.export / OpenVINO IR, verified in its own runtime."""
from __future__ import annotations

import argparse

from ..ranges import NUM_CLASSES
from . import UserError
from .common import add_checkpoint, add_json, print_json


def load(args):
    from ..tasks.inference import load_for_inference

    return load_for_inference(args.model, args.checkpoint, num_classes=getattr(args, "num_classes", None),
                              allow_nonfinite=args.allow_nonfinite)


def run_export(args) -> int:
    from ..atomic import check_writable
    from ..tools.export import ExportError, check_runtime, export, export_metadata, export_path, sample_image
    from ..tools.exported import files_of

    out = export_path(args.output, args.format, f"{args.model or 'model'}{'_fused' if args.fused else ''}")
    check_runtime(args.format)  # before the model is loaded and exported
    check_writable(out, f"--output {out}")
    loaded = load(args)
    model = loaded.model
    if args.fused:
        from ..fast import fuse

        # the portable backend: oneDNN's packed-weight ops do not exist in ONNX or TorchScript runtimes
        model = fuse(model, backend="aten")
    image = sample_image(loaded.transform) if loaded.model.in_chans == 3 else None
    try:
        result = export(model, out, args.format, img_size=loaded.img_size, image=image,
                        dynamic_batch=args.dynamic_batch, dynamic_size=args.dynamic_size, dtype=args.dtype,
                        metadata=export_metadata(loaded))
    except ExportError as e:
        raise UserError(str(e)) from None
    size_mb = sum(p.stat().st_size for p in files_of(result.path, result.format)) / 2**20
    if args.json:
        print_json({"path": str(result.path), "format": result.format, "dtype": result.dtype, "size_mib": size_mb,
                    "max_diff_random": result.max_diff_random, "max_diff_image": result.max_diff_image,
                    "tolerance": result.tolerance, "top1_agrees": result.top1_agrees, "notes": result.notes})
        return 0
    print(f"wrote {result.path} ({result.format}, {result.dtype}, {size_mb:.1f} MiB)")
    print(f"check: max |logit diff| vs PyTorch: random input {result.max_diff_random:.3g}, "
          f"real image {result.max_diff_image:.3g} (tolerance {result.tolerance:g}); top-1 agrees: {result.top1_agrees}")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


def add_weights(p, model_positional: bool = True):
    if model_positional:
        p.add_argument("model", nargs="?", help="variant name, e.g. poolformer_s12 (optional with a checkpoint "
                       "saved by metaformer, which stores its config)")
    add_checkpoint(p, what="weights: any layout metaformer loads (default: the variant's published weights)")
    p.add_argument("--num-classes", type=NUM_CLASSES, help="classifier width of a checkpoint without stored config")
    p.add_argument("--allow-nonfinite", action="store_true", help="load weights holding NaN or inf instead of "
                   "refusing them")


def add_parser(sub) -> None:
    p = sub.add_parser("export", description="Write the model in a deployable format, run the file in its own runtime on a "
                                   "random input and a real image, and fail if it differs from PyTorch by more "
                                   "than 1e-4 (fp32).")
    add_weights(p)
    p.add_argument("--format", choices=["onnx", "torchscript", "exported", "openvino"], default="onnx",
                   help="ONNX (run in ONNX Runtime), TorchScript, torch.export's .pt2, or OpenVINO IR (.xml with "
                        "its .bin; the openvino extra)")
    p.add_argument("--output", "-o", help="output file, or a folder to write MODEL[_fused].onnx|.pt|.pt2|.xml into "
                                          "(default: that name in the current folder)")
    p.add_argument("--fused", action="store_true", help="export the fused inference model (metaformer.fuse)")
    p.add_argument("--dynamic-batch", action=argparse.BooleanOptionalAction, default=True,
                   help="any batch size at run time (the default); --no-dynamic-batch fixes the batch at 1, and "
                        "readers then run such a file one image per call")
    p.add_argument("--dynamic-size", action="store_true", help="any image size at run time (pooling models only)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="weights and input precision")
    add_json(p, "print the written file and its check as JSON")
    p.set_defaults(func=run_export)
