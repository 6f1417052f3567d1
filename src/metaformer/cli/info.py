"""``metaformer info``: every variant's exact parameter count and MACs, beside its paper's figures."""
from __future__ import annotations

import fnmatch
import json

from ..ranges import IMG_SIZE
from . import UserError

_ROW_NAMES = {"baseline": "poolformer_s12"}  # Table-5 rows are models of their own; see ablation_name()


def ablation_name(row: str) -> str:
    from ..zoo import ABLATIONS, ablation_spec

    if row not in ABLATIONS:
        raise UserError(f"unknown ablation row {row!r}; rows: {', '.join(ABLATIONS)}")
    variant, overrides = ablation_spec(row)
    return _ROW_NAMES.get(row) or (f"metaformer_s12_{row}" if overrides else variant)


def paper_figures(info, img_size: int) -> tuple[float | None, float | None, str | None]:
    """``(GMACs, top-1, where from)`` the authors published for this model at ``img_size``: the paper's row at
    224; at another size, the figures of the weights trained on ImageNet-1K at that size (e.g. ``sail_in1k_384``),
    or none: a 224 figure beside MACs counted at 384 would compare two different things."""
    if img_size == 224:
        return info.paper_macs, info.top1, "paper" if info.top1 is not None or info.paper_macs is not None else None
    for w in info.weights:
        if w.img_size == img_size and "in22k" not in w.tag and (w.gmacs is not None or w.top1 is not None):
            return w.gmacs, w.top1, f"{info.name}.{w.tag}"
    return None, None, None


def collect(names: list[str], img_size: int = 224) -> list[dict]:
    """One row per model: measured figures (stored ones at 224, counted live at another size)."""
    from ..tools.complexity import measure
    from ..zoo import get_model_info
    from ..zoo.registry import complexity

    rows = []
    for name in names:
        info = get_model_info(name)
        figures = complexity(name) if img_size == 224 else None
        figures = figures or measure(name, img_size)
        paper_gmacs, paper_top1, source = paper_figures(info, img_size)
        rows.append({"model": name, "family": info.family, "params": figures["params"], "frozen": figures["frozen"],
                     "gmacs": figures["macs"] / 1e9, "gmacs_conv_linear": figures["macs_conv_linear"] / 1e9,
                     "paper_params": info.paper_params, "paper_gmacs": paper_gmacs, "paper_top1": paper_top1,
                     "paper_source": source,
                     "weights": [f"{name}.{w.tag}" for w in info.weights]})
    return rows


def format_table(rows: list[dict], img_size: int) -> str:
    at = "" if img_size == 224 else f" @{img_size}"  # at another size: the authors' figures for that size, if any
    head = (f"| model | params | GMACs @{img_size}: convs, linears, matmuls, norms | convs, linears, matmuls only | "
            f"paper params | paper GMACs{at} | paper top-1{at} |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        frozen = f" (+{r['frozen'] / 1e6:.1f}M frozen)" if r["frozen"] else ""
        top1 = "" if r["paper_top1"] is None else f"{r['paper_top1']:.1f}"
        pmacs = "" if r["paper_gmacs"] is None else f"{r['paper_gmacs']:.1f}"
        lines.append(f"| {r['model']} | {r['params']:,}{frozen} | {r['gmacs']:.3f} | {r['gmacs_conv_linear']:.3f} | "
                     f"{r['paper_params']} | {pmacs} | {top1} |")
    return "\n".join(lines)


def cached_copy(url: str) -> str | None:
    """Where a download of ``url`` is kept, and the SHA-256 recorded when it arrived (checked at every use)."""
    import os
    import urllib.parse

    from ..weights.io import cache_dir

    path = cache_dir() / os.path.basename(urllib.parse.urlparse(url).path)
    if not path.is_file():
        return None
    try:
        digest = json.loads(path.with_name(path.name + ".sha256.json").read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        digest = None
    return f"{path}" + (f", sha256 {digest} (recorded at download)" if digest else "")


def details(name: str) -> str:
    from ..zoo import get_model_info

    info = get_model_info(name)
    lines = [f"{name}: {info.description} ({info.family}, {info.paper})"]
    for w in info.weights or ():
        top1 = f"top-1 {w.top1}" if w.top1 is not None else f"{w.num_classes} classes, no ImageNet-1k top-1"
        lines.append(f"  {name}.{w.tag}: {w.dataset}, {w.img_size}px, {top1}, eval resize "
                     f"{w.eval_resize()} "
                     f"({w.interpolation}, crop_pct {w.crop_pct}); {w.url or w.hf_hub_id}")
        cached = cached_copy(w.url) if w.url else None
        if cached:
            lines.append(f"    cached: {cached}")
    if not info.weights:
        lines.append("  weights: none published (pass a path with pretrained=PATH)")
    lines.append(f"  eval transform: {info.transforms()}".replace("\n", "\n  "))
    lines.append(f"  config: {json.dumps(info.config)}")
    return "\n".join(lines)


def run(args) -> int:
    from ..zoo import list_models

    known = list_models()
    names = []
    for pattern in args.models or ["*"]:
        matched = [n for n in known if fnmatch.fnmatch(n, pattern)]
        if not matched:
            from ..zoo import get_model_info

            get_model_info(pattern)  # the clear error, with close names
        names += [n for n in matched if n not in names]
    names += [n for n in map(ablation_name, args.ablation or []) if n not in names]
    rows = collect(names, args.img_size)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_table(rows, args.img_size))
    if args.img_size != 224:
        print(f"\npaper columns @{args.img_size}: the authors' figures for their ImageNet-1K weights at that size "
              "(blank where they published none)")
    if args.models and len(names) <= 4:
        for n in names:
            print()
            print(details(n))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("info", description="Exact parameter counts and MACs (convolutions, linears, matrix products and "
                                   "norms, as fvcore counted them for the papers), beside the papers' figures. "
                                   "MODEL may be a pattern, e.g. 'caformer_*'.")
    p.add_argument("models", nargs="*", metavar="MODEL", help="models or patterns to show (default: all)")
    p.add_argument("--ablation", nargs="*", metavar="ROW", help="PoolFormer Table-5 rows to add, by row name "
                   "(e.g. identity dwconv no_mlp)")
    p.add_argument("--img-size", type=IMG_SIZE, default=224, help="input size the MACs are counted at")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
