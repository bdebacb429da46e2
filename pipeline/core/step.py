"""One BYOL optimizer step, plain PyTorch: the Ray worker calls exactly this.

lr, tau   <- schedule(step)                       (global optimizer step, full-run budget)
p, z      <- online(v1, v2);  z' <- target(v1, v2) (no grad)
loss      <- l(p1, z'2) + l(p2, z'1)              (summed)
backward, optimizer.step()                        (DDP all-reduces the gradients)
target    <- tau * target + (1 - tau) * online    (identical on every rank: same weights, same tau)
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform

import torch
from torch import nn

from pipeline.core.models import OnlineNetwork, TargetNetwork, byol_loss, collapse_monitor, update_target
from pipeline.core.optim import set_lr
from pipeline.core.schedules import Schedule
from pipeline.errors import NonFiniteLossError


def unwrap(online: nn.Module) -> OnlineNetwork:
    """The OnlineNetwork inside a DistributedDataParallel wrapper (or itself)."""
    return getattr(online, "module", online)


# CPU flags of bf16 dot-product instructions oneDNN uses for bf16 convolutions and matmuls: Intel AMX, and AVX-512
# BF16 (CPUs that report avx512_bf16, e.g. Intel Cooper Lake, AMD Zen 4). Without them bf16 is emulated and slower
# than fp32 (bench/cpu_precision.py measures both).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flags() -> list[str]:
    """Which of :data:`BF16_CPU_FLAGS` this CPU has (empty off Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: fp32
        return []
    return [flag for flag in BF16_CPU_FLAGS if flag in flags]


def cpu_description(precision: str = "auto") -> str:
    """This CPU for a console line: its model, cores and which precision ``train.precision`` trains in here."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = cpu_bf16_flags()
    kind = f"bf16 instructions ({', '.join(flags)})" if flags else "no bf16 instructions"
    trains = "bf16" if autocast_dtype(precision, torch.device("cpu")) == torch.bfloat16 else "fp32"
    chosen = "" if precision == "auto" else f" (train.precision={precision})"
    return f"{model}, {cores} cores, {kind}: trains in {trains}{chosen}"


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX-512 BF16)."""
    return bool(cpu_bf16_flags())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``train.precision`` on this device: the autocast dtype of the forwards, None for fp32. ``auto`` is decided
    by each worker for its own hardware: on a cluster of mixed machines set bf16 or fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":  # native bf16 from Ampere on; emulated before, and slower than fp32
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
    return torch.bfloat16 if cpu_has_bf16_matmul() else None


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype``, or no context at all for fp32 (None): not one with ``enabled=False``, since
    torch.autocast refuses some device types, the meta device among them, which the tests use to show that a step
    never reads a value back."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype)


def precision_name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"


def compile_forwards(online: nn.Module, target: TargetNetwork) -> None:
    """``torch.compile`` the online (DDP-wrapped or not) and target forwards in place (``train.compile``).

    Only the forwards: the EMA update and the optimizer are already fused foreach ops, and a compiled EMA
    would have to stay bit-identical across ranks. ``dynamic=False``: every step has the same shapes.
    """
    online.compile(dynamic=False)
    target.compile(dynamic=False)


def train_step(
    online: nn.Module,
    target: TargetNetwork,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    step: int,
    schedule: Schedule,
    autocast_dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> dict[str, torch.Tensor | float]:
    """Apply optimizer step number ``step`` (0-based) from one or more micro-batches of two views.

    Gradients of the micro-batches are averaged (gradient accumulation); lr and tau depend only on
    ``step``, so accumulation never advances the schedules. ``loss`` and ``collapse_std`` come back as
    0-dim tensors on the device: nothing here waits for the device unless ``check_finite``, which raises
    :class:`NonFiniteLossError` before a non-finite step is applied (single process). Data-parallel
    callers pass ``check_finite=False`` and decide to stop on all ranks together (a rank that raised
    here alone would leave the others waiting in the gradient all-reduce).
    """
    lr, tau = schedule.lr(step), schedule.tau(step)
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    device_type = micro_batches[0][0].device.type
    total_loss, z_for_monitor = None, None
    for i, (view1, view2) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # DDP: all-reduce gradients only on the last micro-batch.
        sync = contextlib.nullcontext() if last or not hasattr(online, "no_sync") else online.no_sync()
        with sync:
            with autocast(device_type, autocast_dtype):
                p1, p2, z1, _ = online(view1, view2)
                t1, t2 = target(view1, view2)
                loss = byol_loss(p1.float(), p2.float(), t1.float(), t2.float())
            if check_finite and not torch.isfinite(loss).item():
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(f"loss is {loss.item()} at step {step} (lr={lr:.4g}, tau={tau:.6f})")
            (loss / len(micro_batches)).backward()
        part = loss.detach() / len(micro_batches)
        total_loss = part if total_loss is None else total_loss + part
        z_for_monitor = z1
    optimizer.step()
    update_target(target, unwrap(online), tau)
    return {"loss": total_loss, "lr": lr, "tau": tau, "collapse_std": collapse_monitor(z_for_monitor)}
