"""Triton kernels for the pooling family's blocks (PoolFormer, PoolFormerV2, IdentityFormer) on CUDA.

On a GPU these blocks are memory-bound: apart from the two 1x1 convolutions, every step
(GroupNorm statistics, normalisation, 3x3 pool, subtraction, LayerScale, residual add) is a
pass over the activation. The kernels here move each activation as few times as the algebra
of ``docs/fast.md`` allows (all channels_last, i.e. ``[tokens, C]`` row-major):

* :func:`sample_sums` - per-sample sum and sum of squares (GroupNorm(1) statistics): one read.
* :func:`pool_mix` - the whole token-mixer half in one read and one write:
  ``y = r x + a (pool(x) - x)`` with ``a = g w / sigma`` per (sample, channel) (the norm never
  materialised), the 3x3 stencil with ``count_include_pad=False``'s border counts computed
  from the position; it also emits the per-sample sums of ``y`` (norm2's statistics).
* :func:`pointwise_conv` - a 1x1 convolution (a GEMM over tokens) with MetaFormer's prologue and
  epilogue: norm2's affine folded into the weights, its per-sample mean subtracted from each
  input tile as it is loaded and ``1/sigma`` applied to the accumulator (so the normalised map
  is never written), bias, GELU / ReLU^2, drop-path keep, ``r2 y +`` residual, and the output's
  per-sample sums (the next block's norm1 statistics); or the activation applied to the input
  tile as it is loaded (fc2 in training, where fc1's pre-activation is what is kept).
* :func:`pool_mix_backward` - the mixer's gradient in two passes (a reduction for the gradients of
  the per-channel parameters and of ``1/sigma``; then ``dx``), recomputing ``pool(x)``.

Per-sample statistics are reduced from per-tile partial sums written to a small buffer (no
atomics), so results are deterministic. Kernels run on CUDA, or on the CPU under Triton's
interpreter (``TRITON_INTERPRET=1``), which is how the test suite checks them. The interpreter
keeps bfloat16 as raw 16-bit integers (numpy has no bfloat16): loads, stores and explicit
casts are right (a float32 -> bfloat16 cast truncates instead of rounding to nearest), but
arithmetic on bfloat16 values is not, so every kernel converts to float32 before arithmetic and
``tl.dot`` gets float32 tiles when interpreting bfloat16.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# What decides how kernels run is fixed when this module is imported (triton.jit reads it).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

ACT_NONE, ACT_GELU, ACT_RELU2, ACT_RELU, ACT_SILU = 0, 1, 2, 3, 4
MIX_SUBTRACT, MIX_POOL, MIX_IDENTITY = 0, 1, 2


def check_tensor(x: torch.Tensor, what: str) -> None:
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"{what}: Triton kernels run on CUDA tensors (or on the CPU under TRITON_INTERPRET=1, "
                           f"for tests); got a {x.device.type} tensor")


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- statistics
# Every kernel that produces GroupNorm(1) statistics writes per-tile partial (sum, sum of squares)
# into a float32 [B, P, 2] buffer; :func:`finish_stats` turns it into (mu, 1/sigma) in one launch.
@triton.jit
def _sample_sums_kernel(x_ptr, part_ptr, n, chunk, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    base = x_ptr + b.to(tl.int64) * n
    acc1 = tl.zeros([BLOCK], tl.float32)
    acc2 = tl.zeros([BLOCK], tl.float32)
    for i in range(0, chunk, BLOCK):
        offs = s * chunk + i + tl.arange(0, BLOCK)
        v = tl.load(base + offs, mask=offs < n, other=0.0).to(tl.float32)
        acc1 += v
        acc2 += v * v
    out = part_ptr + (b * SPLIT + s) * 2
    tl.store(out, tl.sum(acc1, 0))
    tl.store(out + 1, tl.sum(acc2, 0))


def sample_partials(x: torch.Tensor) -> torch.Tensor:
    """Partial (sum, sum of squares) of each sample of a contiguous [B, ...] tensor: float32 [B, P, 2]."""
    check_tensor(x, "sample_partials")
    b = x.shape[0]
    n = x.numel() // b
    block = _pow2(n, 16, 2048)
    # enough programs to fill the GPU at small batch, each reading at least a few blocks
    split = max(1, min(triton.cdiv(n, 4 * block), triton.cdiv(1024, b)))
    chunk = triton.cdiv(triton.cdiv(n, split), block) * block
    split = triton.cdiv(n, chunk)
    part = torch.empty(b, split, 2, device=x.device, dtype=torch.float32)
    _sample_sums_kernel[(b, split)](x, part, n, chunk, SPLIT=split, BLOCK=block, num_warps=4)
    return part


@triton.jit
def _finish_stats_kernel(part_ptr, mu_ptr, rstd_ptr, P, n, eps, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    base = part_ptr + b.to(tl.int64) * P * 2
    acc1 = tl.zeros([BLOCK], tl.float32)
    acc2 = tl.zeros([BLOCK], tl.float32)
    for i in range(0, P, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        m = offs < P
        acc1 += tl.load(base + 2 * offs, mask=m, other=0.0)
        acc2 += tl.load(base + 2 * offs + 1, mask=m, other=0.0)
    # float64 for the variance, so the cancellation in E[x^2] - mu^2 costs no precision
    s1 = tl.sum(acc1, 0).to(tl.float64)
    s2 = tl.sum(acc2, 0).to(tl.float64)
    mu = s1 / n
    var = tl.maximum(s2 / n - mu * mu, 0.0)
    tl.store(mu_ptr + b, mu.to(tl.float32))
    tl.store(rstd_ptr + b, (1.0 / tl.sqrt(var + eps)).to(tl.float32))


def finish_stats(part: torch.Tensor, n: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm(1) mean and 1/sigma (float32 [B] each) from a [B, P, 2] partial-sum buffer over ``n``
    values per sample."""
    b, p = part.shape[0], part.numel() // (2 * part.shape[0])
    mu = torch.empty(b, device=part.device, dtype=torch.float32)
    rstd = torch.empty_like(mu)
    _finish_stats_kernel[(b,)](part, mu, rstd, p, n, eps, BLOCK=_pow2(p, 16, 1024), num_warps=4)
    return mu, rstd


