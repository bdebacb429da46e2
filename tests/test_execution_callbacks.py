"""Ray Data execution callbacks of the training stream (pipeline.data.execution), without a cluster."""

import threading
import time
from types import SimpleNamespace

from pipeline.data.execution import SchedulingLoopBackoff


class Backoff(SchedulingLoopBackoff):
    MIN_STEP_S = 0.4
    WAITING_MIN_STEP_S = 0.1


def executor(waiting: int) -> SimpleNamespace:
    """The part of Ray Data's StreamingExecutor the backoff reads: the output operator's state."""
    return SimpleNamespace(_output_node=(None, SimpleNamespace(num_waiting_consumers=waiting)))


def seconds_of_second_step(callback: SchedulingLoopBackoff, executor_like) -> float:
    callback.on_execution_step(executor_like)  # the first step: nothing before it to space from
    start = time.perf_counter()
    callback.on_execution_step(executor_like)
    return time.perf_counter() - start


def test_steps_are_spaced_while_no_consumer_waits():
    assert seconds_of_second_step(Backoff(), executor(waiting=0)) >= 0.39


def test_a_waiting_consumer_ends_the_pause_after_the_floor():
    # the floor: a consumer may wait for a block the executor cannot make yet, and the loop must not spin then
    assert 0.09 <= seconds_of_second_step(Backoff(), executor(waiting=1)) < 0.3
    # a consumer that starts waiting during the pause ends it within a poll
    state = SimpleNamespace(num_waiting_consumers=0)
    callback, running = Backoff(), SimpleNamespace(_output_node=(None, state))
    callback.on_execution_step(running)
    start = time.perf_counter()
    timer = threading.Timer(0.15, lambda: setattr(state, "num_waiting_consumers", 1))
    timer.start()
    callback.on_execution_step(running)
    timer.join()
    assert 0.14 <= time.perf_counter() - start < 0.35


def test_an_executor_that_does_not_say_gets_the_pause():
    assert seconds_of_second_step(Backoff(), SimpleNamespace()) >= 0.39
