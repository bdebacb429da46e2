"""The worker's progress accounting: the log window's throughput and data wait, the progress line's ETA, and the
run's start-up timeline (where the seconds before the first step go)."""

from __future__ import annotations

import time
from itertools import pairwise
from typing import Any


class Window:
    """Throughput and data-wait accounting between two log steps."""

    def __init__(self) -> None:
        self.start, self.wait, self.images = time.perf_counter(), 0.0, 0

    def rates(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"images_per_s": self.images / elapsed, "data_wait_fraction": min(self.wait / elapsed, 1.0)}


class Eta:
    """Seconds per step for the ETA, measured from the first log step on (the stream's start and the cache's
    filling are not what the remaining steps cost); before the second log step, from the loop's start."""

    def __init__(self, start_step: int) -> None:
        self.start, self.start_step = time.perf_counter(), start_step
        self.origin: tuple[float, int] | None = None  # (perf_counter, step) at the first log step

    def seconds_per_step(self, step: int) -> float:
        now = time.perf_counter()
        if self.origin is None or step <= self.origin[1]:
            self.origin = self.origin or (now, step)
            return (now - self.start) / max(step - self.start_step, 1)
        return (now - self.origin[0]) / (step - self.origin[1])


def print_progress(m: dict[str, Any], stop_step: int, knn: float | None, seconds_per_step: float) -> None:
    knn_text = f"{knn:.3f}" if knn is not None else "-"
    bad = f" bad-records {m['bad_records']:.0f}" if m["bad_records"] else ""
    print(
        f"[byol] step {m['step']}/{stop_step} epoch {m['epoch']:.2f} loss {m['loss']:.4f} knn {knn_text} "
        f"{m['images_per_s']:.0f} img/s data-wait {m['data_wait_fraction']:.0%} collapse {m['collapse_std']:.2f}"
        f"{bad} ETA {format_eta((stop_step - m['step']) * seconds_per_step)}",
        flush=True,
    )


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


_MARKS: dict[str, float] = {}  # this process's start-up marks (the driver's): name -> wall clock


def mark(name: str) -> None:
    """Note that the start-up phase ``name`` ends now (a diagnostic: ``byol --verbose``, the summary's startup_s)."""
    _MARKS[name] = time.time()


def startup_marks() -> dict[str, float]:
    return {"command": process_start_time(), **_MARKS}


def process_start_time() -> float:
    """This process's start (wall clock): the command's start for ``byol pretrain`` / ``byol demo``."""
    import psutil  # a Ray dependency

    return psutil.Process().create_time()


def startup_phases(timeline: dict[str, float]) -> dict[str, float]:
    """Marks (name -> wall clock, in the order they happened) -> seconds each phase took, named by its end."""
    timeline = {k: v for k, v in timeline.items() if v is not None}  # no first step: nothing left to train
    names = sorted(timeline, key=timeline.get)
    return {b: round(timeline[b] - timeline[a], 2) for a, b in pairwise(names)}
