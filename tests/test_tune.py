"""``byol tune`` on a local Ray with the real trial function (Ray Train pretraining per trial), tiny budgets on
real Fashion-MNIST: ASHA stops a worse trial early, a collapsing trial is stopped and marked collapsed, and a PBT
exploit continues the source trial's state (step, target weights, schedules) with the mutated learning rate."""

import json
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline.config import load_config
from pipeline.core.plan import RunPlan
from pipeline.tune.space import load_study, trial_config
from pipeline.tune.study import run_study

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

STEPS_PER_EPOCH = 54000 // 64  # full Fashion-MNIST train split, batch 64
BASE = {
    "data": {"deterministic": True, "mean": [0.286], "std": [0.353]},
    "augment": {"blur": False, "crop_scale_min": 0.2},
    "model": {"cnn_width": 8, "proj_hidden": 64, "pred_hidden": 64, "proj_dim": 32},
    "train": {"num_workers": 1, "batch_size": 64, "epochs": 1, "max_steps": 30},
    "optim": {"base_lr": 1.0, "warmup_epochs": 0, "trust_coefficient": 0.02, "weight_decay": 1e-5},
    "eval": {"max_train_images": 1000, "max_val_images": 1000},
    "log": {"every_steps": 5},
    "checkpoint": {"every_steps": 1000},
}
HALF = 15 / STEPS_PER_EPOCH  # a report (and a PBT chunk) every 15 steps


