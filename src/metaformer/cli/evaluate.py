"""``metaformer eval`` (top-1/top-5 on any --data source, distributed under torchrun) and ``metaformer predict``."""
from __future__ import annotations

import argparse
import sys
import time

from ..ranges import NUM_CLASSES, whole
from .common import (add_amp, add_batch_size, add_checkpoint, add_device, add_json, add_workers, print_json)


def _add_weights(p) -> None:
    add_checkpoint(p, what="weights: ours (a training checkpoint or .safetensors, which name their model), the "
                           "authors', timm's or Hugging Face's (default: the variant's published weights)")
    p.add_argument("--num-classes", type=NUM_CLASSES, help="classifier width of a checkpoint that does not say "
                                                           "(default: 1000)")
    p.add_argument("--ema", action="store_true", help="the training checkpoint's EMA weights (train --ema; timm's "
                                                      "state_dict_ema) instead of its model weights")
    p.add_argument("--allow-nonfinite", action="store_true", help="load weights holding NaN or inf instead of "
                   "refusing them")


def _add_speed(p) -> None:
    add_device(p)
    add_amp(p, "none")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (implied by the "
                                                                "fused model)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="run the fused inference model (metaformer.fuse: the same numbers, faster) for models with "
                        "blocks it covers; --no-fused runs the model as built")


def add_parser(subparsers) -> None:
    e = subparsers.add_parser(
        "eval", description="Top-1/top-5 with the weights' eval transform (resize floor(size/crop_pct) bicubic, centre "
                    "crop), the data's classes matched to the model's by name. MODEL may be omitted for a checkpoint "
                    "of ours (it stores its config). Without --checkpoint: the variant's published weights. "
                    "Distributed: torchrun --nproc_per_node=N -m metaformer eval ... (exact counts).")
    e.add_argument("model", nargs="?", help="variant name or tag, e.g. poolformer_s12")
    e.add_argument("--data", help="ImageNet-style root (its val/), a folder of class folders, a folder of shards "
                                  "from `metaformer data pack` (its val shards), or a Hugging Face datasets folder; "
                                  "'builtin' or omitted: the built-in digits val split")
    _add_weights(e)
    add_batch_size(e, 100)
    add_workers(e)
    _add_speed(e)
    e.add_argument("--tta", choices=["none", "flip"], default="none", help="flip: average each image's prediction "
                                                                           "with its mirror image's")
    e.add_argument("--exported", metavar="FILE", help="evaluate this file from `metaformer export` or `metaformer "
                   "quantize` (int8) in its own runtime instead of PyTorch (its stored classes and preprocessing)")
    e.add_argument("--strict-data", action="store_true", help="stop at the first unreadable image")
    e.add_argument("--positional", action="store_true", help="map the i-th class folder (sorted) to class i, as "
                   "torchvision's ImageFolder does, instead of matching folders to the model's classes by name "
                   "(for a checkpoint without class names)")
    add_json(e)
    e.set_defaults(func=run_eval)

    p = subparsers.add_parser(
        "predict", description="Top-k labels for each image: ImageNet names for 1000-class models, the training data's own "
                    "class names for a checkpoint of ours (then MODEL may be omitted).")
    p.add_argument("inputs", nargs="+", metavar="[MODEL] IMAGE", help="variant name (optional with a checkpoint "
                                                                      "of ours) followed by image files or folders")
    _add_weights(p)
    p.add_argument("--topk", type=whole(1), default=5, help="labels per image (at most the model's classes)")
    add_batch_size(p, 32)
    _add_speed(p)
    p.add_argument("--exported", metavar="FILE", help="run this file from `metaformer export` instead of PyTorch: "
                   ".onnx in ONNX Runtime, .pt in TorchScript, .pt2 with torch.export, .xml in OpenVINO (class names "
                   "and preprocessing stored in the file; --checkpoint or MODEL must agree with them)")
    add_json(p)
    p.set_defaults(func=run_predict)


