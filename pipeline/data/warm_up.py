"""Processes and actors the training stream needs, started ahead of it: Ray worker processes with its modules
imported (``warm_data_workers``) and Ray Data's autoscaling coordinator. Each of them otherwise starts on the way to
the first batch or holds the stream to one task (docs/design.md, "Start-up path").
"""

from __future__ import annotations

import os

import ray

from pipeline.ray_compat import start_data_autoscaling_coordinator


def _import_data_modules() -> int:
    import torchvision.io  # noqa: F401  (the first decode's import, with torch._dynamo)

    import pipeline.data.ray_dataset  # noqa: F401  (torch, pyarrow)

    return os.getpid()


def warm_data_workers(count: int | None = None, runtime_env: dict | None = None) -> list[ray.ObjectRef]:
    """Start ``count`` (default: the free CPUs) Ray worker processes now, with the stream's module, torch and
    torchvision imported (seconds of CPU each): the stream's first tasks otherwise pay it before the first batch.
    Returns at once (refs to the processes' pids). Ray gives an idle process to a later task of the same
    ``runtime_env`` only: to serve Ray Train's data tasks, pass what its controller runs with
    (``ray_compat.train_controller_runtime_env``). Ray Data's autoscaling coordinator is started too
    (``ray_compat.start_data_autoscaling_coordinator``): until it answers, a stream runs one data task at a time."""
    start_data_autoscaling_coordinator()
    if count is None:
        count = min(max(1, int(ray.available_resources().get("CPU", 1))), 16)
    # num_cpus=0: takes no CPU the worker group may be waiting for
    warm = ray.remote(num_cpus=0, runtime_env=runtime_env)(_import_data_modules)
    return [warm.remote() for _ in range(count)]
