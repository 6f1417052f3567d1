"""Static int8 quantization, calibrated on the user's images, with its accuracy cost measured.

Three maintained backends, all static (activation ranges fixed by calibration, not measured per call):

* ``ort``: our verified ONNX export, then ONNX Runtime's ``quantize_static`` (QDQ format, int8
  weights per output channel, uint8 activations, min-max ranges over the calibration images). The
  file is an ordinary ``.onnx`` that runs wherever ONNX Runtime does and loads at once.
* ``pt2e``: PyTorch 2 export quantization with torchao's ``X86InductorQuantizer``; the file is a
  quantized ``torch.export`` program (``.pt2``) that Inductor lowers to oneDNN int8 kernels when it
  is loaded (a compile of minutes on 2 cores, on every load).
* ``openvino``: the model converted to OpenVINO and quantized by NNCF's post-training quantization; the
  file is OpenVINO IR (``.xml`` and its ``.bin``), compiled by OpenVINO's CPU plugin in about a second.

Which one is the default, and why, is measured in ``docs/deploy.md``. Every file carries the same
metadata as ``metaformer export`` writes (classes, preprocessing) plus how it was quantized and the
accuracy measured on the validation split: fp32 top-1, int8 top-1, their difference and the share
of images on which both predict the same class.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..atomic import atomic_path, check_writable, clean_stale_temps, output_file
from ..errors import MetaFormerError, require
from .export import export_metadata, openvino_model, save_openvino, save_program, set_onnx_metadata, write_file
from .exported import COMPANIONS, FORMATS, ExportError, load_runtime

FORMAT = {"ort": "onnx", "pt2e": "exported", "openvino": "openvino"}  # the export format each backend writes
BACKENDS = {backend: FORMATS[fmt] for backend, fmt in FORMAT.items()}  # its file's extension
EXTRA = {"ort": "quant", "pt2e": "quant", "openvino": "openvino"}  # the extra named when a backend's package is missing
DEFAULT_BACKEND = "openvino"  # measured in docs/deploy.md: the fastest at batch 1 and 32, as accurate, loads in 0.5 s


class QuantizeError(MetaFormerError):
    """A model that cannot be quantized, or whose int8 file would cost more accuracy than allowed."""


@dataclass
class Accuracy:
    fp32_top1: float  # %
    int8_top1: float  # %
    agreement: float  # % of images on which fp32 and int8 predict the same class
    images: int

    @property
    def drop(self) -> float:
        """Points of top-1 lost (negative: int8 scored higher)."""
        return self.fp32_top1 - self.int8_top1


@dataclass
class QuantResult:
    path: Path
    backend: str
    calib_images: int
    accuracy: Accuracy
    max_drop: float
    written: bool
    ops: dict = field(default_factory=dict)  # {"int8": {op: n}, "fp32": {op: n}}: what runs in which precision

    @property
    def refusal(self) -> str | None:
        if self.written:
            return None
        return (f"int8 top-1 {self.accuracy.int8_top1:.2f}% is {self.accuracy.drop:.2f} points below fp32's "
                f"{self.accuracy.fp32_top1:.2f}%, more than --max-drop {self.max_drop:g}: nothing was written to "
                f"{self.path}; calibrate on more images (--calib-images), or pass --force to write it anyway")


# ----------------------------------------------------------------------------- calibration data
def calibration_batch(dataset, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` preprocessed images ``[n, C, H, W]`` from ``dataset`` (a seeded random choice from a map-style
    dataset, the first ``n`` of a stream); unreadable samples are skipped."""
    from ..data.images import Unreadable
    from ..data.loaders import Padding

    if n < 1:
        raise QuantizeError("--calib-images must be at least 1")
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
        items = (dataset[i] for i in order)
    else:
        items = iter(dataset)
    images = []
    for item in items:
        if isinstance(item, (Unreadable, Padding)):
            continue
        images.append(item[0])
        if len(images) == n:
            break
    if not images:
        raise QuantizeError("no readable calibration images in the training split of --data")
    return torch.stack(images)


