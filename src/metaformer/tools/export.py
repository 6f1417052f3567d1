"""Export to ONNX, TorchScript and ``torch.export``, then check the file against the model.

Every export is verified before it is reported done: the file is loaded back in its own
runtime (ONNX Runtime for ONNX), run on a random input and on a real image, and compared
with the PyTorch model; a difference over the tolerance (1e-4 in fp32) is an error.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_path, check_writable
from ..errors import MetaFormerError, need, require

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# max |logit difference| allowed, relative to the largest |logit| for the low-precision dtypes
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


class ExportError(MetaFormerError):
    """An export that cannot be made, or whose file disagrees with the model."""


def size_bound_parts(model: nn.Module) -> list[str]:
    """Names of modules whose parameters are tied to one token grid (they forbid dynamic sizes)."""
    from ..models.mixers import PositionEmbedding, RandomMixing, SpatialMlp

    return [n for n, m in model.named_modules() if isinstance(m, (RandomMixing, SpatialMlp, PositionEmbedding))]


def check_runtime(fmt: str) -> None:
    """The packages writing and checking ``fmt`` need are installed: torch's ONNX exporter writes through onnx,
    and the file is checked in ONNX Runtime; TorchScript and torch.export need nothing more than torch."""
    if fmt == "onnx":
        need("onnx", "export", "ONNX export")
        need("onnxruntime", "export", "checking an ONNX export in ONNX Runtime")


def check_combination(model: nn.Module, fmt: str, dynamic_size: bool, dtype: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dynamic_size:
        bound = size_bound_parts(model)
        if bound:
            raise ExportError(
                f"--dynamic-size cannot work for this model: {bound[0]} (and {len(bound) - 1} more) "
                f"has parameters sized for a {model.img_size[0]}x{model.img_size[1]} input (random mixing, spatial "
                f"MLP or a position embedding). Drop --dynamic-size: the file then takes "
                f"{model.img_size[0]}x{model.img_size[1]} images (--dynamic-batch still works)")
    if fmt == "onnx" and dtype == "bf16":
        raise ExportError("ONNX Runtime has no bfloat16 kernels for these operators on CPU; export onnx as fp32 "
                          "or fp16, or use --format torchscript/exported for bf16")
    check_runtime(fmt)


@dataclass
class ExportResult:
    path: Path
    format: str
    dtype: str
    max_diff_random: float
    max_diff_image: float
    tolerance: float
    top1_agrees: bool
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:  # top1_agrees is forced True for low-precision exports (see export())
        return max(self.max_diff_random, self.max_diff_image) <= self.tolerance and self.top1_agrees


META_KEY = "metaformer"  # ONNX metadata_props key / extra-file name holding the JSON metadata


def _write(model: nn.Module, example: torch.Tensor, path: Path, fmt: str, dynamic_batch: bool,
           dynamic_size: bool, metadata: dict | None = None) -> None:
    """Write the file; ``metadata`` (class names, input size, preprocessing) travels inside it, so a file
    is never run with another model's labels: ONNX ``metadata_props``, TorchScript/torch.export extra files."""
    extra = {META_KEY: json.dumps(metadata)} if metadata else {}
    if fmt == "onnx":
        axes = {}
        if dynamic_batch:
            axes[0] = "batch"
        if dynamic_size:
            axes.update({2: "height", 3: "width"})
        # The TorchScript-based exporter: no onnxscript dependency, and ONNX Runtime runs its graphs well.
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], opset_version=17,
                          dynamic_axes={"input": axes, "logits": {0: "batch"} if dynamic_batch else {}})
        if extra:
            onnx = require("onnx", "export", "ONNX export")

            proto = onnx.load(str(path))
            onnx.helper.set_model_props(proto, extra)
            onnx.save(proto, str(path))
    elif fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files=extra)
    else:
        dims = {}
        if dynamic_batch:
            dims[0] = torch.export.Dim("batch", min=1, max=4096)
        if dynamic_size:
            # from 64: at 1x1 in the last stage torch.export specialises the final norm and pooling
            dims[2] = torch.export.Dim("height", min=64, max=4096)
            dims[3] = torch.export.Dim("width", min=64, max=4096)
        # torch.export's writer takes a channels_last weight (the fused model's convs keep theirs so) for a slice of
        # its storage and warns "No complete tensor found"; contiguous copies are written without the warning.
        model = _contiguous_weights(model)
        ep = torch.export.export(model, (example,), dynamic_shapes=({**dims} if dims else None,) if dims else None)
        torch.export.save(ep, str(path), extra_files=extra)


