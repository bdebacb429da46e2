"""Connecting to Ray: the one place that decides the CPU budget of a local cluster.

Ray Train reserves its workers' CPUs, and Ray Data's tasks (each read starts with a ``ListFiles``
task that needs one whole free CPU) get only what is left. On a 2-core laptop with 2 train workers
that is nothing, and reads hang ("Cluster resources are not enough to run any task from
ReadFiles..."). So a local cluster this project starts is given the machine's cores PLUS the train
workers' reservation as logical CPUs: Ray Data keeps one core's worth of budget per real core for
decoding and augmentation, and the operating system shares the real cores between them. On a real
cluster nothing is changed: size it so CPUs are left over for Ray Data (docs/design.md).
"""

from __future__ import annotations

import logging
import os
import sys

import ray

from pipeline.errors import ConfigError
from pipeline.ray_compat import AUTH_TOKEN_SETUP_LOGGER, local_agent_on_a_free_port, quiet_train_report_logs

QUIET_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # otherwise worker prints show twice
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # The Train controller polls its workers at this interval: 2 s by default, paid at the start and end of every
    # fit (a tuning study fits once per trial chunk). Propagated by Ray Train from the driver to the controller.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Ray Train 2.60's own DatasetManager sets a Ray Data option Ray Data 2.60 deprecates: a warning in every run's
    # console that no user can act on. Only that message (a literal prefix); a user's own PYTHONWARNINGS wins.
    "PYTHONWARNINGS": "ignore:`ExecutionOptions.exclude_resources` is deprecated",
}


def available_cpus() -> int:
    """Cores this process may use: CPU affinity and a cgroup (container) quota, not the host's count."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def local_num_cpus(train_workers: int, cpus_per_worker: float) -> int:
    return available_cpus() + int(round(train_workers * cpus_per_worker + 0.49))


def cluster_address() -> str | None:
    """The cluster RAY_ADDRESS names: None when unset or ``local`` (Ray's word for "start a new one"). The one
    reading of RAY_ADDRESS for running work (pretrain, tune, and prepare and embed on Ray); byol submit reads it as
    a job server."""
    address = os.environ.get("RAY_ADDRESS") or None
    if job_server_address(address):
        raise ConfigError(
            f"RAY_ADDRESS={address} is a job server (what byol submit and byol jobs use); to run here on that "
            "cluster give its GCS address (RAY_ADDRESS=HEAD:6379), or unset RAY_ADDRESS for a local Ray "
            "(byol prepare and byol embed: or --parallel off, this process)"
        )
    return None if address == "local" else address


def job_server_address(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def on_ray(parallel: str, worth_it_here: bool) -> bool:
    """``--parallel`` of prepare and embed: ``ray`` always, ``off`` never, ``auto`` on a cluster (RAY_ADDRESS, or a
    Ray this process already joined) or when ``worth_it_here`` (the command's own reason on one machine). Under
    ``auto`` a job server's address in RAY_ADDRESS (a shell set up for ``byol submit``) means this process, said
    on one line: the command was run here, not submitted."""
    if parallel not in ("auto", "ray", "off"):
        raise ConfigError(f"parallel={parallel!r}: give auto, ray or off")
    if parallel != "auto":
        return parallel == "ray"
    if ray.is_initialized():
        return True
    address = os.environ.get("RAY_ADDRESS")
    if job_server_address(address):
        print(
            f"[byol] RAY_ADDRESS={address} is a job server: running in this process on this machine "
            "(`byol submit -- prepare|embed ...` runs it on that cluster)",
            file=sys.stderr,
            flush=True,
        )
        return False
    return bool(cluster_address()) or worth_it_here


def connect(train_workers: int = 1, cpus_per_worker: float = 1.0, **init_kwargs) -> bool:
    """Join the cluster in RAY_ADDRESS, or the Ray already running on this machine (`ray start`), or start a
    local one (dashboard on 127.0.0.1 only; ``RAY_ADDRESS=local`` always starts one). Says which on one line.

    Returns True when this call started a local cluster (the caller shuts it down).
    """
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if not verbose():  # Ray Data's execution plan, start and end lines (its ray-data.log too: --verbose keeps them)
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
        logging.getLogger(AUTH_TOKEN_SETUP_LOGGER).addFilter(_not_auth_on_notice)
    if ray.is_initialized():
        return False
    address = cluster_address()
    if address:
        ray.init(**init_kwargs)
        _say_which_ray(f"joined the cluster at RAY_ADDRESS={address}")
        return False
    try:
        with local_agent_on_a_free_port():  # never the fixed port a `ray start` beside it would need
            ray.init(
                num_cpus=local_num_cpus(train_workers, cpus_per_worker),
                # State API: Train cleans up placement groups. BYOL_RAY_DASHBOARD=0 where its packages are missing.
                include_dashboard=init_kwargs.pop(
                    "include_dashboard", os.environ.get("BYOL_RAY_DASHBOARD", "1") != "0"
                ),
                dashboard_host="127.0.0.1",
                log_to_driver=init_kwargs.pop("log_to_driver", True),
                **init_kwargs,
            )
    except ValueError as exc:
        # A head started on this machine with `ray start` is joined as it is; its CPUs were sized by whoever
        # started it ("When connecting to an existing cluster, num_cpus ... must not be provided").
        if "existing cluster" not in str(exc):
            raise
        # Nor custom resources (a study's tune_driver): the head declares its own; the study then counts them.
        ray.init(**{k: v for k, v in init_kwargs.items() if k != "resources"})
        _say_which_ray(
            "joined the Ray already running on this machine (started with `ray start`); "
            "RAY_ADDRESS=local starts a separate one for this run"
        )
        return False
    _say_which_ray("started a local Ray for this run")
    return True


def _say_which_ray(what: str) -> None:
    resources = ray.cluster_resources()
    print(
        f"[byol] Ray: {what}: {ray.get_runtime_context().gcs_address}, {resources.get('CPU', 0):g} CPUs"
        + (f", {resources['GPU']:g} GPUs" if resources.get("GPU") else ""),
        file=sys.stderr,
        flush=True,
    )


def _not_auth_on_notice(record: logging.LogRecord) -> bool:
    """Ray 2.60 warns at every new local cluster that token authentication is on (its new default): nothing to act
    on. The warning that it is OFF ("Anyone with network access...") stays."""
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def verbose() -> bool:
    """``byol --verbose`` / ``BYOL_VERBOSE=1``: Ray's own INFO lines stay on the console."""
    return os.environ.get("BYOL_VERBOSE") == "1"


def train_log_level() -> str:
    """Ray Train's console level (its ``RunConfig.logging_config``): the worker group's start, "Moving model to
    device", every checkpoint are INFO lines; the progress line, warnings and errors stay."""
    return "INFO" if verbose() else "WARNING"


def quiet_report_logs() -> None:
    """Ray Train logs every ``ray.train.report`` at INFO ("Reporting training result N: ..."), a long line per log
    step on the console; kept at WARNING unless ``BYOL_VERBOSE=1``."""
    if not verbose():
        quiet_train_report_logs()
