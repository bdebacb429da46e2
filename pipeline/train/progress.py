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
    """Seconds per step for the ETA, measured from the first log step on (the stream's start is not what the
    remaining steps cost); before the second log step, from the loop's start.

    With the decoded cache, the first epoch of an attempt decodes every image while later epochs read the cache:
    until ``fill_until`` the ETA is an upper bound (said so on the progress line), and from there it is measured
    afresh on cached epochs only."""

    def __init__(self, start_step: int, fill_until: int | None = None) -> None:
        self.start, self.start_step = time.perf_counter(), start_step
        self.fill_until = fill_until
        self.origin: tuple[float, int] | None = None  # (perf_counter, step) where the measured interval starts
        self.last = 0.0
        self.upper_bound = False  # the last estimate was measured on steps that filled the cache

    def filling(self, step: int) -> bool:
        """Whether ``step`` reads uncached images (this attempt's first epoch, with the cache on)."""
        return self.fill_until is not None and step <= self.fill_until

    def seconds_per_step(self, step: int) -> float:
        now = time.perf_counter()
        if self.origin is not None and self.filling(self.origin[1] + 1) and not self.filling(step):
            self.origin = (now, step)  # the cache is full: cached steps are measured from here
            return self.last  # until the next log step, the (upper-bound) estimate stands
        if self.origin is None or step <= self.origin[1]:
            self.origin = self.origin or (now, step)
            self.last = (now - self.start) / max(step - self.start_step, 1)
            self.upper_bound = self.filling(self.start_step + 1)
        else:
            self.last = (now - self.origin[0]) / (step - self.origin[1])
            self.upper_bound = self.filling(self.origin[1] + 1)
        return self.last


def print_progress(m: dict[str, Any], stop_step: int, knn: float | None, eta: Eta) -> None:
    knn_text = f"{knn:.3f}" if knn is not None else "-"
    bad = f" bad-records {m['bad_records']:.0f}" if m["bad_records"] else ""
    remaining = format_eta((stop_step - m["step"]) * eta.seconds_per_step(m["step"]))
    eta_text = f"ETA <{remaining} (the first epoch fills the cache)" if eta.upper_bound else f"ETA {remaining}"
    print(
        f"[byol] step {m['step']}/{stop_step} epoch {m['epoch']:.2f} loss {m['loss']:.4f} knn {knn_text} "
        f"{m['images_per_s']:.0f} img/s data-wait {m['data_wait_fraction']:.0%} collapse {m['collapse_std']:.2f}"
        f"{bad} {eta_text}",
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
