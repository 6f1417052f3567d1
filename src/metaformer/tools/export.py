"""Export to ONNX, TorchScript, ``torch.export`` and OpenVINO IR, then check the file against the model.

Every export is verified before it is reported done: the file is loaded back in its own
runtime (ONNX Runtime for ONNX, OpenVINO's CPU plugin for IR), run on a random input and on a
real image, and compared with the PyTorch model; a difference over the tolerance (1e-4 in fp32)
is an error.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
import torch
from torch import nn

from ..atomic import atomic_path, check_writable, clean_stale_temps, output_file
from ..errors import MetaFormerError, need, require
from .exported import (COMPANIONS, FORMATS, META_KEY, ExportError, file_sha256, load_runtime, module_tensors,
                       onnx_tensors, tensors_sha256)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# max |logit difference| allowed, relative to the largest |logit| for the low-precision dtypes
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


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
    if fmt == "openvino":
        need("openvino", "openvino", "OpenVINO export")


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
                          "or fp16, or use --format torchscript/exported/openvino for bf16")
    if fmt == "openvino" and dtype == "fp16":
        raise ExportError("OpenVINO runs fp32 or bf16 on the CPU: export openvino with --dtype fp32 or bf16 (bf16 "
                          "keeps fp32 weights in the file and runs in bf16)")
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


def write_file(model: nn.Module, example: torch.Tensor, path: Path, fmt: str, dynamic_batch: bool,
               dynamic_size: bool, metadata: dict | None = None) -> None:
    """Write the file; ``metadata`` (class names, input size, preprocessing) travels inside it, so a file
    is never run with another model's labels: ONNX ``metadata_props``, TorchScript/torch.export extra files,
    OpenVINO's runtime info.
    The metadata also records the SHA-256 of the tensors written (``file_sha256``), which every load checks."""
    with warnings.catch_warnings():
        # torch's notes on its own exporters (the TorchScript-based ONNX exporter's deprecation, the tracer's remark
        # on shape checks read as Python bools) say nothing about this file, which is checked against the model next
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        _write(model, example, path, fmt, dynamic_batch, dynamic_size, metadata)


def _write(model: nn.Module, example: torch.Tensor, path: Path, fmt: str, dynamic_batch: bool,
           dynamic_size: bool, metadata: dict | None) -> None:
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
        if metadata:
            set_onnx_metadata(path, metadata)
    elif fmt == "openvino":
        b, c, h, w = example.shape
        shape = [-1 if dynamic_batch else b, c, -1 if dynamic_size else h, -1 if dynamic_size else w]
        save_openvino(openvino_model(model, example, shape), path, metadata)
    elif fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files=_extra_files(metadata, traced))
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
        save_program(ep, path, metadata)


def _extra_files(metadata: dict | None, module) -> dict:
    if not metadata:
        return {}
    return {META_KEY: json.dumps({**metadata, "file_sha256": tensors_sha256(module_tensors(module))})}


def save_program(program: torch.export.ExportedProgram, path: Path, metadata: dict | None) -> None:
    """``torch.export.save`` with ``metadata`` (and the program's tensors' SHA-256) as the metadata extra file."""
    torch.export.save(program, str(path), extra_files=_extra_files(metadata, program))


def openvino_model(model: nn.Module, example: torch.Tensor, shape: list[int]):
    """``model`` converted by OpenVINO's converter (which traces it) for inputs of ``shape`` (-1: any size)."""
    ov = require("openvino", "openvino", "OpenVINO export")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the converter's own use of torch.jit.trace
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated")
        return ov.convert_model(model, example_input=example, input=[shape])


def save_openvino(ov_model, path: Path, metadata: dict | None) -> None:
    """An OpenVINO model as IR (``path``, and its weights beside it as ``.bin``), its weights in full precision
    (OpenVINO's writer halves them by default), ``metadata`` and the weights' SHA-256 in its runtime info.
    ``metadata['inference_precision']`` (``f32`` unless given) is what readers compile it with."""
    ov = require("openvino", "openvino", "OpenVINO export")
    ov.save_model(ov_model, str(path), compress_to_fp16=False)
    if metadata:
        meta = {"inference_precision": "f32", **metadata,
                "file_sha256": file_sha256(path.with_suffix(".bin"))}
        ov_model.set_rt_info(json.dumps(meta), [META_KEY])
        ov.save_model(ov_model, str(path), compress_to_fp16=False)  # the same weights, now with the metadata


