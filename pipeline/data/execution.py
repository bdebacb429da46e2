"""Ray Data execution callbacks for the training stream: how its executor (in Ray Train's split coordinator process)
behaves on a machine whose cores are busy training. Registered by ``pipeline.data.ray_dataset.build_train_dataset``;
Ray Data's planner builds them in the executor's process.
"""

from __future__ import annotations

import logging
import time

from ray.data._internal.execution.execution_callback import ExecutionCallback


class SchedulingLoopBackoff(ExecutionCallback):
    """Ray Data 2.60's scheduling loop waits for tasks with ``ray.wait(timeout=0.1)`` only while some task runs;
    when every task is held back because the trainers have not taken its output yet (a cached split makes the
    stream faster than training), the loop spins. On 2 cores busy with training a step takes 3-6 ms, and Ray
    Train's split coordinator spun at 20-58% of a core (measured), taking it from the workers. Steps are
    spaced at least ``MIN_STEP_S`` apart: a step dispatches every task that may start and collects every
    finished one, and a block here holds whole worker batches (seconds of training on a CPU), so 10 steps/s lose
    nothing: at 25 ms the coordinator still took 8.5% of a core in a 2-worker run, at 100 ms 1.2%, data wait 1%."""

    MIN_STEP_S = 0.1

    def __init__(self) -> None:
        self.last = 0.0

    def on_execution_step(self, executor) -> None:  # noqa: ANN001  (Ray's StreamingExecutor)
        wait = self.MIN_STEP_S - (time.perf_counter() - self.last)
        if wait > 0:
            time.sleep(wait)
        self.last = time.perf_counter()


class GpuSchedulingLoopBackoff(SchedulingLoopBackoff):
    """GPU training takes blocks many times faster and its data tasks may finish in tens of milliseconds (cached
    images, crops only): 25 ms, the period before CPU runs went to 100 ms (GPU input not measured at either)."""

    MIN_STEP_S = 0.025


class NoProgressBarNotice(ExecutionCallback):
    """Ray Data warns, in the split coordinator's process, that progress bars are off ("Progress bars disabled. To
    enable..."): they are off on purpose (the training progress line says it), so the line is dropped there. An
    execution callback, because callbacks are built in the executor's process before its progress manager."""

    def __init__(self) -> None:
        logging.getLogger("ray.data._internal.progress").addFilter(_not_progress_bar_notice)


def _not_progress_bar_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Progress bars disabled")
