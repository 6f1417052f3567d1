"""The modes a configuration is timed in: how each is built from the model, and what it is compared with.

Inference: ours (eager, channels-last, fused in fp32 or bf16, fused in a CUDA graph, fused and compiled, ONNX
Runtime, int8 through ONNX Runtime or PT2E, OpenVINO in fp32, bf16 or int8 from the plain or the fused model),
timm's own model of the variant with the same weights (eager, channels-last, compiled max-autotune, ONNX
Runtime), an exported file, and the machine's GEMM ceiling. Training: ours
(eager, channels-last, the fast path, compiled) and timm's (eager, channels-last, compiled). Each inference
builder returns the function to time and the reference its logits are compared with.
"""
from __future__ import annotations

import copy
import os
import tempfile
from typing import Callable

import torch
from torch import nn

from ...errors import ConfigError
from ...zoo import create_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CL = torch.channels_last

INFER_MODES = ["eager", "eager_cl", "fused", "fused_bf16", "fused_graph", "fused_compile", "ort", "int8_ort",
               "int8_pt2e", "ov_fp32", "ov_bf16", "ov_int8", "ov_fused_fp32", "ov_fused_bf16", "ov_fused_int8",
               "timm_eager", "timm_cl", "timm_compile", "timm_ort", "gemm_ceiling"]
TRAIN_MODES = ["eager", "eager_cl", "fast", "fast_compile", "timm_eager", "timm_cl", "timm_compile"]
# Fair by default: the strongest peer (timm compiled) is always beside ours.
DEFAULT_INFER = ["eager", "eager_cl", "fused", "timm_eager", "timm_cl", "timm_compile", "gemm_ceiling"]
DEFAULT_TRAIN = ["eager", "fast", "timm_eager", "timm_cl", "timm_compile"]


def gflop_per_image(model: nn.Module, img_size: int) -> float:
    """2 x the conv and linear MACs (what a GEMM-bound ceiling is measured in)."""
    from ..complexity import count_macs

    with torch.device("meta"):  # the model owns its config: the same network, without weights
        meta = type(model)(**model.config)
    return 2 * count_macs(meta, img_size)["matmul_conv"] / 1e9


def _is_the_variant(model: nn.Module) -> bool:
    """The model is its variant as the zoo builds it (no depth/width/mixer overrides): what timm also has."""
    name = getattr(model, "variant", None)
    if not name:
        return False
    with torch.device("meta"):
        ref = create_model(name, num_classes=model.num_classes, img_size=model.config.get("img_size", 224))
    ignore = ("drop_path_rate", "drop_rate", "head_dropout")  # training-time only: the same network
    return {k: v for k, v in ref.config.items() if k not in ignore} == \
        {k: v for k, v in model.config.items() if k not in ignore}


# Our variants that timm implements itself, under the same name (timm has no IdentityFormer or RandFormer).
TIMM_FAMILIES = ("poolformer", "poolformerv2", "convformer", "caformer")


def timm_reference(model: nn.Module) -> nn.Module | None:
    """timm's own model of the same variant (``poolformer_*``, ``poolformerv2_*``, ``convformer_*``,
    ``caformer_*``) with our weights, written in timm's layout."""
    try:
        import timm
    except ImportError:
        return None
    from ...weights import from_ours

    name = getattr(model, "variant", None) or ""
    if name.split("_")[0] not in TIMM_FAMILIES or name not in timm.list_models(name) or not _is_the_variant(model):
        return None
    ref = timm.create_model(name, pretrained=False, num_classes=model.num_classes)
    ref.load_state_dict(from_ours(model.state_dict(), "timm"), strict=True)
    return ref.eval()


def _cast(model: nn.Module, dtype: torch.dtype, device, channels_last: bool) -> nn.Module:
    model = model.to(device=device, dtype=dtype)
    return model.to(memory_format=CL) if channels_last else model