def _contiguous_weights(model: nn.Module) -> nn.Module:
    """``model``, or a copy of it whose parameters and buffers are contiguous (the same values)."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.is_contiguous() for t in tensors):
        return model
    model = copy.deepcopy(model)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.contiguous()
    return model


class Runtime:
    """An exported file loaded in its own runtime: ``runtime(images [B, C, H, W]) -> logits``.

    ``metadata`` is what ``metaformer export`` stored in the file (class names, input size,
    preprocessing), or None for a file written by another tool.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], metadata: dict | None, fmt: str):
        self.fn, self.metadata, self.format = fn, metadata, fmt

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def eval(self) -> "Runtime":  # an exported file is inference-only already; evaluate() calls model.eval()
        return self

    @property
    def quantization(self) -> dict | None:
        """How the file was quantized and what it cost (``metaformer quantize``), or None."""
        return (self.metadata or {}).get("quantization")


def _parse_metadata(text: str | bytes | None, path: Path) -> dict | None:
    if not text:
        return None
    try:
        meta = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise ExportError(f"{path}: its metaformer metadata is not valid JSON; export the model again") from None
    return meta if isinstance(meta, dict) and meta.get("format") == "metaformer" else None


def load_runtime(path: str | os.PathLike, fmt: str | None = None) -> Runtime:
    """The exported file at ``path`` ready to run (see :class:`Runtime`); corrupt files are an ExportError."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    fmt = fmt or {".onnx": "onnx", ".pt": "torchscript", ".pt2": "exported"}.get(path.suffix)
    if fmt not in FORMATS:
        raise ExportError(f"cannot tell the format of {path}: use a .onnx, .pt (TorchScript) or .pt2 "
                          "(torch.export) file, or name the format")
    try:
        return _load_runtime(path, fmt)
    except MetaFormerError:  # a runtime that is not installed: the file may well be fine
        raise
    except Exception as e:  # protobuf, zip and pickle errors from three runtimes
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ExportError(f"{path}: not a readable {fmt} file ({type(e).__name__}: {first}); it is probably "
                          "truncated or corrupt: export it again") from None


def _load_runtime(path: Path, fmt: str) -> Runtime:
    if fmt == "onnx":
        ort = require("onnxruntime", "export", "running an ONNX file")
        opts = ort.SessionOptions()
        # idle workers spinning after each run take the cores from everything else in the process (the
        # server's decoding, PyTorch's threads) for the little latency it saves between calls
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        np_dtype = np.float16 if "float16" in inp.type else np.float32

        def run_onnx(x: torch.Tensor) -> torch.Tensor:
            out = session.run(None, {inp.name: x.detach().cpu().numpy().astype(np_dtype)})[0]
            return torch.from_numpy(out.astype(np.float32))

        meta = session.get_modelmeta().custom_metadata_map.get(META_KEY)
        return Runtime(run_onnx, _parse_metadata(meta, path), fmt)
    extra = {META_KEY: ""}
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    else:
        program = torch.export.load(str(path), extra_files=extra)
        module = program.module()
        if _is_int8_program(program):
            # an int8 program (metaformer quantize --backend pt2e) runs at int8 speed only once Inductor has
            # lowered its quantize/dequantize pairs to oneDNN int8 kernels: compiled on the first call
            from .quantize import compile_int8

            return Runtime(compile_int8(module), _parse_metadata(extra[META_KEY], path), fmt)
    dtype = next((p.dtype for p in module.parameters()), None) if fmt == "torchscript" else None
    if dtype is None:
        dtype = next((t.dtype for t in module.state_dict().values() if t.is_floating_point()), torch.float32)

    def run_torch(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x.to(dtype)).float()

    return Runtime(run_torch, _parse_metadata(extra[META_KEY], path), fmt)


def _is_int8_program(program) -> bool:
    return any(node.op == "call_function" and "quantized_decomposed" in str(node.target)
               for node in program.graph.nodes)


# A real photograph for the checks, shipped with the package so that an export needs no extra: Chelsea the cat,
# scikit-image's sample photograph (CC0, by Stefan van der Walt), resized to 300x200.
SAMPLE_IMAGE = Path(__file__).with_name("chelsea.jpg")


def sample_image(transform) -> torch.Tensor:
    """The sample photograph (:data:`SAMPLE_IMAGE`) through the model's eval ``transform``, as a batch of one."""
    from PIL import Image

    with Image.open(SAMPLE_IMAGE) as im:
        return transform(im.convert("RGB")).unsqueeze(0)


