"""What Ray's dataset processes load of the training stream's plan: its map (named here, imported where it runs)
and the execution callbacks that shape how its executor behaves on a machine whose cores are busy training.

Ray Train's dataset manager and Ray Data's split coordinator (one process each, started one after the other
on the way to the first training step) unpickle the plan but never run the map. Everything the plan holds,
this module, ``pipeline.config`` and ``pipeline.data.read_units``, is kept free of torch: importing torch costs
seconds of CPU in each of them. Registered by ``pipeline.data.ray_dataset.build_train_dataset``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.ray_compat import DATA_PROGRESS_LOGGER, ExecutionCallback, stream_consumer_waiting


class TwoViewBatches:
    """The stream's map, ``pipeline.data.two_views.two_view_batches``, imported in the data task that first calls
    it (a plain function would be pickled by reference and imported, with torch, wherever the plan is loaded)."""

    def __call__(self, items: dict[str, np.ndarray], **kwargs: Any) -> Iterator[dict[str, np.ndarray]]:
        from pipeline.data.two_views import two_view_batches

        return two_view_batches(items, **kwargs)


class SchedulingLoopBackoff(ExecutionCallback):
    """Ray Data 2.60's scheduling loop waits for tasks with ``ray.wait(timeout=0.1)`` only while some task runs;
    when every task is held back because the trainers have not taken its output yet (a cached split makes the
    stream faster than training), the loop spins. On 2 cores busy with training a step takes milliseconds, and Ray
    Train's split coordinator spun on a core, taking it from the workers. So steps are spaced
    ``MIN_STEP_S`` apart: a step dispatches every task that may start and collects every finished one, and a block
    here holds whole worker batches (seconds of training on a CPU), so a few steps a second lose nothing
    (``bench/stream_pause.py`` and ``docs/benchmarks.md`` measure the choices).

    A consumer waiting for a block (a stream slower than its consumer: Ray Data alone in bench/stream_pause.py)
    ends the pause early, though not before ``WAITING_MIN_STEP_S``: a consumer may wait for a block the executor
    cannot make yet (another split's queue is full until its worker takes a batch), and the loop must not spin
    freely then either."""

    MIN_STEP_S = 0.1
    WAITING_MIN_STEP_S = 0.01
    POLL_S = 0.01

    def __init__(self) -> None:
        self.last = 0.0

    def on_execution_step(self, executor) -> None:  # noqa: ANN001  (Ray's StreamingExecutor)
        floor, until = self.last + self.WAITING_MIN_STEP_S, self.last + self.MIN_STEP_S
        while (now := time.perf_counter()) < until and (now < floor or not stream_consumer_waiting(executor)):
            time.sleep(min(self.POLL_S, until - now))
        self.last = time.perf_counter()


class GpuSchedulingLoopBackoff(SchedulingLoopBackoff):
    """GPU training takes blocks many times faster and its data tasks may finish in tens of milliseconds (cached
    images, crops only): a shorter pause."""

    MIN_STEP_S = 0.025


class NoProgressBarNotice(ExecutionCallback):
    """Ray Data warns, in the split coordinator's process, that progress bars are off ("Progress bars disabled. To
    enable..."): they are off on purpose (the training progress line says it), so the line is dropped there. An
    execution callback, because callbacks are built in the executor's process before its progress manager."""

    def __init__(self) -> None:
        logging.getLogger(DATA_PROGRESS_LOGGER).addFilter(_not_progress_bar_notice)


def _not_progress_bar_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Progress bars disabled")