def compile_options(device: torch.device, inference: bool = True) -> dict:
    """Inductor options for a fair compiled peer: inference on a GPU in max-autotune (GEMM templates
    tuned per shape, CUDA graphs), with freezing (weights become constants: on CPU, oneDNN
    pre-packing and post-op fusion); training in the default mode (what ``train --compile`` uses).
    Passed per call, so nothing global changes."""
    import torch._inductor

    if not inference:
        return {}
    options = dict(torch._inductor.list_mode_options("max-autotune")) if device.type == "cuda" else {}
    options["freezing"] = True
    return options


def _compile(model: nn.Module, device: torch.device | None = None, inference: bool = True):
    device = device or next(model.parameters()).device
    return torch.compile(model, options=compile_options(device, inference))


def cuda_graph(fn: Callable, x: torch.Tensor) -> Callable:
    """``fn`` captured once in a CUDA graph and replayed (one launch for the whole forward: what
    ``mode='max-autotune'`` gives a compiled model). The input is copied into the captured buffer."""
    static = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the graph (kernel compilation, allocator)
            fn(static)
        expected = fn(static).float()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static)

    def replay(inp: torch.Tensor) -> torch.Tensor:
        static.copy_(inp)
        graph.replay()
        return out

    # A replay that differs from the eager call (seen once on an H200: NaN logits from a replay that
    # matched eager at a smaller batch) must not be timed as if it were the model.
    got = replay(x).float()
    if not torch.isfinite(got).all() or (got - expected).abs().max() > 1e-3 * expected.abs().max().clamp_min(1):
        raise RuntimeError(f"the CUDA graph's replay differs from the eager call (max abs difference "
                           f"{(got - expected).abs().max().item():.3g}); not timed")
    return replay


def _ort_session(model: nn.Module, x: torch.Tensor):
    """Export ``model`` to ONNX (TorchScript exporter, as timm's export) and open it in ONNX Runtime."""
    with tempfile.TemporaryDirectory(prefix="metaformer-bench-") as tmp:  # the session holds the graph
        path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"x": {0: "batch"}}, dynamo=False)
        return ort_file(path)


def ort_file(path: str | os.PathLike):
    """An ONNX file (fp32 or int8) in ONNX Runtime's session, as eval, predict and serve run it
    (:func:`metaformer.tools.exported.ort_session`)."""
    from ..exported import ort_session

    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    return lambda t: torch.from_numpy(sess.run(None, {name: t.numpy()})[0])


