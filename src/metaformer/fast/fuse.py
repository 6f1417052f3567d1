"""Fused, eval-only PoolFormer: the same outputs with far fewer passes over the activations.

A PoolFormer block spends most of its time outside the 1x1 convolutions in memory-bound
passes (GroupNorm, average pooling, subtraction, LayerScale, GELU, residual add). The fused
block removes them with exact algebra (``docs/fast.md``):

* Token mixer.  For GroupNorm(1) statistics ``mu, sigma`` of ``x`` (scalars per sample),
  ``g * (pool(norm(x)) - norm(x)) = (g * w / sigma) * (pool(x) - x)``: average pooling with
  ``count_include_pad=False`` divides by the number of *real* neighbours, so it maps a
  constant to itself and commutes with a per-channel scale; the norm's shift (``mu`` and the
  bias) cancels in the subtraction. The whole branch plus the residual is one ``lerp``:
  ``x + a * (pool(x) - x)`` with ``a = g * w / sigma`` per (sample, channel). ``norm(x)``
  is never materialised; only two cheap reductions give ``mu, sigma``.
* Channel MLP.  norm2's affine is folded into fc1 (``W1 diag(w2)``, ``b1 + W1 b2``), so only
  the per-sample standardisation ``(y - mu) / sigma`` remains; LayerScale2 is folded into
  fc2. We standardise the C-channel input rather than applying ``1/sigma`` and
  ``-rowsum(W1) mu / sigma`` after the GEMM: that epilogue would be a pass over the 4C-wide
  hidden tensor that oneDNN cannot fuse (its post-ops have no per-sample operand), while
  the input pass is 4x narrower.
* On CPU (the ``mkldnn`` backend), fc1 runs as one oneDNN convolution with GELU as a
  post-op, and fc2 with the residual add as a post-op, on pre-packed weights.
* Everything runs channels_last: NHWC is the layout oneDNN's 1x1 convs prefer, and
  ``avg_pool2d`` on NHWC vectorises over channels (NCHW ``count_include_pad=False`` pooling
  is a pathological scalar loop, ~6x slower).

The ``aten`` backend expresses the same math with portable ops (``conv2d``, ``gelu``, ``add``):
it is what ``torch.compile`` sees (inductor with freezing then does the conv + post-op fusion
itself, and a custom oneDNN call would only hide the graph from it), and what runs on a GPU
without Triton.

The ``triton`` backend (CUDA; :mod:`metaformer.fast.triton_ops`) runs each GroupNorm(1) block as
four kernels: the token mixer in one read and one write of the activation (emitting norm2's
statistics); fc1 as a GEMM that centres each input tile as it loads it and scales the product by
``1/sigma`` (norm2 never materialised; its affine folded into fc1), then adds the bias and applies
the activation; fc2 as a GEMM whose epilogue adds the residual and emits the next block's norm1
statistics; and the small reduction of those statistics. Blocks of a stage pass the statistics
along, so a block reads its input once. ``docs/fast.md`` counts the bytes each path moves.

The MetaFormer Baselines' PoolFormerV2 and IdentityFormer blocks fuse the same way. Their
norms have no bias (the shift term is zero), ResScale ``r`` scales the skip path (the mixer
becomes ``r * x + a * (pool(x) - x)``, the MLP's residual ``r2 * y``), and StarReLU's scalar
affine ``s * relu(h)^2 + b`` folds into fc2 (``s W2``, ``b2 + b W2 1``), leaving ``relu(h)^2``.
IdentityFormer's mixer adds ``norm1(x)`` itself (there is nothing to subtract), so its branch
is the exact per-(sample, channel) affine map ``x * (r + a) + g * (b - w mu / sigma)``.

Blocks that are not PoolFormer-style blocks (attention, separable-conv, random-mixing or
spatial-MLP stages, BatchNorm or no-norm ablations, ``residual=False``) are left as they are;
pooling blocks with the hybrids' channel LayerNorm get the MLP fusions and a cheap NHWC
LayerNorm.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MetaFormerError
from ..models.layers import LayerNorm2d, StarReLU, eager
from ..models.metaformer import Downsampling, MetaFormerBlock, MetaFormerStage, NormPoolHead, Stem
from ..models.mixers import Pooling

CL = torch.channels_last
_ACT_ATTR = {nn.GELU: "gelu", nn.ReLU: "relu", nn.SiLU: "swish"}


def mkldnn_available(device: torch.device | str = "cpu") -> bool:
    return (torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


@dataclass(frozen=True)
class CpuCapabilities:
    """What this CPU's oneDNN can do, as torch reports it. ``bf16_packing``: oneDNN reorders bf16 weights
    (needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT; an AVX2-only CPU has neither, and there the packed
    bf16 call raises)."""

    isa: str  # torch's own dispatch level: DEFAULT, AVX2, AVX512 ...
    bf16_packing: bool
    avx512_bf16: bool
    amx: bool
    vnni: bool

    def describe(self) -> str:
        extras = [n for n, on in (("avx512_bf16", self.avx512_bf16), ("amx", self.amx), ("vnni", self.vnni)) if on]
        return f"{self.isa}{' + ' + ', '.join(extras) if extras else ''}; oneDNN bf16 packing: " \
               f"{'yes' if self.bf16_packing else 'no'}"


def _probe(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=1)
def detect_cpu_capabilities() -> CpuCapabilities:
    bf16 = False
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported"):
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return CpuCapabilities(isa=torch.backends.cpu.get_cpu_capability(), bf16_packing=bf16,
                           avx512_bf16=_probe("_is_avx512_bf16_supported"), amx=_probe("_is_amx_tile_supported"),
                           vnni=_probe("_is_vnni_supported"))


def cpu_capabilities() -> CpuCapabilities:
    """The answer the fused path acts on: this CPU's, unless a caller substitutes another
    (:func:`assume_cpu_capabilities`, e.g. a test forcing "no bf16 packing" on any machine)."""
    return _ASSUMED[-1] if _ASSUMED else detect_cpu_capabilities()


_ASSUMED: list[CpuCapabilities] = []


@contextlib.contextmanager
def assume_cpu_capabilities(**changes):
    """Act as if the CPU's capabilities were these (fields of :class:`CpuCapabilities`) inside the block."""
    _ASSUMED.append(dataclasses.replace(cpu_capabilities(), **changes))
    try:
        yield _ASSUMED[-1]
    finally:
        _ASSUMED.pop()