def export_path(path: str | os.PathLike, fmt: str) -> Path:
    """The file an export to ``path`` writes: ``path`` with the format's extension added when it has another."""
    path = Path(path)
    return path if path.suffix == FORMATS[fmt] else path.with_name(path.name + FORMATS[fmt])


def export(model: nn.Module, path: str | os.PathLike, fmt: str, *, img_size: int | None = None,
           image: torch.Tensor | None = None, dynamic_batch: bool = False, dynamic_size: bool = False,
           dtype: str = "fp32", metadata: dict | None = None) -> ExportResult:
    """Write ``model`` to ``path`` in ``fmt`` and verify it (see the module docstring).

    ``metadata`` (JSON-serialisable; see :func:`metaformer.tasks.inference.export_metadata`) is stored in the
    file, so ``metaformer predict --exported`` runs it with its own class names and preprocessing.
    """
    model = model.eval()
    if any(t.device.type != "cpu" for t in [*model.parameters(), *model.buffers()]):
        # the file does not depend on where the model lives: write and verify it from a CPU copy
        model = copy.deepcopy(model).cpu()
    check_combination(model, fmt, dynamic_size, dtype)
    path = check_writable(export_path(path, fmt), f"--output {export_path(path, fmt)}")
    size = img_size or model.img_size[0]
    torch_dtype = DTYPES[dtype]
    cast = copy.deepcopy(model).to(torch_dtype) if dtype != "fp32" else model
    gen = torch.Generator().manual_seed(0)
    batch = 2 if dynamic_batch else 1
    example = torch.randn(batch, model.in_chans, size, size, generator=gen)
    # Written beside `path` and renamed only after the check passed: no half-verified file under `path`.
    with atomic_path(path) as tmp:
        try:
            _write(cast, example.to(torch_dtype), tmp, fmt, dynamic_batch, dynamic_size, metadata)
            run = load_runtime(tmp, fmt)
        except MetaFormerError:
            raise
        except Exception as e:  # an exporter's internal error: say which step failed, in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ExportError(f"{fmt} export ({dtype}{', dynamic batch' if dynamic_batch else ''}"
                              f"{', dynamic size' if dynamic_size else ''}) failed: {type(e).__name__}: {first}. "
                              "Try another --format, or export without --fused / dynamic axes") from None
        notes = []
        inputs = {"random": example}
        if image is not None:
            inputs["image"] = image
        if dynamic_batch:
            inputs["random"] = torch.randn(3, model.in_chans, size, size, generator=gen)  # another batch size
            notes.append("checked at batch 3 (exported at batch 2)")
        if dynamic_size:
            inputs["random"] = torch.randn(inputs["random"].shape[0], model.in_chans, size + 32, size + 32,
                                           generator=gen)
            notes.append(f"checked at {size + 32}x{size + 32} (exported at {size}x{size})")
        diffs, agree = {}, True
        for key, x in inputs.items():
            with torch.no_grad():
                ref = model(x)  # always against the fp32 PyTorch model
            got = run(x)
            scale = 1.0 if dtype == "fp32" else max(ref.abs().max().item(), 1.0)
            diffs[key] = (got - ref).abs().max().item() / scale
            agree &= bool((got.argmax(-1) == ref.argmax(-1)).all())
        if dtype != "fp32":
            notes.append("differences relative to the largest |logit|; top-1 agreement not required in low precision")
            agree = True
        result = ExportResult(path, fmt, dtype, diffs["random"], diffs.get("image", 0.0), TOLERANCE[dtype], agree,
                              notes)
        if not result.ok:
            raise ExportError(f"the exported {fmt} file disagrees with the PyTorch model: max difference "
                              f"{max(diffs.values()):.3g} (tolerance {TOLERANCE[dtype]:g}), top-1 agrees: {agree}; "
                              "nothing was written")
        return result


# ----------------------------------------------------------------------------- running exported files

def export_metadata(loaded) -> dict:
    """What an exported file must carry to be run correctly alone: classes, input, preprocessing."""
    from .. import __version__

    from ..weights.io import state_dict_sha256

    meta = {"format": "metaformer", "variant": loaded.variant, "num_classes": len(loaded.class_names),
            "class_names": loaded.class_names, "in_chans": loaded.model.in_chans,
            "preprocessing": loaded.preprocessing, "metaformer_version": __version__,
            "weights_sha256": state_dict_sha256(loaded.model.state_dict())}  # which weights: see load_exported
    try:  # the architecture, so tools (bench) can rebuild the same network; absent for custom Python parts
        meta["config"] = json.loads(json.dumps(getattr(loaded.model, "config", None)))
    except (TypeError, ValueError):
        pass
    return meta


