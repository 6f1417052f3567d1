"""What a detection run and a segmentation run share, on top of :mod:`metaformer.engine`.

:class:`DenseRun` holds a run's moving parts (the model and its DDP wrapper, the AdamW of the
paper's mmdet/mmseg configs, the AMP scaler, the position in the schedule, the history) and
does the things both loops do the same way: resume from the run folder's checkpoint, start a pass over
the data at a given batch, take a step that refuses a NaN loss, save a checkpoint every rank
agrees on, and evaluate only after the step's checkpoint is on disk (an evaluation that dies
is redone on resume). The loops themselves, the schedules and the metrics are the tasks'
(:mod:`metaformer.tasks.detection`, :mod:`metaformer.tasks.segmentation`).

Exact resume, as in classification: each pass over the data re-seeds python/numpy/torch from
``(seed, pass, rank)`` and shuffles by pass; each image's crops and flips are seeded by the image
(:class:`~metaformer.data.PerSampleSeeds`), whatever DataLoader worker reads it; a checkpoint taken
mid-pass holds every rank's RNG streams, so a resumed run, with any number of workers, draws the
same crops, flips and sampled RoIs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from ... import data as D
from ...engine.loop import (check_finite, check_weights_finite, optimizer_step, report_unreadable, stop_requested,
                            wrap_ddp)
from ...engine.metrics import MetricsLog, check_loggers
from ...engine.run import RunDir
from ...engine.runtime import Runtime, epoch_seed, rng_state, seed_everything, set_rng_state
from ...engine.stop import GracefulStop, Interrupted


class DenseRun:
    """One detection or segmentation run. ``meta``: what eval/predict need to rebuild the model from
    the checkpoint alone (the architecture's config, class names...), saved with every checkpoint."""

    def __init__(self, task: str, cfg: Any, rt: Runtime, folder: RunDir, ckpt: dict | None, model: torch.nn.Module,
                 meta: dict, step_key: str):
        self.task, self.cfg, self.rt, self.folder, self.meta = task, cfg, rt, folder, meta
        self.output = Path(cfg.output)
        self.model = model.to(rt.device)
        self.ddp = wrap_ddp(self.model, rt)
        # As the paper's mmdet/mmseg configs: one AdamW group, weight decay on every parameter.
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp == "fp16")
        self.epoch = self.step_in_epoch = self.iteration = 0  # passes finished, batches into this pass, steps
        self.history: list[dict] = []
        self.pending_eval = False
        self.sums: dict[str, float] = {}  # loss sums since the last row
        self.steps = 0
        self.rng = None  # this rank's RNG streams at a mid-pass checkpoint
        if ckpt:
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.epoch, self.step_in_epoch, self.iteration = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["iteration"]
            self.history, self.pending_eval = list(ckpt["history"]), ckpt["pending_eval"]
            self.sums, self.steps = dict(ckpt["sums"]), ckpt["steps"]
            rngs = ckpt.get("rng")  # one state per rank
            if self.step_in_epoch and len(rngs or ()) == rt.world:
                self.rng = rngs[rt.rank]
            elif self.step_in_epoch:
                rt.log(f"resume: the checkpoint was written by {len(rngs or ())} process(es), this run has "
                       f"{rt.world}: the data order of this pass is kept, its random augmentation restarts")
            rt.log(f"resumed from {folder.resume_path()}: pass {self.epoch + 1}, batch {self.step_in_epoch}, "
                   f"iteration {self.iteration}")
        folder.started = lambda: self.iteration > 0  # a failure before the first step leaves no folder behind
        self.metrics = MetricsLog(self.output, rt.main, self.history, step_key, wandb=cfg.wandb,
                                  config=dataclasses.asdict(cfg), purge_step=self.iteration or None, extra="dense")
        self.unreadable = D.UnreadableLog()
        self.stop: GracefulStop | None = None

    @staticmethod
    def train_in_folder(cfg: Any, rt: Runtime, train: Callable[[RunDir], list[dict]]) -> list[dict]:
        """``train(folder)`` inside the run's folder (:class:`~metaformer.engine.run.RunDir`, checked with the
        loggers' packages before any work); the process's runtime closed after; the history ``train`` returns."""
        check_loggers("dense", cfg.wandb)
        folder = RunDir(cfg.output, cfg.resume, cfg.overwrite, rt)
        folder.check()
        with folder:
            history = train(folder)
        rt.close()
        return history

    # ------------------------------------------------------------------------------------ the loop's parts

    def loader(self, dataset, collate: Callable):
        """The batches of pass ``self.epoch`` from batch ``self.step_in_epoch`` on, this rank's share; seeds the pass."""
        cfg, rt = self.cfg, self.rt
        seed = epoch_seed(cfg.seed, self.epoch, rt.rank)
        seed_everything(seed)
        if self.rng is not None:  # mid-pass resume: continue the interrupted streams
            set_rng_state(self.rng)
            self.rng = None
        full = len(dataset) >= cfg.batch_size * rt.world  # else one short batch per pass
        dataset = D.PerSampleSeeds(dataset, seed)
        sampler = D.ResumableDistributedSampler(dataset, num_replicas=rt.world, rank=rt.rank, shuffle=True,
                                                seed=cfg.seed, drop_last=full)
        sampler.set_epoch(self.epoch, start=self.step_in_epoch * cfg.batch_size)
        return D.make_loader(dataset, cfg.batch_size, sampler, cfg.workers, drop_last=full,
                             generator=torch.Generator().manual_seed(seed), pin_memory=rt.device.type == "cuda",
                             collate_fn=collate)

    def batches_per_pass(self, dataset) -> int:
        return max(1, len(dataset) // (self.cfg.batch_size * self.rt.world))

    def has_data(self, n: int) -> bool:
        """Whether every rank's batch holds an image (DDP needs every rank in every backward pass)."""
        return not self.rt.any_rank(n == 0)

    def step(self, losses: dict[str, torch.Tensor], lr: float, where: str) -> None:
        """One optimizer step at ``lr``; a NaN or infinite loss (on any rank) stops the run before it is applied."""
        loss = sum(losses.values())
        mean = self.rt.all_reduce_sum(loss.detach().float().reshape(1).clone()).item() / self.rt.world
        check_finite(mean, where, self.output, self.rt.amp)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        optimizer_step(self.opt, self.scaler)
        for k, v in {**losses, "loss": loss}.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
        self.steps += 1
        self.iteration += 1

    def take_means(self) -> dict:
        """The mean losses since the last call."""
        means = {k: v / max(self.steps, 1) for k, v in self.sums.items()}
        self.sums, self.steps = {}, 0
        return means

    def end_of_batch(self) -> None:
        """After each batch: Ctrl-C/SIGTERM (on any rank) saves here and stops."""
        if stop_requested(self.rt, self.stop):
            path = self.save()
            raise Interrupted(f"stopped by {self.stop.signal or 'another rank'} at iteration {self.iteration}; saved "
                              f"{path}. Continue with the same command plus --resume auto")

    def skipped(self, where: str) -> list:
        """The unreadable files since the last call (every rank's), listed on the console."""
        bad = self.unreadable.end_epoch()
        report_unreadable(self.rt.log, bad, where)
        return bad

    # ------------------------------------------------------------------------------------ saving, evaluating

    def save(self, pending_eval: bool = False) -> Path:
        """Write ``last.pth`` (collective: every rank gives its RNG streams; rank 0 writes)."""
        check_weights_finite(self.model, f"iteration {self.iteration}", self.output)
        rngs = self.rt.gather(rng_state())
        self.folder.save({"task": self.task, **self.meta, "model": self.model.state_dict(),
                          "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                          "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "iteration": self.iteration,
                          "history": self.history, "pending_eval": pending_eval, "sums": self.sums,
                          "steps": self.steps, "config": dataclasses.asdict(self.cfg), "rng": rngs,
                          "world_size": self.rt.world})
        return self.output / "last.pth"

    def evaluate_into(self, row: dict, evaluate: Callable[[], dict]) -> None:
        """Evaluate (the state is already saved, marked pending), add the results to ``row``, save again."""
        res = evaluate()
        bad = res.pop("unreadable")
        report_unreadable(self.rt.log, bad, "in the validation set")
        row.update(res, val_unreadable=len(bad))
        self.metrics.update(row)
        self.save()
        self.ddp.train()

    def redo_pending_eval(self, evaluate: Callable[[], dict] | None) -> None:
        """A run killed during an evaluation: evaluate the saved state now, into the last row."""
        if self.pending_eval and evaluate is not None and self.history:
            self.rt.log(f"resume: evaluating iteration {self.iteration}, whose evaluation did not finish")
            self.evaluate_into(self.history[-1], evaluate)

    def close(self) -> list[dict]:
        """End the run's logs (the folder is closed by its :class:`~metaformer.engine.run.RunDir`)."""
        self.metrics.close()
        return self.history