def gn1_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm(1) mean and 1/sigma of a contiguous [B, C, H, W] tensor, float32 [B] each: two launches."""
    return finish_stats(sample_partials(x), x.numel() // x.shape[0], eps)


# ----------------------------------------------------------------------------- token mixer
@triton.jit
def _window_sum(ptr, bh, h, w, c, cm, H, W, C, K: tl.constexpr, DIVIDE: tl.constexpr,
                BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum over the KxK window around each (h, w) of a [B*H*W, C] map; with DIVIDE, each neighbour j
    is divided by its own window's real-token count (the adjoint of count_include_pad=False pooling)."""
    P: tl.constexpr = K // 2
    acc = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
    for i in tl.static_range(K):
        hh = h + i - P
        hv = (hh >= 0) & (hh < H)
        row = (bh + i - P).to(tl.int64) * W
        if DIVIDE:
            cnt_h = tl.minimum(hh + P, H - 1) - tl.maximum(hh - P, 0) + 1
        for j in tl.static_range(K):
            ww = w + j - P
            m = (hv & (ww >= 0) & (ww < W))[:, None] & cm[None, :]
            v = tl.load(ptr + (row + ww)[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
            if DIVIDE:
                cnt_w = tl.minimum(ww + P, W - 1) - tl.maximum(ww - P, 0) + 1
                cnt = tl.maximum(cnt_h * cnt_w, 1).to(tl.float32)
                v = v / cnt[:, None]
            acc += v
    return acc


@triton.jit
def _pool(x_ptr, bh, h, w, c, cm, H, W, C, K: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """avg_pool(x, K, stride 1, count_include_pad=False): border windows divide by their real tokens."""
    P: tl.constexpr = K // 2
    acc = _window_sum(x_ptr, bh, h, w, c, cm, H, W, C, K, False, BLOCK_W, BLOCK_C)
    cnt_h = tl.minimum(h + P, H - 1) - tl.maximum(h - P, 0) + 1
    cnt_w = tl.minimum(w + P, W - 1) - tl.maximum(w - P, 0) + 1
    return acc / tl.maximum(cnt_h * cnt_w, 1).to(tl.float32)[:, None]


@triton.jit
def _mixer_coef(scale_ptr, shift_ptr, mu_ptr, rstd_ptr, keep_ptr, b, c, cm, HAS_SHIFT: tl.constexpr,
                HAS_KEEP: tl.constexpr):
    """a = keep g w / sigma per (sample, channel), and the norm's shift keep g (b - w mu / sigma)."""
    rk = tl.load(rstd_ptr + b)
    kp = 1.0
    if HAS_KEEP:
        kp = tl.load(keep_ptr + b)
        rk = rk * kp
    a = tl.load(scale_ptr + c, mask=cm, other=0.0).to(tl.float32) * rk
    shift = a * 0.0
    if HAS_SHIFT:
        shift = kp * tl.load(shift_ptr + c, mask=cm, other=0.0).to(tl.float32) - a * tl.load(mu_ptr + b)
    return a, shift


@triton.jit
def _pool_mix_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, mu_ptr, rstd_ptr, keep_ptr, r_ptr, ps_ptr, H, W, C, NCB,
                     K: tl.constexpr, MODE: tl.constexpr, HAS_RES: tl.constexpr, HAS_SHIFT: tl.constexpr,
                     HAS_KEEP: tl.constexpr, STATS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    cb = tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    wm = w < W
    cm = c < C
    m = wm[:, None] & cm[None, :]
    tok = bh.to(tl.int64) * W + w
    offs = tok[:, None] * C + c[None, :]
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a, shift = _mixer_coef(scale_ptr, shift_ptr, mu_ptr, rstd_ptr, keep_ptr, b, c, cm, HAS_SHIFT, HAS_KEEP)
    a = a[None, :]
    r = 1.0
    if HAS_RES:
        r = tl.load(r_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    if MODE == 2:  # identity mixer (IdentityFormer): r x + g norm(x) = (r + a) x + shift
        y = (r + a) * x
    else:
        pool = _pool(x_ptr, bh, h, w, c, cm, H, W, C, K, BLOCK_W, BLOCK_C)
        if MODE == 0:  # pool(x) - x: the norm's shift cancels
            y = (r - a) * x + a * pool
        else:  # pool(x) alone keeps it
            y = r * x + a * pool
    if HAS_SHIFT:
        y += shift[None, :]
    yq = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, yq, mask=m)
    if STATS:  # of the stored (rounded) values: exactly what the next norm sees
        v = tl.where(m, yq.to(tl.float32), 0.0)
        tl.store(ps_ptr + tok * (2 * NCB) + 2 * cb, tl.sum(v, 1), mask=wm)
        tl.store(ps_ptr + tok * (2 * NCB) + 2 * cb + 1, tl.sum(v * v, 1), mask=wm)


def _mixer_blocks(h: int, w: int, c: int) -> tuple[int, int, int]:
    block_c = _pow2(c, 16, 128)
    block_w = _pow2(w, 1, max(1, 4096 // block_c))
    return block_w, block_c, triton.cdiv(c, block_c)


def pool_mix(x: torch.Tensor, mu: torch.Tensor, rstd: torch.Tensor, scale: torch.Tensor,
             shift: torch.Tensor | None = None, res: torch.Tensor | None = None, keep: torch.Tensor | None = None,
             mode: int = MIX_SUBTRACT, pool_size: int = 3, stats: bool = True):
    """The token-mixer half of a pooling-family block on a channels_last ``x`` [B, C, H, W] with
    GroupNorm(1) statistics ``mu, rstd`` [B]: with ``a = keep g w rstd`` (``scale = g w`` [C]) and
    ``s = keep g (b - w mu rstd)`` (``shift = g b`` [C], omitted for a bias-free norm),

    ``MIX_SUBTRACT``: ``y = r x + a (pool(x) - x)`` (the shift cancels); ``MIX_POOL``:
    ``y = r x + a pool(x) + s``; ``MIX_IDENTITY``: ``y = (r + a) x + s``.
    Returns ``y`` and, with ``stats``, the [B, P, 2] partial sums of ``y`` for :func:`finish_stats`.
    """
    check_tensor(x, "pool_mix")
    x = channels_last(x)
    b, c, h, w = x.shape
    y = torch.empty_like(x)
    block_w, block_c, ncb = _mixer_blocks(h, w, c)
    ps = torch.empty(b, h * w * ncb, 2, device=x.device, dtype=torch.float32) if stats else y
    _pool_mix_kernel[(b * h, triton.cdiv(w, block_w), ncb)](
        x, y, scale, scale if shift is None else shift, mu, rstd, rstd if keep is None else keep,
        scale if res is None else res, ps, h, w, c, ncb,
        K=pool_size, MODE=mode, HAS_RES=res is not None, HAS_SHIFT=shift is not None and mode != MIX_SUBTRACT,
        HAS_KEEP=keep is not None, STATS=stats, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=4)
    return y, (ps if stats else None)


@triton.jit
def _pool_mix_bwd_reduce_kernel(x_ptr, dy_ptr, t_ptr, dr_ptr, H, W, C, NWB,
                                K: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_W: tl.constexpr,
                                BLOCK_C: tl.constexpr):
    """Per (row, W-block) partial sums over tokens of ``dy (pool(x) - x)`` and ``dy x``."""
    bh = tl.program_id(0)
    h = bh % H
    wb = tl.program_id(1)
    w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    wm = w < W
    cm = c < C
    m = wm[:, None] & cm[None, :]
    offs = (bh.to(tl.int64) * W + w)[:, None] * C + c[None, :]
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    d = _pool(x_ptr, bh, h, w, c, cm, H, W, C, K, BLOCK_W, BLOCK_C) - x
    out = (bh * NWB + wb).to(tl.int64) * C + c
    tl.store(t_ptr + out, tl.sum(tl.where(m, dy * d, 0.0), 0), mask=cm)
    if HAS_RES:
        tl.store(dr_ptr + out, tl.sum(tl.where(m, dy * x, 0.0), 0), mask=cm)


@triton.jit
def _pool_mix_bwd_dx_kernel(x_ptr, dy_ptr, dx_ptr, scale_ptr, rk_ptr, r_ptr, coef_ptr, mu_ptr, H, W, C,
                            K: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """``dx = (r - a) dy + a pool^T(dy) + coef (x - mu)`` with ``a = scale rk`` (``coef``: the path
    through 1/sigma)."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    wm = w < W
    cm = c < C
    m = wm[:, None] & cm[None, :]
    offs = (bh.to(tl.int64) * W + w)[:, None] * C + c[None, :]
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a = (tl.load(scale_ptr + c, mask=cm, other=0.0).to(tl.float32) * tl.load(rk_ptr + b))[None, :]
    r = 1.0
    if HAS_RES:
        r = tl.load(r_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    # count_include_pad=False pooling's adjoint: each neighbour's gradient over its own window's count
    pt = _window_sum(dy_ptr, bh, h, w, c, cm, H, W, C, K, True, BLOCK_W, BLOCK_C)
    dx = (r - a) * dy + a * pt + tl.load(coef_ptr + b) * (x - tl.load(mu_ptr + b))
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


def pool_mix_backward_sums(x: torch.Tensor, dy: torch.Tensor, pool_size: int, need_res: bool):
    """``t[b, c] = sum_hw dy (pool(x) - x)`` [B, C] and (with ``need_res``) ``sum_bhw dy x`` [C], float32."""
    check_tensor(x, "pool_mix_backward")
    b, c, h, w = x.shape
    block_w, block_c, ncb = _mixer_blocks(h, w, c)
    nwb = triton.cdiv(w, block_w)
    t = torch.empty(b * h * nwb, c, device=x.device, dtype=torch.float32)
    dr = torch.empty_like(t) if need_res else t
    _pool_mix_bwd_reduce_kernel[(b * h, nwb, ncb)](x, dy, t, dr, h, w, c, nwb, K=pool_size, HAS_RES=need_res,
                                                   BLOCK_W=block_w, BLOCK_C=block_c, num_warps=4)
    return t.view(b, -1, c).sum(1), (dr.sum(0) if need_res else None)


def pool_mix_backward_dx(x, dy, scale, rk, res, coef, mu, pool_size: int) -> torch.Tensor:
    """The gradient of :func:`pool_mix` (``MIX_SUBTRACT``) w.r.t. ``x``; ``rk = keep rstd`` [B], ``coef`` [B]."""
    b, c, h, w = x.shape
    block_w, block_c, ncb = _mixer_blocks(h, w, c)
    dx = torch.empty_like(x)
    _pool_mix_bwd_dx_kernel[(b * h, triton.cdiv(w, block_w), ncb)](
        x, dy, dx, scale, rk, scale if res is None else res, coef, mu, h, w, c, K=pool_size,
        HAS_RES=res is not None, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=4)
    return dx


# ----------------------------------------------------------------------------- 1x1 convolutions
@triton.jit
def _act(v, ACT: tl.constexpr):
    if ACT == 1:  # exact GELU, as nn.GELU()
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 2:  # relu(v)^2 (StarReLU with its scalar affine folded into the next layer)
        v = tl.maximum(v, 0.0)
        v = v * v
    elif ACT == 3:
        v = tl.maximum(v, 0.0)
    elif ACT == 4:
        v = v / (1.0 + tl.exp(-v))
    return v


@triton.jit
def _pointwise_conv_kernel(a_ptr, w_ptr, bias_ptr, mu_ptr, rstd_ptr, keep_ptr, skip_ptr, res_ptr,
                           out_ptr, ps_ptr, M, N, K, HW, NNB,
                           NORM: tl.constexpr, ACT_IN: tl.constexpr, ACT_OUT: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, SKIP: tl.constexpr,
                           HAS_RES: tl.constexpr, STATS: tl.constexpr, DOT_F32: tl.constexpr,
                           PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped ordering: programs that run together share A row-blocks and all of W in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rows < M
    cn = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * K
    sample = rows // HW
    if NORM:
        mu = tl.load(mu_ptr + sample, mask=rm, other=0.0)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        km = kk < K
        a = tl.load(a_rows + kk[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        if NORM:  # centred before rounding to the GEMM's dtype: no cancellation against a large mean
            a = tl.where(km[None, :], a.to(tl.float32) - mu, 0.0)
        if ACT_IN != 0:
            a = _act(a.to(tl.float32), ACT_IN)
        wt = tl.load(w_ptr + cols[None, :] * K + kk[:, None], mask=km[:, None] & cn[None, :], other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), wt.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a.to(wt.dtype), wt, acc, input_precision=PRECISION)
    if NORM:  # norm2 with its affine folded into W: W diag(w) (y - mu) / sigma
        acc *= tl.load(rstd_ptr + sample, mask=rm, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cn, other=0.0).to(tl.float32)[None, :]
    acc = _act(acc, ACT_OUT)
    if HAS_KEEP:  # stochastic depth: this sample's branch kept (1 / keep prob) or dropped (0)
        acc *= tl.load(keep_ptr + sample, mask=rm, other=0.0).to(tl.float32)[:, None]
    m = rm[:, None] & cn[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if SKIP:
        s = tl.load(skip_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            s *= tl.load(res_ptr + cols, mask=cn, other=0.0).to(tl.float32)[None, :]
        acc += s
    q = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, q, mask=m)
    if STATS:
        v = tl.where(m, q.to(tl.float32), 0.0)
        pso = ps_ptr + rows.to(tl.int64) * (2 * NNB) + 2 * pid_n
        tl.store(pso, tl.sum(v, 1), mask=rm)
        tl.store(pso + 1, tl.sum(v * v, 1), mask=rm)


def _gemm_blocks(m: int, n: int, k: int, itemsize: int) -> dict:
    # Measured on an H200 (bf16, batch 256, benchmarks/README.md): fc1 (N = 4C >= 256, GELU epilogue)
    # runs fastest with 128 x 256 tiles on 8 warps (0.49 ms at C=64 and 0.22 ms at C=320, against
    # 0.57 and 0.28 with 128 x 128); fc2 (N = C) already reached 89% of the copy bandwidth at 128 x 128.
    block_n = _pow2(n, 16, 256 if n >= 256 else 128)
    block_k = _pow2(k, 16, 64 if itemsize <= 2 else 32)
    block_m = 128 if m >= 4096 else _pow2(m, 16, 64)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                num_warps=8 if block_m * block_n >= 128 * 128 else 4, num_stages=1 if INTERPRET else 3)


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   norm: tuple[torch.Tensor, torch.Tensor] | None = None, act_in: int = ACT_NONE,
                   act_out: int = ACT_NONE, keep: torch.Tensor | None = None, skip: torch.Tensor | None = None,
                   res: torch.Tensor | None = None, stats: bool = False, out_dtype: torch.dtype | None = None,
                   config: dict | None = None):
    """A 1x1 convolution of a channels_last ``x`` [B, K, H, W] by ``weight`` [N, K(, 1, 1)] as one GEMM
    over tokens, with (in this order) the per-sample ``norm = (mu, rstd)`` (``x - mu`` as it is
    loaded, ``* rstd`` on the product), ``act_in`` on the input, ``bias``, ``act_out``, ``keep`` [B],
    and ``skip (* res)`` added.
    The product runs in ``weight``'s dtype with float32 accumulation (IEEE float32, not TF32, for
    float32 weights). Returns the [B, N, H, W] channels_last output (``out_dtype``, default ``x``'s)
    and, with ``stats``, its per-sample (sum, sum of squares)."""
    check_tensor(x, "pointwise_conv")
    x = channels_last(x)
    b, k, h, w = x.shape
    w2 = weight.reshape(weight.shape[0], -1).contiguous()
    n = w2.shape[0]
    if w2.shape[1] != k:
        raise ValueError(f"pointwise_conv: weight has {w2.shape[1]} input channels, x has {k}")
    m = b * h * w
    out = torch.empty(b, n, h, w, device=x.device, dtype=out_dtype or x.dtype, memory_format=torch.channels_last)
    cfg = {**_gemm_blocks(m, n, k, w2.element_size()), **(config or {})}
    nnb = triton.cdiv(n, cfg["BLOCK_N"])
    ps = torch.empty(b, h * w * nnb, 2, device=x.device, dtype=torch.float32) if stats else out
    mu, rstd = norm if norm is not None else (out, out)
    if skip is not None:
        skip = channels_last(skip)
        if tuple(skip.shape) != tuple(out.shape):
            raise ValueError(f"pointwise_conv: skip has shape {list(skip.shape)}, the output {list(out.shape)}")
    dot_f32 = w2.dtype == torch.float32 or (INTERPRET and w2.dtype == torch.bfloat16)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * nnb,)
    _pointwise_conv_kernel[grid](
        x, w2, out if bias is None else bias, mu, rstd, out if keep is None else keep,
        out if skip is None else skip, out if res is None else res, out, ps, m, n, k, h * w, nnb,
        NORM=norm is not None, ACT_IN=act_in, ACT_OUT=act_out, HAS_BIAS=bias is not None, HAS_KEEP=keep is not None,
        SKIP=skip is not None, HAS_RES=res is not None, STATS=stats, DOT_F32=dot_f32,
        PRECISION="ieee" if dot_f32 else "tf32", **cfg)
    return out, (ps if stats else None)


# ----------------------------------------------------------------------------- a copy, for the ceiling
@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)


def copy(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """A plain Triton copy (the bandwidth ceiling a memory-bound kernel is compared with)."""
    n = src.numel()
    _copy_kernel[(triton.cdiv(n, 4096),)](src, dst, n, BLOCK=4096, num_warps=8)
    return dst
