"""Processes and actors the training stream needs, started ahead of it: Ray worker processes with its modules
imported (``warm_data_workers``) and Ray Data's autoscaling coordinator. Each of them otherwise starts on the way to
the first batch or holds the stream to one task (measured figures in the docstrings; README "Start-up").
"""

from __future__ import annotations

import os
import warnings

import ray


def _import_data_modules() -> int:
    import torchvision.io  # noqa: F401  (the first decode's import: ~1.5 s, torch._dynamo)

    import pipeline.data.ray_dataset  # noqa: F401  (torch, pyarrow)

    return os.getpid()


def start_autoscaling_coordinator() -> ray.ObjectRef | None:
    """Start Ray Data's cluster-wide ``AutoscalingCoordinator`` actor now if it is not running (a ref to its first
    answer; None where Ray Data's internals moved).

    Ray Data 2.60 sizes an execution from what this named, detached actor reserves for it, and creates it if no one
    has (Ray Train's controller does at its start, so training streams find it running). Until that new process is
    up and has answered, the executor's resource limits are zero and it runs one task at a time: in a stream of its
    own (the benchmarks, a user's pipeline) the second worker process took its first task 3.0-3.1 s after the first
    on 2 cores, 1.0-1.1 s with the actor started beforehand (bench/stream_start.py)."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        return get_or_create_autoscaling_coordinator().get_reserved_resources.remote("byol-warm-up")
    except Exception as exc:  # an optimisation only: a Ray upgrade that moved it must not stop a run
        warnings.warn(f"Ray Data's autoscaling coordinator not started ahead ({exc!r})", stacklevel=2)
        return None


def warm_data_workers(count: int | None = None, runtime_env: dict | None = None) -> list[ray.ObjectRef]:
    """Start ``count`` (default: the free CPUs) Ray worker processes now, with the stream's module, torch and
    torchvision imported (~4 CPU-seconds each): the stream's first tasks otherwise pay it before the first batch.
    Returns at once (refs to the processes' pids). Ray gives an idle process to a later task of the same
    ``runtime_env`` only: to serve Ray Train's data tasks, pass what its controller runs with
    (``cluster.train_runtime_env``). Ray Data's autoscaling coordinator is started too
    (``start_autoscaling_coordinator``): until it answers, a stream runs one data task at a time."""
    start_autoscaling_coordinator()
    if count is None:
        count = min(max(1, int(ray.available_resources().get("CPU", 1))), 16)
    # num_cpus=0: takes no CPU the worker group may be waiting for
    warm = ray.remote(num_cpus=0, runtime_env=runtime_env)(_import_data_modules)
    return [warm.remote() for _ in range(count)]
