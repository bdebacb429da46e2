"""What the data-parallel ranks must decide together, so that no rank waits for another that has left.

* The EMA targets are compared bit for bit (SHA-256) every ``ema.check_every`` steps.
* Before every step the ranks agree that each of them has a full batch; when one rank's pass over its
  data ends (bad records can leave it fewer batches), every rank ends the epoch at the same step.
* A data error or a non-finite loss on any rank stops every rank at the same step, with the error of
  the rank(s) that saw it: :class:`StopRun`, which the worker turns into the run's result (a retry
  would meet the same data or the same divergence again).

The agreements travel over a gloo process group in host memory, so on GPUs they never wait for
the device; without a process group (one worker) they are local.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.core.models import state_checksum
from pipeline.errors import DataError, NonFiniteLossError, TargetsOutOfSyncError, UserError, user_error_class


class StopRun(Exception):
    """Every rank stops here for the same reason: ``error``, the user error the driver raises as it is."""

    def __init__(self, error: UserError) -> None:
        super().__init__(str(error))
        self.error = error


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class RankSync:
    """Small all-gathers and object exchanges among the training ranks (a no-op for one rank)."""

    def __init__(self) -> None:
        self.world = dist.get_world_size() if _distributed() else 1
        self.rank = dist.get_rank() if _distributed() else 0
        self.group = None
        if self.world > 1:
            # The default group may be NCCL (device memory); decisions are made on the host.
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def gather(self, values: list[float]) -> torch.Tensor:
        """[world, len(values)]: every rank's values, on every rank."""
        mine = torch.tensor([values], dtype=torch.float64)
        if self.world == 1:
            return mine
        rows = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(rows, mine, group=self.group)
        return torch.cat(rows)

    def gather_objects(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def agree_to_step(self, have_batch: bool, error: BaseException | None) -> bool:
        """True when every rank has a batch for this step; False ends the epoch on all ranks.

        A data error on any rank raises :class:`StopRun` on every rank, with that rank's message.
        """
        rows = self.gather([float(have_batch), float(error is not None)])
        if rows[:, 1].any():
            failed = [r for r in range(self.world) if rows[r, 1]]
            messages = self.gather_objects(_error_text(error) if error is not None else None)
            kinds = self.gather_objects(user_error_class(error) if error is not None else DataError)
            first = failed[0]
            raise StopRun(kinds[first](f"rank {first}: {messages[first]}"))
        return bool(rows[:, 0].all())

    def check_finite(self, loss: torch.Tensor, step: int, last_checkpoint_step: int | None) -> None:
        """Raise :class:`StopRun` (NonFiniteLossError) on every rank if the loss is NaN/Inf on any."""
        value = float(loss)
        rows = self.gather([float(torch.isfinite(loss).item()), value if value == value else 0.0])
        if rows[:, 0].all():
            return
        bad = [r for r in range(self.world) if not rows[r, 0]]
        kept = f"step {last_checkpoint_step}" if last_checkpoint_step else "none yet"
        raise StopRun(
            NonFiniteLossError(
                f"loss is {value if self.rank in bad else 'nan'} at step {step} on rank(s) {bad}: training diverged; "
                f"the last good checkpoint is kept ({kept}). Lower optim.base_lr or raise optim.warmup_epochs"
            )
        )

    def total(self, value: float) -> float:
        return float(self.gather([value])[:, 0].sum())


def _error_text(error: BaseException) -> str:
    """The line of an error that says what happened: Ray wraps a data task's error in a traceback and
    retry advice, so the record-level line ("bad record (...) in shard X, key Y") is looked for first."""
    return readable_line(str(error)) or type(error).__name__


def readable_line(text: str) -> str | None:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in lines:
        at = line.find("bad record (")
        if at >= 0:
            return line[at:]
    return lines[-1] if lines else None


def check_targets_in_sync(target: nn.Module, step: int, sync: RankSync | None = None) -> str:
    """All ranks compare a SHA-256 of their target's parameters and buffers; raise on any difference."""
    digest = state_checksum(target)
    sync = sync or RankSync()
    digests = sync.gather_objects(digest)
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise TargetsOutOfSyncError(
            f"EMA targets out of sync at step {step}: rank(s) {differing} differ from rank 0 "
            f"({', '.join(f'rank {r}: {d[:12]}' for r, d in enumerate(digests))})"
        )
    return digest