def packed_dtypes() -> tuple[torch.dtype, ...]:
    """Dtypes the oneDNN packed-weight convs run in on this CPU; others take aten's conv2d (which the
    plain model uses too, so the fused model runs wherever the plain one does)."""
    return (torch.float32, torch.bfloat16) if cpu_capabilities().bf16_packing else (torch.float32,)


def _is_gn1(m: nn.Module) -> bool:
    return isinstance(m, nn.GroupNorm) and m.num_groups == 1


def _is_ln(m: nn.Module) -> bool:
    return isinstance(m, LayerNorm2d)


def _scale_of(layer_scale: nn.Module, dim: int, ref: torch.Tensor) -> torch.Tensor:
    s = getattr(layer_scale, "scale", None)
    return torch.ones(dim, dtype=torch.float64, device=ref.device) if s is None else s.detach().double()


def _affine(norm: nn.Module, dim: int, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = norm.weight.detach().double() if norm.weight is not None else torch.ones(dim, dtype=torch.float64,
                                                                                 device=ref.device)
    b = norm.bias.detach().double() if norm.bias is not None else torch.zeros(dim, dtype=torch.float64,
                                                                              device=ref.device)
    return w, b


def gn1_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm(1) mean and 1/sigma per sample, shaped [B, 1, 1, 1] in fp32.

    Two vectorised reductions (sum, sum of squares accumulated in fp32 even for bf16 input)
    instead of ``var_mean``, whose generic Welford reduction is ~20x slower over these shapes.
    The variance is formed in fp64 from those sums so the cancellation in ``E[x^2] - mu^2`` costs
    no precision for the activation statistics PoolFormer sees.
    """
    b = x.shape[0]
    flat = x.permute(0, 2, 3, 1).reshape(b, -1) if x.is_contiguous(memory_format=CL) else x.reshape(b, -1)
    if torch.compiler.is_compiling():  # inductor fuses a one-pass Welford reduction into neighbours
        var, mu = torch.var_mean(flat.float(), dim=1, correction=0)
        return mu.view(b, 1, 1, 1), torch.rsqrt(var + eps).view(b, 1, 1, 1)
    n = flat.shape[1]
    s1 = flat.sum(1, dtype=torch.float32).double()
    s2 = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32).double().square()
    mu = s1 / n
    var = (s2 / n - mu * mu).clamp_min(0)
    rstd = torch.rsqrt(var + eps)
    return mu.float().view(b, 1, 1, 1), rstd.float().view(b, 1, 1, 1)


class _Packed:
    """oneDNN pre-packed weights of one conv, per dtype and input shape.

    Packing once saves a reorder per call. The input shape is passed to oneDNN as a hint: packed
    without it, the layout chosen for large batches makes some convs ~10x slower at batch 1
    (S12's 320-channel stage: 9.3 ms instead of 0.8 ms per call). A few shapes are kept.
    """

    MAX_SHAPES = 8

    def __init__(self, padding, stride, groups):
        self.padding, self.stride, self.groups = list(padding), list(stride), groups
        self.cache: dict = {}

    def get(self, weight: torch.Tensor, input_shape) -> torch.Tensor:
        key = (weight.dtype, weight.data_ptr(), weight._version, tuple(input_shape))
        packed = self.cache.get(key)
        if packed is None:
            if len(self.cache) >= self.MAX_SHAPES:
                self.cache.pop(next(iter(self.cache)))
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                weight.detach(), self.padding, self.stride, [1, 1], self.groups, list(input_shape))
            self.cache[key] = packed
        return packed


class FusedModule(nn.Module):
    """Common surface: eval-only, a backend switch, and no pickling of oneDNN-packed weights."""

    backend = "mkldnn"

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("a fused MetaFormer is inference-only; train the original model "
                               "(or use metaformer.fast.training) and fuse it again")
        return super().train(False)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed"] = {k: _Packed(v.padding, v.stride, v.groups) for k, v in state.get("_packed", {}).items()}
        return state

    def _conv(self, name, x, weight, bias, attr="none", other=None):
        """Conv with an optional fused unary post-op (``attr``) or residual add (``other``)."""
        pk = self._packed[name]
        if self.backend == "mkldnn" and x.device.type == "cpu" and x.dtype in packed_dtypes() \
                and eager():  # packed oneDNN weights are opaque to tracing and export: those get conv2d
            w = pk.get(weight, x.shape)
            if other is not None:
                return torch.ops.mkldnn._convolution_pointwise.binary(
                    x, other, w, bias, pk.padding, pk.stride, [1, 1], pk.groups, "add", None, None, [], None)
            algo = "none" if attr == "gelu" else None
            return torch.ops.mkldnn._convolution_pointwise(
                x, w, bias, pk.padding, pk.stride, [1, 1], pk.groups, attr, [], algo)
        y = F.conv2d(x, weight, bias, pk.stride, pk.padding, 1, pk.groups)
        if attr != "none":
            y = self.act(y)
        return y if other is None else y + other


class FusedConv(FusedModule):
    """A plain conv (stem, downsampling) on pre-packed weights; makes its input channels_last."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.dilation != (1, 1) or isinstance(conv.padding, str):
            raise ValueError("FusedConv supports plain strided convs only")
        self.register_buffer("weight", conv.weight.detach().clone().contiguous(memory_format=CL))
        self.register_buffer("bias", conv.bias.detach().clone() if conv.bias is not None else None)
        self._packed = {"conv": _Packed(conv.padding, conv.stride, conv.groups)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv("conv", x.contiguous(memory_format=CL), self.weight, self.bias)


def _plain_mlp(mlp: nn.Module) -> bool:
    """fc1 -> act -> fc2 with no norm and no active dropout in between (timm's Mlp, as our blocks build it)."""
    drops = [m for m in (getattr(mlp, "drop1", None), getattr(mlp, "drop2", None)) if m is not None]
    return isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity) and all(
        isinstance(d, nn.Identity) or getattr(d, "p", 0) == 0 for d in drops)


def unfusable_reason(block: MetaFormerBlock) -> str | None:
    """Why ``fuse()`` keeps ``block`` as it is, or None if it fuses."""
    mixer, norm1 = block.token_mixer, block.norm1
    # nn.Identity: IdentityFormer's mixer (and the "identity" ablation)
    if not isinstance(mixer, (Pooling, nn.Identity)):
        return f"its token mixer is {type(mixer).__name__} (pooling and identity mixers fuse)"
    if not block.residual:
        return "it has no residual connection (the ablation)"
    if not block.mixer_residual:
        return "its token mixer has no residual connection (the ablation)"
    if not (_is_gn1(norm1) or _is_ln(norm1)):
        return f"its norm is {type(norm1).__name__} (GroupNorm(1) and channel LayerNorm fuse)"
    if block.use_mlp:
        if not _plain_mlp(block.mlp):
            return "its MLP has a norm or active dropout inside"
        if type(block.norm2) is not type(norm1):
            return f"norm2 ({type(block.norm2).__name__}) differs from norm1 ({type(norm1).__name__})"
    return None


class FusedPoolBlock(FusedModule):
    """A PoolFormer-style block (pooling or identity mixer, GroupNorm(1) or channel LayerNorm, with or
    without bias, LayerScale and/or ResScale) with folded weights."""

    def __init__(self, block: MetaFormerBlock):
        super().__init__()
        mixer = block.token_mixer
        norm1 = block.norm1
        reason = unfusable_reason(block)
        if reason is not None:
            raise ValueError(f"not a fusable PoolFormer block: {reason}")
        ref = next(block.parameters())
        dim = norm1.weight.shape[0] if norm1.weight is not None else block.layer_scale1.scale.shape[0]
        self.dim = dim
        self.norm_kind = "gn1" if _is_gn1(norm1) else "ln"
        self.mixer_kind = "pooling" if isinstance(mixer, Pooling) else "identity"
        self.pool_size = getattr(mixer, "pool_size", 0)
        self.subtract = getattr(mixer, "subtract", False)
        self.eps1 = float(norm1.eps)
        w1, b1 = _affine(norm1, dim, ref)
        g1 = _scale_of(block.layer_scale1, dim, ref)
        f32 = dict(dtype=torch.float32)
        # gn1: the mixer is x + a * (pool(x) - x) with a = g1 * w1 / sigma, plus, without the
        # subtraction, g1 * (b1 - w1 mu / sigma) (pool(norm(x)) alone keeps the norm's shift).
        self.register_buffer("mix_scale", (g1 * w1).to(**f32).view(1, dim, 1, 1))
        self.register_buffer("mix_shift", (g1 * b1).to(**f32).view(1, dim, 1, 1))
        # ResScale (the Baselines' stages 3-4) multiplies the skip path; None where the block has none.
        self.register_buffer("res1", _res_scale(block.res_scale1, dim))
        if self.norm_kind == "ln":  # channel LN: per-token stats, so the identity does not apply
            self.register_buffer("ln1_weight", w1.to(**f32))
            self.register_buffer("ln1_bias", b1.to(**f32))
            self.register_buffer("ls1", g1.to(**f32).view(1, dim, 1, 1))
        self.use_mlp = block.use_mlp
        if self.use_mlp:
            fc1, fc2, act = block.mlp.fc1, block.mlp.fc2, block.mlp.act
            self.eps2 = float(block.norm2.eps)
            w2, b2 = _affine(block.norm2, dim, ref)
            W1 = fc1.weight.detach().double().flatten(1)
            bias1 = fc1.bias.detach().double() if fc1.bias is not None else W1.new_zeros(W1.shape[0])
            W1f = W1 * w2[None, :]
            b1f = bias1 + W1 @ b2
            g2 = _scale_of(block.layer_scale2, dim, ref)
            W2 = fc2.weight.detach().double().flatten(1)
            bias2 = fc2.bias.detach().double() if fc2.bias is not None else W1.new_zeros(dim)
            if type(act) is StarReLU:
                # s * relu(h)^2 + b with scalar s, b: fc2(s * r + b) = (s W2) r + (b2 + b W2 1)
                s, b = act.scale.detach().double(), act.bias.detach().double()
                bias2 = bias2 + b * W2.sum(1)
                W2 = s * W2
                act = None
            self.register_buffer("fc1_weight", W1f.to(**f32).view(*W1f.shape, 1, 1).contiguous(memory_format=CL))
            self.register_buffer("fc1_bias", b1f.to(**f32))
            self.register_buffer("fc2_weight", (g2[:, None] * W2).to(**f32).view(*W2.shape, 1, 1)
                                 .contiguous(memory_format=CL))
            self.register_buffer("fc2_bias", (g2 * bias2).to(**f32))
            self.register_buffer("res2", _res_scale(block.res_scale2, dim))
            self.squared_relu = act is None  # StarReLU with its affine folded away: relu(h)^2
            self.act = nn.ReLU() if act is None else act
            self.act_attr = _ACT_ATTR.get(type(self.act)) if getattr(act, "approximate", "none") == "none" else None
            self._packed = {"fc1": _Packed((0, 0), (1, 1), 1), "fc2": _Packed((0, 0), (1, 1), 1)}
        else:
            self.register_buffer("res2", None)
            self._packed = {}

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        k = self.pool_size
        return F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)

    def _skip(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.res1 is None else x * self.res1.to(x.dtype)

    def _mixer(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_kind == "ln":
            n = _ln_nhwc(x, self.ln1_weight.to(x.dtype), self.ln1_bias.to(x.dtype), self.eps1)
            if self.mixer_kind == "identity":
                return torch.addcmul(self._skip(x), self.ls1.to(x.dtype), n)
            p = self._pool(n)
            return torch.addcmul(self._skip(x), self.ls1.to(x.dtype), p - n if self.subtract else p)
        mu, rstd = gn1_stats(x, self.eps1)
        a = self.mix_scale * rstd
        shift = (self.mix_shift - a * mu).to(x.dtype)  # g * (b - w mu / sigma): the norm's own shift
        if self.mixer_kind == "identity":
            # r x + g norm(x) = x (r + a) + shift: one pass, exactly (IdentityFormer adds norm1(x) itself)
            r = 1.0 if self.res1 is None else self.res1
            return torch.addcmul(shift, x, (r + a).to(x.dtype))
        a = a.to(x.dtype)
        p = self._pool(x)
        if self.subtract:
            if self.res1 is None:
                return torch.lerp(x, p, a)  # x + a * (p - x) in one pass
            return torch.addcmul(x * (self.res1.to(x.dtype) - a), a, p)  # r x + a (p - x)
        return torch.addcmul(self._skip(x) + shift, a, p)

    def triton_ready(self) -> bool:
        """Whether this block runs as Triton kernels under the ``triton`` backend (GroupNorm(1) blocks
        with an activation the kernels have; the others run the ``aten`` math)."""
        return self.norm_kind == "gn1" and (not self.use_mlp or self._triton_act() is not None)

    def _triton_act(self) -> int | None:
        from . import triton_ops as T

        if self.squared_relu:
            return T.ACT_RELU2
        kind = type(self.act)
        if kind is nn.GELU and self.act.approximate == "none":
            return T.ACT_GELU
        return {nn.ReLU: T.ACT_RELU, nn.SiLU: T.ACT_SILU}.get(kind)

    # How the GEMMs run under the triton backend: a mode or a measured table (metaformer.fast.tuning), set by
    # fuse(gemm=...), set_gemm or tuning.tune; the plans per (dtype, device) follow from it.
    gemm = None

    def gemm_shape(self, role: str) -> tuple[int, int, int]:
        """fc1's or fc2's input channels, output channels and Triton activation (fc2's is in no epilogue)."""
        weight = self.fc1_weight if role == "fc1" else self.fc2_weight  # [N, K, 1, 1]
        return weight.shape[1], weight.shape[0], self._triton_act() if role == "fc1" else 0

    def gemm_plan(self, role: str, dtype: torch.dtype, device: torch.device):
        """The :class:`~metaformer.fast.tuning.GemmPlan` of fc1 or fc2 for inputs of ``dtype`` on ``device``."""
        from . import tuning

        key = (role, dtype, device.type)
        plans = self.__dict__.setdefault("_plans", {})
        if key not in plans:
            k, n, act = self.gemm_shape(role)
            plans[key] = tuning.plan(role, k, n, dtype, act, device, self.gemm)
        return plans[key]

    def forward_triton(self, x: torch.Tensor, stats: torch.Tensor | None = None):
        """This block as Triton kernels; ``stats``: partial sums of ``x`` from the block before (or None).
        Returns the output and its partial sums, for the next block."""
        from . import triton_ops as T

        x = x.contiguous(memory_format=CL)
        n = x[0].numel()
        mu, rstd = T.finish_stats(T.sample_partials(x) if stats is None else stats, n, self.eps1)
        mode = T.MIX_IDENTITY if self.mixer_kind == "identity" else T.MIX_SUBTRACT if self.subtract else T.MIX_POOL
        y, ys = T.pool_mix(x, mu, rstd, self.mix_scale, self.mix_shift, self.res1, None, mode, self.pool_size)
        if not self.use_mlp:
            return y, ys
        mu2, rstd2 = T.finish_stats(ys, n, self.eps2)
        p1 = self.gemm_plan("fc1", y.dtype, y.device)
        hid = T.fc1(y, self.fc1_weight, self.fc1_bias, mu2, rstd2, self._triton_act(), p1.impl, p1.config)
        p2 = self.gemm_plan("fc2", y.dtype, y.device)
        return T.pointwise_conv(hid, self.fc2_weight, self.fc2_bias, skip=y, res=self.res2, stats=True,
                                config=p2.config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton" and self.triton_ready() and eager():
            return self.forward_triton(x)[0]
        x = x.contiguous(memory_format=CL)
        y = self._mixer(x)
        if not self.use_mlp:
            return y
        if self.norm_kind == "gn1":
            n = F.group_norm(y, 1, None, None, self.eps2)  # same kernel; also exports to ONNX
        else:
            n = _ln_nhwc(y, None, None, self.eps2)
        if self.act_attr is not None:
            hid = self._conv("fc1", n, self.fc1_weight, self.fc1_bias, self.act_attr)
        else:
            hid = self.act(self._conv("fc1", n, self.fc1_weight, self.fc1_bias))
        if self.squared_relu:
            hid = hid * hid  # relu(h)^2; StarReLU's scale and bias live in fc2
        skip = y if self.res2 is None else y * self.res2.to(y.dtype)
        return self._conv("fc2", hid, self.fc2_weight, self.fc2_bias, other=skip)

    def extra_repr(self) -> str:
        mixer = f"pool_size={self.pool_size}, subtract={self.subtract}" if self.mixer_kind == "pooling" else "identity"
        return f"dim={self.dim}, norm={self.norm_kind}, {mixer}, res_scale={self.res1 is not None}"


def _res_scale(scale: nn.Module, dim: int) -> torch.Tensor | None:
    s = getattr(scale, "scale", None)
    return None if s is None else s.detach().float().view(1, dim, 1, 1).clone()


def _ln_nhwc(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """Channel LayerNorm on an NHWC-stored map: a contiguous last-dim norm, no copies."""
    x = x.contiguous(memory_format=CL)
    # int(): the channel count is fixed, and a traced size here breaks the ONNX exporter
    return F.layer_norm(x.permute(0, 2, 3, 1), (int(x.shape[1]),), weight, bias, eps).permute(0, 3, 1, 2)


class FusedHead(FusedModule):
    """GroupNorm(1) then global mean, without the normalised map: ``w * (mean_hw(x) - mu) / sigma + b``."""

    def __init__(self, head: NormPoolHead):
        super().__init__()
        self.eps = float(head.norm.eps)
        self.register_buffer("weight", head.norm.weight.detach().clone())
        self.register_buffer("bias", head.norm.bias.detach().clone())
        self.drop = head.drop
        self.fc = head.fc
        self._packed = {}

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        mu, rstd = gn1_stats(x, self.eps)
        m = x.float().mean((2, 3))
        pooled = ((m - mu.flatten(1)) * rstd.flatten(1) * self.weight.float() + self.bias.float()).to(x.dtype)
        return pooled if pre_logits else self.fc(pooled)


class FusedBlocks(nn.Sequential):
    """A stage's blocks (same keys as the ``nn.Sequential`` it replaces). Under the ``triton`` backend,
    each block's last kernel hands the partial sums of its output to the next block, whose norm1
    statistics then cost no extra read."""

    backend = "mkldnn"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Traced, compiled or exported, the portable math runs: the kernels are opaque to those tools
        # (torch.compile then generates its own fused kernels from it).
        if self.backend != "triton" or not eager():
            return super().forward(x)
        stats = None
        for block in self:
            if isinstance(block, FusedPoolBlock) and block.triton_ready():
                x, stats = block.forward_triton(x, stats)
            else:
                x, stats = block(x), None
        return x


def _fused_modules(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (FusedModule, FusedBlocks))]


BACKENDS = ("mkldnn", "aten", "triton")


def triton_available(device: torch.device | str = "cuda") -> bool:
    """Triton kernels can run here: a CUDA device (compute capability 8.0+, for bfloat16) and Triton."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(dev) >= (8, 0)


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """``mkldnn``: oneDNN fused convs (CPU eager). ``aten``: portable ops (any device, torch.compile).
    ``triton``: Triton kernels for the GroupNorm(1) blocks (CUDA), portable ops for the rest."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "triton":
        from . import triton_ops  # noqa: F401  (fails here, with Triton's own message, if it is missing)
    for m in _fused_modules(model):
        m.backend = backend
    return model


def set_gemm(model: nn.Module, gemm) -> nn.Module:
    """How the fused blocks' GEMMs run under the ``triton`` backend: ``None``/``"default"``, ``"triton"``,
    ``"cublaslt"`` (where it computes the same function), or a table measured by
    :func:`metaformer.fast.tuning.tune` (a dict or the path of its JSON file); see :mod:`metaformer.fast.tuning`."""
    from . import tuning

    if gemm is not None and not (isinstance(gemm, str) and gemm in tuning.MODES):
        if isinstance(gemm, str) and not Path(gemm).exists():
            what = "no such GEMM table file" if gemm.endswith(".json") else \
                f"gemm must be one of {', '.join(tuning.MODES)}, a table or a table's JSON file; got"
            raise ValueError(f"{what} {gemm!r}")
        gemm = tuning.load_table(gemm)
    for m in model.modules():
        if isinstance(m, FusedPoolBlock):
            m.gemm = gemm
            m.__dict__.pop("_plans", None)
    return model


def fuse(model: nn.Module, backend: str = "auto", inplace: bool = False, strict: bool = False,
         gemm=None) -> nn.Module:
    """An eval-only copy of a MetaFormer whose PoolFormer blocks are fused (same outputs).

    Works for every PoolFormer variant and for the pooling stages of hybrids (attention and
    spatial-MLP stages are kept as they are) at any input size the model accepts. The result
    runs channels_last; cast it with ``.to(torch.bfloat16)`` for bf16 inference.
    ``backend='auto'`` picks oneDNN fused convs on CPU, Triton kernels on a CUDA GPU that Triton
    supports, and portable ops elsewhere. :func:`fusion_report` says what was fused and why any block
    was kept; ``strict=True`` raises :class:`FusionError` naming each block that cannot be fused.
    ``gemm``: how the Triton blocks' 1x1 convolutions run (:func:`set_gemm`; default: the Triton GEMM).
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    first = next(model.parameters())
    device, dtype = first.device, first.dtype  # folding runs in fp64; the result keeps the model's dtype
    if backend == "auto":
        backend = "mkldnn" if mkldnn_available(device) else "triton" if triton_available(device) else "aten"

    def convert(parent: nn.Module):
        for name, child in parent.named_children():
            if isinstance(child, MetaFormerBlock):
                try:
                    setattr(parent, name, FusedPoolBlock(child))
                except ValueError:  # another mixer or norm: keep the block as it is
                    convert(child)
            elif isinstance(child, NormPoolHead) and child.pool and _is_gn1(child.norm) and child.norm.affine:
                setattr(parent, name, FusedHead(child))
            elif isinstance(child, nn.Conv2d) and child.kernel_size != (1, 1) and child.groups == 1 \
                    and isinstance(parent, (Stem, Downsampling)):
                setattr(parent, name, FusedConv(child))
            else:
                convert(child)
                if isinstance(parent, MetaFormerStage) and name == "blocks" and type(child) is nn.Sequential:
                    setattr(parent, name, FusedBlocks(*child))

    with torch.no_grad():
        convert(model)
    model = model.to(device=device, dtype=dtype).to(memory_format=CL)
    set_backend(model, backend)
    set_gemm(model, gemm)
    model.requires_grad_(False)
    if strict:
        report = fusion_report(model)
        if report.kept:
            raise FusionError(f"fuse(strict=True): {len(report.kept)} block(s) cannot be fused: " + "; ".join(
                f"{name}: {why}" for name, why in report.kept.items()))
    return model


class FusionError(MetaFormerError):
    """``fuse(strict=True)`` met a block it cannot fuse."""


@dataclass
class FusionReport:
    """What :func:`fuse` did to a model: which blocks are fused, which kept (and why), how they run."""

    backend: str
    fused: list[str]
    kept: dict[str, str]
    kernels: list[str]  # fused blocks that run as Triton kernels (the ``triton`` backend)
    convs: str  # how the fused convolutions run
    # the ``triton`` backend's GEMMs: shape key (metaformer.fast.tuning.gemm_key) -> how it runs, and why
    gemms: dict[str, str] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        total = len(self.fused) + len(self.kept)
        text = f"{len(self.fused)}/{total} blocks fused, backend {self.backend}"
        if self.backend == "triton":
            text += f" ({len(self.kernels)} as Triton kernels)"
        text += f"; convs: {self.convs}"
        for role in ("fc1", "fc2"):  # e.g. "fc1: cublaslt x2, triton x2 [table]"
            hows = [how for key, how in self.gemms.items() if key.startswith(role + " ")]
            if hows:
                impls = [how.split()[0].lower() for how in hows]
                sources = sorted({how.rsplit("[", 1)[-1].split()[0].rstrip("]") for how in hows})
                text += f"; {role}: " + ", ".join(f"{i} x{impls.count(i)}" for i in dict.fromkeys(impls)) + \
                    f" [{', '.join(sources)}]"
        return text

    def __str__(self) -> str:
        return (self.summary() + "".join(f"\n  kept {name}: {why}" for name, why in self.kept.items())
                + "".join(f"\n  {key}: {how}" for key, how in self.gemms.items()))


def fusion_report(model: nn.Module) -> FusionReport:
    """Count what a fused model runs: its fused blocks, the blocks kept as they were with the reason, the
    blocks on Triton kernels, and the convolution path (oneDNN packed weights or aten's conv2d, which
    this CPU's oneDNN decides for bf16)."""
    fused, kept, kernels, gemms = [], {}, [], {}
    backends = {m.backend for m in _fused_modules(model)}
    backend = backends.pop() if len(backends) == 1 else ("mixed" if backends else "none")
    for name, m in model.named_modules():
        if isinstance(m, FusedPoolBlock):
            fused.append(name)
            if backend == "triton" and m.triton_ready():
                kernels.append(name)
                if m.use_mlp:
                    gemms.update(_gemm_lines(m))
        elif isinstance(m, MetaFormerBlock):
            kept[name] = unfusable_reason(m) or "not converted"
    params = [t for t in model.buffers() if t.is_floating_point()]
    dtype = params[0].dtype if params else torch.float32
    if backend != "mkldnn":
        convs = "aten conv2d"
    elif dtype in packed_dtypes():
        convs = f"oneDNN packed weights ({str(dtype)[6:]})"
    else:
        convs = (f"aten conv2d ({str(dtype)[6:]}: this CPU's oneDNN cannot pack {str(dtype)[6:]} weights; "
                 f"{cpu_capabilities().describe()})")
    return FusionReport(backend, fused, kept, kernels, convs, gemms)


def _gemm_lines(block: FusedPoolBlock) -> dict[str, str]:
    """{shape key: plan} of a Triton block's two GEMMs, for its buffers' dtype and device."""
    from .tuning import gemm_key

    w = block.fc1_weight
    out = {}
    for role in ("fc1", "fc2"):
        k, n, act = block.gemm_shape(role)
        out[gemm_key(role, k, n, w.dtype, act)] = block.gemm_plan(role, w.dtype, w.device).describe()
    return out


def compile_fused(model: nn.Module, mode: str | None = "max-autotune-no-cudagraphs", dynamic: bool = False):
    """``torch.compile`` a fused model with inductor freezing (weights become constants, so
    inductor pre-packs them and fuses conv + GELU / conv + add into oneDNN post-ops); the options
    apply to this compile only."""
    import torch._inductor

    set_backend(model, "aten")
    options = {**(torch._inductor.list_mode_options(mode) if mode else {}), "freezing": True}
    return torch.compile(model, options=options, dynamic=dynamic)
