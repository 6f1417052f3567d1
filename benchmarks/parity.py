"""Logit parity of the MetaFormer Baselines families with timm's models and with the authors' code.

    python benchmarks/parity.py                          # vs timm: every poolformerv2/convformer/caformer size
    python benchmarks/parity.py caformer_s18 --authors PATH/TO/metaformer_baselines.py   # also vs the authors

Both sides hold the same random weights, with every 1-d parameter (norms, scales, StarReLU) moved off
its init so that each term counts. Printed per model: max |difference| / max |logit| (fp32 and fp64,
at 224 and 160x224, logits and stage features); against timm also with timm's MLP-head eps (1e-6)
instead of the authors' 1e-5 that our models follow. The figures in docs/families.md come from here.

The authors' file (github.com/sail-sg/metaformer) is read from your checkout, unchanged on disk; two
of its imports moved in timm 1.0 and its ``@register_model`` would replace timm's own entries of the
same names, so those three lines are swapped as it is loaded.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import timm
import torch

import metaformer
from metaformer.weights import from_ours

TIMM_FAMILIES = ("poolformerv2", "convformer", "caformer")
SIZES = ((224, 224), (160, 224))


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim <= 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def images(h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1)).to(dtype)


@torch.no_grad()
def vs_timm(name: str) -> dict:
    torch.manual_seed(0)
    ours = perturb(metaformer.create_model(name))
    theirs = timm.create_model(name, pretrained=False).eval()
    theirs.load_state_dict(from_ours(ours.state_dict(), "timm"), strict=True)
    row = {}
    for dtype, tag in ((torch.float32, "fp32"), (torch.float64, "fp64")):
        ours, theirs = ours.to(dtype), theirs.to(dtype)
        for h, w in SIZES:
            x = images(h, w, dtype)
            row[f"{tag} {h}x{w}"] = rel(ours(x), theirs(x))
            row[f"{tag} {h}x{w} features"] = rel(ours.forward_features(x), theirs.forward_features(x))
        if ours.config.get("mlp_head"):  # timm's MlpHead norm with the authors' eps: only the eps differed
            theirs.head.fc.norm.eps = ours.config["mlp_head_eps"]
            x = images(224, 224, dtype)
            row[f"{tag} 224x224 same head eps"] = rel(ours(x), theirs(x))
            theirs.head.fc.norm.eps = 1e-6
    return row


def load_authors(path: Path) -> dict:
    source = path.read_text()
    swaps = {"from timm.models.layers import trunc_normal_, DropPath": "from timm.layers import trunc_normal_, DropPath",
             "from timm.models.layers.helpers import to_2tuple": "from timm.layers import to_2tuple",
             "from timm.models.registry import register_model":
                 "MODELS = {}\ndef register_model(fn):\n    MODELS[fn.__name__] = fn\n    return fn"}
    for old, new in swaps.items():
        if old not in source:
            sys.exit(f"{path}: no line {old!r}; is this the authors' metaformer_baselines.py?")
        source = source.replace(old, new)
    module = types.ModuleType("authors_metaformer_baselines")
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module.MODELS


@torch.no_grad()
def vs_authors(name: str, authors: dict) -> dict:
    torch.manual_seed(0)
    theirs = perturb(authors[name]())
    with tempfile.TemporaryDirectory() as tmp:  # through the file reader users have: layout detected, strict
        torch.save(theirs.state_dict(), Path(tmp) / "w.pth")
        ours = metaformer.create_model(name)
        report = metaformer.load_weights(ours, Path(tmp) / "w.pth")
    ours.eval()
    row = {"layout": report.layout}
    for dtype, tag in ((torch.float32, "fp32"), (torch.float64, "fp64")):
        ours, theirs = ours.to(dtype), theirs.to(dtype)
        for h, w in SIZES:
            if name.startswith("randformer") and (h, w) != (224, 224):
                continue  # the authors' RandFormer runs at 224 only
            x = images(h, w, dtype)
            row[f"{tag} {h}x{w}"] = rel(ours(x), theirs(x))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="default: every size of the families compared")
    p.add_argument("--authors", type=Path, help="the authors' metaformer_baselines.py: also compare with it")
    p.add_argument("--output", type=Path, help="write the figures as JSON")
    args = p.parse_args()
    authors = load_authors(args.authors) if args.authors else None
    families = ("identityformer", "randformer", *TIMM_FAMILIES) if authors else TIMM_FAMILIES
    names = args.models or [n for n in metaformer.list_models() if n.split("_")[0] in families]
    results = {}
    for name in names:
        results[name] = {"timm": vs_timm(name) if name.split("_")[0] in TIMM_FAMILIES else None,
                         "authors": vs_authors(name, authors) if authors else None}
        for ref, row in results[name].items():
            if row:
                print(f"{name} vs {ref}: " + ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in row.items()), flush=True)
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
