"""Pieces of a training loop that every task writes the same way: DDP wrapping, the optimizer step,
refusing a NaN loss, stopping on any rank's Ctrl-C, listing skipped files, and log lines people can read."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import ConfigError
from .checkpoint import good_checkpoint, nonfinite
from .runtime import Runtime
from .stop import GracefulStop, TrainingDiverged


def wrap_ddp(model: torch.nn.Module, rt: Runtime, find_unused: bool = False) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when the run has several processes, else itself."""
    if not rt.distributed:
        return model
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def frozen_modules(model: torch.nn.Module, frozen_stages: int) -> list[torch.nn.Module]:
    """The parts ``frozen_stages`` names, with mmdet's meaning (every task): -1 none, 0 the stem, ``k`` the stem
    and the first ``k`` stages. ``model`` is a MetaFormer or its features_only backbone (``stem``, ``stages``)."""
    n = model.num_stages
    if not (isinstance(frozen_stages, int) and -1 <= frozen_stages <= n):
        raise ConfigError(f"frozen_stages={frozen_stages!r} is out of range: use -1 (none), 0 (the stem) up to {n} "
                          "(the stem and every stage)")
    return [] if frozen_stages < 0 else [model.stem, *list(model.stages)[:frozen_stages]]


def freeze(model: torch.nn.Module, frozen_stages: int) -> list[torch.nn.Module]:
    """Stop :func:`frozen_modules` learning: parameters fixed, norms in eval mode (a BatchNorm variant keeps its
    statistics). Call again after ``model.train()``."""
    frozen = frozen_modules(model, frozen_stages)
    for m in frozen:
        m.eval()
        m.requires_grad_(False)
    return frozen


def check_finite(loss: float, where: str, output: Path, amp: str, hint: str = "", what: str = "loss",
                 stopped: str = "stopped without applying it") -> None:
    """Stop the run at a NaN/inf loss, before the step is applied (or, for a validation loss, before the epoch
    is saved), naming the last good checkpoint."""
    if math.isfinite(loss):
        return
    good = good_checkpoint(Path(output))
    ckpt = f"{good} (resume with --resume {good})" if good else "none yet"
    raise TrainingDiverged(f"{what} is {loss} at {where}; {stopped}. Last good checkpoint: {ckpt}. "
                           f"Try a lower --lr{', --amp bf16 instead of fp16' if amp == 'fp16' else ''}{hint}")


def check_weights_finite(model: torch.nn.Module, where: str, output: Path, hint: str = "") -> None:
    """Refuse to save weights holding NaN or inf (a step can overflow them while its loss was still finite):
    the checkpoint on disk stays the last good one."""
    bad = nonfinite(model.state_dict())
    if bad:
        good = good_checkpoint(Path(output))
        raise TrainingDiverged(f"the weights hold NaN or inf at {where} ({len(bad)} tensor(s), e.g. {bad[0]}) though "
                               f"the loss was finite; they were not saved. Last good checkpoint: "
                               f"{f'{good} (resume with --resume {good})' if good else 'none yet'}. Try a lower --lr"
                               f"{hint}")


def optimizer_step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   params: Iterable[torch.nn.Parameter] | None = None, clip_grad: float | None = None) -> None:
    """Apply the accumulated gradients (unscaled and clipped to ``clip_grad`` when given) and clear them."""
    if clip_grad is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def stop_requested(rt: Runtime, stop: GracefulStop) -> bool:
    """Whether Ctrl-C/SIGTERM reached any rank (all ranks then save and stop at the same step)."""
    return rt.any_rank(stop.requested)


def report_unreadable(log: Callable[[str], None], bad: list, where: str) -> None:
    if bad:
        log(f"  skipped {len(bad)} unreadable image(s) {where}:")
        for b in bad:
            log(f"    {b.path}: {b.error}")


def progress_bar(iterable=None, *, main: bool = True, **kw):
    """A progress bar on rank 0, in a terminal (not in logs: tqdm's ``disable=None``), that clears itself when
    done; used as a context manager, so an error or Ctrl-C closes it before the message is printed."""
    from tqdm import tqdm

    return tqdm(iterable, disable=None if main else True, leave=False, dynamic_ncols=True, mininterval=0.5, **kw)


# Fractions in the metrics files and JSON (as the evaluators return them) that a reader expects as percentages
# (mmseg's logs, `metaformer segment eval`).
PERCENT = ("mIoU", "mAcc", "aAcc")


def format_row(row: dict, keys: Iterable[str]) -> str:
    """The ``keys`` of a metrics row that it has, as one readable line (``key value``, 4 significant digits; the
    :data:`PERCENT` scores as percentages); the whole row is in the metrics files."""
    parts = []
    for k in keys:
        v = row.get(k)
        if v is None or isinstance(v, (bool, list, dict)):
            continue
        if k in PERCENT and isinstance(v, (int, float)):
            parts.append(f"{k} {100 * v:.2f}%")
        else:
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return "  ".join(parts)
