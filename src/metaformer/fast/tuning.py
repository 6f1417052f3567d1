"""Which implementation and tile each 1x1 convolution of a Triton-fused block runs, per shape.

A fused block's two GEMMs (``docs/fast.md``) have candidates:

* fc1, ``act(W1 (y - mu) / sigma + b1)``:
  ``triton``: our GEMM kernel centring each input tile as it loads it, scaling the product by ``1/sigma``,
  bias and activation in its epilogue; one read of the C-wide ``y``, one write of the 4C-wide output
  (5 maps of traffic), with any tile of :data:`~metaformer.fast.triton_ops.GEMM_CONFIGS`.
  ``cublaslt``: the standardised map written first (read ``y``, write ``(y - mu) / sigma``: 2 maps), then
  cuBLASLt's GEMM with its bias + activation epilogue (5 maps): 7 maps, at cuBLAS's speed.
  Folding the centring into a per-sample rank-one bias ``W1 mu / sigma`` instead is no candidate: the
  GELU that follows keeps ``1/sigma`` on the GEMM's input, which is the same pass as the standardisation,
  and a per-sample bias is not an epilogue cuBLASLt takes.
* fc2 (residual add and the next block's statistics in its epilogue): the Triton kernel, any tile.

A *table* (from :func:`tune`, which times every candidate on the device; ``benchmarks/gpu_check.py`` writes
one) names the fastest candidate per shape key ``"fc1 K64 N256 bfloat16 gelu"``; shapes it lacks, and
models without one, take the default: the Triton kernel with its tile heuristic (the path measured on an
H200 so far). What each block runs shows in :func:`metaformer.fast.fusion_report`.

cuBLASLt's GELU epilogue on CUDA is the tanh approximation, up to 4.8e-4 from the exact GELU PoolFormer
uses: below bfloat16's and float16's own rounding of fc1's output (2^-9 and 2^-12 relative), but visible in
float32, so ``cublaslt`` runs GELU in 16-bit dtypes only. It runs ReLU and no activation in any dtype, and
never ReLU^2 or SiLU (no such epilogue). TMA-store tiles need compute capability 9.0.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError

ROLES = ("fc1", "fc2")
MODES = ("default", "triton", "cublaslt")
ACT_NAMES = {0: "none", 1: "gelu", 2: "relu2", 3: "relu", 4: "silu"}


@dataclass(frozen=True)
class GemmPlan:
    """How one GEMM runs: ``impl`` (``triton`` or ``cublaslt``), the Triton tile (None: the heuristic) and where
    the choice came from (``default``, ``table``, ``forced``, or ``default (cublaslt ...: reason)``)."""

    impl: str
    config: dict | None
    source: str

    def label(self) -> str:
        if self.impl == "cublaslt":
            return "cuBLASLt (standardised map, bias/activation epilogue)"
        if self.config:
            return "triton " + tile_label(self.config)
        return "triton (tile heuristic)"

    def describe(self) -> str:
        return f"{self.label()} [{self.source}]"


def tile_label(c: dict) -> str:
    return (f"{c.get('BLOCK_M')}x{c.get('BLOCK_N')}x{c.get('BLOCK_K')} w{c.get('num_warps')} s{c.get('num_stages')}"
            f"{' tma' if c.get('TMA_STORE') else ''}")


def gemm_key(role: str, k: int, n: int, dtype: torch.dtype, act: int) -> str:
    """The table key of one GEMM shape: role, input and output channels, dtype, activation."""
    return f"{role} K{k} N{n} {str(dtype).removeprefix('torch.')} {ACT_NAMES[act]}"


def cublaslt_problem(role: str, dtype: torch.dtype, act: int) -> str | None:
    """Why cuBLASLt cannot run this GEMM with the same function, or None."""
    if role != "fc1":
        return "cuBLASLt runs fc1 only (fc2's epilogue adds the residual and emits statistics)"
    if act not in ACT_NAMES or ACT_NAMES[act] in ("relu2", "silu"):
        return f"cuBLASLt has no {ACT_NAMES.get(act, act)} epilogue"
    if ACT_NAMES[act] == "gelu" and dtype not in (torch.float16, torch.bfloat16):
        return f"its GELU epilogue is the tanh approximation, which {str(dtype).removeprefix('torch.')} would show"
    return None


def config_problem(config: dict | None, n: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why a Triton tile cannot run this GEMM here, or None."""
    if config and config.get("TMA_STORE"):
        from . import triton_ops as T

        return T.tma_store_problem(n, dtype, device)
    return None


