"""The run plan: step budget, per-worker batch and schedules, derived from a config and the data size.

A pure function of (config, number of training images), computed where it is used (the driver for
its summary, every worker for its schedules), never shipped frozen: a tuning trial that changes
``optim.base_lr``, ``optim.warmup_epochs`` or ``ema.tau_base`` gets schedules built from its own values
and its own full budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import Config
from pipeline.core.schedules import Schedule, scaled_lr
from pipeline.errors import PlanError


@dataclass(frozen=True)
class RunPlan:
    num_train_images: int
    steps_per_epoch: int  # optimizer steps per pass over the training split
    total_steps: int  # optimizer steps of the whole run: the budget of the tau and LR schedules
    micro_batch: int  # images per worker per micro-step
    schedule: Schedule

    @classmethod
    def from_config(cls, cfg: Config, num_train_images: int, world_size: int | None = None) -> RunPlan:
        t = cfg.train
        world = world_size or t.num_workers
        steps_per_epoch = num_train_images // t.batch_size
        if steps_per_epoch < 1:
            raise PlanError(f"{num_train_images} training images are fewer than train.batch_size={t.batch_size}")
        total = t.epochs * steps_per_epoch
        if t.max_steps is not None:
            total = min(total, t.max_steps)
        schedule = Schedule(
            total_steps=total,
            peak_lr=scaled_lr(cfg.optim.base_lr, t.batch_size),
            warmup_steps=round(cfg.optim.warmup_epochs * steps_per_epoch),
            lr_schedule=cfg.optim.lr_schedule,
            tau_base=cfg.ema.tau_base,
            tau_schedule=cfg.ema.schedule,
            tau_handover=tuple(cfg.ema.handover) if cfg.ema.handover is not None else None,
        )
        return cls(num_train_images, steps_per_epoch, total, t.batch_size // (world * t.grad_accum), schedule)

    def stop_step(self, requested: int | None) -> int:
        """Where a run (or a tuning chunk) stops: ``requested`` (0 is a valid stop) in the budget; None: the end."""
        return self.total_steps if requested is None else min(max(requested, 0), self.total_steps)

    def epochs_to_train(self, start_step: int, stop_step: int | None) -> int:
        """Passes over the data a run from ``start_step`` trains (rounded up; at least 1)."""
        return max(1, -(-(self.stop_step(stop_step) - start_step) // self.steps_per_epoch))

    def summary(self) -> dict[str, Any]:
        """Flat numbers for logs and MLflow params (``plan.*``)."""
        out = {k: v for k, v in asdict(self).items() if k != "schedule"}
        out.update(warmup_steps=self.schedule.warmup_steps, peak_lr=self.schedule.peak_lr)
        return out