def _int8(backend: str, model: nn.Module, x: torch.Tensor):
    """``model`` quantized to int8 by ``backend`` (``ort`` or ``pt2e``; see :mod:`metaformer.tools.quantize`),
    calibrated on random images: int8 kernels take the same time whatever the ranges, and the diff column
    shows what int8 costs on such inputs."""
    from ..exported import compile_int8
    from ..quantize import pt2e_program, quantize_to_file

    calib = torch.randn(16, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    if backend == "ort":
        with tempfile.TemporaryDirectory(prefix="metaformer-bench-") as tmp:
            return ort_file(quantize_to_file(model, calib, os.path.join(tmp, "int8.onnx"), "ort"))
    return compile_int8(pt2e_program(model, calib, 16).module())


def _openvino(model: nn.Module, x: torch.Tensor, precision: str, int8: bool):
    """``model`` converted to OpenVINO (any batch) and compiled for the CPU as every reader compiles a file
    (:func:`metaformer.tools.exported.openvino_config`): ``precision`` for what is not int8 (``f32``, ``bf16``);
    ``int8``: quantized by NNCF first, calibrated on random images like the other int8 modes."""
    from ..export import openvino_model
    from ..exported import openvino_config, openvino_core, openvino_fn
    from ..quantize import openvino_int8_model

    core = openvino_core("the OpenVINO benchmark modes")
    if int8:
        calib = torch.randn(16, *x.shape[1:], generator=torch.Generator().manual_seed(1))
        ov_model = openvino_int8_model(model, calib)
    else:
        ov_model = openvino_model(model, x[:2], [-1, *x.shape[1:]])
    return openvino_fn(core.compile_model(ov_model, "CPU", openvino_config(precision)))


def gemm_fn(dtype: torch.dtype, device) -> tuple[Callable, float]:
    """The machine's GEMM throughput, measured beside the models: a 2048 x 1024 x 1024 GEMM.

    On CPU it runs as a oneDNN 1x1 convolution on pre-packed weights (8 x 16 x 16 tokens,
    1024 -> 1024 channels): the primitive the fused model's convs use, and the fastest GEMM
    form measured here (~220 GFLOP/s fp32 against ~185 for ``torch.mm`` on the machine of
    ``benchmarks/README.md``), so the ceiling is the strict one. Elsewhere: ``torch.mm``
    into a preallocated output.
    """
    from ...fast.fuse import FusedConv, mkldnn_available

    g = torch.Generator().manual_seed(0)
    if mkldnn_available(device) and dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(8, 1024, 16, 16, generator=g).to(dtype).contiguous(memory_format=CL)
        conv = FusedConv(nn.Conv2d(1024, 1024, 1, bias=False)).to(dtype)  # fuse()'s packed oneDNN call
        return torch.no_grad()(lambda _x: conv(x)), 2 * 2048 * 1024 * 1024 / 1e9
    n = 2048
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return (lambda _x: torch.mm(a, b, out=out)), 2 * n ** 3 / 1e9


def build_infer_mode(mode: str, model: nn.Module, dtype: torch.dtype, device, x: torch.Tensor,
                     exported: str | None = None, fuse_kwargs: dict | None = None):
    """Returns (fn, diff reference) or raises to skip the mode. ``exported``: the file the ``exported`` mode
    times (from ``metaformer export`` or ``metaformer quantize``; its weights, not ``model``'s). ``fuse_kwargs``:
    options of ``fuse()`` for the ``fused`` modes (e.g. ``gemm``, a measured GEMM table)."""
    from ...fast import fuse

    fk = fuse_kwargs or {}
    if mode == "eager":
        return _cast(copy.deepcopy(model), dtype, device, False), "eager_fp32"
    if mode == "eager_cl":
        return _cast(copy.deepcopy(model), dtype, device, True), "eager_fp32"
    if mode == "fused":
        return fuse(_cast(copy.deepcopy(model), dtype, device, False), **fk), "eager_fp32"
    if mode == "fused_bf16":  # ours in bf16 beside fp32 modes of the same run (the input cast is timed too)
        fused_bf16 = fuse(_cast(copy.deepcopy(model), torch.bfloat16, device, False), **fk)
        return (lambda t: fused_bf16(t.to(torch.bfloat16)).float()), "eager_fp32"
    if mode == "fused_graph":
        if device.type != "cuda":
            raise RuntimeError("CUDA graphs need a GPU")
        fused = fuse(_cast(copy.deepcopy(model), dtype, device, False), **fk)
        return cuda_graph(fused, x.contiguous(memory_format=CL)), "eager_fp32"
    if mode == "fused_compile":
        fused = fuse(_cast(copy.deepcopy(model), dtype, device, False), backend="aten")
        return _compile(fused, device), "eager_fp32"
    if mode == "ort":
        if device.type != "cpu" or dtype != torch.float32:
            raise RuntimeError("ONNX Runtime mode is CPU fp32 only here")
        return _ort_session(copy.deepcopy(model).eval(), x), "eager_fp32"
    if mode in ("int8_ort", "int8_pt2e"):
        if device.type != "cpu" or dtype != torch.float32:
            raise RuntimeError("the int8 modes run on the CPU, quantized from the fp32 model")
        return _int8(mode[5:], copy.deepcopy(model).eval(), x), "eager_fp32"
    if mode.startswith("ov_"):
        if device.type != "cpu" or dtype != torch.float32:
            raise RuntimeError("the OpenVINO modes run on the CPU, from the fp32 model (their precision is in "
                               "the mode's name)")
        plain = copy.deepcopy(model).eval()
        # our fused algebra (norms folded into the pointwise convs, the mixer as one affine pooling) in the graph
        # OpenVINO compiles, against OpenVINO's own graph of the plain model
        source = fuse(plain, backend="aten") if mode.startswith("ov_fused_") else plain
        kind = mode.rsplit("_", 1)[1]
        return _openvino(source, x, "bf16" if kind == "bf16" else "f32", kind == "int8"), "eager_fp32"
    if mode == "exported":
        if device.type != "cpu" or dtype != torch.float32 or exported is None:
            raise RuntimeError("the exported file runs on the CPU, from fp32 inputs (bench --exported FILE)")
        from ..exported import load_runtime

        return load_runtime(exported), None
    if mode.startswith("timm_"):
        ref = timm_reference(model)
        if ref is None:
            raise RuntimeError("timm is not installed or has no such variant")
        kind = mode[5:]
        if kind == "eager":
            return _cast(ref, dtype, device, False), "timm_fp32"
        if kind == "cl":
            return _cast(ref, dtype, device, True), "timm_fp32"
        if kind == "compile":
            return _compile(_cast(ref, dtype, device, True), device), "timm_fp32"
        if kind == "ort":
            if device.type != "cpu" or dtype != torch.float32:
                raise RuntimeError("ONNX Runtime mode is CPU fp32 only here")
            return _ort_session(ref, x), "timm_fp32"
    raise ConfigError(f"unknown inference mode {mode!r}; choose from {INFER_MODES}")


def model_of_file(path: str) -> nn.Module:
    """The architecture an exported file was made from (stored in it by ``metaformer export`` / ``quantize``),
    with random weights, for the other modes to run beside the file."""
    from ...zoo import build_from_config
    from ..exported import load_runtime

    meta = load_runtime(path).metadata or {}
    if not isinstance(meta.get("config"), dict):
        raise ConfigError(f"{path} does not carry its model's architecture (written by another tool or an older "
                          "metaformer): export or quantize it again")
    model = build_from_config(meta["config"], meta.get("variant"))
    randomize_affine(model)
    return model.eval()


def randomize_affine(model: nn.Module) -> None:
    """Non-trivial norm affines and layer scales, so exactness checks exercise every folded term
    (a fresh model's unit weights, zero biases and 1e-5 layer scales would hide folding bugs)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # norms, layer scales, and the Baselines' res scales and StarReLU scale/bias (``act.scale``/``act.bias``)
            if ".norm" in name or "layer_scale" in name or "res_scale" in name or ".act" in name:
                base = 1.0 if name.endswith(("weight", "scale")) else 0.0
                if "layer_scale" in name:
                    base = 0.1
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- training
CL_TRAIN_MODES = ("eager_cl", "fast", "fast_compile", "timm_cl", "timm_compile")


def build_train_mode(mode: str, model: nn.Module, device):
    from ...fast.training import enable_fast_training

    device = torch.device(device)
    m = copy.deepcopy(model).to(device).train()
    if mode == "eager":
        return m
    if mode == "eager_cl":
        return m.to(memory_format=CL)
    if mode == "fast":
        return enable_fast_training(m)
    if mode == "fast_compile":
        return torch.compile(enable_fast_training(m), options=compile_options(device, inference=False))
    if mode.startswith("timm_"):
        ref = timm_reference(model)
        if ref is None:
            raise RuntimeError("timm is not installed or has no such variant")
        ref = ref.to(device).train()
        if mode == "timm_eager":
            return ref
        ref = ref.to(memory_format=CL)
        if mode == "timm_cl":
            return ref
        if mode == "timm_compile":
            return torch.compile(ref, options=compile_options(device, inference=False))
    raise ConfigError(f"unknown training mode {mode!r}; choose from {TRAIN_MODES}")


def train_step_fn(net: nn.Module, x: torch.Tensor, target: torch.Tensor, channels_last: bool, dtype: str = "fp32"):
    """One optimizer step; ``bf16``/``fp16``: mixed precision under autocast (fp16 with a GradScaler),
    as ``metaformer train --amp`` runs it."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.05)
    xin = x.contiguous(memory_format=CL) if channels_last else x
    loss_fn = nn.CrossEntropyLoss()
    dev = x.device.type
    amp = DTYPES[dtype] if dtype != "fp32" else None
    scaler = torch.amp.GradScaler(dev, enabled=amp is torch.float16)

    def step(_x=None):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn(net(xin), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    return step
