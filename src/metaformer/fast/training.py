"""Training with the same math and less memory: recompute cheap passes instead of storing them.

Plain autograd keeps, per PoolFormer block, about eleven C-channel maps alive until the
backward pass (norm input and output, pool difference, LayerScale inputs, fc1 input, the
4C-wide fc1 output and GELU output, fc2 output). Two custom autograd Functions keep only the
block input ``x``, the mixer output ``y`` and the 4C-wide fc1 pre-activation, with per-sample
norm statistics, and recompute the rest in backward:

* :class:`PoolMixer`: ``y = x + keep * g * (pool(norm1(x)) - norm1(x))`` computed as
  ``x + a * (pool(x) - x)``, ``a = keep * g * w / sigma`` (``REFERENCE.md`` §7). Its gradient
  is that of the same expression, differentiated through ``sigma(x)``; norm1's bias gets a zero
  gradient (it cancels exactly, as in the plain model).
* :class:`MlpBranch`: ``z = y + keep * g2 * fc2(gelu(fc1(norm2(y))))``; backward recomputes
  ``norm2(y)`` (one C-wide pass) and ``gelu`` (one 4C-wide pass) instead of storing them, and
  gets LayerScale2's gradient from the fc2 weight-gradient GEMM it computes anyway.

``keep`` is the stochastic-depth mask, drawn in the same order as the plain block draws it,
so with a seeded generator the fast path follows the plain model step for step.
Everything runs channels_last (oneDNN's preferred layout for the 1x1 convs). Under autocast
the 1x1 convs and GELU run in autocast's dtype and the norms, pooling and residual stream in
fp32, as autocast runs the plain block. ``metaformer train --fast-training`` switches it on.

On the 2-core CPU of ``benchmarks/README.md`` this is a memory path: S12 at batch 32 peaks at
0.53x the plain model's training memory at 0.98x timm channels_last's speed.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

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


class PoolMixer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale, keep, eps: float, pool_size: int):
        mu, rstd = gn1_stats(x, eps)
        rk = rstd * keep.view(-1, 1, 1, 1).float()
        gw = (scale * weight).view(1, -1, 1, 1).float()
        p = F.avg_pool2d(x, pool_size, 1, pool_size // 2, count_include_pad=False)
        y = torch.lerp(x, p, (gw * rk).to(x.dtype))
        ctx.save_for_backward(x, weight, bias, scale, mu, rstd, rk)
        ctx.eps, ctx.k = eps, pool_size
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, scale, mu, rstd, rk = ctx.saved_tensors
        k = ctx.k
        b, c, h, w = x.shape
        dy = dy.contiguous(memory_format=CL)
        gw = (scale * weight).float()
        d = F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False).sub_(x)  # recomputed, not stored
        t = (dy * d).sum((2, 3), dtype=torch.float32)  # [B, C]: sum over tokens of dy * (pool(x) - x)
        tr = (t * rk.view(b, 1)).sum(0)
        dscale = (tr * weight.float()).to(scale.dtype)
        dweight = (tr * scale.float()).to(weight.dtype)
        s = (t * gw).sum(1) * rk.view(b) / rstd.view(b)  # per sample: d loss / d(1/sigma) * keep
        ad = dy * (gw.view(1, c, 1, 1) * rk).to(dy.dtype)
        # d(pool)^T: the adjoint of count_include_pad=False pooling is aten's own avg_pool2d backward.
        dx = torch.ops.aten.avg_pool2d_backward(ad, x, [k, k], [1, 1], [k // 2, k // 2], False, False, None)
        dx = dx.add_(dy).sub_(ad)
        # 1/sigma depends on x: d(1/sigma)/dx = -(x - mu) / (N sigma^3).
        coef = (-s * rstd.view(b).pow(3) / (c * h * w)).view(b, 1, 1, 1)
        dx = dx.addcmul_(x - mu.to(x.dtype), coef.to(x.dtype))
        return dx, dweight, torch.zeros_like(bias), dscale, None, None, None


class MlpBranch(torch.autograd.Function):
    """``cdt``: the dtype of the GEMMs (fc1, GELU, fc2 and their gradients), autocast's dtype
    under autocast; the norm and the residual stream stay in ``y``'s dtype, as autocast keeps them."""

    @staticmethod
    def forward(ctx, y, nw, nb, w1, b1, w2, b2, scale, keep, eps: float, cdt: torch.dtype):
        bsz, c, h, w = y.shape
        n, mean, rstd = torch.native_group_norm(y, nw, nb, bsz, c, h * w, 1, eps)
        a = F.conv2d(n.to(cdt), w1.to(cdt), b1.to(cdt))
        hid = F.gelu(a)
        sk = (scale.view(1, -1, 1, 1) * keep.view(-1, 1, 1, 1))
        z = F.conv2d(hid, w2.to(cdt), b2.to(cdt)).to(y.dtype).mul_(sk).add_(y)
        ctx.save_for_backward(y, nw, nb, w1, w2, b2, scale, keep, a, mean, rstd)
        ctx.eps, ctx.cdt = eps, cdt
        return z

    @staticmethod
    def backward(ctx, dz):
        y, nw, nb, w1, w2, b2, scale, keep, a, mean, rstd = ctx.saved_tensors
        cdt = ctx.cdt
        bsz, c, h, w = y.shape
        dz = dz.contiguous(memory_format=CL)
        dk = dz * keep.view(-1, 1, 1, 1)  # gradient reaching the branch output (stochastic depth)
        dkc = dk.to(cdt)
        hid = F.gelu(a)  # recomputed, not stored
        hf = _flat(hid)
        dkf = _flat(dkc)
        m0 = (dkf.t() @ hf).to(w2.dtype)  # [C, 4C]; also yields LayerScale2's gradient for free
        sum_dk = _flat(dk).sum(0)
        dw2 = _like(scale[:, None] * m0, w2)
        db2 = scale * sum_dk
        dscale = (w2.flatten(1) * m0).sum(1) + b2 * sum_dk
        dhid = F.conv2d(dkc, (w2 * scale.view(-1, 1, 1, 1)).transpose(0, 1).to(cdt))
        da = torch.ops.aten.gelu_backward(dhid, a)
        del dhid, hid, hf
        n = torch.native_group_norm(y, nw, nb, bsz, c, h * w, 1, ctx.eps)[0]  # recomputed
        daf = _flat(da)
        dw1 = _like(daf.t() @ _flat(n.to(cdt)), w1)
        db1 = daf.sum(0, dtype=torch.float32).to(w1.dtype)
        dn = F.conv2d(da, w1.to(cdt).transpose(0, 1)).to(y.dtype)
        dy, dnw, dnb = torch.ops.aten.native_group_norm_backward(dn, y, mean, rstd, nw, bsz, c, h * w, 1,
                                                                 [True, True, True])
        return dy.add_(dz), dnw, dnb, dw1, db1, dw2, db2, dscale, None, None, None


