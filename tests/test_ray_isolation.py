"""One Ray never harms another: a run keeps its workers when a second Ray instance is started on the machine.

Ray Train 2.60's placement-group cleaner finds "its" cluster with "auto", i.e. the latest Ray started here; without
``ray_compat.train_bound_to_this_cluster`` it looked for its controller in the newer cluster, found none and removed
the run's placement group (the workers died; with ``run.max_failures=0`` the run fails).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline import ray_compat
from tests.netutil import free_port, stop_ray_head, wait_for_port

BIN = Path(sys.executable).parent
LATEST = Path("/tmp/ray/ray_current_cluster")  # where `ray start` records the latest cluster ("auto" reads it)


def start_second_ray() -> tuple[subprocess.Popen, int]:
    """A second head with Ray's default temp dir (so "auto" resolves to it: the latest) and free ports of its own."""
    port, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    ports = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port")
    ports += ("runtime-env-agent-port", "ray-client-server-port")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=0", "--disable-usage-stats"]
        + ["--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true"]
        + [f"--{name}={free_port()}" for name in ports],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not recorded_as_latest(port):
        time.sleep(0.5)  # `ray start` records itself as the latest cluster once it is up
    if not wait_for_port(dash, 1) or not recorded_as_latest(port):
        stop_second_ray(proc, port)
        pytest.fail("the second Ray head did not start")
    return proc, port


def recorded_as_latest(port: int) -> bool:
    try:
        return f":{port}" in LATEST.read_text()
    except OSError:
        return False


def stop_second_ray(proc: subprocess.Popen, port: int) -> None:
    """What Ray daemonised of it is found by its GCS port (it shares Ray's default temp dir). Its record as the
    latest cluster goes too: a stale one would make every later `ray.init()` on the machine try to join it."""
    markers = (f"--gcs_server_port={port}", f":{port}")
    left = stop_ray_head(proc, lambda line: "ray" in line and any(m in line for m in markers))
    if recorded_as_latest(port):
        LATEST.unlink()
    assert not left, left


def which_ray_a_new_command_uses() -> str:
    """What a new byol command prints when it connects (its own process, no RAY_ADDRESS)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code = "import ray; from pipeline.train.cluster import connect; connect(); ray.shutdown()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


def test_a_local_ray_started_by_byol_leaves_the_default_agent_port_free(ray_local):
    """A `ray start` head started beside a byol run needs the fixed agent port 52365 (else: "No available agent"
    for every job submitted to it): the local Ray byol started took a free one (``ray_compat``)."""
    from ray._private.worker import global_worker

    assert global_worker.node.dashboard_agent_listen_port not in (None, 0, 52365)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_second_ray_started_during_a_study_leaves_every_trial_whole(ray_local, fmnist_full_shards, tmp_path):
    """The cases seen: a run lost its workers when a second Ray was started beside it, and a study started beside
    another Ray had its trials' placement groups left behind and its next trials' workers timing out for good.
    Here the second Ray comes up while the first of two trials (each a Ray Train run, as `byol pretrain` runs it)
    trains, one trial at a time, so the second trial's workers start beside it. No worker may be lost (no restart
    allowed: a lost worker fails its trial); every trial trains its whole budget; nothing is left behind."""
    import threading

    from ray.util import placement_group_table

    from pipeline.tune.space import load_study
    from pipeline.tune.study import run_study
    from tests.test_tune import STEPS_PER_EPOCH, study_file

    assert ray_compat.private_api_status()["train_propagated_env"]  # the pin's private API still works
    every = 60 / STEPS_PER_EPOCH
    space = {"optim.base_lr": {"type": "grid", "values": [0.5, 1.0]}}
    tune = {"name": "beside", "searcher": "grid", "scheduler": "fifo", "max_concurrent_trials": 1}
    path = study_file(tmp_path, fmnist_full_shards, {**tune, "report_every_epochs": every, "space": space})
    study = yaml.safe_load(path.read_text())
    study["train"]["max_steps"] = 120
    study["run"]["max_failures"] = 0  # a lost worker fails its trial
    path.write_text(yaml.safe_dump(study))
    trials = tmp_path / "runs" / "beside" / "trials"
    second: dict = {}
    before = set(placement_group_table())  # groups of earlier tests (removed ones stay listed)
    study_over = threading.Event()

    def start_while_training() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not study_over.is_set() and not (trials.is_dir() and any(trials.iterdir())):
            time.sleep(0.2)  # the first trial's Ray Train run has started
        if study_over.is_set():  # the study failed first: start nothing the test would not stop
            return
        try:
            second["head"] = start_second_ray()
            second["up_at"] = time.time()
            second["trial_runs_then"] = len(list(trials.iterdir()))
            second["which"] = which_ray_a_new_command_uses()
        except BaseException as exc:
            second["error"] = exc

    watcher = threading.Thread(target=start_while_training, daemon=True)
    watcher.start()
    try:
        summary = run_study(*load_study(path))
        ended_at = time.time()
    finally:
        study_over.set()
        watcher.join(timeout=300)  # (the start and the which-Ray command have 120 s each)
        if "head" in second:
            stop_second_ray(*second["head"])
    assert "error" not in second and "head" in second, second
    # it came up during the study: while the first trial trained (then the second started beside it), or the second
    assert second["trial_runs_then"] in (1, 2) and second["up_at"] < ended_at, (second, ended_at)
    # a command started meanwhile joins the `ray start` head, and says so (and how to get a Ray of its own)
    assert "[byol] Ray: joined the Ray already running on this machine" in second["which"], second["which"]
    assert f":{second['head'][1]}" in second["which"] and "RAY_ADDRESS=local" in second["which"]
    assert "RAY_ADDRESS" not in os.environ  # the pin lasts a run only: a later connect() starts or joins afresh
    assert len(summary["trials"]) == 2
    for row in summary["trials"]:  # every trial trained its whole budget in one go (no worker lost: no restart)
        assert row["status"] == "finished", row
        assert [r["step"] for r in row["reports"]] == [60, 120], row
        assert all(r.get("chunk_start_step", 0) == 0 for r in row["reports"]), row
    deadline = time.time() + 30  # nothing the study asked for is left (Train and Tune remove their groups)
    while (
        left := [pg for pg, info in placement_group_table().items() if pg not in before and info["state"] != "REMOVED"]
    ) and time.time() < deadline:
        time.sleep(1)
    assert not left, left
