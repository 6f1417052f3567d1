"""Triton kernels for the pooling family's blocks (PoolFormer, PoolFormerV2, IdentityFormer) on CUDA.

On a GPU these blocks are memory-bound: apart from the two 1x1 convolutions, every step
(GroupNorm statistics, normalisation, 3x3 pool, subtraction, LayerScale, residual add) is a
pass over the activation. The kernels here move each activation as few times as the algebra
of ``docs/fast.md`` allows (all channels_last, i.e. ``[tokens, C]`` row-major):

* :func:`sample_partials` / :func:`finish_stats` - per-sample sum and sum of squares (GroupNorm(1)
  statistics): one read, then mean and 1/sigma.
* :func:`pool_mix` - the whole token-mixer half in one read and one write:
  ``y = r x + a (pool(x) - x)`` with ``a = g w / sigma`` per (sample, channel) (the norm never
  materialised), the stencil as a rolling window down strips of rows with
  ``count_include_pad=False``'s border counts computed from the position; it also emits the
  per-sample sums of ``y`` (norm2's statistics).
* :func:`pointwise_conv` - a 1x1 convolution (a GEMM over tokens, any tile of :data:`GEMM_CONFIGS`) with
  MetaFormer's prologue and epilogue: norm2's affine folded into the weights, its per-sample mean
  subtracted from each input tile as it is loaded and ``1/sigma`` applied to the accumulator (so the
  normalised map is never written), bias, GELU / ReLU^2, drop-path keep, ``r2 y +`` residual, and
  the output's per-sample sums (the next block's norm1 statistics); or the activation applied to the
  input tile as it is loaded (fc2 in training, where fc1's pre-activation is what is kept).
* :func:`fc1` - fc1 by that kernel or by cuBLASLt after :func:`standardise` (which runs where is
  :mod:`metaformer.fast.tuning`'s choice).
* :func:`pool_mix_backward_sums` / :func:`pool_mix_backward_dx` - the mixer's gradient in two passes
  (a reduction for the gradients of the per-channel parameters and of ``1/sigma``; then ``dx``),
  recomputing ``pool(x)`` in the same rolling window.

Per-sample statistics are reduced from per-program partial sums written to a small buffer (no
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
# The KxK stencil runs as a rolling window down a strip of rows: each program owns ROWS rows of one
# sample (a [BLOCK_W, BLOCK_C] tile of each), and each input row is loaded K times (its K horizontal
# shifts, from cache after the first) and summed once, instead of K*K loads per output row. For the
# 3x3 pool the three row sums of the window are carried from one output row to the next; for larger
# pools (the paper's 5/7/9 ablation) a running sum of the K row sums is carried instead (the incoming
# row added, the outgoing one subtracted: 2K loads per output row instead of K*K).
@triton.jit
def _count(i, n, P: tl.constexpr):
    """Real tokens in the window of 2P+1 centred at ``i`` along an axis of ``n`` (count_include_pad=False);
    1 outside the axis, where nothing is summed."""
    return tl.maximum(tl.minimum(i + P, n - 1) - tl.maximum(i - P, 0) + 1, 1).to(tl.float32)


@triton.jit
def _load_row(ptr, b, hh, w, c, wm, cm, H, W, C):
    """Row ``hh`` of sample ``b`` of a channels_last [B*H*W, C] map as float32 (zeros outside the map)."""
    m = ((hh >= 0) & (hh < H) & wm)[:, None] & cm[None, :]
    offs = ((b * H + hh).to(tl.int64) * W + w)[:, None] * C + c[None, :]
    return tl.load(ptr + offs, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _row_sum(ptr, b, hh, w, c, cm, H, W, C, K: tl.constexpr, DIVIDE: tl.constexpr, BLOCK_W: tl.constexpr,
             BLOCK_C: tl.constexpr):
    """Row ``hh`` of sample ``b``: each token's sum over its K horizontal neighbours, and the token itself
    (both zero for a row outside the map). With DIVIDE, each neighbour is divided by its own window's
    real-token count (the adjoint of count_include_pad=False pooling; the counts are separable)."""
    P: tl.constexpr = K // 2
    hv = (hh >= 0) & (hh < H)
    row = (b * H + hh).to(tl.int64) * W
    acc = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
    mid = acc
    for j in tl.static_range(K):
        ww = w + (j - P)
        m = (hv & (ww >= 0) & (ww < W))[:, None] & cm[None, :]
        v = tl.load(ptr + (row + ww)[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
        if j == P:
            mid = v
        if DIVIDE:
            v = v / _count(ww, W, P)[:, None]
        acc += v
    if DIVIDE:
        acc = acc / _count(hh, H, P)
    return acc, mid


@triton.jit
def _window_start(ptr, b, h0, w, c, cm, H, W, C, K: tl.constexpr, DIVIDE: tl.constexpr, BLOCK_W: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """The rolling window's state before output row ``h0``: for K = 3 the row sums of rows h0-1 and h0
    and row h0 itself; otherwise the sum of the row sums of rows h0-P .. h0+P-1."""
    P: tl.constexpr = K // 2
    if K == 3:
        up, _unused = _row_sum(ptr, b, h0 - 1, w, c, cm, H, W, C, K, DIVIDE, BLOCK_W, BLOCK_C)
        cur, mid = _row_sum(ptr, b, h0, w, c, cm, H, W, C, K, DIVIDE, BLOCK_W, BLOCK_C)
    else:
        up = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
        cur = up
        mid = up
        for i in tl.static_range(K - 1):
            s, _unused = _row_sum(ptr, b, h0 - P + i, w, c, cm, H, W, C, K, DIVIDE, BLOCK_W, BLOCK_C)
            up += s
    return up, cur, mid


@triton.jit
def _window_next(ptr, b, h, up, cur, mid, w, c, wm, cm, H, W, C, K: tl.constexpr, DIVIDE: tl.constexpr,
                 BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """The KxK window sum around each token of row ``h``, row ``h`` itself, and the state for row h+1."""
    P: tl.constexpr = K // 2
    if K == 3:
        down, below = _row_sum(ptr, b, h + 1, w, c, cm, H, W, C, K, DIVIDE, BLOCK_W, BLOCK_C)
        total = up + cur + down
        center = mid
        up = cur
        cur = down
        mid = below
    else:
        s_in, _unused = _row_sum(ptr, b, h + P, w, c, cm, H, W, C, K, DIVIDE, BLOCK_W, BLOCK_C)
        total = up + s_in
        center = _load_row(ptr, b, h, w, c, wm, cm, H, W, C)
        s_out, _unused2 = _row_sum(ptr, b, h - P, w, c, cm, H, W, C, K, DIVIDE, BLOCK_W, BLOCK_C)
        up = total - s_out
    return total, center, up, cur, mid


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
def _pool_mix_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, mu_ptr, rstd_ptr, keep_ptr, r_ptr, ps_ptr, H, W, C, ROWS, NS,
                     K: tl.constexpr, MODE: tl.constexpr, HAS_RES: tl.constexpr, HAS_SHIFT: tl.constexpr,
                     HAS_KEEP: tl.constexpr, STATS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // NS
    h0 = (pid % NS) * ROWS
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    wm = w < W
    cm = c < C
    a, shift = _mixer_coef(scale_ptr, shift_ptr, mu_ptr, rstd_ptr, keep_ptr, b, c, cm, HAS_SHIFT, HAS_KEEP)
    a = a[None, :]
    shift = shift[None, :]
    r = 1.0
    if HAS_RES:
        r = tl.load(r_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    P: tl.constexpr = K // 2
    cnt_w = _count(w, W, P)[:, None]
    s1 = tl.zeros([BLOCK_C], tl.float32)
    s2 = tl.zeros([BLOCK_C], tl.float32)
    if MODE == 2:  # no window
        up = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
        cur = up
        mid = up
    else:
        up, cur, mid = _window_start(x_ptr, b, h0, w, c, cm, H, W, C, K, False, BLOCK_W, BLOCK_C)
    for i in range(0, ROWS):
        h = h0 + i
        if MODE == 2:  # identity mixer (IdentityFormer): r x + g norm(x) = (r + a) x + shift
            x = _load_row(x_ptr, b, h, w, c, wm, cm, H, W, C)
            y = (r + a) * x + shift
        else:
            total, x, up, cur, mid = _window_next(x_ptr, b, h, up, cur, mid, w, c, wm, cm, H, W, C, K, False,
                                                  BLOCK_W, BLOCK_C)
            pool = total / (cnt_w * _count(h, H, P))
            if MODE == 0:  # pool(x) - x: the norm's shift cancels
                y = (r - a) * x + a * pool
            else:  # pool(x) alone keeps it
                y = r * x + a * pool + shift
        m = ((h < H) & wm)[:, None] & cm[None, :]
        yq = y.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + ((b * H + h).to(tl.int64) * W + w)[:, None] * C + c[None, :], yq, mask=m)
        if STATS:  # of the stored (rounded) values: exactly what the next norm sees
            v = tl.where(m, yq.to(tl.float32), 0.0)
            s1 += tl.sum(v, 0)
            s2 += tl.sum(v * v, 0)
    if STATS:
        out = ps_ptr + ((pid * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)) * 2
        tl.store(out, tl.sum(s1, 0))
        tl.store(out + 1, tl.sum(s2, 0))


# Programs a mixer launch aims for: enough to keep every SM of a 132-SM H100/H200 busy several times over.
# The interpreter runs programs one after another, so there whole-map strips are quickest (the tests
# ask for short strips and single rows explicitly).
MIXER_PROGRAMS = 1 if INTERPRET else 1024
MIXER_TILE = 2048  # elements of one row tile [BLOCK_W, BLOCK_C]: ~16 float32 per thread and tile on 4 warps


def _channel_block(c: int) -> int:
    """Channels per tile. channels_last keeps a token's channels contiguous: a block that divides C wastes no
    lanes (320 = 5 x 64 rather than 3 x 128 with a third of the last block masked), and at least 32 channels
    (64 bytes in 16-bit) keep each token's access a whole 32-byte sector run."""
    p = c & -c  # the largest power of two dividing c
    return min(p, 128) if p >= 32 else _pow2(c, 16, 128)


