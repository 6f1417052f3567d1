"""A run's metrics: ``metrics.csv`` and ``metrics.jsonl`` (one row per epoch or log point), TensorBoard,
and Weights & Biases when asked for. The files are rewritten from the run's history, which lives in
its checkpoints: a resumed run continues them from the checkpoint (never a row twice), and a new run
never appends to another's."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..atomic import atomic_write
from ..errors import need, require


def ranked(scores, k: int):
    """The indices of the ``k`` highest ``scores`` per row ``[B, C] -> [B, k]``, best first; equal scores rank by
    class index, lowest first (the rule of ``argmax``). Every top-1/top-k count and every label list goes through
    this one rule: int8 files give exactly equal logits often enough that ``topk``'s unspecified order among ties
    made two counts of the same file disagree."""
    return scores.sort(dim=1, descending=True, stable=True).indices[:, :k]


def top_hits(logits, targets, ks=(1, 5)) -> dict:
    """``{k: number of rows whose target is among the k best}`` (see :func:`ranked`; k at most the classes)."""
    best = ranked(logits, min(max(ks), logits.shape[1]))
    hits = best.eq(targets[:, None])
    return {k: hits[:, :k].any(1).sum() for k in ks}


def _scalars(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def check_loggers(extra: str, wandb: str | None = None) -> None:
    """Before a run starts: what :class:`MetricsLog` will import is installed (``extra``: the one that brings
    TensorBoard to this task, ``train`` or ``dense``)."""
    need("tensorboard", extra, "TensorBoard logging")
    if wandb:
        need("wandb", "wandb", "--wandb")


class MetricsLog:
    """Rank 0 writes; the other ranks' calls do nothing.

    ``history``: the rows so far (from the checkpoint when resuming). ``step_key``: the row field
    that orders rows on the TensorBoard axis (``epoch`` or ``iteration``). ``wandb``: a project name,
    or None (Weights & Biases is optional: ``pip install 'metaformer[wandb]'``). ``extra``: the extra that
    installs TensorBoard for this task, named when it is missing.
    """

    def __init__(self, output: Path, main: bool, history: list[dict], step_key: str = "epoch",
                 tensorboard: bool = True, wandb: str | None = None, config: dict | None = None,
                 purge_step: int | None = None, extra: str = "train"):
        self.output, self.main, self.history, self.step_key = Path(output), main, history, step_key
        self.tb = self.wandb = None
        if not main:
            return
        if tensorboard:
            writer = require("torch.utils.tensorboard", extra, "TensorBoard logging").SummaryWriter
            self.tb = writer(str(self.output / "tb"), purge_step=purge_step)
        if wandb:
            self.wandb = require("wandb", "wandb", "--wandb").init(project=wandb, dir=str(self.output),
                                                                 name=self.output.name, config=config,
                                                                 resume="allow")
        self._write()

    def scalar(self, name: str, value: float, step: int) -> None:
        """A point between rows (the training loss every few steps)."""
        if self.tb is not None:
            self.tb.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log({name: value}, step=step)

    def add(self, row: dict) -> None:
        """Record a row (it also joins ``history``) and rewrite the files."""
        self.history.append(row)
        self.update(row)

    def update(self, row: dict) -> None:
        """``row`` (already in ``history``) changed, e.g. an evaluation was added to it."""
        if not self.main:
            return
        step = row.get(self.step_key, len(self.history))
        for key, value in _scalars(row).items():
            if key != self.step_key:
                self.scalar(f"{self.step_key}/{key}", value, step)
        self._write()

    def _write(self) -> None:
        rows = self.history
        atomic_write(self.output / "metrics.jsonl",
                     lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))
        keys = list(dict.fromkeys(k for r in rows for k in _scalars(r)))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write(self.output / "metrics.csv", lambda f: f.write(buf.getvalue().encode()))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss, accuracy and learning rate per epoch of a classification run's ``history``, as a PNG at ``path``."""
    matplotlib = require("matplotlib", "train", "plotting the training curves")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train")
    ax[0].plot(ep, [h["val_loss"] for h in history], label="val")
    ax[0].set_title("loss")
    ax[1].plot(ep, [h["val_top1"] for h in history], label="top-1")
    ax[1].plot(ep, [h["val_top5"] for h in history], label="top-5")
    if "ema_top1" in history[0]:
        ax[1].plot(ep, [h["ema_top1"] for h in history], label="EMA top-1")
    ax[1].set_title("val accuracy (%)")
    ax[2].plot(ep, [h["lr"] for h in history])
    ax[2].set_title("learning rate (end of epoch)")
    for a in ax:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    ax[0].legend()
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
