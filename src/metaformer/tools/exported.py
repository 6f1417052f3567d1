"""Running exported files: ONNX (in ONNX Runtime), TorchScript, ``torch.export`` programs, OpenVINO IR, and the
int8 files of ``metaformer quantize``, with the metadata ``metaformer export`` stores in them.

Every reader (``eval``/``predict``/``bench``/``serve --exported``, and export's and quantize's own checks) loads a
file here, so each runs the same session, with the same checks:

- the metadata (class names, preprocessing, the weights' SHA-256) is checked for the fields a reader needs and
  against the file's own input shape; a file that does not fit it is refused in one line, before any image;
- the SHA-256 of the tensors inside the file is compared with the one recorded when it was written, so a file
  whose weights were changed since (edited, or bytes flipped on a disk) is refused rather than run;
- a file exported for a fixed batch runs any number of images, a batch of its size at a time.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ..errors import MetaFormerError, installed, require
from ..weights.io import file_sha256

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2", "openvino": ".xml"}
COMPANIONS = {"openvino": (".bin",)}  # files written beside the named one (OpenVINO's weights)
META_KEY = "metaformer"  # ONNX metadata_props key / extra-file name holding the JSON metadata
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")


class ExportError(MetaFormerError):
    """An export that cannot be made, or a file that cannot be run as it is."""


def files_of(path: Path, fmt: str) -> list[Path]:
    """The files an export in ``fmt`` to ``path`` consists of: ``path``, then its :data:`COMPANIONS`."""
    return [path, *(path.with_suffix(s) for s in COMPANIONS.get(fmt, ()))]


# ----------------------------------------------------------------------------- the file's tensors
def tensors_sha256(named: Iterable[tuple[str, np.ndarray]]) -> str:
    """SHA-256 over ``(name, array)`` pairs in name order: each name, dtype, shape and bytes. What is inside an
    exported file (ONNX initializers, a TorchScript module's or a program's tensors) in one fingerprint."""
    h = hashlib.sha256()
    for name, a in sorted(named, key=lambda kv: kv[0]):
        a = np.ascontiguousarray(a)
        h.update(f"{name}:{a.dtype.str}:{tuple(a.shape)};".encode())
        h.update(a.reshape(-1).view(np.uint8).tobytes())
    return h.hexdigest()


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    # bf16 has no numpy type: its bytes, as 16-bit words, are what the file holds
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def onnx_tensors(proto) -> list[tuple[str, np.ndarray]]:
    """An ONNX graph's initializers and the tensors of its Constant nodes."""
    from onnx import numpy_helper

    named = [(t.name, numpy_helper.to_array(t)) for t in proto.graph.initializer]
    for node in proto.graph.node:
        if node.op_type == "Constant":
            named += [(f"{node.output[0]}.{a.name}", numpy_helper.to_array(a.t)) for a in node.attribute
                      if a.type == a.TENSOR]
    return named


def module_tensors(module) -> list[tuple[str, np.ndarray]]:
    """A TorchScript module's or an ExportedProgram's tensors (parameters, buffers and lifted constants)."""
    if isinstance(module, torch.export.ExportedProgram):
        items = [*module.state_dict.items(), *((f"constant.{k}", v) for k, v in module.constants.items())]
    else:
        items = list(module.state_dict().items())
    return [(k, _numpy(v)) for k, v in items if torch.is_tensor(v)]


# ----------------------------------------------------------------------------- metadata
def parse_metadata(text: str | bytes | None, path: Path) -> dict | None:
    """The metadata ``metaformer export`` stored in ``path``, checked for what the readers use; None for a file
    written by another tool (no metadata, or metadata of another kind)."""
    if not text:
        return None
    try:
        meta = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise ExportError(f"{path}: its metaformer metadata is not valid JSON; export the model again") from None
    if not (isinstance(meta, dict) and meta.get("format") == "metaformer"):
        return None
    problem = metadata_problem(meta)
    if problem:
        raise ExportError(f"{path}: its metaformer metadata {problem}, so its images cannot be prepared or labelled "
                          "as the model needs: export the model again (metaformer export / quantize)")
    return meta


