"""``metaformer data``: write tar shards from an ImageFolder root, and show how ``--data`` reads a source."""
from __future__ import annotations

import json

from ..ranges import IMG_SIZE, SEED, whole


def run_pack(args) -> int:
    from tqdm import tqdm

    from ..data import pack_image_folder

    bar = tqdm(unit="img", desc="pack", disable=None, leave=False, dynamic_ncols=True)
    try:
        info = pack_image_folder(args.root, args.out, args.shard_size, overwrite=args.overwrite, seed=args.seed,
                                 progress=lambda split, name, n: bar.update(n))
    finally:
        bar.close()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    parts = [f"{s} {d['num_samples']} samples in {len(d['filenames'])} shard(s)" for s, d in info["splits"].items()]
    print(f"packed {args.root} -> {args.out}: {', '.join(parts)}; classes in {args.out}/classes.json")
    print(f"train on it with --data {args.out}")
    return 0


def run_check(args) -> int:
    from ..data import open_source

    src = open_source(args.data, None, None)
    if args.json:
        print(json.dumps({"data": args.data, "description": src.description, "classes": src.class_names,
                          "train": len(src.train), "val": len(src.val)}, indent=2))
        return 0
    shown = ", ".join(src.class_names[:10]) + (", ..." if len(src.class_names) > 10 else "")
    print(f"{src.description}\n{len(src.class_names)} classes: {shown}")
    return 0


def run_export_digits(args) -> int:
    from ..data.digits import export_digits

    counts = export_digits(args.dir, args.img_size)
    print(f"wrote the built-in digits to {args.dir}: train {counts['train']} and val {counts['val']} images, "
          f"{args.img_size}x{args.img_size} PNGs in one folder per digit")
    print(f"train on them with --data {args.dir}; as tar shards: metaformer data pack {args.dir} OUT")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("data", description="Data sources for --data: an ImageFolder root, tar shards, or a Hugging Face "
                                   "datasets folder (see docs/data.md).")
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    pack = verbs.add_parser("pack", help="write ROOT/train and ROOT/val as tar shards in OUT",
                            description="Write an ImageFolder root (ROOT/train/<class>/*, ROOT/val/<class>/*) as tar "
                                        "shards OUT/train-000000.tar ..., OUT/val-000000.tar ..., with OUT/classes.json "
                                        "and OUT/_info.json. Image files are stored unchanged; the train split in a "
                                        "seeded random order. Then train with --data OUT.")
    pack.add_argument("root", metavar="ROOT", help="ImageFolder root with train/ and val/ class folders")
    pack.add_argument("out", metavar="OUT", help="output folder (new or empty)")
    pack.add_argument("--shard-size", type=whole(1), default=1000, metavar="N",
                      help="samples per shard (default 1000); keep the train shards many times the number of "
                           "ranks x workers, or padding grows")
    pack.add_argument("--seed", type=SEED, default=0, help="seed of the train split's order (default 0)")
    pack.add_argument("--overwrite", action="store_true", help="replace the shards of a non-empty OUT")
    pack.add_argument("--json", action="store_true", help="print the written _info.json")
    pack.set_defaults(func=run_pack)
    digits = verbs.add_parser("export-digits", help="write the built-in digits as an ImageFolder root",
                              description="Write the built-in digits (the same 1,437 / 360 split the demo trains on) "
                                          "as DIR/train/<digit>/*.png and DIR/val/<digit>/*.png: the layout --data "
                                          "reads, and `metaformer data pack DIR OUT` turns into shards.")
    digits.add_argument("dir", metavar="DIR", help="output folder (new or empty)")
    digits.add_argument("--img-size", type=IMG_SIZE, default=32, help="image side in pixels")
    digits.set_defaults(func=run_export_digits)
    check = verbs.add_parser("check", help="how --data DATA is read: its kind, sizes and classes",
                             description="Open DATA as `metaformer train --data DATA` would (same checks) and "
                                         "describe it.")
    check.add_argument("data", metavar="DATA", help="ImageFolder root, shard folder or pattern, Hugging Face folder")
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(func=run_check)