def _keep_mask(block: MetaFormerBlock, x: torch.Tensor) -> torch.Tensor:
    p = getattr(block.drop_path, "drop_prob", 0.0)
    if not block.training or p == 0.0:
        return torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    keep = 1.0 - p
    return x.new_empty((x.shape[0],)).bernoulli_(keep).div_(keep)  # as DropPath, same RNG order


def _fast_forward(self: MetaFormerBlock, x: torch.Tensor) -> torch.Tensor:
    dev = x.device.type
    # Under autocast the 1x1 convs run in autocast's dtype and the rest in fp32, as autocast
    # would run the plain block; autocast itself is off inside (the Functions cast explicitly).
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    with torch.autocast(dev, enabled=False):
        x = x.to(self.norm1.weight.dtype).contiguous(memory_format=CL)
        y = PoolMixer.apply(x, self.norm1.weight, self.norm1.bias, self.layer_scale1.scale,
                            _keep_mask(self, x), float(self.norm1.eps), self.token_mixer.pool_size)
        if not self.use_mlp:
            return y
        return MlpBranch.apply(y, self.norm2.weight, self.norm2.bias, self.mlp.fc1.weight, self.mlp.fc1.bias,
                               self.mlp.fc2.weight, self.mlp.fc2.bias, self.layer_scale2.scale,
                               _keep_mask(self, y), float(self.norm2.eps), cdt)


def _supported(block: MetaFormerBlock) -> bool:
    n1, mixer = block.norm1, block.token_mixer
    ok = (isinstance(mixer, Pooling) and mixer.subtract and block.residual
          and isinstance(n1, nn.GroupNorm) and n1.num_groups == 1 and n1.affine
          and hasattr(block.layer_scale1, "scale") and isinstance(block.res_scale1, nn.Identity))
    if ok and block.use_mlp:
        m = block.mlp
        ok = (isinstance(block.norm2, nn.GroupNorm) and block.norm2.num_groups == 1 and block.norm2.affine
              and type(m.act) is nn.GELU and m.act.approximate == "none" and _plain_mlp(m)
              and m.fc1.bias is not None and m.fc2.bias is not None and hasattr(block.layer_scale2, "scale")
              and isinstance(block.res_scale2, nn.Identity))
    return ok


def enable_fast_training(model: nn.Module) -> nn.Module:
    """Switch a MetaFormer (in place) to the memory-saving training path; returns it.

    Parameters, their names and the state dict are unchanged (only the forward of each
    supported block is swapped), so optimizers, checkpoints and EMA work as before. Blocks
    the path does not cover (other mixers or norms, ablation switches) keep their forward.
    The model is moved to channels_last.
    """
    for m in model.modules():
        if isinstance(m, MetaFormerBlock) and _supported(m):
            m.forward = types.MethodType(_fast_forward, m)
            m.fast_training = True
    return model.to(memory_format=CL)


def disable_fast_training(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if getattr(m, "fast_training", False):
            del m.forward
            m.fast_training = False
    return model
