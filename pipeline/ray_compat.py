"""Every private Ray API this project relies on, in one place, each with why and a fallback.

Ray 2.60 offers no public way to do these things; each is an optimisation or a nicety, never a condition for a
run to work. When an upgraded Ray moves one, the fallback keeps runs working (slower, or noisier) and
``tests/test_ray_compat.py`` fails naming it, so the move is noticed on the upgrade and not in a user's run.
:func:`private_api_status` reports, for each, whether the private path is available.

No module outside this one imports ``ray._private``, ``ray._common``, ``ray._raylet``, ``ray.*._internal``, or
reads the private attributes used here (a test walks the package for them).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------
# Logger names of Ray's private modules whose lines say nothing a user can act on. Filtering a logger that
# no longer exists does nothing, so there is no fallback to write; the test checks the modules exist.
# ---------------------------------------------------------------------------------------------
AUTH_TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"
RUNTIME_ENV_WORKING_DIR_LOGGER = "ray._private.runtime_env.working_dir"
RUNTIME_ENV_PACKAGING_LOGGER = "ray._private.runtime_env.packaging"
DATA_PROGRESS_LOGGER = "ray.data._internal.progress"
LOGGER_MODULES = (
    AUTH_TOKEN_SETUP_LOGGER,
    RUNTIME_ENV_WORKING_DIR_LOGGER,
    RUNTIME_ENV_PACKAGING_LOGGER,
    DATA_PROGRESS_LOGGER,
)


# ---------------------------------------------------------------------------------------------
# Ray Data: execution callbacks (the base class of ``pipeline.data.execution``'s callbacks).
# Why: the only hook into the streaming executor's scheduling loop (to pace it on busy CPUs) and into the
# process where it runs (to drop a console notice). Fallback: a plain base class; the callbacks are then not
# registered (``EXECUTION_CALLBACKS``) and the executor runs as Ray ships it.
# ---------------------------------------------------------------------------------------------
try:
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    EXECUTION_CALLBACKS = True
except ImportError:  # pragma: no cover - only on a Ray that moved it

    class ExecutionCallback:  # type: ignore[no-redef]
        """Stand-in base class: nothing registers callbacks built on it."""

    EXECUTION_CALLBACKS = False


def stream_consumer_waiting(executor: Any) -> bool:
    """Whether a consumer of a streaming execution (a training worker's iterator) waits for its next block.
    Why: the scheduling-loop pause ends early for a waiting consumer. Fallback: False (the pause always applies)."""
    try:
        return executor._output_node[1].num_waiting_consumers > 0  # noqa: SLF001
    except (AttributeError, TypeError, IndexError):
        return False


def start_data_autoscaling_coordinator() -> Any | None:
    """Start Ray Data's cluster-wide autoscaling coordinator actor (a ref to its first answer).
    Why: until it has answered, a stream's executor runs one task at a time. Fallback: None (Ray Data starts it
    itself on the way to the first batch)."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        return get_or_create_autoscaling_coordinator().get_reserved_resources.remote("byol-warm-up")
    except Exception as exc:  # an optimisation only
        warnings.warn(f"Ray Data's autoscaling coordinator not started ahead ({exc!r})", stacklevel=2)
        return None


# ---------------------------------------------------------------------------------------------
# Ray Train
# ---------------------------------------------------------------------------------------------


def train_controller_runtime_env() -> dict | None:
    """The runtime_env Ray Train 2.60 starts its controller with, inherited by its dataset manager, Ray Data's split
    coordinator and the data tasks. Why: Ray reuses an idle worker process only for a task of the same runtime_env,
    so processes warmed for the stream must have it. Fallback: None (no warm-up; the first tasks import torch)."""
    if os.environ.get("RAY_TRAIN_V2_ENABLED") == "0":  # Train V1 starts no controller: nothing to match
        return None
    try:
        from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR as warn_var
        from ray.train.v2._internal.constants import DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE as warn_default
        from ray.train.v2._internal.constants import get_env_vars_to_propagate

        env_vars = dict(get_env_vars_to_propagate())
    except Exception:  # moved, renamed or with another signature: no warm-up
        return None
    env_vars.setdefault(warn_var, warn_default)
    return {"env_vars": env_vars}