def mixer_config(b: int, h: int, w: int, c: int, config: dict | None = None) -> dict:
    """Tile of the mixer kernels for a [B, C, H, W] map: BLOCK_C channels (:func:`_channel_block`), BLOCK_W
    tokens of a row (the tile about MIXER_TILE elements), ROWS rows per program (as many as keep at least
    MIXER_PROGRAMS programs, at most 16: fewer rows per strip re-read more halo rows), 4 warps; ``config``
    overrides any of them."""
    block_c = _channel_block(c)
    block_w = _pow2(w, 1, max(1, MIXER_TILE // block_c))
    tiles = triton.cdiv(w, block_w) * triton.cdiv(c, block_c)
    rows = min(h, 16)
    while rows > 1 and b * triton.cdiv(h, rows) * tiles < MIXER_PROGRAMS:
        rows = triton.cdiv(rows, 2)
    cfg = dict(BLOCK_W=block_w, BLOCK_C=block_c, ROWS=max(rows, 1), num_warps=4)
    cfg.update(config or {})
    return cfg


def _mixer_launch(b: int, h: int, w: int, c: int, config: dict | None):
    """A mixer kernel's grid (strips of every sample, W-tiles, C-tiles), rows per strip, strips per sample, and
    the remaining launch options (:func:`mixer_config`)."""
    cfg = mixer_config(b, h, w, c, config)
    rows = cfg.pop("ROWS")
    strips = triton.cdiv(h, rows)
    return (b * strips, triton.cdiv(w, cfg["BLOCK_W"]), triton.cdiv(c, cfg["BLOCK_C"])), rows, strips, cfg


def pool_mix(x: torch.Tensor, mu: torch.Tensor, rstd: torch.Tensor, scale: torch.Tensor,
             shift: torch.Tensor | None = None, res: torch.Tensor | None = None, keep: torch.Tensor | None = None,
             mode: int = MIX_SUBTRACT, pool_size: int = 3, stats: bool = True, config: dict | None = None):
    """The token-mixer half of a pooling-family block on a channels_last ``x`` [B, C, H, W] with
    GroupNorm(1) statistics ``mu, rstd`` [B]: with ``a = keep g w rstd`` (``scale = g w`` [C]) and
    ``s = keep g (b - w mu rstd)`` (``shift = g b`` [C], omitted for a bias-free norm),

    ``MIX_SUBTRACT``: ``y = r x + a (pool(x) - x)`` (the shift cancels); ``MIX_POOL``:
    ``y = r x + a pool(x) + s``; ``MIX_IDENTITY``: ``y = (r + a) x + s``.
    Returns ``y`` and, with ``stats``, the [B, P, 2] partial sums of ``y`` for :func:`finish_stats`
    (one pair per program). ``config``: tile overrides (:func:`mixer_config`).
    """
    check_tensor(x, "pool_mix")
    if mode != MIX_IDENTITY and pool_size % 2 != 1:
        raise ValueError(f"pool_mix: pool_size must be odd (a centred window), got {pool_size}")
    x = channels_last(x)
    b, c, h, w = x.shape
    y = torch.empty_like(x)
    grid, rows, strips, cfg = _mixer_launch(b, h, w, c, config)
    ps = torch.empty(b, strips * grid[1] * grid[2], 2, device=x.device, dtype=torch.float32) if stats else y
    _pool_mix_kernel[grid](
        x, y, scale, scale if shift is None else shift, mu, rstd, rstd if keep is None else keep,
        scale if res is None else res, ps, h, w, c, rows, strips,
        K=pool_size, MODE=mode, HAS_RES=res is not None, HAS_SHIFT=shift is not None and mode != MIX_SUBTRACT,
        HAS_KEEP=keep is not None, STATS=stats, **cfg)
    return y, (ps if stats else None)


@triton.jit
def _pool_mix_bwd_reduce_kernel(x_ptr, dy_ptr, t_ptr, dr_ptr, H, W, C, ROWS, NS,
                                K: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_W: tl.constexpr,
                                BLOCK_C: tl.constexpr):
    """Per program partial sums over its tokens of ``dy (pool(x) - x)`` and ``dy x``, per channel."""
    pid = tl.program_id(0)
    b = pid // NS
    h0 = (pid % NS) * ROWS
    wb = tl.program_id(1)
    w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    wm = w < W
    cm = c < C
    P: tl.constexpr = K // 2
    cnt_w = _count(w, W, P)[:, None]
    t = tl.zeros([BLOCK_C], tl.float32)
    dr = tl.zeros([BLOCK_C], tl.float32)
    up, cur, mid = _window_start(x_ptr, b, h0, w, c, cm, H, W, C, K, False, BLOCK_W, BLOCK_C)
    for i in range(0, ROWS):
        h = h0 + i
        total, x, up, cur, mid = _window_next(x_ptr, b, h, up, cur, mid, w, c, wm, cm, H, W, C, K, False,
                                              BLOCK_W, BLOCK_C)
        dy = _load_row(dy_ptr, b, h, w, c, wm, cm, H, W, C)  # zero outside the map and the tile
        t += tl.sum(dy * (total / (cnt_w * _count(h, H, P)) - x), 0)
        if HAS_RES:
            dr += tl.sum(dy * x, 0)
    out = (pid * tl.num_programs(1) + wb).to(tl.int64) * C + c
    tl.store(t_ptr + out, t, mask=cm)
    if HAS_RES:
        tl.store(dr_ptr + out, dr, mask=cm)


@triton.jit
def _pool_mix_bwd_dx_kernel(x_ptr, dy_ptr, dx_ptr, scale_ptr, rk_ptr, r_ptr, coef_ptr, mu_ptr, H, W, C, ROWS, NS,
                            K: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """``dx = (r - a) dy + a pool^T(dy) + coef (x - mu)`` with ``a = scale rk`` (``coef``: the path
    through 1/sigma); ``pool^T``, the adjoint of count_include_pad=False pooling, sums each neighbour's
    gradient over its own window's count, in the same rolling window over rows of ``dy``."""
    pid = tl.program_id(0)
    b = pid // NS
    h0 = (pid % NS) * ROWS
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    wm = w < W
    cm = c < C
    a = (tl.load(scale_ptr + c, mask=cm, other=0.0).to(tl.float32) * tl.load(rk_ptr + b))[None, :]
    r = 1.0
    if HAS_RES:
        r = tl.load(r_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    coef = tl.load(coef_ptr + b)
    mu = tl.load(mu_ptr + b)
    up, cur, mid = _window_start(dy_ptr, b, h0, w, c, cm, H, W, C, K, True, BLOCK_W, BLOCK_C)
    for i in range(0, ROWS):
        h = h0 + i
        pt, dy, up, cur, mid = _window_next(dy_ptr, b, h, up, cur, mid, w, c, wm, cm, H, W, C, K, True,
                                            BLOCK_W, BLOCK_C)
        x = _load_row(x_ptr, b, h, w, c, wm, cm, H, W, C)
        dx = (r - a) * dy + a * pt + coef * (x - mu)
        m = ((h < H) & wm)[:, None] & cm[None, :]
        tl.store(dx_ptr + ((b * H + h).to(tl.int64) * W + w)[:, None] * C + c[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=m)


def pool_mix_backward_sums(x: torch.Tensor, dy: torch.Tensor, pool_size: int, need_res: bool,
                           config: dict | None = None):
    """``t[b, c] = sum_hw dy (pool(x) - x)`` [B, C] and (with ``need_res``) ``sum_bhw dy x`` [C], float32."""
    check_tensor(x, "pool_mix_backward")
    b, c, h, w = x.shape
    grid, rows, strips, cfg = _mixer_launch(b, h, w, c, config)
    t = torch.empty(grid[0] * grid[1], c, device=x.device, dtype=torch.float32)
    dr = torch.empty_like(t) if need_res else t
    _pool_mix_bwd_reduce_kernel[grid](x, dy, t, dr, h, w, c, rows, strips, K=pool_size, HAS_RES=need_res, **cfg)
    return t.view(b, -1, c).sum(1), (dr.sum(0) if need_res else None)


def pool_mix_backward_dx(x, dy, scale, rk, res, coef, mu, pool_size: int, config: dict | None = None) -> torch.Tensor:
    """The gradient of :func:`pool_mix` (``MIX_SUBTRACT``) w.r.t. ``x``; ``rk = keep rstd`` [B], ``coef`` [B]."""
    b, c, h, w = x.shape
    grid, rows, strips, cfg = _mixer_launch(b, h, w, c, config)
    dx = torch.empty_like(x)
    _pool_mix_bwd_dx_kernel[grid](x, dy, dx, scale, rk, scale if res is None else res, coef, mu, h, w, c, rows,
                                  strips, K=pool_size, HAS_RES=res is not None, **cfg)
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
                           out_ptr, out_desc, ps_ptr, M, N, K, HW, NNB,
                           NORM: tl.constexpr, ACT_IN: tl.constexpr, ACT_OUT: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, SKIP: tl.constexpr,
                           HAS_RES: tl.constexpr, STATS: tl.constexpr, DOT_F32: tl.constexpr,
                           PRECISION: tl.constexpr, TMA_STORE: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
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
    if TMA_STORE:  # Hopper's bulk tensor copy from shared memory; it clips the tile at the map's edges
        out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], q)
    else:
        tl.store(out_ptr + offs, q, mask=m)
    if STATS:
        v = tl.where(m, q.to(tl.float32), 0.0)
        pso = ps_ptr + rows.to(tl.int64) * (2 * NNB) + 2 * pid_n
        tl.store(pso, tl.sum(v, 1), mask=rm)
        tl.store(pso + 1, tl.sum(v * v, 1), mask=rm)


# The tiles metaformer.fast.tuning times on the device for each GEMM shape (``tune``). Block sizes are capped
# at each shape's own (a 64-channel K takes BLOCK_K 64). TMA_STORE: the output tile leaves through Hopper's
# bulk copy engine (compute capability 9.0+), so a program's stores overlap the next program's work.
GEMM_CONFIGS = (
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, TMA_STORE=True),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, TMA_STORE=True),
)


def _gemm_blocks(m: int, n: int, k: int, itemsize: int) -> dict:
    # The tile without a measured table. Measured on an H200 (bf16, batch 256, docs/fast.md): fc1 (N = 4C >= 256,
    # GELU epilogue) runs fastest with 128 x 256 tiles on 8 warps (0.49 ms at C=64 and 0.22 ms at C=320, against
    # 0.57 and 0.28 with 128 x 128); fc2 (N = C) takes the same rule, and reached 89% of the copy bandwidth
    # at C=64 (128 x 64 tiles).
    block_n = _pow2(n, 16, 256 if n >= 256 else 128)
    block_k = _pow2(k, 16, 64 if itemsize <= 2 else 32)
    block_m = 128 if m >= 4096 else _pow2(m, 16, 64)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                num_warps=8 if block_m * block_n >= 128 * 128 else 4, num_stages=3)