# ----------------------------------------------------------------------------- backends
def _onnx_quantize(model: nn.Module, calib: torch.Tensor, path: Path, metadata: dict, batch_size: int) -> None:
    """Our ONNX export (dynamic batch), pre-processed (shape inference, graph optimisation) and quantized
    statically by ONNX Runtime; the intermediate files are written beside ``path`` (a temporary folder of
    :func:`metaformer.atomic.atomic_path`, so a killed run's leftovers are found and removed by the next)."""
    require("onnx", "quant", "int8 quantization (backend ort)")
    ortq = require("onnxruntime.quantization", "quant", "int8 quantization (backend ort)")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(ortq.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calib.split(batch_size))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch.numpy()}

    fp32, pre = path.with_name(path.name + ".fp32.onnx"), path.with_name(path.name + ".pre.onnx")
    try:
        write_file(model, calib[:2], fp32, "onnx", dynamic_batch=True, dynamic_size=False)
        quant_pre_process(str(fp32), str(pre))
        # Conv and MatMul in int8 (oneDNN/MLAS VNNI kernels); norms, pooling, softmax and the elementwise
        # ops stay fp32: quantizing those only adds requantization steps (measured in docs/deploy.md).
        ortq.quantize_static(str(pre), str(path), Reader(), quant_format=ortq.QuantFormat.QDQ,
                             activation_type=ortq.QuantType.QUInt8, weight_type=ortq.QuantType.QInt8,
                             per_channel=True, op_types_to_quantize=list(INT8_OPS),
                             calibrate_method=ortq.CalibrationMethod.MinMax)
    finally:
        for f in (fp32, pre):
            f.unlink(missing_ok=True)
    set_onnx_metadata(path, metadata)