def metadata_problem(meta: dict) -> str | None:
    """What a reader would trip on in ``meta``, in words; None when it is usable."""
    names, pre = meta.get("class_names"), meta.get("preprocessing")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return "has no list of class names"
    if meta.get("num_classes") != len(names):
        return f"gives {meta.get('num_classes')!r} classes but names {len(names)}"
    if not isinstance(pre, dict):
        return "has no preprocessing"
    size = pre.get("img_size")
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 16384:
        return f"has no usable image size (img_size {size!r})"
    crop = pre.get("crop_pct")
    if not isinstance(crop, (int, float)) or isinstance(crop, bool) or not 0 < crop <= 1:
        return f"has no usable crop fraction (crop_pct {crop!r})"
    if pre.get("interpolation") not in INTERPOLATIONS:
        return f"names an unknown interpolation ({pre.get('interpolation')!r})"
    if meta.get("inference_precision", "f32") not in ("f32", "bf16"):
        return f"names an unknown inference precision ({meta.get('inference_precision')!r})"
    chans = meta.get("in_chans", 3)
    for key in ("mean", "std"):
        v = pre.get(key)
        if not (isinstance(v, list) and len(v) == chans and all(isinstance(x, (int, float)) and not
                                                                 isinstance(x, bool) for x in v)):
            return f"has no usable {key} ({chans} numbers expected, found {v!r})"
        if key == "std" and not all(x > 0 for x in v):
            return f"has a std that is not positive ({v!r})"
    return None