def gemm_config(m: int, n: int, k: int, itemsize: int, config: dict | None = None) -> dict:
    """The launch configuration of :func:`pointwise_conv` for an [m, k] x [k, n] GEMM: ``config`` (a tile of
    :data:`GEMM_CONFIGS`, or any of its keys) over the default tile, block sizes capped at the shape's own
    (float32 operands take BLOCK_K at most 32: twice the bytes per element in shared memory)."""
    cfg = {**_gemm_blocks(m, n, k, itemsize), **(config or {})}
    cfg["BLOCK_N"] = _pow2(n, 16, cfg["BLOCK_N"])
    cfg["BLOCK_K"] = _pow2(k, 16, min(cfg["BLOCK_K"], 32 if itemsize > 2 else 128))
    cfg["BLOCK_M"] = _pow2(m, 16, cfg["BLOCK_M"])
    cfg.setdefault("TMA_STORE", False)
    if INTERPRET:
        cfg["num_stages"] = 1
    return cfg


def tma_store_problem(n: int, out_dtype: torch.dtype, device: torch.device) -> str | None:
    """Why a TMA-store tile cannot write an [M, n] output of ``out_dtype`` here, or None."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return "this Triton has no tensor descriptors"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        return "TMA stores need compute capability 9.0 (Hopper) or newer"
    if (n * torch.empty((), dtype=out_dtype).element_size()) % 16:
        return f"output rows of {n} channels are not a multiple of 16 bytes"
    return None


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
    float32 weights). ``config``: the tile (:func:`gemm_config`). Returns the [B, N, H, W] channels_last
    output (``out_dtype``, default ``x``'s) and, with ``stats``, its per-sample (sum, sum of squares)."""
    check_tensor(x, "pointwise_conv")
    x = channels_last(x)
    b, k, h, w = x.shape
    w2 = weight.reshape(weight.shape[0], -1).contiguous()
    n = w2.shape[0]
    if w2.shape[1] != k:
        raise ValueError(f"pointwise_conv: weight has {w2.shape[1]} input channels, x has {k}")
    m = b * h * w
    out = torch.empty(b, n, h, w, device=x.device, dtype=out_dtype or x.dtype, memory_format=torch.channels_last)
    cfg = gemm_config(m, n, k, w2.element_size(), config)
    nnb = triton.cdiv(n, cfg["BLOCK_N"])
    ps = torch.empty(b, h * w * nnb, 2, device=x.device, dtype=torch.float32) if stats else out
    mu, rstd = norm if norm is not None else (out, out)
    if skip is not None:
        skip = channels_last(skip)
        if tuple(skip.shape) != tuple(out.shape):
            raise ValueError(f"pointwise_conv: skip has shape {list(skip.shape)}, the output {list(out.shape)}")
    desc = out
    if cfg["TMA_STORE"]:
        problem = tma_store_problem(n, out.dtype, out.device)
        if problem is not None:
            raise ValueError(f"pointwise_conv: a TMA_STORE tile cannot run here: {problem}")
        from triton.tools.tensor_descriptor import TensorDescriptor

        desc = TensorDescriptor.from_tensor(out.permute(0, 2, 3, 1).reshape(m, n), [cfg["BLOCK_M"], cfg["BLOCK_N"]])
    dot_f32 = w2.dtype == torch.float32 or (INTERPRET and w2.dtype == torch.bfloat16)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * nnb,)
    _pointwise_conv_kernel[grid](
        x, w2, out if bias is None else bias, mu, rstd, out if keep is None else keep,
        out if skip is None else skip, out if res is None else res, out, desc, ps, m, n, k, h * w, nnb,
        NORM=norm is not None, ACT_IN=act_in, ACT_OUT=act_out, HAS_BIAS=bias is not None, HAS_KEEP=keep is not None,
        SKIP=skip is not None, HAS_RES=res is not None, STATS=stats, DOT_F32=dot_f32,
        PRECISION="ieee" if dot_f32 else "tf32", **cfg)
    return out, (ps if stats else None)