def _described_by(model_name: str | None, checkpoint: str | None) -> dict:
    """Classes, input size and preprocessing that ``--checkpoint`` (or else the variant) stands for."""
    from ..tasks.inference import default_class_names, preprocessing_of, resolve_checkpoint, stored_metadata
    from ..zoo import build_from_config, create_model

    stored = (stored_metadata(resolve_checkpoint(checkpoint)) if checkpoint else None) or {}
    if not stored and not model_name:
        raise ExportError(f"--checkpoint {checkpoint} does not say which model it is: name the model too")
    with torch.device("meta"):  # shapes and configs only
        model = build_from_config(stored["config"], stored.get("variant")) if stored else create_model(model_name)
    pre = preprocessing_of(model)
    names, aliases = (stored["class_names"], None) if stored.get("class_names") else \
        default_class_names(model.num_classes)
    return {"what": f"--checkpoint {checkpoint}" if checkpoint else model_name, "variant": model.variant,
            "num_classes": model.num_classes, "class_names": names, "aliases": aliases, "img_size": pre["img_size"],
            "preprocessing": pre}


def load_exported(path: str, model_name: str | None, checkpoint: str | None = None):
    """An exported file (ONNX, TorchScript, torch.export) run in its own runtime, with the class names and
    preprocessing it carries (files from `metaformer export`), or else those of ``checkpoint``/the variant;
    a ``checkpoint`` or variant that disagrees with what the file carries is refused."""
    from ..tasks.inference import Loaded, default_class_names
    from ..zoo import eval_transform

    run = load_runtime(path)
    ref = _described_by(model_name, checkpoint) if (checkpoint or model_name) else None
    meta = run.metadata
    if meta:
        if ref is not None:
            _check_exported_against(path, meta, ref)
        if checkpoint:
            _check_same_weights(path, meta, model_name, checkpoint)
        names, pre, variant = meta["class_names"], meta["preprocessing"], meta.get("variant")
        default_names, default_aliases = default_class_names(len(names))
        aliases = default_aliases if names == default_names else None  # ImageNet's wnids for its names
    elif ref is not None:
        names, pre, variant, aliases = ref["class_names"], ref["preprocessing"], ref["variant"], ref["aliases"]
    else:
        raise ExportError(f"{path} carries no metaformer metadata (not written by `metaformer export`): name the "
                          "model (e.g. poolformer_s12) or pass the --checkpoint it was exported from, so the images "
                          "get the right preprocessing and class names")
    return Loaded(run, list(names), pre["img_size"], eval_transform(**pre), path, pre, aliases, variant)


def _check_same_weights(path: str, meta: dict, model_name: str | None, checkpoint: str) -> None:
    """A file is run with ``--checkpoint`` only when it holds that checkpoint's weights: the same classes and input
    size are not enough (another epoch, another run), and the file's weights are the ones that would run."""
    from ..tasks.inference import load_for_inference
    from ..weights.io import state_dict_sha256

    if not meta.get("weights_sha256"):
        raise ExportError(f"{path} does not record which weights it was exported from (an older metaformer wrote it), "
                          f"so it cannot be checked against --checkpoint {checkpoint}: drop --checkpoint (the file "
                          "carries its class names and preprocessing), or export the checkpoint again")
    mine = state_dict_sha256(load_for_inference(model_name, checkpoint).model.state_dict())
    if mine != meta["weights_sha256"]:
        raise ExportError(f"{path} holds other weights than --checkpoint {checkpoint} (weights sha256 "
                          f"{meta['weights_sha256'][:12]}... vs {mine[:12]}...): it was exported from another "
                          f"checkpoint. Export {checkpoint} to run it, or drop --checkpoint to run the file's own "
                          "weights")


def _check_exported_against(path: str, meta: dict, ref: dict) -> None:
    def show(names):
        return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")

    problems = []
    if meta["num_classes"] != ref["num_classes"]:
        problems.append(f"{meta['num_classes']} classes ({show(meta['class_names'])}) vs {ref['num_classes']}")
    elif meta["class_names"] != ref["class_names"]:
        problems.append(f"classes {show(meta['class_names'])} vs {show(ref['class_names'])}")
    if ref["img_size"] and meta["preprocessing"]["img_size"] != ref["img_size"]:
        problems.append(f"input {meta['preprocessing']['img_size']}px vs {ref['img_size']}px")
    if problems:
        raise ExportError(f"{path} was exported from another model than {ref['what']}: {'; '.join(problems)}. "
                          f"Pass the checkpoint it was exported from, or drop --checkpoint and the model name to "
                          f"use the class names and preprocessing stored in the file")