def run_eval(args) -> int:
    from .. import data as D
    from ..engine.runtime import setup
    from ..tasks.inference import eval_dataset, eval_loader, evaluate, load_for_inference, prepare

    if args.exported:
        from . import UserError
        from ..tools.exported import load_exported

        if args.ema or args.tta != "none" or args.amp not in ("auto", "none"):
            raise UserError("--exported runs the file as written: --ema, --tta and --amp apply to PyTorch models")
        rt = setup("cpu", "none")
        loaded = load_exported(args.exported, args.model, args.checkpoint)
        applied = [f"{loaded.model.format} file"] + (["int8"] if loaded.model.quantization else [])
    else:
        rt = setup(args.device, args.amp)
        loaded = load_for_inference(args.model, args.checkpoint, args.num_classes, rt.device, args.allow_nonfinite,
                                    args.ema)
    ds = eval_dataset(loaded, args.data, args.positional)
    if not args.exported:
        applied = prepare(loaded, rt.device, args.fused, args.channels_last)
    unreadable = D.UnreadableLog(strict=args.strict_data)
    t0 = time.time()
    result = evaluate(loaded.model, eval_loader(ds, rt, args.batch_size, args.workers), rt.device, rt.amp_dtype,
                      args.channels_last and not args.fused, unreadable=unreadable, progress=rt.main,
                      tta=None if args.tta == "none" else args.tta)
    seconds = time.time() - t0
    bad = unreadable.end_epoch()
    if rt.main:
        result.update(source=loaded.source, data=f"builtin {D.builtin_name(args.data)} (val)" if D.is_builtin(args.data) else args.data,
                      img_size=loaded.img_size, unreadable=len(bad), processes=rt.world, amp=rt.amp,
                      speed=applied, tta=args.tta, images_per_s=round(result["images"] / max(seconds, 1e-9), 1))
        if args.json:
            print_json(result)
        else:
            print(f"{loaded.source} on {result['data']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
                  f"loss {result['loss']:.4f}  ({result['images']} images at {loaded.img_size}px, "
                  f"{result['images_per_s']:.0f} img/s on {rt.world} x {rt.device.type}"
                  + "".join(f", {a}" for a in [*applied, *(["amp " + rt.amp] if rt.amp != "none" else []),
                                                 *(["tta flip"] if args.tta == "flip" else [])]) + ")")
        for b in bad:
            print(f"  skipped unreadable {b.path}: {b.error}")
    rt.close()
    return 0


def split_model_and_images(inputs: list[str], has_weights, verb: str) -> tuple[str | None, list[str]]:
    """``[MODEL] IMAGE...``: the model name is optional when the weights say what they are."""
    from . import UserError
    from ..zoo import list_models, split_name

    model, images = None, list(inputs)
    if split_name(images[0])[0] in list_models():
        model, images = images[0], images[1:]
    elif not has_weights:
        raise UserError(f"{images[0]!r} is not a model name; usage: metaformer {verb} MODEL IMAGE... (or "
                        f"--checkpoint F IMAGE... for a checkpoint trained here"
                        + (", or --exported FILE IMAGE...)" if verb == "predict" else ")"))
    if not images:
        raise UserError(f"no images given: metaformer {verb} [MODEL] IMAGE...")
    return model, images


def run_predict(args) -> int:
    from . import UserError
    from ..data import list_images
    from ..engine.runtime import setup
    from ..tasks.inference import load_for_inference, predict, prepare

    model, inputs = split_model_and_images(args.inputs, args.checkpoint or args.exported, "predict")
    if args.topk < 1 or args.batch_size < 1:
        raise UserError("--topk and --batch-size must be at least 1")
    images = list_images(inputs)
    if args.exported:
        if args.ema:
            raise UserError("--ema applies to a training checkpoint; export the EMA weights instead")
        from ..tools.exported import load_exported

        loaded, device, amp_dtype, channels_last = load_exported(args.exported, model, args.checkpoint), "cpu", None, False
    else:
        rt = setup(args.device, args.amp)
        loaded = load_for_inference(model, args.checkpoint, args.num_classes, rt.device, args.allow_nonfinite,
                                    args.ema)
        prepare(loaded, rt.device, args.fused, args.channels_last)
        device, amp_dtype, channels_last = rt.device, rt.amp_dtype, args.channels_last and not args.fused
    results = predict(loaded, images, args.topk, device, args.batch_size, amp_dtype, channels_last)
    bad = [r for r in results if "error" in r]
    if len(bad) == len(results):
        raise UserError(f"none of the {len(results)} image(s) could be read; the first: {bad[0]['error']}")
    if args.json:
        print_json(results)
    for r in [] if args.json else results:
        if "predictions" in r:
            print(r["image"])
            for name, p in r["predictions"]:
                print(f"  {100 * p:6.2f}%  {name}")
    if bad:
        print(f"skipped {len(bad)} unreadable image(s):", file=sys.stderr)
        for r in bad:
            print(f"  {r['image']}: {r['error']}", file=sys.stderr)
    return 0