def study_file(tmp_path: Path, shards: Path, tune: dict, **sections) -> Path:
    tree = json.loads(json.dumps(BASE))
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    tree["data"]["path"] = str(shards)
    tree["run"] = {"storage_path": str(tmp_path / "runs")}
    tree["tracking"] = {"uri": f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", "experiment": "tune-test"}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**tree, "tune": {"report_every_epochs": HALF, **tune}}))
    return path


def by_values(summary: dict) -> dict:
    return {tuple(sorted(r["values"].items())): r for r in summary["trials"]}


# Collapsing: no predictor and tau = 0 (target = online): the loss goes to ~0 within ~15 steps (paper, Table 5).
SANE_AND_COLLAPSING = {
    "model.predictor": {"type": "grid", "values": ["mlp", "none"]},
}


def test_asha_stops_the_worse_trial_early(ray_local, fmnist_full_shards, tmp_path):
    path = study_file(
        tmp_path,
        fmnist_full_shards,
        {
            "name": "asha",
            "searcher": "grid",
            "scheduler": "asha",
            "max_concurrent_trials": 1,  # in order: the first trial sets the rung's bar
            "asha": {"grace_epochs": HALF, "reduction_factor": 2},
            "collapse": {"patience": 100},  # leave the stopping to ASHA here
            "space": SANE_AND_COLLAPSING,
        },
        ema={"tau_base": 0.0, "schedule": "constant"},
    )
    summary = run_study(*load_study(path))
    first, second = sorted(summary["trials"], key=lambda r: r["trial"])  # the grid's order, one at a time
    assert first["values"] == {"model.predictor": "mlp"}

    def at_rung(row: dict) -> float:
        return next(r["knn_top1"] for r in row["reports"] if r["step"] == 15)

    # What ASHA decided, whichever way the near-random kNN of 15 steps falls: the first trial reaches the rung alone
    # and goes on; the second is stopped there iff its kNN is below the rung's cut (the better half of two).
    assert first["status"] == "finished" and [r["step"] for r in first["reports"]] == [15, 30]
    assert first["epochs"] == pytest.approx(30 / STEPS_PER_EPOCH)
    if at_rung(second) < at_rung(first):
        assert second["status"] == "stopped by asha" and [r["step"] for r in second["reports"]] == [15]
        assert second["epochs"] == pytest.approx(HALF)
    else:
        assert second["status"] == "finished" and [r["step"] for r in second["reports"]] == [15, 30]
    assert summary["best_trial"] == max(summary["trials"], key=lambda r: r["knn_top1"])["trial"]


def test_collapsed_trial_is_stopped_and_marked_and_mlflow_has_the_study(ray_local, fmnist_full_shards, tmp_path):
    path = study_file(
        tmp_path,
        fmnist_full_shards,
        {
            "name": "collapse",
            "searcher": "grid",
            "scheduler": "fifo",
            "max_concurrent_trials": 2,
            "collapse": {"patience": 1},
            "space": SANE_AND_COLLAPSING,
        },
        ema={"tau_base": 0.0, "schedule": "constant"},
        train={"max_steps": 45},
    )
    cfg, study = load_study(path)
    summary = run_study(cfg, study)
    rows = by_values(summary)
    collapsed = next(r for r in summary["trials"] if r["values"]["model.predictor"] == "none")
    sane = next(r for r in summary["trials"] if r["values"]["model.predictor"] == "mlp")
    assert collapsed["status"] == "collapsed" and "collapse monitor" in collapsed["why"]
    # Under the threshold at every log step of a report (the first report's window still starts above it):
    # stopped at its second report of three, its resources freed.
    assert collapsed["epochs"] == pytest.approx(2 * HALF) and sane["epochs"] == pytest.approx(3 * HALF)
    assert sane["status"] == "finished"
    assert len(rows) == 2

    # MLflow: the parent run and one nested run per trial with its values, kNN by step and final status.
    client = mlflow.MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["tune.best_trial"] == sane["trial"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "trials.csv", "knn_vs_tau_lr.png"} <= artifacts
    exp = client.get_experiment(parent.info.experiment_id)
    nested = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(nested) == 2
    for run in nested:
        assert {"ema.tau_base", "optim.base_lr", "model.predictor"} <= set(run.data.params)
        assert "knn_top1" in run.data.metrics and client.get_metric_history(run.info.run_id, "loss")
        status = run.data.tags["tune.status"]
        assert status in ("finished", "collapsed")
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        # A finished trial keeps its backbone; one stopped mid-fit (collapsed) has its config only.
        assert artifacts >= ({"config.yaml", "backbone.pt"} if status == "finished" else {"config.yaml"})
        assert run.info.status == ("FINISHED" if status == "finished" else "KILLED")

    # The best config is a pretraining config as it stands (bench/tune_study.py runs it for 1 step).
    best = load_config(summary["best_config"])
    assert best.model.predictor == "mlp" and best.ema.tau_base == 0.0 and best.run.name is None


def test_pbt_exploit_continues_the_source_state_with_mutated_values(ray_local, fmnist_full_shards, tmp_path):
    path = study_file(
        tmp_path,
        fmnist_full_shards,
        {
            "name": "pbt",
            "searcher": "random",
            "scheduler": "pbt",
            "num_samples": 2,
            "max_concurrent_trials": 2,
            "seed": 3,
            "pbt": {"interval_epochs": HALF, "quantile_fraction": 0.5, "resample_probability": 0.0, "synch": True},
            "collapse": {"patience": 100},
            "space": {
                "optim.base_lr": {"type": "loguniform", "low": 0.3, "high": 3.0},
                "ema.tau_base": {"type": "one_minus_loguniform", "low": 0.001, "high": 0.1},
            },
        },
    )
    cfg, study = load_study(path, [f"optim.warmup_epochs={24 / STEPS_PER_EPOCH}"])
    summary = run_study(cfg, study)
    exploited = [r for r in summary["trials"] if r["exploits"]]
    assert len(exploited) == 1, summary["trials"]
    trial = exploited[0]
    source_id, at_step = trial["exploits"].split("@")
    assert int(at_step) == 15
    (source,) = [r for r in summary["trials"] if r["trial"] == source_id]
    source_chunk = next(r for r in source["reports"] if r["step"] == 15)
    before = next(r for r in trial["reports"] if r["step"] == 15)
    after = next(r for r in trial["reports"] if r.get("exploited_from") == source_id)
    # The whole state came from the source: same step, same target weights (the checksum at the start).
    assert after["chunk_start_step"] == 15 and after["step"] == 30
    assert after["start_target_checksum"] == source_chunk["target_checksum"]
    assert after["start_target_checksum"] != before["target_checksum"]
    # The mutated values are in effect from the copied step: no new warmup (it spans the exploit step here),
    # no tau restart. A log entry at step s holds the lr and tau the schedule gave optimizer step s - 1.
    new_values, old_values = after["search_values"], source_chunk["search_values"]
    assert new_values["optim.base_lr"] != pytest.approx(old_values["optim.base_lr"])
    mutated = RunPlan.from_config(trial_config(cfg, new_values), 54000).schedule
    source_schedule = RunPlan.from_config(trial_config(cfg, old_values), 54000).schedule
    assert mutated.warmup_steps == 24
    assert after["start_lr"] == pytest.approx(mutated.lr(15))  # in the restored optimizer before the first step
    first_log = after["first_log"]
    assert first_log["step"] == 20
    assert first_log["lr"] == pytest.approx(mutated.lr(19))
    assert first_log["lr"] != pytest.approx(source_schedule.lr(19)) and first_log["lr"] != pytest.approx(mutated.lr(4))
    # tau goes on from the source's tau at the exploit step (no jump), then joins the mutated cosine over one
    # interval (15 steps): at step 19 it is 4/15 of the way there.
    assert mutated.tau_base != pytest.approx(source_schedule.tau_base)
    assert after["start_tau"] == pytest.approx(source_schedule.tau(15), abs=1e-12)
    gap = source_schedule.tau(15) - mutated.tau(15)
    assert first_log["tau"] == pytest.approx(mutated.tau(19) + gap * (1 - 4 / 15), abs=1e-9)
    assert all(r["status"] in ("finished", "exploited") for r in summary["trials"])


def test_a_trial_whose_worker_is_killed_goes_on_from_its_last_report(ray_local, fmnist_full_shards, tmp_path):
    """Every report carries a Train checkpoint: a worker killed after the first report (step 20) costs the trial
    only the steps since then; its restarted chunk starts at step 20, not 0."""
    import threading

    import psutil

    every = 20 / STEPS_PER_EPOCH
    path = study_file(
        tmp_path,
        fmnist_full_shards,
        {"name": "killed", "searcher": "grid", "scheduler": "fifo", "report_every_epochs": every,
         "collapse": {"patience": 100}, "space": {"model.predictor": {"type": "grid", "values": ["mlp"]}}},
        train={"max_steps": 100},
    )  # fmt: skip
    killed: list[int] = []

    def registered(step_dir: str) -> bool:  # Ray Train's checkpoint manager has taken the report's checkpoint
        snapshots = (tmp_path / "runs" / "killed" / "trials").glob("*/checkpoint_manager_snapshot.json")
        return any(step_dir in snapshot.read_text() for snapshot in snapshots)

    def kill_after_first_report() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not registered("step_00000020"):
            time.sleep(0.2)
        for p in psutil.process_iter(["cmdline"]):
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                p.kill()
                killed.append(p.pid)

    watcher = threading.Thread(target=kill_after_first_report, daemon=True)
    watcher.start()
    summary = run_study(*load_study(path))
    watcher.join(timeout=10)
    assert killed, "no training worker was found to kill"
    (trial,) = summary["trials"]
    assert trial["status"] == "finished" and trial["reports"][-1]["step"] == 100
    assert trial["reports"][-1]["chunk_start_step"] == 20  # the restarted worker group began at the last report
