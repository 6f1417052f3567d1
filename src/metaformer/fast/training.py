"""Training with the same math and less memory: recompute cheap passes instead of storing them.

Plain autograd keeps, per PoolFormer block, about eleven C-channel maps alive until the
backward pass (norm input and output, pool difference, LayerScale inputs, fc1 input, the
4C-wide fc1 output and GELU output, fc2 output). Two custom autograd Functions keep only the
block input ``x``, the mixer output ``y`` and the 4C-wide fc1 pre-activation, with per-sample
norm statistics, and recompute the rest in backward:

* :class:`PoolMixer`: ``y = x + keep * g * (pool(norm1(x)) - norm1(x))`` computed as
  ``x + a * (pool(x) - x)``, ``a = keep * g * w / sigma`` (``docs/fast.md``). Its gradient
  is that of the same expression, differentiated through ``sigma(x)``; norm1's bias gets a zero
  gradient (it cancels exactly, as in the plain model).
* :class:`MlpBranch`: ``z = y + keep * g2 * fc2(gelu(fc1(norm2(y))))``; backward recomputes
  ``norm2(y)`` (one C-wide pass) and ``gelu`` (one 4C-wide pass) instead of storing them, and
  gets LayerScale2's gradient from the fc2 weight-gradient GEMM it computes anyway.

The same Functions cover the MetaFormer Baselines' PoolFormerV2 blocks: bias-free norms (no bias
gradient to return), no LayerScale (``g = 1``), ResScale ``r`` on the skip path (``r * x + ...``,
its gradient ``sum(dy * x)``), bias-free MLP layers and StarReLU ``s * relu(h)^2 + b`` (recomputed
from the stored pre-activation like GELU; ``s`` and ``b`` get their scalar gradients).

``keep`` is the stochastic-depth mask, drawn in the same order as the plain block draws it,
so with a seeded generator the fast path follows the plain model step for step.
Everything runs channels_last (oneDNN's preferred layout for the 1x1 convs). Under autocast
the 1x1 convs and GELU run in autocast's dtype and the norms, pooling and residual stream in
fp32, as autocast runs the plain block. ``metaformer train --fast-training`` switches it on.

On the 2-core CPU of ``benchmarks/README.md`` this is a memory path: S12 at batch 32 peaks at
0.53x the plain model's training memory at 0.98x timm channels_last's speed.
"""
from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import StarReLU, eager
from ..models.metaformer import MetaFormerBlock
from ..models.mixers import Pooling
from .fuse import CL, _plain_mlp, gn1_stats