@contextlib.contextmanager
def train_bound_to_this_cluster() -> Iterator[bool]:
    """While a TorchTrainer fits: its controller, the controller's detached ``PlacementGroupCleaner`` and its
    workers get ``RAY_ADDRESS`` = the GCS of the cluster this process is connected to. Why: Ray Train 2.60's
    cleaner finds its cluster with "auto" (the State API), which picks the *latest* Ray started on the machine;
    with a second Ray beside a run (another ``byol``, a notebook's ``ray.init()``) it looked for its controller
    there, found none, and removed the run's placement group: the workers died and the run restarted. Train
    propagates only the variables named in ``ENV_VARS_TO_PROPAGATE`` to its controller (and from it to its
    actors and workers), so RAY_ADDRESS is added there and set in this process for the fit's duration.
    Yields whether the pin is in place. Fallback: the fit runs unpinned (False)."""
    import ray

    address = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    try:
        from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

        ENV_VARS_TO_PROPAGATE.add("RAY_ADDRESS")  # a set, read at each fit: the name now travels when it is set
    except Exception:  # moved, renamed or no longer a set: unpinned
        address = None
    if address is None or os.environ.get("RAY_ADDRESS"):  # unpinnable, or a cluster address the user gave
        yield address is not None
        return
    os.environ["RAY_ADDRESS"] = address
    try:
        yield True
    finally:
        os.environ.pop("RAY_ADDRESS", None)  # a later connect() must not mistake it for a cluster to join