def pt2e_program(model: nn.Module, calib: torch.Tensor, batch_size: int) -> torch.export.ExportedProgram:
    """The model captured by ``torch.export`` (dynamic batch), annotated by torchao's X86 Inductor quantizer,
    calibrated and converted: a program with quantize/dequantize around every conv and linear."""
    require("torchao", "quant", "int8 quantization (backend pt2e)")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = calib[:2]
    captured = torch.export.export(copy.deepcopy(model).eval(), (example,), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(captured, quantizer)
    with torch.no_grad():
        for chunk in calib.split(batch_size):
            prepared(chunk)
    converted = convert_pt2e(prepared)
    return torch.export.export(converted, (example,), dynamic_shapes=({0: batch},))


def has_attention(model: nn.Module) -> bool:
    from ..models.mixers import Attention

    return any(isinstance(m, Attention) for m in model.modules())


def import_nncf():
    """NNCF, imported without the line torch logs when NNCF loads its C++ extension helpers on a machine without
    CUDA ("No CUDA runtime is found"), which says nothing about quantizing for the CPU."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401  (NNCF imports it while quantizing; the line comes at import)

        return require("nncf", "openvino", "int8 quantization (backend openvino)")
    finally:
        logger.setLevel(level)


def openvino_int8_model(model: nn.Module, calib: torch.Tensor):
    """The model converted to OpenVINO (dynamic batch) and quantized by NNCF's post-training quantization,
    calibrated on ``calib`` one image at a time (NNCF's statistics assume it); attention models as NNCF's
    transformer type, which keeps the operations attention is sensitive to (softmax, the norms) in float."""
    nncf = import_nncf()
    ov_model = openvino_model(model, calib[:2], [-1, *calib.shape[1:]])
    kw = {"model_type": nncf.ModelType.TRANSFORMER} if has_attention(model) else {}
    dataset = nncf.Dataset(list(calib.split(1)), lambda x: x.numpy())
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout stays the command's (--json)
        return nncf.quantize(ov_model, dataset, subset_size=len(calib), **kw)


def _openvino_quantize(model: nn.Module, calib: torch.Tensor, path: Path, metadata: dict):
    quantized = openvino_int8_model(model, calib)
    save_openvino(quantized, path, metadata)
    return quantized


def _write_int8(model, calib, path: Path, backend: str, metadata: dict, batch_size: int):
    if backend == "ort":
        _onnx_quantize(model, calib, path, metadata, batch_size)
        return None
    if backend == "openvino":
        return _openvino_quantize(model, calib, path, metadata)
    program = pt2e_program(model, calib, batch_size)
    save_program(program, path, metadata)
    return program


def quantize_to_file(model: nn.Module, calib: torch.Tensor, path: str | os.PathLike, backend: str | None = None,
                     metadata: dict | None = None, batch_size: int = 32) -> Path:
    """Write ``model`` in int8 to ``path`` (``.xml`` for ``openvino``, ``.onnx`` for ``ort``, ``.pt2`` for
    ``pt2e``; ``backend`` by default the one ``path``'s extension names, see :func:`backend_for`), calibrated on
    ``calib`` (preprocessed images); no accuracy check (see :func:`quantize` for the checked command)."""
    backend = backend_for(path, backend)
    path = int8_path(path, backend)
    with atomic_path(path, COMPANIONS.get(FORMAT[backend], ())) as tmp:
        _checked_write(model, calib, tmp, backend, metadata or {}, batch_size)
    return path


def _checked_write(model, calib, path: Path, backend: str, metadata: dict, batch_size: int):
    try:
        return _write_int8(model.eval(), calib, path, backend, metadata, batch_size)
    except MetaFormerError:
        raise
    except Exception as e:  # an exporter's or quantizer's internal error, in one line
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise QuantizeError(f"int8 quantization ({backend}) failed: {type(e).__name__}: {first}") from None


def backend_for(output: str | os.PathLike | None, backend: str | None) -> str:
    """``backend``, or the one ``output``'s extension names (``.onnx``: ort, ``.pt2``: pt2e, ``.xml``: openvino),
    else :data:`DEFAULT_BACKEND`; an extension of another backend than the one named is refused."""
    text = os.fspath(output) if output else ""
    named = next((b for b, s in BACKENDS.items() if Path(text).suffix == s), None)
    if named and output_file(text, "x").name != Path(text).name:  # a folder named like a file
        named = None
    if backend is None:
        return named or DEFAULT_BACKEND
    if backend not in BACKENDS:
        raise QuantizeError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if named is not None and named != backend:
        raise QuantizeError(f"--output {output} names a {BACKENDS[named]} file, which --backend {named} writes, but "
                            f"--backend {backend} writes {BACKENDS[backend]}: change one of them")
    return backend


def int8_path(output: str | os.PathLike | None, backend: str, default: str = "model_int8") -> Path:
    """The file an int8 export to ``output`` writes: the backend's extension added when it has another;
    ``default`` (plus the extension) inside ``output`` when it names a folder, or alone without ``output``."""
    return output_file(output, default + BACKENDS[backend], BACKENDS[backend])


# ----------------------------------------------------------------------------- what runs in int8
def onnx_ops(path: str | os.PathLike) -> dict:
    """``{"int8": {op: n}, "fp32": {op: n}}``: convs and matrix products whose input and weight both come from a
    DequantizeLinear (ONNX Runtime runs those as int8 kernels), and every other compute node (fp32)."""
    onnx = require("onnx", "quant", "reading an ONNX graph")
    graph = onnx.load(str(path), load_external_data=False).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    int8, fp32 = Counter(), Counter()
    for n in graph.node:
        if n.op_type in _STRUCTURAL:
            continue
        quantized = n.op_type in INT8_OPS and all(i in dequantized for i in n.input[:2])
        (int8 if quantized else fp32)[n.op_type] += 1
    return {"int8": dict(int8), "fp32": dict(fp32)}


INT8_OPS = ("Conv", "MatMul", "Gemm")
_STRUCTURAL = ("QuantizeLinear", "DequantizeLinear", "Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat",
               "Reshape", "Flatten", "Transpose", "Identity", "Cast")


# OpenVINO's executed layers that only move or reshape data
_OV_STRUCTURAL = ("Input", "Output", "Const", "Reorder", "Reshape", "Transpose", "Concatenation", "Split", "Gather",
                  "ShapeOf", "Convert", "FakeQuantize")


def openvino_ops(path: str | os.PathLike) -> dict:
    """The same count for an OpenVINO file, from the graph the CPU plugin actually runs (each layer's runtime
    precision): a layer running in u8/i8 is int8, any other compute layer float."""
    from .exported import openvino_config, openvino_core

    core = openvino_core("reading an OpenVINO graph")
    compiled = core.compile_model(core.read_model(str(path)), "CPU", openvino_config("f32", 1))
    int8, fp32 = Counter(), Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        kind = rt["layerType"].astype(str) if "layerType" in rt else op.get_type_name()
        if kind in _OV_STRUCTURAL:
            continue
        precision = rt["runtimePrecision"].astype(str) if "runtimePrecision" in rt else ""
        (int8 if precision in ("u8", "i8") else fp32)[kind] += 1
    return {"int8": dict(int8), "fp32": dict(fp32)}


def program_ops(program: torch.export.ExportedProgram) -> dict:
    """The same count for a PT2E program: convs and linears fed by a dequantize run in int8."""
    int8, fp32 = Counter(), Counter()
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if "quantize" in name or name in ("getitem", "view", "reshape", "permute", "flatten"):
            continue
        fed = any(getattr(a, "op", None) == "call_function" and "dequantize" in str(a.target) for a in node.args)
        (int8 if fed and name in ("conv2d", "linear", "matmul", "bmm", "addmm", "mm") else fp32)[name] += 1
    return {"int8": dict(int8), "fp32": dict(fp32)}


def describe_ops(ops: dict) -> str:
    def show(c):
        return ", ".join(f"{k} x{v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])) or "none"

    return f"int8: {show(ops.get('int8', {}))}; kept in fp32: {show(ops.get('fp32', {}))}"


# ----------------------------------------------------------------------------- accuracy
@torch.no_grad()
def compare(reference: Callable, candidate: Callable, loader, progress: bool = False) -> Accuracy:
    """Top-1 of both on ``loader``'s ``(images, targets, unreadable)`` batches, and how often they agree (each
    model's class is the first of :func:`metaformer.engine.metrics.ranked`, as every top-1 here is counted)."""
    from ..engine.loop import progress_bar
    from ..engine.metrics import ranked

    ref_hits = cand_hits = same = n = 0
    for x, y, _bad in progress_bar(loader, main=progress, desc="fp32 vs int8"):
        if not len(x):
            continue
        a, b = ranked(reference(x), 1)[:, 0], ranked(candidate(x), 1)[:, 0]
        ref_hits += int((a == y).sum())
        cand_hits += int((b == y).sum())
        same += int((a == b).sum())
        n += len(y)
    if n == 0:
        raise QuantizeError("the validation split has no readable images to measure the int8 model on")
    return Accuracy(100 * ref_hits / n, 100 * cand_hits / n, 100 * same / n, n)


def check_output(output: str | os.PathLike | None, backend: str | None, overwrite: bool = False,
                 default: str = "model_int8") -> Path:
    """The int8 file ``output`` names (see :func:`int8_path`), refused before any work when it cannot be written
    or already exists (unless ``overwrite``); the temporary files of an earlier, killed run are removed."""
    path = int8_path(output, backend_for(output, backend), default)
    try:
        check_writable(path, f"--output {path}")
    except MetaFormerError as e:
        raise QuantizeError(str(e)) from None
    if path.exists() and not overwrite:
        raise QuantizeError(f"--output {path} already exists: pass --overwrite to replace it, or choose another "
                            "--output")
    clean_stale_temps(path.parent, path.name)
    return path


class _Refused(Exception):
    """Leaves an ``atomic_path`` block without keeping its file."""


def quantize(loaded, calib_dataset, val_dataset, output: str | os.PathLike | None, backend: str | None = None,
             calib_images: int = 256, max_drop: float = 1.0, force: bool = False, batch_size: int = 32,
             workers: int = 0, progress: bool = False, log: Callable[[str], None] = lambda s: None,
             overwrite: bool = False) -> QuantResult:
    """Calibrate ``loaded.model`` (a :class:`metaformer.tasks.inference.Loaded`) on ``calib_images`` images of
    ``calib_dataset``, write it in int8, run the file on ``val_dataset`` beside the fp32 model, and keep the
    file only if top-1 dropped by at most ``max_drop`` points (or ``force``). The file carries the result.
    ``output``: a file or a folder (see :func:`int8_path`); an existing file is replaced only with ``overwrite``.
    Nothing is left under ``output`` unless the file is kept."""
    from ..data.loaders import make_loader

    backend = backend_for(output, backend)
    path = check_output(output, backend, overwrite)
    model = loaded.model.eval()
    calib = calibration_batch(calib_dataset, calib_images)
    log(f"calibrating on {len(calib)} images, backend {backend}")
    metadata = export_metadata(loaded)
    result = None
    try:
        with atomic_path(path, COMPANIONS.get(FORMAT[backend], ())) as tmp:
            program = _checked_write(model, calib, tmp, backend, metadata, batch_size)  # PT2E's or OpenVINO's
            run = load_runtime(tmp)
            loader = make_loader(val_dataset, batch_size, None, workers)
            log("measuring fp32 and int8 on the validation split")
            accuracy = compare(model, run, loader, progress)
            ops = onnx_ops(tmp) if backend == "ort" else program_ops(program) if backend == "pt2e" else \
                openvino_ops(tmp)
            ok = force or accuracy.drop <= max_drop
            result = QuantResult(path, backend, len(calib), accuracy, max_drop, ok, ops)
            if not ok:
                raise _Refused
            metadata["quantization"] = {"backend": backend, "calib_images": len(calib), "max_drop": max_drop,
                                        **asdict(accuracy), "drop": accuracy.drop}
            if backend == "ort":
                set_onnx_metadata(tmp, metadata)
            elif backend == "pt2e":  # the metadata is an extra file of the archive: save the program again with it
                save_program(program, tmp, metadata)
            else:
                save_openvino(program, tmp, metadata)
    except _Refused:
        pass
    except ExportError as e:
        raise QuantizeError(str(e)) from None
    except OSError as e:  # the file system refused the write (full, read-only since the check)
        raise QuantizeError(f"cannot write --output {path} ({e.strerror or e})") from None
    return result