def load_table(table: dict | str | os.PathLike) -> dict:
    """A table as :func:`tune` returns it, or the path of its JSON file."""
    if isinstance(table, dict):
        data = table
    else:
        try:
            data = json.loads(Path(table).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the GEMM table {table}: {e}") from e
    if not isinstance(data.get("entries"), dict):
        raise ConfigError("a GEMM table has an 'entries' mapping (as metaformer.fast.tuning.tune returns it)")
    return data


def plan(role: str, k: int, n: int, dtype: torch.dtype, act: int, device: torch.device,
         choice: str | dict | None = None) -> GemmPlan:
    """The plan for one GEMM: ``choice`` is a mode (``default``, ``triton``, ``cublaslt``; None is ``default``) or a
    table (:func:`load_table`), whose entry for this shape wins over the default."""
    choice = "default" if choice is None else choice
    if isinstance(choice, str) and choice not in MODES:
        raise ValueError(f"gemm must be one of {', '.join(MODES)} or a table, got {choice!r}")
    if choice == "triton":
        return GemmPlan("triton", None, "forced")
    if choice == "cublaslt" and role == "fc1":
        problem = cublaslt_problem(role, dtype, act)
        return GemmPlan("cublaslt", None, "forced") if problem is None else \
            GemmPlan("triton", None, f"default (cublaslt asked for, but {problem})")
    if isinstance(choice, dict):
        entry = choice["entries"].get(gemm_key(role, k, n, dtype, act))
        if entry is not None:
            impl, cfg = entry.get("impl"), entry.get("config")
            problem = cublaslt_problem(role, dtype, act) if impl == "cublaslt" else \
                config_problem(cfg, n, dtype, device) if impl == "triton" else f"unknown impl {impl!r}"
            if problem is None:
                return GemmPlan(impl, cfg, "table")
            return GemmPlan("triton", None, f"default (the table's {impl} cannot run: {problem})")
    return GemmPlan("triton", None, "default")


# ----------------------------------------------------------------------------- measuring
def _timer(device: torch.device):
    """Median milliseconds of a call: CUDA events through Triton's do_bench on a GPU, the host clock elsewhere
    (under the interpreter, where only the mechanics are exercised)."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")

    def host(fn):
        fn()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    return host


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def gemm_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, dict]:
    """The GEMMs a Triton-fused model runs at input ``x``: {key: {role, block, M, K, N, hw, dtype, act, device}}
    (``M`` tokens of ``hw`` maps), the first block of each key (the model's own weights time each candidate)."""
    from .fuse import FusedPoolBlock, set_backend

    seen: dict[str, dict] = {}
    hooks = []

    def hook(block, args):
        y = args[0]
        b, c, h, w = y.shape
        for role in ROLES:
            k, n, a = block.gemm_shape(role)
            key = gemm_key(role, k, n, y.dtype, a)
            seen.setdefault(key, dict(role=role, block=block, M=b * h * w, K=k, N=n, hw=(h, w), dtype=y.dtype,
                                      act=a, device=y.device))

    blocks = [m for m in model.modules() if isinstance(m, FusedPoolBlock) and m.use_mlp and m.triton_ready()]
    backend = next((m.backend for m in blocks), "triton")
    for m in blocks:
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        set_backend(model, "aten")  # the blocks are then called one by one, so the hooks see each input
        with torch.no_grad():
            model(x)
    finally:
        set_backend(model, backend)
        for h in hooks:
            h.remove()
    return seen


def _candidates(role: str, dtype: torch.dtype, act: int, n: int, device: torch.device, configs) -> list:
    """The default first (the Triton kernel, its tile heuristic), then each tile that can run here, then
    cuBLASLt where it computes the same function."""
    out = [("triton", None)] + [("triton", dict(c)) for c in configs if config_problem(c, n, dtype, device) is None]
    if cublaslt_problem(role, dtype, act) is None:
        out.append(("cublaslt", None))
    return out


def tune(model: nn.Module, x: torch.Tensor, configs=None, install: bool = True) -> dict:
    """Time every candidate (the default tile, each Triton tile of ``configs``, default
    :data:`~metaformer.fast.triton_ops.GEMM_CONFIGS`, and cuBLASLt where it computes the same function) for
    each GEMM of a Triton-fused ``model`` at input ``x``, on its device, with the model's weights and random
    activations; keep the fastest whose output matches the default's (to the dtype's rounding).
    Returns the table (save it with ``json.dump``; pass it to ``fuse(model, gemm=table)``) and, with
    ``install``, makes ``model`` use it."""
    from . import triton_ops as T

    configs = T.GEMM_CONFIGS if configs is None else configs
    device = x.device
    timer = _timer(device)
    shapes = gemm_shapes(model, x)
    entries = {}
    for key, s in shapes.items():
        blk, dtype = s["block"], s["dtype"]
        b = max(1, s["M"] // (s["hw"][0] * s["hw"][1]))
        g = torch.Generator(device=device).manual_seed(0)
        inp = torch.randn(b, s["K"], *s["hw"], device=device, generator=g).to(dtype).contiguous(
            memory_format=torch.channels_last)
        if s["role"] == "fc1":
            mu = torch.randn(b, device=device, generator=g) * 0.1
            rstd = 1 + torch.rand(b, device=device, generator=g)

            def run(impl, cfg, inp=inp, mu=mu, rstd=rstd, blk=blk, act=s["act"]):
                return T.fc1(inp, blk.fc1_weight, blk.fc1_bias, mu, rstd, act, impl=impl, config=cfg)
        else:
            skip = torch.randn(b, s["N"], *s["hw"], device=device, generator=g).to(dtype).contiguous(
                memory_format=torch.channels_last)

            def run(impl, cfg, inp=inp, skip=skip, blk=blk):
                return T.pointwise_conv(inp, blk.fc2_weight, blk.fc2_bias, skip=skip, res=blk.res2, stats=True,
                                        config=cfg)[0]
        ref = run("triton", None).float()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        times, errors = {}, {}
        best = None
        itemsize = torch.empty((), dtype=dtype).element_size()
        candidates = _candidates(s["role"], dtype, s["act"], s["N"], device, configs)
        default_label = None
        for impl, cfg in candidates:
            label = "cublaslt" if impl == "cublaslt" else "triton " + tile_label(
                T.gemm_config(s["M"], s["N"], s["K"], itemsize, cfg))
            default_label = default_label or label
            if label in times or label in errors:  # two tiles the same once capped at this shape
                continue
            try:
                diff = _rel(run(impl, cfg).float(), ref)
                if not diff <= tol:
                    errors[label] = f"output {diff:.2e} from the default's"
                    continue
                times[label] = ms = timer(lambda impl=impl, cfg=cfg: run(impl, cfg))
            except Exception as e:  # noqa: BLE001 (a tile may not fit this GPU's shared memory or registers)
                errors[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                continue
            if best is None or ms < best[2]:
                best = (impl, cfg, ms)
        entries[key] = {"impl": best[0] if best else "triton", "config": best[1] if best else None,
                        "ms": best[2] if best else None, "default_ms": times.get(default_label), "M": s["M"],
                        "times_ms": times, "errors": errors}
    table = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
             "torch": torch.__version__, "triton": _triton_version(), "input": list(x.shape), "entries": entries}
    if install:
        from .fuse import set_gemm

        set_gemm(model, table)
    return table


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None
