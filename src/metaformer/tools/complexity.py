"""Parameter and MAC counts, the way the paper counted them.

The paper's MACs come from fvcore: convolutions, linears and matrix products, PLUS the
norms (``numel * 5`` for an affine GroupNorm/LayerNorm, ``numel * 2`` for an eval BatchNorm).
Pooling, activations and additions are not counted. We count the same operators at the
ATen level with a dispatch mode, so any user-defined token mixer is counted too, and
``scaled_dot_product_attention`` is counted as its two matrix products.

One convention to know: the authors' channel LayerNorm (their attention hybrids, the "LN"
ablation) was written as elementwise ops, which fvcore does not count, so the paper's
figures leave it out (ppaa: 2.55 G without it = the paper's 2.5, 2.56 G with it).
``count_macs(..., paper=True)`` follows that convention.

Counting runs on the ``meta`` device when the model is there: no memory, no arithmetic.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def _conv(args, out):
    w = args[1]
    return _numel(out.shape) * _numel(w.shape[1:])  # each output: in/groups * kh * kw MACs


def _mm(args, out):
    a, b = args[-2], args[-1]
    return _numel(a.shape) * int(b.shape[-1])


def _bmm(args, out):
    a, b = args[0], args[1]
    return _numel(a.shape) * int(b.shape[-1])


def _norm(affine_index):
    def count(args, out):
        affine = len(args) > affine_index and args[affine_index] is not None
        return _numel(args[0].shape) * (5 if affine else 4)
    return count


def _bn_eval(args, out):
    return _numel(args[0].shape) * (2 if args[1] is not None else 1)


def _sdpa(args, out):
    q, k = args[0], args[1]
    # q@k^T and attn@v: 2 * B * heads * N * M * d
    return 2 * _numel(q.shape) * int(k.shape[-2])


_HANDLERS = {
    aten.convolution.default: _conv,
    aten.mm.default: _mm,
    aten.addmm.default: _mm,
    aten.bmm.default: _bmm,
    aten.native_group_norm.default: _norm(1),
    aten.native_layer_norm.default: _norm(2),
    aten._native_batch_norm_legit_no_training.default: _bn_eval,
    aten._native_batch_norm_legit.default: _norm(1),
    aten.native_batch_norm.default: _norm(1),
}
for _name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention"):
    if hasattr(aten, _name):
        _HANDLERS[getattr(aten, _name).default] = _sdpa


class MacCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.by_op: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        handler = _HANDLERS.get(func)
        if handler is not None:
            first = out[0] if isinstance(out, (tuple, list)) else out
            self.by_op[func.__name__.split(".")[0]] += int(handler(args, first))
        return out

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


@torch.no_grad()
def count_macs(model: nn.Module, img_size: int | tuple[int, int] = 224, in_chans: int | None = None,
               paper: bool = True) -> dict:
    """MACs of one forward pass on one image, by operator family, and their total.

    ``paper=True`` leaves channel LayerNorms out, as the paper's fvcore counts did (see above).
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    c = in_chans or getattr(model, "in_chans", 3)
    p = next(model.parameters())
    x = torch.zeros(1, c, h, w, dtype=p.dtype, device=p.device)
    was_training = model.training
    model.eval()
    try:
        with MacCounter() as counter:
            model(x)
    finally:
        model.train(was_training)
    by_op = dict(counter.by_op)
    if paper:
        by_op.pop("native_layer_norm", None)
    norms = sum(v for k, v in by_op.items() if "norm" in k)
    total = sum(by_op.values())
    return {"total": total, "norms": norms, "matmul_conv": total - norms, "by_op": by_op}


def count_params(model: nn.Module) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    buffers = sum(b.numel() for n, b in model.named_buffers() if not n.endswith("num_batches_tracked")
                  and not n.endswith("running_mean") and not n.endswith("running_var"))
    return {"trainable": trainable, "frozen": frozen + buffers}


def measure(name: str, img_size: int = 224, **overrides) -> dict:
    """Parameters and MACs of a registered model (1000 classes, one image), counted on the meta device."""
    from ..zoo import create_model

    with torch.device("meta"):  # counting needs shapes only: no memory, no init, no arithmetic
        model = create_model(name, img_size=img_size, **overrides)
    params = count_params(model)
    macs = count_macs(model, img_size)
    return {"params": params["trainable"], "frozen": params["frozen"], "macs": macs["total"],
            "macs_conv_linear": macs["matmul_conv"]}


def write_figures(path=None) -> dict:
    """Measure every registered model at 224 and write the zoo's ``complexity.json`` (what `metaformer info`
    shows without counting); ``tests/test_models.py`` checks the file against a live count."""
    import json
    from pathlib import Path

    from ..zoo import list_models
    from ..zoo.registry import COMPLEXITY_FILE

    figures = {name: measure(name) for name in list_models()}
    Path(path or COMPLEXITY_FILE).write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
    return figures


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m metaformer.tools.complexity --write   (re-measure every model into the zoo's "
                 "complexity.json)")
    print(f"measured {len(write_figures())} models")
