"""MLflow records of a pretraining run: default SQLite store, a real `mlflow server`, and an unreachable one."""

import json

import mlflow
import pytest
import torch

from pipeline.cli.main import main as cli
from pipeline.config import load_config
from pipeline.core.checkpoint import load_state, local_checkpoint
from pipeline.core.models import SmallCNN
from pipeline.core.plan import RunPlan
from pipeline.tracking import Tracker
from pipeline.train import pretrain
from tests.netutil import free_port
from tests.test_train_ray import ChecksumsPerRank

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
ARTIFACTS = {"config.yaml", "curves.png", "backbone.pt", "summary.json"}


def assert_run_recorded(uri, summary, min_metric_points=3):
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    demo = load_config("configs/fashion_mnist_cpu.yaml")  # the tests' runs start from the demo's config
    assert float(params["optim.base_lr"]) == demo.optim.base_lr and params["model.backbone"]
    assert float(params["ema.tau_base"]) == demo.ema.tau_base
    for key in ("loss", "tau", "lr", "images_per_s", "data_wait_fraction", "collapse_std", "knn_top1"):
        assert key in run.data.metrics, key
    loss_history = client.get_metric_history(run.info.run_id, "loss")
    assert len(loss_history) >= min_metric_points and len({m.step for m in loss_history}) == len(loss_history)
    assert run.data.tags["checkpoint"] == summary["checkpoint"]
    assert run.data.tags["target_checksum"] == summary["target_checksum"]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert ARTIFACTS <= names, names
    return client.download_artifacts(run.info.run_id, "backbone.pt")


def test_two_workers_synchronized_targets_and_default_sqlite_store(ray_local, tiny_cfg, tmp_path, capsys):
    # 2 workers x 2 accumulated micro-batches of 16 = a global batch of 64, Ray Data input
    cfg = tiny_cfg(
        "train.num_workers=2",
        "train.grad_accum=2",
        "train.max_steps=12",
        "ema.check_every=3",
        "checkpoint.every_steps=6",
    )
    log = tmp_path / "checksums.jsonl"
    summary = pretrain(cfg, callbacks=[ChecksumsPerRank(str(log))])
    assert summary["steps"] == 12 and summary["total_steps"] == 12
    for key in ("run_id", "checkpoint", "knn_top1", "target_checksum", "tracking_uri"):
        assert summary[key] is not None, key
    # where the start-up went: every phase from the process's start to rank 0's first step, in order
    phases = summary["startup_s"]
    assert list(phases) == [
        "pretrain", "ray_ready", "tracking_ready", "fit", "worker_started", "worker_ready", "worker_first_batch",
        "first_step",
    ]  # fmt: skip
    assert all(v >= 0 for v in phases.values()) and phases["worker_started"] > 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 12  # log.every_steps=1
    for per_rank in rows:
        assert len(per_rank) == 2 and per_rank[0][1] == per_rank[1][1]  # same checksum on both ranks
    assert rows[-1][0][1] == summary["target_checksum"]
    state = load_state(summary["checkpoint"])
    assert state["step"] == 12 and "predictor.0.weight" in state["online"]
    # accumulation does not advance the schedules: step k used lr(k-1) and tau(k-1) of the full-run budget
    schedule = RunPlan.from_config(cfg, 1080).schedule
    assert [h["step"] for h in state["history"]] == list(range(1, 13))
    for h in state["history"]:
        assert h["lr"] == schedule.lr(h["step"] - 1) and h["tau"] == schedule.tau(h["step"] - 1)

    assert summary["tracking_uri"] == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    backbone_file = assert_run_recorded(summary["tracking_uri"], summary)
    SmallCNN(1, 8).load_state_dict(torch.load(backbone_file, weights_only=True), strict=True)
    # byol eval by run id and by checkpoint; byol export
    assert (
        cli(
            [
                "eval",
                "--run",
                summary["run_id"],
                "--tracking-uri",
                summary["tracking_uri"],
                "--data",
                cfg.data.path,
                "--splits",
                "val",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= result["splits"]["val"]["knn_top1"] <= 1.0 and "linear_top1" in result["splits"]["val"]
    run = mlflow.MlflowClient(tracking_uri=summary["tracking_uri"]).get_run(summary["run_id"])
    assert run.data.metrics["val_knn_top1"] == result["splits"]["val"]["knn_top1"]  # logged to the evaluated run
    assert run.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())  # next to the store
    assert cli(["export", "--checkpoint", summary["checkpoint"], "--out", str(tmp_path / "b.pt")]) == 0
    SmallCNN(1, 8).load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True), strict=True)


def test_s3_storage_and_unreachable_server(ray_local, tiny_cfg, s3_endpoint, capsys):
    """Checkpoints and outputs on S3 (a local moto server); a dead MLflow server does not stop training."""
    cfg = tiny_cfg(
        "train.max_steps=3",
        "run.storage_path=s3://byol-test/runs",
        "run.name=s3",
        f"tracking.uri=http://127.0.0.1:{free_port()}",
        "data.deterministic=true",
    )
    summary = pretrain(cfg)
    assert summary["steps"] == 3 and summary["run_id"] is None
    assert summary["checkpoint"] == "s3://byol-test/runs/s3/step_00000003", summary["checkpoint"]
    assert summary["backbone"] == "s3://byol-test/runs/s3/backbone.pt"
    with local_checkpoint(summary["checkpoint"]) as local:
        assert load_state(local)["step"] == 3
    # byol eval / export read the checkpoint from the URI (no Ray needed)
    assert cli(["export", "--checkpoint", summary["checkpoint"], "--out", "s3://byol-test/exported/b.pt"]) == 0
    assert cli(["eval", "--checkpoint", summary["checkpoint"], "--data", cfg.data.path, "--splits", "val",
                "--no-linear", "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= result["splits"]["val"]["knn_top1"] <= 1.0


def test_tracker_failure_is_reported_once(capsys):
    tracker = Tracker(f"http://127.0.0.1:{free_port()}", run_id="0" * 32)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_metrics({"loss": 0.5}, step=2)
    tracker.log_artifact(__file__)
    out = capsys.readouterr().out
    assert out.count("MLflow tracking lost") == 1 and not tracker.enabled


def test_interrupted_run_is_marked_killed(ray_local, tiny_cfg, monkeypatch):
    """Ctrl-C during fit: the MLflow run ends KILLED, not RUNNING (one try/finally ends every run)."""
    import ray.train.torch

    class Interrupted(ray.train.torch.TorchTrainer):
        def fit(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Interrupted)
    cfg = tiny_cfg("train.max_steps=2")
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cfg.run.storage_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.info.status == "KILLED"
