"""Optimizers: LARS (You et al. 2017, as used by BYOL), SGD and AdamW, with BYOL's parameter groups.

Biases and normalisation parameters (every parameter with ndim <= 1) get no weight decay and no
LARS trust-ratio adaptation, as in the paper.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pipeline.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, LARS-adapted) and biases/norm parameters (neither)."""
    decayed, excluded = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (excluded if param.ndim <= 1 else decayed).append(param)
    return [
        {"params": decayed, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with momentum where each weight tensor's step is scaled by its trust ratio.

    For a non-excluded parameter w with gradient g:
        g' = g + wd * w
        ratio = eta * ||w|| / ||g'||   (1 when either norm is 0)
        v = momentum * v + lr * ratio * g'
        w = w - v
    Excluded parameters (``lars_exclude=True`` in their group) use ratio 1 and no weight decay.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, lars_exclude=False
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad
                if not group["lars_exclude"]:
                    if group["weight_decay"]:
                        g = g.add(w, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
                    ratio = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["trust_coefficient"] * w_norm / g_norm,
                        torch.ones_like(w_norm),
                    )
                    g = g * ratio
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(w)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(g, alpha=group["lr"])
                w.sub_(buf)
        return loss


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The configured optimizer over ``model``; ``lr`` is replaced every step by the schedule."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=False)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {cfg.name!r} (allowed: lars, sgd, adamw)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