def quiet_train_report_logs() -> None:
    """Ray Train logs every ``ray.train.report`` at INFO, a long line per log step, under its context module's file
    name. Why: the progress line says it already. Fallback: the lines stay."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(getattr(context, "__file__", "") or context.__name__).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------
# Ray Tune
# ---------------------------------------------------------------------------------------------
_warned_tune_queue = False


def report_to_tune(callback: Any, result: dict[str, Any]) -> bool:
    """Send a Tune result from a ``TuneReportCallback`` running in Ray Train's controller, between the trial's own
    reports. Why: ASHA can stop a trial at an intermediate kNN evaluation while its fit runs. Fallback: False, with
    one warning (Tune then sees only the trial's own reports, at the end of each chunk)."""
    global _warned_tune_queue
    queue = getattr(callback, "_training_actor_item_queue", None)
    if queue is not None:
        queue.put(result)
        return True
    if not _warned_tune_queue:
        _warned_tune_queue = True
        warnings.warn("this Ray's TuneReportCallback has no result queue: intermediate kNN not sent", stacklevel=2)
    return False


def placement_group_job(placement_group_hex: str) -> str | None:
    """The ID of the job that created a placement group, read from the group's ID. Why: a study counts as stalled
    only on its own waiting placement groups, not another job's on a shared cluster, and the placement group table
    has no job field; Ray's placement group IDs end in their job's ID. Fallback: None (counted as this job's, so
    another job's waiting groups may count too)."""
    import ray

    try:
        id_hex, job_hex = ray.PlacementGroupID.size() * 2, ray.JobID.size() * 2
    except AttributeError:
        return None
    if len(placement_group_hex) != id_hex or job_hex >= id_hex:
        return None
    return placement_group_hex[-job_hex:]


# ---------------------------------------------------------------------------------------------
# Ray Jobs: what ``working_dir`` uploads
# ---------------------------------------------------------------------------------------------


def working_dir_files(root: Path, excludes: list[str], handler: Callable[[Path], None]) -> None:
    """Call ``handler`` on every path Ray would pack for ``working_dir=root`` (Ray's own walk, default excludes,
    ``.gitignore`` and ``.rayignore``). Why: the upload is sized and refused before Ray zips it. Fallback: a plain
    walk with the given excludes as path prefixes (no ignore files read: the count may be larger than Ray's)."""
    try:
        from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE, get_runtime_env_default_excludes
        from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

        seen: list[Path] = []
        _dir_travel(
            root,
            [_get_excludes(root, get_runtime_env_default_excludes() + excludes)],
            seen.append,
            include_gitignore=os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1",
            logger=logging.getLogger("byol.submit.upload"),
        )
    except Exception:  # moved, renamed or with another signature: the plain walk
        seen = [
            path
            for path in sorted(root.rglob("*"))
            if not any(
                (rel := path.relative_to(root).as_posix()) == e.strip("/") or rel.startswith(e.strip("/") + "/")
                for e in excludes
            )
        ]
    for path in seen:
        handler(path)


# ---------------------------------------------------------------------------------------------
# A local Ray's dashboard agent on a free port.
# Why: ``ray.init`` starting a local Ray gives its dashboard agent the fixed port 52365 (``RayParams``' default,
# not an argument of ``ray.init``); a `ray start` head started beside it then cannot start its own agent, and every
# job submitted to that head fails with "No available agent". Ray picks a free port when the value is None (what
# ``ray.cluster_utils.Cluster`` does for its extra nodes). Fallback: the default port, as Ray ships it.
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def local_agent_on_a_free_port() -> Iterator[bool]:
    """While ``ray.init`` starts a local Ray: its ``RayParams`` default the agent's listen port to None (free)."""
    try:
        from ray._private.parameter import RayParams

        defaults = RayParams.__init__.__defaults__
        names = RayParams.__init__.__code__.co_varnames[1 : RayParams.__init__.__code__.co_argcount]
        index = names[-len(defaults) :].index("dashboard_agent_listen_port")
    except (ImportError, AttributeError, ValueError):
        yield False
        return
    patched = list(defaults)
    patched[index] = None
    RayParams.__init__.__defaults__ = tuple(patched)
    try:
        yield True
    finally:
        RayParams.__init__.__defaults__ = defaults


def _source_mentions(module: str, *names: str) -> bool:
    import inspect

    try:
        source = inspect.getsource(importlib.import_module(module))
    except (ImportError, OSError):
        return False
    return all(name in source for name in names)


def _agent_port_default_is_patchable() -> bool:
    with local_agent_on_a_free_port() as patched:
        return patched


def _placement_group_job_reads_its_job() -> bool:
    import ray

    try:
        job = ray.JobID.from_int(7)
        return placement_group_job(ray.PlacementGroupID.of(job).hex()) == job.hex()
    except (AttributeError, TypeError):
        return False


def private_api_status() -> dict[str, bool]:
    """For each private API above: whether this Ray has it where this module looks (all True on Ray 2.60)."""

    def importable(module: str, name: str | None = None) -> bool:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            return False
        return name is None or hasattr(mod, name)

    return {
        "ExecutionCallback": EXECUTION_CALLBACKS,
        "stream_consumer_waiting": _source_mentions("ray.data._internal.execution.streaming_executor", "_output_node")
        and _source_mentions("ray.data._internal.execution.streaming_executor_state", "num_waiting_consumers"),
        "autoscaling_coordinator": importable(
            "ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator",
            "get_or_create_autoscaling_coordinator",
        ),
        "train_env_vars": importable("ray.train.v2._internal.constants", "get_env_vars_to_propagate")
        and importable("ray.train.v2._internal.constants", "DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE")
        and importable("ray._common.constants", "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR")
        and train_controller_runtime_env() is not None,
        "train_report_logger": importable("ray.train.v2._internal.execution.context"),
        "train_propagated_env": importable("ray.train.v2._internal.constants", "ENV_VARS_TO_PROPAGATE")
        and isinstance(importlib.import_module("ray.train.v2._internal.constants").ENV_VARS_TO_PROPAGATE, set)
        and _source_mentions("ray.train.v2._internal.constants", "for env_var in ENV_VARS_TO_PROPAGATE")
        and _source_mentions("ray.train.v2.api.data_parallel_trainer", "get_env_vars_to_propagate()"),
        "tune_result_queue": _source_mentions("ray.tune.integration.ray_train", "self._training_actor_item_queue ="),
        "working_dir_walk": importable("ray._private.runtime_env.packaging", "_dir_travel")
        and importable("ray._private.runtime_env.packaging", "_get_excludes")
        and importable("ray._private.ray_constants", "get_runtime_env_default_excludes")
        and importable("ray._private.ray_constants", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE"),
        "local_agent_port": _agent_port_default_is_patchable(),
        "placement_group_job": _placement_group_job_reads_its_job(),
        **{f"logger {name}": importable(name) for name in LOGGER_MODULES},
    }