def _like(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``grad`` shaped and strided as ``param`` (DDP's buckets expect the parameter's layout; a
    channels_last 1x1 weight has other strides than the GEMM's contiguous result)."""
    grad = grad.reshape(param.shape).to(param.dtype)
    return grad if grad.stride() == param.stride() else torch.empty_like(param).copy_(grad)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] channels_last -> [B*H*W, C] view (tokens by channels)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _sum_bhw(t: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [C], accumulated in fp32 (a per-channel scale's gradient)."""
    return t.sum((0, 2, 3), dtype=torch.float32)


class PoolMixer(torch.autograd.Function):
    """``y = r * x + keep * g * (pool(norm1(x)) - norm1(x))``; ``scale`` (LayerScale ``g``) and ``res``
    (ResScale ``r``) may be None (1), and so may norm1's ``bias`` (it cancels either way). With
    ``use_triton`` the passes run as :mod:`~metaformer.fast.triton_ops` kernels (CUDA): the statistics,
    then one read and one write for ``y``; backward one reduction pass and one pass for ``dx``."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, res, keep, eps: float, pool_size: int, use_triton: bool = False):
        b = x.shape[0]
        gw = weight if scale is None else scale * weight
        if use_triton:
            from . import triton_ops as T

            mu, rstd = T.gn1_stats(x, eps)
            y, _ = T.pool_mix(x, mu, rstd, gw, None, res, keep, T.MIX_SUBTRACT, pool_size, stats=False)
            mu, rstd = mu.view(b, 1, 1, 1), rstd.view(b, 1, 1, 1)
            rk = rstd * keep.view(-1, 1, 1, 1).float()
        else:
            mu, rstd = gn1_stats(x, eps)
            rk = rstd * keep.view(-1, 1, 1, 1).float()
            p = F.avg_pool2d(x, pool_size, 1, pool_size // 2, count_include_pad=False)
            a = (gw.view(1, -1, 1, 1).float() * rk).to(x.dtype)
            if res is None:
                y = torch.lerp(x, p, a)
            else:
                y = torch.addcmul(x * (res.view(1, -1, 1, 1).to(x.dtype) - a), a, p)  # r x + a (p - x)
        ctx.save_for_backward(x, weight, bias, scale, res, mu, rstd, rk)
        ctx.eps, ctx.k, ctx.use_triton = eps, pool_size, use_triton
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, scale, res, mu, rstd, rk = ctx.saved_tensors
        k = ctx.k
        b, c, h, w = x.shape
        dy = dy.contiguous(memory_format=CL)
        gw = (weight if scale is None else scale * weight).float()
        if ctx.use_triton:
            from . import triton_ops as T

            # t[b, c] = sum over tokens of dy * (pool(x) - x), pool recomputed, not stored
            t, dres = T.pool_mix_backward_sums(x, dy, k, res is not None)
        else:
            d = F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False).sub_(x)  # recomputed, not stored
            t = (dy * d).sum((2, 3), dtype=torch.float32)  # [B, C]
            dres = None if res is None else _sum_bhw(dy * x)
        tr = (t * rk.view(b, 1)).sum(0)
        dscale = None if scale is None else (tr * weight.float()).to(scale.dtype)
        dweight = (tr if scale is None else tr * scale.float()).to(weight.dtype)
        s = (t * gw).sum(1) * rk.view(b) / rstd.view(b)  # per sample: d loss / d(1/sigma) * keep
        # 1/sigma depends on x: d(1/sigma)/dx = -(x - mu) / (N sigma^3).
        coef = -s * rstd.view(b).pow(3) / (c * h * w)
        if ctx.use_triton:
            dx = T.pool_mix_backward_dx(x, dy, gw, rk.view(b), res, coef, mu.view(b), k)
        else:
            ad = dy * (gw.view(1, c, 1, 1) * rk).to(dy.dtype)
            # d(pool)^T: the adjoint of count_include_pad=False pooling is aten's own avg_pool2d backward.
            dx = torch.ops.aten.avg_pool2d_backward(ad, x, [k, k], [1, 1], [k // 2, k // 2], False, False, None)
            dx = dx.add_(dy if res is None else dy * res.view(1, c, 1, 1).to(dy.dtype)).sub_(ad)
            dx = dx.addcmul_(x - mu.to(x.dtype), coef.view(b, 1, 1, 1).to(x.dtype))
        dres = None if res is None else dres.to(res.dtype)
        dbias = None if bias is None else torch.zeros_like(bias)
        return dx, dweight, dbias, dscale, dres, None, None, None, None


class MlpBranch(torch.autograd.Function):
    """``z = r2 * y + keep * g2 * fc2(act(fc1(norm2(y))))`` with ``act`` GELU or, when ``act_scale`` is
    given, StarReLU ``s * relu(h)^2 + b``. ``scale`` (g2), ``res`` (r2), the norm's and fc layers' biases
    may be None. ``cdt``: the dtype of the GEMMs (fc1, the activation, fc2 and their gradients),
    autocast's dtype under autocast; the norm and the residual stream stay in ``y``'s dtype, as autocast
    keeps them."""

    @staticmethod
    def _act(a, act_scale, act_bias):
        if act_scale is None:
            return F.gelu(a)
        return torch.relu(a).square().mul_(act_scale.to(a.dtype)).add_(act_bias.to(a.dtype))

    @staticmethod
    def forward(ctx, y, nw, nb, w1, b1, w2, b2, scale, res, act_scale, act_bias, keep, eps: float,
                cdt: torch.dtype, use_triton: bool = False):
        bsz, c, h, w = y.shape
        if use_triton:
            a, z, mean, rstd = MlpBranch._forward_triton(y, nw, nb, w1, b1, w2, b2, scale, res, act_scale, act_bias,
                                                         keep, eps, cdt)
        else:
            n, mean, rstd = group_norm(y, nw, nb, eps)
            a = F.conv2d(n.to(cdt), w1.to(cdt), None if b1 is None else b1.to(cdt))
            hid = MlpBranch._act(a, act_scale, act_bias)
            sk = keep.view(-1, 1, 1, 1) if scale is None else scale.view(1, -1, 1, 1) * keep.view(-1, 1, 1, 1)
            z = F.conv2d(hid, w2.to(cdt), None if b2 is None else b2.to(cdt)).to(y.dtype).mul_(sk)
            z = z.add_(y) if res is None else z.addcmul_(y, res.view(1, -1, 1, 1).to(y.dtype))
        ctx.save_for_backward(y, nw, nb, w1, b1, w2, b2, scale, res, act_scale, act_bias, keep, a, mean, rstd)
        ctx.eps, ctx.cdt = eps, cdt
        return z

    @staticmethod
    def _forward_triton(y, nw, nb, w1, b1, w2, b2, scale, res, act_scale, act_bias, keep, eps, cdt):
        """Two GEMM kernels: fc1 on the raw ``y`` with norm2's affine folded into its weights and the
        per-sample standardisation in its prologue/epilogue (writes the pre-activation, which backward
        needs); fc2 applying the activation as it loads that, with LayerScale (and StarReLU's scalar
        affine) folded into its weights and drop path plus the residual in its epilogue."""
        from . import triton_ops as T

        bsz = y.shape[0]
        mu, rstd = T.gn1_stats(y, eps)
        w1f = w1.flatten(1).float()
        b1f = (torch.zeros(w1f.shape[0], device=y.device) if b1 is None else b1.float())
        if nb is not None:
            b1f = b1f + w1f @ nb.float()
        w1f = (w1f * nw.float()[None, :]).to(cdt)
        a, _ = T.pointwise_conv(y, w1f, b1f, norm=(mu, rstd), out_dtype=cdt)
        w2f = w2.flatten(1).float()
        b2f = torch.zeros(w2f.shape[0], device=y.device) if b2 is None else b2.float()
        if act_scale is None:
            act_in = T.ACT_GELU
        else:  # s relu(a)^2 + b with scalar s, b: (s W2) relu(a)^2 + (b2 + b W2 1)
            act_in = T.ACT_RELU2
            b2f = b2f + act_bias.float() * w2f.sum(1)
            w2f = act_scale.float() * w2f
        if scale is not None:
            w2f, b2f = scale.float()[:, None] * w2f, scale.float() * b2f
        z, _ = T.pointwise_conv(a, w2f.to(cdt), b2f, act_in=act_in, keep=keep, skip=y, res=res, out_dtype=y.dtype)
        # as native_group_norm returns them, for its backward
        return a, z, mu.to(y.dtype).view(bsz, 1), rstd.to(y.dtype).view(bsz, 1)

    @staticmethod
    def backward(ctx, dz):
        y, nw, nb, w1, b1, w2, b2, scale, res, act_scale, act_bias, keep, a, mean, rstd = ctx.saved_tensors
        cdt = ctx.cdt
        bsz, c, h, w = y.shape
        dz = dz.contiguous(memory_format=CL)
        dk = dz * keep.view(-1, 1, 1, 1)  # gradient reaching the branch output (stochastic depth)
        dkc = dk.to(cdt)
        hid = MlpBranch._act(a, act_scale, act_bias)  # recomputed, not stored
        hf = _flat(hid)
        dkf = _flat(dkc)
        m0 = (dkf.t() @ hf).to(w2.dtype)  # [C, 4C]; also yields LayerScale2's gradient for free
        sum_dk = _flat(dk).sum(0)
        g = torch.ones_like(sum_dk) if scale is None else scale
        dw2 = _like(g[:, None] * m0, w2)
        db2 = None if b2 is None else g * sum_dk
        dscale = None
        if scale is not None:
            dscale = (w2.flatten(1) * m0).sum(1) + (0 if b2 is None else b2 * sum_dk)
        dhid = F.conv2d(dkc, (w2 * g.view(-1, 1, 1, 1)).transpose(0, 1).to(cdt))
        dact_scale = dact_bias = None
        if act_scale is None:
            da = torch.ops.aten.gelu_backward(dhid, a)
        else:  # d/dh (s relu(h)^2 + b) = 2 s relu(h)
            r = torch.relu(a)
            dact_scale = (dhid * r.square()).sum(dtype=torch.float32).reshape(act_scale.shape).to(act_scale.dtype)
            dact_bias = dhid.sum(dtype=torch.float32).reshape(act_bias.shape).to(act_bias.dtype)
            da = dhid * r.mul_(2 * act_scale.to(r.dtype))
        del dhid, hid, hf
        n = group_norm(y, nw, nb, ctx.eps, mean, rstd)[0]  # recomputed
        daf = _flat(da)
        dw1 = _like(daf.t() @ _flat(n.to(cdt)), w1)
        db1 = None if b1 is None else daf.sum(0, dtype=torch.float32).to(b1.dtype)
        dn = F.conv2d(da, w1.to(cdt).transpose(0, 1)).to(y.dtype)
        dy, dnw, dnb = group_norm_backward(dn, y, mean, rstd, nw, nb is not None)
        if res is None:
            dy = dy.add_(dz)
            dres = None
        else:
            dy = dy.addcmul_(dz, res.view(1, -1, 1, 1).to(dz.dtype))
            dres = _sum_bhw(dz * y).to(res.dtype)
        return (dy, dnw, dnb if nb is not None else None, dw1, db1, dw2, db2, dscale, dres, dact_scale, dact_bias,
                None, None, None, None)


def _native_gn(y: torch.Tensor, portable: bool | None) -> bool:
    # aten's CUDA GroupNorm kernels take only NCHW-contiguous tensors (its CPU kernels take channels_last
    # too); elsewhere the same math runs elementwise, keeping the channels_last layout (no copies).
    return not portable if portable is not None else (y.device.type == "cpu" or y.is_contiguous())


def group_norm(y: torch.Tensor, weight, bias, eps: float, mean=None, rstd=None, portable: bool | None = None):
    """GroupNorm(1) of ``y``: ``(n, mean, rstd)`` as ``native_group_norm`` returns them ([B, 1], y's dtype);
    given ``mean`` and ``rstd`` (a recomputation), only ``n`` is new."""
    bsz, c, h, w = y.shape
    if _native_gn(y, portable):
        if mean is None:
            return torch.native_group_norm(y, weight, bias, bsz, c, h * w, 1, eps)
        return torch.native_group_norm(y, weight, bias, bsz, c, h * w, 1, eps)[0], mean, rstd
    if mean is None:
        mu, rs = gn1_stats(y, eps)
        mean, rstd = mu.view(bsz, 1).to(y.dtype), rs.view(bsz, 1).to(y.dtype)
    n = (y.float() - mean.float().view(bsz, 1, 1, 1)) * rstd.float().view(bsz, 1, 1, 1) * weight.float().view(1, c, 1, 1)
    if bias is not None:
        n = n + bias.float().view(1, c, 1, 1)
    return n.to(y.dtype), mean, rstd


def group_norm_backward(dn: torch.Tensor, y: torch.Tensor, mean, rstd, weight, has_bias: bool,
                        portable: bool | None = None):
    """Gradients of :func:`group_norm` w.r.t. ``y``, its weight and (``has_bias``) its bias."""
    bsz, c, h, w = y.shape
    if _native_gn(y, portable):
        return torch.ops.aten.native_group_norm_backward(dn, y, mean, rstd, weight, bsz, c, h * w, 1,
                                                        [True, True, has_bias])
    rs = rstd.float().view(bsz, 1, 1, 1)
    xhat = (y.float() - mean.float().view(bsz, 1, 1, 1)) * rs
    dnf = dn.float()
    g = dnf * weight.float().view(1, c, 1, 1)
    dweight = _sum_bhw(dnf * xhat).to(weight.dtype)
    dbias = _sum_bhw(dnf).to(weight.dtype) if has_bias else None
    m1 = g.mean((1, 2, 3), keepdim=True)
    m2 = (g * xhat).mean((1, 2, 3), keepdim=True)
    dy = ((g - m1 - xhat * m2) * rs).to(y.dtype)
    return dy, dweight, dbias


def _keep_mask(block: MetaFormerBlock, x: torch.Tensor) -> torch.Tensor:
    p = getattr(block.drop_path, "drop_prob", 0.0)
    if not block.training or p == 0.0:
        return torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    keep = 1.0 - p
    return x.new_empty((x.shape[0],)).bernoulli_(keep).div_(keep)  # as DropPath, same RNG order


def _param(module: nn.Module, name: str):
    """A scale's or norm's parameter, or None where the block has none (Identity, a bias-free norm)."""
    return getattr(module, name, None)


BACKENDS = ("auto", "aten", "triton")


def _use_triton(backend: str, x: torch.Tensor) -> bool:
    if not eager():  # under torch.compile the aten math runs, and inductor fuses it itself
        return False
    if backend == "auto":
        from .fuse import triton_available

        return triton_available(x.device)
    return backend == "triton"


def _fast_forward(self: MetaFormerBlock, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    dev = x.device.type
    use_triton = _use_triton(backend, x)
    # Under autocast the 1x1 convs run in autocast's dtype and the rest in fp32, as autocast
    # would run the plain block; autocast itself is off inside (the Functions cast explicitly).
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    with torch.autocast(dev, enabled=False):
        x = x.to(self.norm1.weight.dtype).contiguous(memory_format=CL)
        y = PoolMixer.apply(x, self.norm1.weight, self.norm1.bias, _param(self.layer_scale1, "scale"),
                            _param(self.res_scale1, "scale"), _keep_mask(self, x), float(self.norm1.eps),
                            self.token_mixer.pool_size, use_triton)
        if not self.use_mlp:
            return y
        act = self.mlp.act
        star = isinstance(act, StarReLU)
        return MlpBranch.apply(y, self.norm2.weight, self.norm2.bias, self.mlp.fc1.weight, self.mlp.fc1.bias,
                               self.mlp.fc2.weight, self.mlp.fc2.bias, _param(self.layer_scale2, "scale"),
                               _param(self.res_scale2, "scale"), act.scale if star else None,
                               act.bias if star else None, _keep_mask(self, y), float(self.norm2.eps), cdt,
                               use_triton)


def _scale_or_none(m: nn.Module) -> bool:
    return isinstance(m, nn.Identity) or isinstance(getattr(m, "scale", None), torch.Tensor)


def unsupported_reason(block: MetaFormerBlock) -> str | None:
    """Why the fast path leaves ``block`` on its own forward, or None if it covers it: PoolFormer v1 and
    PoolFormerV2 blocks (pooling with the subtraction, GroupNorm(1) with or without bias, LayerScale
    and/or ResScale, a plain MLP with GELU or StarReLU)."""
    n1, mixer = block.norm1, block.token_mixer
    if not (isinstance(mixer, Pooling) and mixer.subtract):
        return f"its token mixer is {type(mixer).__name__}{'' if not isinstance(mixer, Pooling) else ' without the subtraction'}"
    if not block.residual:
        return "it has no residual connection (the ablation)"
    if not block.mixer_residual:
        return "its token mixer has no residual connection (the ablation)"
    if not (isinstance(n1, nn.GroupNorm) and n1.num_groups == 1 and n1.weight is not None):
        return f"its norm is {type(n1).__name__} (the path covers GroupNorm(1) with a weight)"
    if not (_scale_or_none(block.layer_scale1) and _scale_or_none(block.res_scale1)):
        return "its layer or residual scale is not a per-channel vector"
    if block.use_mlp:
        m = block.mlp
        if not ((type(m.act) is nn.GELU and m.act.approximate == "none") or type(m.act) is StarReLU):
            return f"its MLP activation is {type(m.act).__name__} (GELU and StarReLU are covered)"
        n2 = block.norm2
        if not (isinstance(n2, nn.GroupNorm) and n2.num_groups == 1 and n2.weight is not None):
            return f"norm2 is {type(n2).__name__}"
        if not (_plain_mlp(m) and _scale_or_none(block.layer_scale2) and _scale_or_none(block.res_scale2)):
            return "its MLP has a norm or active dropout inside, or its scales are not per-channel vectors"
    return None


def fast_training_report(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """(blocks on the fast path, {block kept on its own forward: why})."""
    on, off = [], {}
    for name, m in model.named_modules():
        if isinstance(m, MetaFormerBlock):
            if getattr(m, "fast_training", False):
                on.append(name)
            else:
                off[name] = unsupported_reason(m) or "not enabled"
    return on, off


def enable_fast_training(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Switch a MetaFormer (in place) to the memory-saving training path; returns it.

    Parameters, their names and the state dict are unchanged (only the forward of each
    supported block is swapped), so optimizers, checkpoints and EMA work as before. Blocks
    the path does not cover (other mixers or norms, ablation switches) keep their forward.
    The model is moved to channels_last. ``backend``: ``auto`` runs the passes as Triton kernels
    on a CUDA GPU that Triton supports and as aten ops elsewhere; ``aten`` or ``triton`` forces one.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "triton":
        from . import triton_ops  # noqa: F401  (fails here, with Triton's own message, if it is missing)
    for m in model.modules():
        if isinstance(m, MetaFormerBlock) and unsupported_reason(m) is None:
            m.forward = types.MethodType(functools.partial(_fast_forward, backend=backend), m)
            m.fast_training = True
    return model.to(memory_format=CL)
