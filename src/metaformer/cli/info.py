"""``metaformer info``: every variant's exact parameter count and MACs, beside the paper's figures."""
from __future__ import annotations

import json

import torch

from . import UserError
from ..tools.complexity import count_macs, count_params
from ..zoo import ABLATIONS, ablation_spec, create_model, get_model_info, list_models


def _row(label: str, variant: str, overrides: dict, img_size: int, paper_params, paper_macs, top1) -> dict:
    with torch.device("meta"):  # counting needs shapes only: no memory, no init, no arithmetic
        model = create_model(variant, img_size=img_size, **overrides)
    params = count_params(model)
    macs = count_macs(model, img_size)
    return {
        "model": label,
        "params": params["trainable"],
        "frozen": params["frozen"],
        "gmacs": macs["total"] / 1e9,
        "gmacs_conv_linear": macs["matmul_conv"] / 1e9,
        "paper_params": paper_params,
        "paper_gmacs": paper_macs,
        "paper_top1": top1,
    }


def collect(models: list[str], ablations: list[str], img_size: int = 224) -> list[dict]:
    rows = []
    for name in models:
        info = get_model_info(name)
        rows.append(_row(name, name, {}, img_size, info.paper_params, info.paper_macs, info.top1))
    for row in ablations:
        variant, overrides = ablation_spec(row)
        _, _, pparams, pmacs, top1 = ABLATIONS[row]
        rows.append(_row(f"s12 ablation: {row}", variant, overrides, img_size, pparams, pmacs, top1))
    return rows


def format_table(rows: list[dict], img_size: int) -> str:
    head = (f"| model | params | GMACs @{img_size} (norms incl., as the paper) | conv+linear only | paper params | "
            "paper GMACs | paper top-1 |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        frozen = f" (+{r['frozen'] / 1e6:.1f}M frozen)" if r["frozen"] else ""
        top1 = "" if r["paper_top1"] is None else f"{r['paper_top1']:.1f}"
        pmacs = "" if r["paper_gmacs"] is None else f"{r['paper_gmacs']:.1f}"
        lines.append(f"| {r['model']} | {r['params']:,}{frozen} | {r['gmacs']:.3f} ({r['gmacs']:.1f}) | "
                     f"{r['gmacs_conv_linear']:.2f} | {r['paper_params']} | {pmacs} | {top1} |")
    return "\n".join(lines)


def details(name: str) -> str:
    info = get_model_info(name)
    tf = info.transforms()
    return "\n".join([
        f"{name}: {info.description}",
        f"  checkpoint: {info.url or 'none published (pass a path with pretrained=PATH)'}",
        f"  eval: resize {info.eval_resize()} ({info.interpolation}), centre crop {info.input_size[-1]} "
        f"(crop_pct {info.crop_pct}), mean {info.mean}, std {info.std}",
        f"  transform: {tf}".replace("\n", "\n  "),
        f"  config: {json.dumps(info.config)}",
    ])


def run(args) -> int:
    names = args.models or list_models()
    unknown_rows = [r for r in args.ablation or [] if r not in ABLATIONS]
    if unknown_rows:
        raise UserError(f"unknown ablation row(s) {unknown_rows}; rows: {', '.join(ABLATIONS)}")
    for n in names:
        get_model_info(n)  # clear error for an unknown name before any work
    ablations = args.ablation if args.ablation is not None else ([] if args.models else list(ABLATIONS))
    rows = collect(names, ablations, args.img_size)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_table(rows, args.img_size))
    if args.models:
        for n in names:
            print()
            print(details(n))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="parameters and MACs of every variant (counted like the paper)",
                       description="Exact parameter counts and MACs, counted like the paper (fvcore: convolutions, "
                                   "linears, matrix products and norms), beside the paper's figures.")
    p.add_argument("models", nargs="*", help="variants to show (default: all, plus the S12 ablation rows)")
    p.add_argument("--ablation", nargs="*", metavar="ROW", help=f"S12 ablation rows to add: {', '.join(ABLATIONS)}")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
