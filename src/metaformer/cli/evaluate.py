"""``metaformer eval`` (top-1/top-5 on a folder or the built-in digits) and ``metaformer predict``."""
from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    e = subparsers.add_parser(
        "eval", help="top-1/top-5 accuracy of a model or checkpoint",
        description="Top-1/top-5 with the variant's eval transform (resize floor(size/crop_pct) bicubic, centre "
                    "crop). MODEL may be omitted for a checkpoint trained by `metaformer train` (it stores its "
                    "config). Without --checkpoint: the variant's release weights.")
    e.add_argument("model", nargs="?", help="variant name, e.g. poolformer_s12")
    e.add_argument("--data", help="ImageNet-style root (its val/ is used) or a directory of class folders; "
                                  "'builtin' or omitted: the built-in digits val split")
    e.add_argument("--checkpoint", help="weights: ours (.pth training checkpoint, .safetensors), the authors', "
                                        "timm's or Hugging Face's")
    e.add_argument("--num-classes", type=int, help="classifier width of a foreign checkpoint (default 1000)")
    e.add_argument("--batch-size", type=int, default=100)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    e.add_argument("--strict-data", action="store_true", help="stop at the first unreadable image")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--fused", action="store_true", help="run the fused inference model (metaformer.fuse: same "
                                                        "numbers, faster)")
    e.add_argument("--positional", action="store_true", help="map the i-th class folder (sorted) to class i, as "
                   "torchvision's ImageFolder does, instead of matching folders to the model's classes by name "
                   "(for a checkpoint without class names)")
    e.add_argument("--allow-nonfinite", action="store_true", help="load weights holding NaN or inf instead of "
                   "refusing them")
    e.set_defaults(func=run_eval)

    p = subparsers.add_parser(
        "predict", help="top-k labels with probabilities for images",
        description="Top-k labels for each image: ImageNet names for 1000-class models, the training data's own "
                    "class names for a checkpoint trained by `metaformer train` (then MODEL may be omitted).")
    p.add_argument("inputs", nargs="+", metavar="[MODEL] IMAGE", help="variant name (optional with a checkpoint "
                                                                      "of ours) followed by image files")
    p.add_argument("--checkpoint", help="weights file (default: the variant's release weights)")
    p.add_argument("--num-classes", type=int, help="classifier width of a foreign checkpoint (default 1000)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--fused", action="store_true", help="run the fused inference model (metaformer.fuse)")
    p.add_argument("--exported", metavar="FILE", help="run this file from `metaformer export` instead of PyTorch: "
                   ".onnx in ONNX Runtime, .pt in TorchScript, .pt2 with torch.export (same preprocessing; class "
                   "names and preprocessing stored in the file; --checkpoint or MODEL must agree with them)")
    p.add_argument("--allow-nonfinite", action="store_true", help="load weights holding NaN or inf instead of "
                   "refusing them")
    p.set_defaults(func=run_predict)


def _device(arg):
    import torch

    return torch.device(arg or ("cuda" if torch.cuda.is_available() else "cpu"))


def run_eval(args) -> int:
    from .. import data as D
    from ..tasks.inference import eval_dataset, evaluate, load_for_inference

    device = _device(args.device)
    loaded = load_for_inference(args.model, args.checkpoint, args.num_classes, device, args.allow_nonfinite)
    if args.fused:
        from ..fast import fuse

        loaded.model = fuse(loaded.model)
    ds = eval_dataset(loaded, args.data, args.positional)
    loader = D.make_loader(ds, args.batch_size, None, args.workers)
    unreadable = D.UnreadableLog(strict=args.strict_data)
    result = evaluate(loaded.model, loader, device, unreadable=unreadable, progress=True)
    bad = unreadable.end_epoch()
    result.update(source=loaded.source, data="builtin digits (val)" if D.is_builtin(args.data) else args.data,
                  img_size=loaded.img_size, unreadable=len(bad))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{loaded.source} on {result['data']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
              f"loss {result['loss']:.4f}  ({result['images']} images at {loaded.img_size}px)")
    for b in bad:
        print(f"  skipped unreadable {b.path}: {b.error}")
    return 0


def split_model_and_images(inputs: list[str], has_weights, verb: str) -> tuple[str | None, list[str]]:
    """``[MODEL] IMAGE...``: the model name is optional when the weights say what they are."""
    from . import UserError
    from ..zoo import list_models

    model, images = None, list(inputs)
    if images[0] in list_models():
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
    from ..tasks.inference import load_for_inference, predict

    model, images = split_model_and_images(args.inputs, args.checkpoint or args.exported, "predict")
    if args.topk < 1:
        raise UserError("--topk must be at least 1")
    device = _device(args.device)
    if args.exported:
        if args.fused:
            raise UserError("--fused applies to the PyTorch model; export with `metaformer export --fused` instead")
        from ..tools.export import load_exported

        loaded, device = load_exported(args.exported, model, args.checkpoint), "cpu"
    else:
        loaded = load_for_inference(model, args.checkpoint, args.num_classes, device, args.allow_nonfinite)
        if args.fused:
            from ..fast import fuse

            loaded.model = fuse(loaded.model)
    results = predict(loaded, images, args.topk, device)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(r["image"])
        for name, p in r["predictions"]:
            print(f"  {100 * p:6.2f}%  {name}")
    return 0