# ----------------------------------------------------------------------------- fc1 through cuBLASLt
@triton.jit
def _standardise_kernel(x_ptr, out_ptr, mu_ptr, rstd_ptr, n, BLOCK: tl.constexpr):
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    base = b.to(tl.int64) * n
    v = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
    v = (v - tl.load(mu_ptr + b)) * tl.load(rstd_ptr + b)
    tl.store(out_ptr + base + offs, v.to(out_ptr.dtype.element_ty), mask=m)


def standardise(x: torch.Tensor, mu: torch.Tensor, rstd: torch.Tensor, dtype: torch.dtype | None = None):
    """``(x - mu) * rstd`` per sample of a channels_last ``x`` [B, C, H, W] (GroupNorm(1) without its affine),
    in one read and one write, stored in ``dtype`` (default ``x``'s): centred in float32 before rounding."""
    check_tensor(x, "standardise")
    x = channels_last(x)
    out = torch.empty_like(x, dtype=dtype or x.dtype)
    n = x[0].numel()
    _standardise_kernel[(triton.cdiv(n, 4096), x.shape[0])](x, out, mu, rstd, n, BLOCK=4096, num_warps=8)
    return out


def fc1_cublaslt(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mu: torch.Tensor,
                 rstd: torch.Tensor, act: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """fc1 of a fused block through cuBLASLt: norm2's standardisation written by :func:`standardise` in the
    weights' dtype (one C-wide read and write), then one GEMM over tokens with cuBLASLt's bias + GELU or
    bias + ReLU epilogue (``torch._addmm_activation``; ``addmm`` without an activation). On CUDA that
    GELU is the tanh approximation (within 4.8e-4 of exact GELU): :mod:`metaformer.fast.tuning` lets it run
    GELU in 16-bit dtypes only. Returns the channels_last [B, N, H, W] output."""
    if act not in (ACT_NONE, ACT_GELU, ACT_RELU):
        raise ValueError("fc1_cublaslt: cuBLASLt's epilogues are bias, bias + ReLU and bias + GELU; "
                         "ReLU^2 and SiLU run on the Triton GEMM")
    b, k, h, w = x.shape
    w2 = weight.reshape(weight.shape[0], -1)
    n = w2.shape[0]
    a = standardise(x, mu, rstd, w2.dtype).permute(0, 2, 3, 1).reshape(-1, k)
    bias = torch.zeros(n, device=x.device, dtype=w2.dtype) if bias is None else bias.to(w2.dtype)
    if act == ACT_NONE:
        out = torch.addmm(bias, a, w2.t())
    else:
        out = torch._addmm_activation(bias, a, w2.t(), use_gelu=act == ACT_GELU)
    out = out.view(b, h, w, n).permute(0, 3, 1, 2)  # a channels_last view of the [tokens, N] product
    return out if out_dtype in (None, out.dtype) else out.to(out_dtype)


FC1_IMPLS = ("triton", "cublaslt")


def fc1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mu: torch.Tensor, rstd: torch.Tensor,
        act: int, impl: str = "triton", config: dict | None = None, out_dtype: torch.dtype | None = None):
    """fc1 of a fused block, ``act(W ((x - mu) rstd) + bias)`` per sample, by ``impl``: ``triton`` (one GEMM
    kernel, the standardisation in its prologue and epilogue, ``config`` its tile) or ``cublaslt``
    (:func:`fc1_cublaslt`). Returns the channels_last [B, N, H, W] output."""
    if impl == "cublaslt":
        return fc1_cublaslt(x, weight, bias, mu, rstd, act, out_dtype)
    if impl != "triton":
        raise ValueError(f"fc1: impl must be one of {', '.join(FC1_IMPLS)}, got {impl!r}")
    return pointwise_conv(x, weight, bias, norm=(mu, rstd), act_out=act, out_dtype=out_dtype, config=config)[0]


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
