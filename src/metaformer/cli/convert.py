"""``metaformer convert``: a checkpoint in another layout, checked by its logits before it is written."""
from __future__ import annotations

import json

from ..ranges import IMG_SIZE


def run(args) -> int:
    from ..tools.convert import convert

    result = convert(args.src, args.dst, args.to, args.model, args.img_size)
    if args.json:
        print(json.dumps({"path": str(result.path), "layout": result.layout, "variant": result.variant,
                          "source_layout": result.source_layout, "max_relative_diff": result.max_diff,
                          "checked_in": result.checked_in, "skipped": result.skipped}))
    else:
        print(f"wrote {result.path} ({result.layout} layout, from {result.source_layout}; model "
              f"{result.variant or 'custom'}); checked in {' and '.join(result.checked_in)}: max relative logit "
              f"difference {result.max_diff:.2g}")
        for note in result.skipped:
            print(f"  note: {note}")
    return 0


def add_parser(sub) -> None:
    from ..tools.convert import TARGETS

    p = sub.add_parser("convert", description="Load SRC (any layout metaformer reads) strictly into the model it describes, "
                                   "write it as DST in the layout asked for, run the written file and keep it only "
                                   "if its logits equal the source's. --to hf writes a folder that "
                                   "transformers.PoolFormerForImageClassification.from_pretrained loads "
                                   "(PoolFormer v1 only).")
    p.add_argument("src", help="a checkpoint file or URL")
    p.add_argument("dst", help="the file to write (a folder for --to hf)")
    p.add_argument("--to", required=True, choices=TARGETS, help="the layout to write")
    p.add_argument("--model", help="the variant, when the file's layers could be several (e.g. identityformer_s12 vs "
                                   "poolformerv2_s12)")
    p.add_argument("--img-size", type=IMG_SIZE, help="the input size of a model with size-bound parts")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run, weights_flag="SRC")  # where a download that failed can be given as a file
