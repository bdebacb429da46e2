"""Pure schedule functions of the global optimizer step, computed from the full step budget.

``total_steps`` is always the whole run's number of optimizer steps (not an epoch, not a tuning
rung, not micro-steps): a resumed run passes the same total and its saved step, so tau and the
learning rate continue exactly where they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def tau_at(step: int, total_steps: int, tau_base: float, schedule: str = "cosine") -> float:
    """EMA momentum: tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2, so tau_0 = tau_base, tau_K = 1."""
    if schedule == "constant":
        return tau_base
    if schedule != "cosine":
        raise ValueError(f"unknown ema schedule {schedule!r} (allowed: cosine, constant)")
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int, schedule: str = "cosine") -> float:
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then decay to 0 at ``total_steps``.

    cosine: half-cosine; linear: straight line; step: x0.1 at 50% and 75% of the decay phase;
    constant: stays at ``peak_lr``.
    """
    if schedule not in ("cosine", "linear", "step", "constant"):
        raise ValueError(f"unknown lr schedule {schedule!r} (allowed: cosine, linear, step, constant)")
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    if schedule == "cosine":
        return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return peak_lr * (1.0 - progress)
    if schedule == "step":
        return peak_lr * (0.1 ** ((progress >= 0.5) + (progress >= 0.75)))
    return peak_lr  # constant


def scaled_lr(base_lr: float, global_batch_size: int) -> float:
    """The linear scaling rule of the paper: lr = base_lr * batch / 256."""
    return base_lr * global_batch_size / 256


@dataclass(frozen=True)
class Schedule:
    """Everything the training step needs to know about time: one object, built once per run."""

    total_steps: int
    peak_lr: float
    warmup_steps: int
    lr_schedule: str
    tau_base: float
    tau_schedule: str
    # (from_step, from_tau, blend_steps): a PBT exploit copied another trial's state at from_step, where that
    # trial's tau was from_tau, and mutated tau_base. tau goes on from exactly from_tau (no jump in the target's
    # update rate) and joins this schedule's own curve linearly over blend_steps.
    tau_handover: tuple[int, float, int] | None = None

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.peak_lr, self.warmup_steps, self.lr_schedule)

    def tau(self, step: int) -> float:
        own = tau_at(step, self.total_steps, self.tau_base, self.tau_schedule)
        if self.tau_handover is None or step < self.tau_handover[0]:
            return own
        from_step, from_tau, blend_steps = self.tau_handover
        gap = from_tau - tau_at(from_step, self.total_steps, self.tau_base, self.tau_schedule)
        weight = max(0.0, 1.0 - (step - from_step) / max(blend_steps, 1))
        return min(1.0, own + gap * weight)