def set_onnx_metadata(path: Path, metadata: dict) -> None:
    """Store ``metadata`` (replacing any) in the ONNX file at ``path``, with the SHA-256 of its tensors."""
    onnx = require("onnx", "export", "writing ONNX metadata")
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    meta = {**metadata, "file_sha256": tensors_sha256(onnx_tensors(proto))}
    onnx.helper.set_model_props(proto, {META_KEY: json.dumps(meta)})
    onnx.save(proto, str(path))


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


# A real photograph for the checks, shipped with the package so that an export needs no extra: Chelsea the cat,
# scikit-image's sample photograph (CC0, by Stefan van der Walt), resized to 300x200.
SAMPLE_IMAGE = Path(__file__).with_name("chelsea.jpg")


def sample_image(transform) -> torch.Tensor:
    """The sample photograph (:data:`SAMPLE_IMAGE`) through the model's eval ``transform``, as a batch of one."""
    from PIL import Image

    with Image.open(SAMPLE_IMAGE) as im:
        return transform(im.convert("RGB")).unsqueeze(0)


def export_path(path: str | os.PathLike | None, fmt: str, default: str = "model") -> Path:
    """The file an export to ``path`` writes: ``path`` with the format's extension added when it has another;
    ``default`` (plus the extension) inside ``path`` when it names a folder, or alone when there is no ``path``."""
    return output_file(path, default + FORMATS[fmt], FORMATS[fmt])


def export(model: nn.Module, path: str | os.PathLike, fmt: str, *, img_size: int | None = None,
           image: torch.Tensor | None = None, dynamic_batch: bool = True, dynamic_size: bool = False,
           dtype: str = "fp32", metadata: dict | None = None) -> ExportResult:
    """Write ``model`` to ``path`` in ``fmt`` and verify it (see the module docstring).

    ``metadata`` (JSON-serialisable; see :func:`export_metadata`) is stored in the file, so ``metaformer predict
    --exported`` runs it with its own class names and preprocessing. ``path`` may name a folder (the file is then
    ``model`` plus the format's extension inside it). ``dynamic_batch`` (the default): the file takes any batch.
    """
    model = model.eval()
    if any(t.device.type != "cpu" for t in [*model.parameters(), *model.buffers()]):
        # the file does not depend on where the model lives: write and verify it from a CPU copy
        model = copy.deepcopy(model).cpu()
    check_combination(model, fmt, dynamic_size, dtype)
    path = check_writable(export_path(path, fmt), f"--output {export_path(path, fmt)}")
    clean_stale_temps(path.parent, path.name)  # a killed export's unfinished file
    size = img_size or model.img_size[0]
    torch_dtype = DTYPES[dtype]
    if fmt == "openvino":  # fp32 weights; bf16 is how OpenVINO runs them (the metadata says so)
        torch_dtype = torch.float32
        metadata = {**(metadata or {"format": "openvino"}), "inference_precision": "bf16" if dtype == "bf16" else "f32"}
    cast = copy.deepcopy(model).to(torch_dtype) if torch_dtype != torch.float32 else model
    gen = torch.Generator().manual_seed(0)
    batch = 2 if dynamic_batch else 1
    example = torch.randn(batch, model.in_chans, size, size, generator=gen)
    # Written beside `path` and renamed only after the check passed: no half-verified file under `path`.
    with atomic_path(path, COMPANIONS.get(fmt, ())) as tmp:
        try:
            write_file(cast, example.to(torch_dtype), tmp, fmt, dynamic_batch, dynamic_size, metadata)
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


def export_metadata(loaded) -> dict:
    """What an exported file must carry to be run correctly alone: classes, input, preprocessing."""
    from .. import __version__

    from ..weights.io import state_dict_sha256

    meta = {"format": "metaformer", "variant": loaded.variant, "num_classes": len(loaded.class_names),
            "class_names": loaded.class_names, "in_chans": loaded.model.in_chans,
            "preprocessing": loaded.preprocessing, "metaformer_version": __version__,
            "weights_sha256": state_dict_sha256(loaded.model.state_dict())}  # see exported.load_exported
    try:  # the architecture, so tools (bench) can rebuild the same network; absent for custom Python parts
        meta["config"] = json.loads(json.dumps(getattr(loaded.model, "config", None)))
    except (TypeError, ValueError):
        pass
    return meta