# ----------------------------------------------------------------------------- the runtime
def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX file (fp32 or int8) in ONNX Runtime, as every reader runs it (eval, predict, serve, bench): all
    graph optimisations, ``threads`` intra-op threads (default: torch's), workers not spinning."""
    ort = require("onnxruntime", "export", "running an ONNX file")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    # Idle workers spinning after each run take the cores from everything else in the process (the server's
    # decoding, PyTorch's threads, the mode a benchmark times next) for the little latency they save.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class Runtime:
    """An exported file loaded in its own runtime: ``runtime(images [B, C, H, W]) -> logits`` for any ``B``.

    ``metadata``: what ``metaformer export`` stored in the file (class names, input size, preprocessing), or
    None for a file written by another tool. ``fixed_batch``: the batch the file was exported for when it takes
    no other (then a call runs the images that many at a time), else None. ``input_shape``: ``(C, H, W)`` with
    None for a dynamic size.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], metadata: dict | None, fmt: str,
                 path: Path | None = None, fixed_batch: int | None = None,
                 input_shape: tuple | None = None):
        self.fn, self.metadata, self.format, self.path = fn, metadata, fmt, path
        self.fixed_batch, self.input_shape = fixed_batch, input_shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        b = self.fixed_batch
        if b is None or len(x) == b:
            return self.fn(x)
        outs = []
        for chunk in x.split(b):
            n = len(chunk)
            if n < b:  # the last, short chunk: padded to the file's batch, the padding's outputs dropped
                chunk = torch.cat([chunk, chunk.new_zeros((b - n, *chunk.shape[1:]))])
            outs.append(self.fn(chunk)[:n])
        return torch.cat(outs)

    def check_input(self, x: torch.Tensor) -> None:
        want = self.input_shape
        if want is None or x.dim() != 4:
            return
        if any(w is not None and w != g for w, g in zip(want, x.shape[1:])):
            shown = "x".join("any" if w is None else str(w) for w in want)
            raise ExportError(f"{self.path} takes images of {shown} (channels x height x width), not "
                              f"{'x'.join(map(str, x.shape[1:]))}: run it with the preprocessing it was exported "
                              "with, or export the model again at this size (or with --dynamic-size)")

    def eval(self) -> "Runtime":  # an exported file is inference-only already; evaluate() calls model.eval()
        return self

    @property
    def quantization(self) -> dict | None:
        """How the file was quantized and what it cost (``metaformer quantize``), or None."""
        return (self.metadata or {}).get("quantization")

    @property
    def batching(self) -> str:
        """How the file takes batches, in words."""
        if self.fixed_batch is None:
            return "any batch size"
        return (f"exported for a fixed batch of {self.fixed_batch}: images run {self.fixed_batch} per call "
                "(export with --dynamic-batch, the default, to run a batch in one call)")


def load_runtime(path: str | os.PathLike, fmt: str | None = None, verify: bool = True) -> Runtime:
    """The exported file at ``path`` ready to run (see :class:`Runtime`). A corrupt file, metadata a reader cannot
    use, or (``verify``) tensors other than those recorded when it was written are an :class:`ExportError`."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    fmt = fmt or {suffix: name for name, suffix in FORMATS.items()}.get(path.suffix)
    if fmt not in FORMATS:
        raise ExportError(f"cannot tell the format of {path}: use a .onnx, .pt (TorchScript), .pt2 "
                          "(torch.export) or .xml (OpenVINO) file, or name the format")
    missing = [p for p in files_of(path, fmt)[1:] if not p.is_file()]
    if missing:
        raise ExportError(f"{path} needs {missing[0].name} beside it (the {fmt} weights): copy both files together")
    try:
        run, digest = _load(path, fmt)
    except MetaFormerError:  # a runtime that is not installed: the file may well be fine
        raise
    except Exception as e:  # protobuf, zip and pickle errors from three runtimes
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ExportError(f"{path}: not a readable {fmt} file ({type(e).__name__}: {first}); it is probably "
                          "truncated or corrupt: export it again") from None
    meta = run.metadata
    if meta:
        _check_input_matches(path, meta, run.input_shape)
        recorded = meta.get("file_sha256")
        if verify and recorded and digest() != recorded:
            raise ExportError(f"{path}: the weights inside the file are not those it was written with (their "
                              f"SHA-256 differs from the one recorded at export, {recorded[:12]}...): it was changed "
                              "or damaged since. Export or quantize the model again")
    return run


def _check_input_matches(path: Path, meta: dict, shape: tuple | None) -> None:
    if shape is None:
        return
    c, h, w = shape
    size, chans = meta["preprocessing"]["img_size"], meta.get("in_chans", 3)
    if (c is not None and c != chans) or (h is not None and h != size) or (w is not None and w != size):
        raise ExportError(f"{path} takes {c}x{h}x{w} inputs but its metadata describes {chans}x{size}x{size} images: "
                          "the metadata belongs to another export. Export the model again")


def _load(path: Path, fmt: str) -> tuple[Runtime, Callable[[], str]]:
    """``(runtime, digest)``: ``digest()`` is the SHA-256 of the weights inside the file, as recorded at export
    (``file_sha256``)."""
    if fmt == "onnx":
        return _load_onnx(path)
    if fmt == "openvino":
        return _load_openvino(path)
    extra = {META_KEY: ""}
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        meta = parse_metadata(extra[META_KEY], path)
        dtype = next((p.dtype for p in module.parameters()), torch.float32)
        return Runtime(_torch_fn(module, dtype), meta, fmt, path), lambda: tensors_sha256(module_tensors(module))
    program = _load_program(path, extra)
    meta = parse_metadata(extra[META_KEY], path)
    shape, batch = _program_input(program)
    module = program.module()
    if _is_int8_program(program):
        # an int8 program (metaformer quantize --backend pt2e) runs at int8 speed only once Inductor has lowered its
        # quantize/dequantize pairs to oneDNN int8 kernels: compiled on the first call
        fn = compile_int8(module)
    else:
        dtype = next((t.dtype for t in module.state_dict().values() if t.is_floating_point()), torch.float32)
        fn = _torch_fn(module, dtype)
    return Runtime(fn, meta, fmt, path, batch, shape), lambda: tensors_sha256(module_tensors(program))


def _torch_fn(module, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x.to(dtype)).float()

    return run


def _load_onnx(path: Path) -> tuple[Runtime, Callable[[], list]]:
    session = ort_session(path)
    inp = session.get_inputs()[0]
    np_dtype = np.float16 if "float16" in inp.type else np.float32
    dims = [d if isinstance(d, int) and not isinstance(d, bool) else None for d in inp.shape]
    batch, shape = (dims[0], tuple(dims[1:])) if len(dims) == 4 else (None, None)

    def run(x: torch.Tensor) -> torch.Tensor:
        try:
            out = session.run(None, {inp.name: x.detach().cpu().numpy().astype(np_dtype)})[0]
        except Exception as e:  # ONNX Runtime's own errors (a shape it cannot take): one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ExportError(f"{path} cannot run on an input of shape {list(x.shape)}: {first}") from None
        return torch.from_numpy(out.astype(np.float32))

    meta = parse_metadata(session.get_modelmeta().custom_metadata_map.get(META_KEY), path)

    def digest():
        onnx = require("onnx", "export", "checking an ONNX file's weights")
        return tensors_sha256(onnx_tensors(onnx.load(str(path))))

    return Runtime(run, meta, "onnx", path, batch, shape), digest


def openvino_core(what: str = "running an OpenVINO file"):
    """The process's one OpenVINO ``Core``, kept until the process exits (``what``: for the missing-extra message).

    Every ``Core`` makes its own CPU plugin, and each CPU plugin installs an alternate signal stack on the thread
    that compiles with it, putting back at its end the stack it found there. Two plugins that end in the order
    they began (load one file, load another, let go of the first, then the second) leave the thread pointing at
    a stack already unmapped, and the next signal handled on it (Ctrl-C, SIGTERM, a DataLoader's SIGCHLD) kills
    the process with SIGSEGV. With one Core, every compiled model shares one plugin and none ends early."""
    require("openvino", "openvino", what)
    return _the_openvino_core()


@functools.lru_cache(maxsize=None)
def _the_openvino_core():
    import openvino

    return openvino.Core()


def openvino_config(precision: str = "f32", threads: int | None = None) -> dict:
    """How every reader compiles an OpenVINO model for the CPU: ``precision`` for the operations that are not int8
    (OpenVINO's own default is bf16 on CPUs that have it, which would make an fp32 file answer in bf16), ``threads``
    (default: torch's), one stream for the lowest latency of each call, as the other runtimes here run."""
    return {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY"}


def openvino_fn(compiled) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images -> logits`` through one infer request of an OpenVINO compiled model."""
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        out = request.infer({0: x.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(np.array(out, dtype=np.float32))

    return run


def _load_openvino(path: Path) -> tuple[Runtime, Callable[[], str]]:
    core = openvino_core()
    model = core.read_model(str(path))
    text = model.get_rt_info([META_KEY]).astype(str) if model.has_rt_info([META_KEY]) else None
    meta = parse_metadata(text, path)
    raw = json.loads(text) if text else {}  # the precision is stored also for files without our metadata
    dims = [d.get_length() if d.is_static else None for d in model.inputs[0].get_partial_shape()]
    batch, shape = (dims[0], tuple(dims[1:])) if len(dims) == 4 else (None, None)
    precision = raw.get("inference_precision", "f32") if isinstance(raw, dict) else "f32"
    fn = openvino_fn(core.compile_model(model, "CPU", openvino_config(precision)))
    return Runtime(fn, meta, "openvino", path, batch, shape), lambda: file_sha256(path.with_suffix(".bin"))


def _load_program(path: Path, extra: dict):
    """``torch.export.load`` with the operators int8 programs use registered first (they come from torchao, or
    torch's own copy), and without the page of deserialisation warnings torch logs before a failure."""
    for module in ("torchao.quantization.pt2e", "torch.ao.quantization.fx._decomposed"):
        if installed(module):
            with contextlib.suppress(ImportError):
                importlib.import_module(module)
                break
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return torch.export.load(str(path), extra_files=extra)
    finally:
        logger.setLevel(level)


def _program_input(program) -> tuple[tuple | None, int | None]:
    """``((C, H, W), fixed batch)`` of a program's image input (None where dynamic)."""
    user = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            val = node.meta.get("val")
            if val is None or val.dim() != 4:
                return None, None
            dims = [d if isinstance(d, int) else None for d in val.shape]
            return tuple(dims[1:]), dims[0]
    return None, None


def _is_int8_program(program) -> bool:
    return any(node.op == "call_function" and "quantized_decomposed" in str(node.target)
               for node in program.graph.nodes)


def compile_int8(module: Callable) -> Callable:
    """A PT2E int8 module lowered by Inductor to oneDNN int8 kernels. Freezing (weights as constants, so
    they are pre-packed) is what the lowering patterns need; it is switched on for this compile only."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(module)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return compiled(x)

    return run


# ----------------------------------------------------------------------------- with labels and preprocessing
def load_exported(path: str, model_name: str | None, checkpoint: str | None = None):
    """An exported file (ONNX, TorchScript, torch.export, OpenVINO IR) run in its own runtime, with the class
    names and preprocessing it carries (files from `metaformer export`), or else those of ``checkpoint``/the
    variant; a ``checkpoint`` or variant that disagrees with what the file carries is refused."""
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
        _check_input_matches(Path(path), {"preprocessing": pre, "in_chans": len(pre["mean"])}, run.input_shape)
    else:
        raise ExportError(f"{path} carries no metaformer metadata (not written by `metaformer export`): name the "
                          "model (e.g. poolformer_s12) or pass the --checkpoint it was exported from, so the images "
                          "get the right preprocessing and class names")
    return Loaded(run, list(names), pre["img_size"], eval_transform(**pre), path, pre, aliases, variant)


def _described_by(model_name: str | None, checkpoint: str | None) -> dict:
    """Classes, input size and preprocessing that ``--checkpoint`` (or else the variant) stands for."""
    from ..tasks.inference import default_class_names, preprocessing_of, resolve_checkpoint
    from ..weights.save import stored_metadata
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


def _check_same_weights(path: str, meta: dict, model_name: str | None, checkpoint: str) -> None:
    """A file is run with ``--checkpoint`` only when it was exported from that checkpoint's weights (recorded in
    the file, and its own tensors checked against the record when it was loaded): the same classes and input size
    are not enough (another epoch, another run)."""
    from ..tasks.inference import load_for_inference
    from ..weights.io import state_dict_sha256

    if not meta.get("weights_sha256") or not meta.get("file_sha256"):
        raise ExportError(f"{path} does not record which weights it holds (an older metaformer wrote it), so it "
                          f"cannot be checked against --checkpoint {checkpoint}: drop --checkpoint (the file "
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
