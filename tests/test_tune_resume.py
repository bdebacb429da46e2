"""``byol tune --resume``: a study whose driver process is killed mid-study goes on where it was.

The driver runs as ``byol tune`` in its own process, joined to the test's Ray (as a driver on a cluster would be),
its trials reading the Ray Data stream (two at once: each takes a CPU for its worker and one for its data tasks,
of the test Ray's four); it is killed with SIGKILL once both trials have a checkpoint at their first report.
``byol tune --resume`` in a new process then finishes the study: every trial finishes, none starts again from step
0, MLflow holds the one parent run (FINISHED) and one nested run per trial, and the summary covers every report,
before and after.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.test_tune import STEPS_PER_EPOCH, study_file

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
REPORT = 20  # steps between reports (and Train checkpoints)
STEPS = 80


def byol(args: list[str], address: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def checkpointed(trials: Path, step: int) -> int:
    """How many trials' Ray Train runs have registered their checkpoint of ``step``."""
    name = f"step_{step:08d}"
    return sum(name in s.read_text() for s in trials.glob("*/checkpoint_manager_snapshot.json"))


def recorded(study_dir: Path) -> int:
    """How many trials the study driver has recorded a report of (its record, byol/state.json)."""
    try:
        rows = json.loads((study_dir / "byol" / "state.json").read_text())["rows"]
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return 0
    return sum(bool(row.get("reports")) for row in rows.values())


def test_a_study_whose_driver_is_killed_resumes_without_restarting_a_trial(ray_local, fmnist_full_shards, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    path = study_file(
        tmp_path,
        fmnist_full_shards,
        {"name": "resumed", "searcher": "grid", "scheduler": "fifo", "max_concurrent_trials": 2,
         "report_every_epochs": REPORT / STEPS_PER_EPOCH, "collapse": {"patience": 100},
         "space": {"optim.base_lr": {"type": "grid", "values": [1.0, 0.5]}}},
        train={"max_steps": STEPS},
        data={"deterministic": False},
    )  # fmt: skip
    study_dir = tmp_path / "runs" / "resumed"

    # 1. The study's driver, killed once it has recorded both trials' first reports (each with its checkpoint).
    first = byol(["tune", "--config", str(path)], address, tmp_path / "first.log")
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and recorded(study_dir) < 2:
        time.sleep(0.2)
    time.sleep(1)  # Tune's experiment state written with the reports
    assert first.poll() is None, "the study ended before it could be killed:\n" + (tmp_path / "first.log").read_text()
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert checkpointed(study_dir / "trials", STEPS) == 0, "a trial finished before the driver was killed"

    # 2. Resumed by a new driver, with the config the study saved.
    second = byol(["tune", "--resume", str(study_dir), "--json"], address, tmp_path / "second.log")
    second.wait(timeout=420)
    log = (tmp_path / "second.log").read_text()
    assert second.returncode == 0, log[-4000:]
    summary = json.loads(next(line for line in reversed(log.splitlines()) if line.startswith('{"study"')))

    assert len(summary["trials"]) == 2 and summary["concurrency"] == 2
    for trial in summary["trials"]:
        steps = [r["step"] for r in trial["reports"]]
        assert trial["status"] == "finished" and steps[0] == REPORT and steps[-1] == STEPS, trial
        # the report before the kill is kept, and the resumed trial went on from a checkpoint, not from step 0
        assert trial["reports"][-1]["chunk_start_step"] >= REPORT, trial["reports"]
    assert {t["values"]["optim.base_lr"] for t in summary["trials"]} == {1.0, 0.5}

    client = mlflow.MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    nested = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["tune.trial_id"] for r in nested) == sorted(t["trial"] for t in summary["trials"])
    assert all(r.info.status == "FINISHED" for r in nested)
    parents = client.search_runs([parent.info.experiment_id], "tags.`tune.study` = 'resumed'")
    assert len(parents) == 1


def test_resume_names_what_it_needs(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.tune.study import resume_study

    with pytest.raises(ConfigError, match="no byol/study.json there"):
        resume_study(str(tmp_path))


def test_the_monitor_record_is_read_back_with_the_rule_the_stopper_shares(tmp_path):
    """What the monitor writes to the study's folder restores its MLflow runs, rows, values and the collapse rule
    the stopper holds (a resumed study's monitor is set up from it)."""
    from pipeline.tracking import Tracker
    from pipeline.tune.monitor import CollapseRule, StudyMonitor, TrialStopper
    from pipeline.tune.space import load_study
    from pipeline.tune.stall import StallWatch

    cfg, study = load_study(ROOT / "configs" / "tune_fashion_mnist_cpu.yaml")
    state_file = str(tmp_path / "study" / "state.json")
    rule = CollapseRule(0.1, 1, 0.1, 0.02)
    monitor = StudyMonitor(cfg, study, rule, "sqlite:///unused.db", "parent", state_file)
    rule.observe("t1", {"training_iteration": 1, "step": 10, "collapse_std": 0.01})
    monitor.rows["t1"] = {"trial": "t1", "status": "running", "reports": [{"step": 10}]}
    monitor.params["t1"] = {"optim.base_lr": 0.5}
    monitor.runs["t1"] = Tracker("sqlite:///unused.db", "run-1")
    monitor.save()

    restored_rule = CollapseRule(0.1, 1, 0.1, 0.02)
    stopper = TrialStopper(restored_rule, StallWatch(0, "1 CPU", str(tmp_path / "study")))
    restored = StudyMonitor(cfg, study, restored_rule, "sqlite:///unused.db", "parent", state_file)
    restored.setup()
    assert restored.runs["t1"].run_id == "run-1" and restored.rows == monitor.rows
    assert restored.params == {"t1": {"optim.base_lr": 0.5}}
    # the same result is not counted twice, and the trial stays collapsed for the stopper
    assert stopper("t1", {"training_iteration": 1, "step": 10}) and restored_rule.streak["t1"] == 1
    assert "collapse monitor" in restored_rule.collapsed["t1"]
