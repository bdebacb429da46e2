"""Run-level pieces that need no cluster: checkpoint writes, run plan, bad-record log, Ray connection, MLflow guards."""

import os

import numpy as np
import pytest
import torch

import pipeline.core.checkpoint as ckpt
from pipeline.config import load_config
from pipeline.core.plan import RunPlan
from pipeline.data.bad_records import BadRecordLog
from pipeline.errors import ConfigError


def test_rewriting_a_checkpoint_never_loses_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "step_00000010"
    ckpt.save_state(target, {"step": 10, "w": torch.ones(3)}, "a: 1\n")
    real_replace = os.replace

    def crash_on_first_replace(src, dst):
        monkeypatch.setattr(os, "replace", real_replace)
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash_on_first_replace)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_state(target, {"step": 10, "w": torch.zeros(3)}, "a: 2\n")
    state = ckpt.load_state(target)  # the old checkpoint is still there and complete
    assert state["step"] == 10 and torch.equal(state["w"], torch.ones(3))
    ckpt.save_state(target, {"step": 10, "w": torch.zeros(3)}, "a: 2\n")
    assert torch.equal(ckpt.load_state(target)["w"], torch.zeros(3)) and ckpt.load_config_text(target) == "a: 2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010"]  # no temporary left behind


def test_checkpoint_by_file_uri_and_refused_pickles(tmp_path):
    ckpt.save_state(tmp_path / "c", {"step": 3, "w": torch.ones(2)}, "x: 1\n")
    assert ckpt.load_state(f"file://{tmp_path / 'c'}")["step"] == 3
    with pytest.raises(FileNotFoundError, match="not a byol checkpoint"):
        ckpt.load_state(f"file://{tmp_path / 'missing'}")
    (tmp_path / "evil").mkdir()
    torch.save({"step": 1, "payload": RunPlan}, tmp_path / "evil" / "state.pt")  # an arbitrary class: a pickle gadget
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        ckpt.load_state(tmp_path / "evil")


def test_last_metric_looks_back_past_log_steps_without_it():
    history = [{"step": 10, "knn_top1": 0.5}, {"step": 20, "loss": 1.0}, {"step": 30, "loss": 0.9}]
    assert ckpt.last_metric(history, "knn_top1") == 0.5 and ckpt.last_metric([], "knn_top1") is None


def test_stop_step_zero_is_a_stop_and_none_is_the_end():
    cfg = load_config("configs/fashion_mnist_cpu.yaml")
    plan = RunPlan.from_config(cfg, 54_000)
    assert plan.total_steps == cfg.train.epochs * (54_000 // cfg.train.batch_size)
    assert plan.stop_step(None) == plan.total_steps and plan.stop_step(0) == 0
    assert plan.stop_step(10**9) == plan.total_steps
    assert plan.stop_step(100) == 100


def test_plan_derives_schedules_from_the_trial_config():
    base = RunPlan.from_config(
        load_config("configs/fashion_mnist_cpu.yaml", ["optim.base_lr=1.0", "optim.warmup_epochs=1"]), 54_000
    )
    trial = RunPlan.from_config(
        load_config("configs/fashion_mnist_cpu.yaml", ["optim.base_lr=0.5", "optim.warmup_epochs=2"]), 54_000
    )
    assert trial.schedule.peak_lr == base.schedule.peak_lr / 2
    assert trial.schedule.warmup_steps == 2 * base.schedule.warmup_steps == 2 * base.steps_per_epoch


def test_bad_record_log_prints_a_few_lines_and_counts_all(capsys):
    log = BadRecordLog()
    for i in range(100):
        log.add(np.array([f"train-{i:06d}-{j}" for j in range(135)]))
    lines = [line for line in capsys.readouterr().out.splitlines() if "bad record" in line]
    assert log.count == 13_500 and len(lines) == 5 and len(log.first_keys) == 10
    assert "counted, not logged" in lines[-1]


def test_connect_joins_an_existing_local_head_without_num_cpus(monkeypatch):
    import ray

    from pipeline.train import cluster

    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        if "num_cpus" in kwargs:
            raise ValueError("When connecting to an existing cluster, num_cpus and num_gpus must not be provided.")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(cluster, "_say_which_ray", lambda what: None)  # it asks the (fake) Ray for its resources
    assert cluster.connect(2, 1.0) is False  # joined, not started: the caller must not shut it down
    assert "num_cpus" in calls[0] and "num_cpus" not in calls[1]
    calls.clear()  # a study's custom resource is not passed to an existing head either (Ray refuses it)
    assert cluster.connect(2, 1.0, resources={"tune_driver": 2}) is False
    assert "resources" in calls[0] and "resources" not in calls[1]


def test_connect_drops_rays_auth_on_notice_and_keeps_the_auth_off_warning(monkeypatch, caplog):
    import logging

    import ray

    from pipeline.train import cluster

    monkeypatch.delenv("BYOL_VERBOSE", raising=False)
    for key in [*cluster.QUIET_ENV, "RAY_DATA_LOG_LEVEL"]:  # what connect() sets: restored after the test
        monkeypatch.setenv(key, os.environ.get(key, ""))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # connect() installs its filters, then joins
    cluster.connect(1, 1.0)
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    with caplog.at_level(logging.WARNING, logger=auth.name):
        auth.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        auth.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    assert [r.getMessage().split(" for ")[0] for r in caplog.records] == ["Token authentication is disabled"]


def test_the_data_stream_drops_rays_progress_bar_notice_only(caplog):
    import logging

    from pipeline.data.execution import NoProgressBarNotice

    NoProgressBarNotice()  # what Ray Data's planner does in the split coordinator's process
    progress = logging.getLogger("ray.data._internal.progress")
    with caplog.at_level(logging.WARNING, logger=progress.name):
        progress.warning("Progress bars disabled. To enable, set `ray.data.DataContext...`")
        progress.warning("Progress bars for operators disabled. To enable, ...")
    assert [r.getMessage().split(".")[0] for r in caplog.records] == ["Progress bars for operators disabled"]


def test_cpu_budget_follows_affinity():
    from pipeline.train.cluster import available_cpus, local_num_cpus

    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))
    assert local_num_cpus(2, 1.0) == available_cpus() + 2


def test_file_store_refused_on_a_multinode_cluster(monkeypatch):
    import ray

    from pipeline.errors import TrackingError
    from pipeline.train.driver import refuse_local_store_on_multinode

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}])
    with pytest.raises(TrackingError, match="cluster has 2 nodes.*mlflow server"):
        refuse_local_store_on_multinode("sqlite:////tmp/x/mlflow.db")
    refuse_local_store_on_multinode("http://mlflow:5000")  # a server is fine
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    refuse_local_store_on_multinode("sqlite:////tmp/x/mlflow.db")  # one node: fine


def test_sqlite_store_keeps_artifacts_next_to_it(tmp_path, monkeypatch):
    import mlflow

    from pipeline.tracking import Tracker, resolve_tracking_uri

    monkeypatch.chdir(tmp_path)  # artifacts must not land in ./mlruns of the current directory
    uri = resolve_tracking_uri(None, tmp_path / "store")
    run_id = Tracker.create_run(uri, "exp", "r")
    artifact_uri = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).info.artifact_uri
    assert artifact_uri.startswith((tmp_path / "store" / "mlartifacts").as_uri()), artifact_uri
    assert not (tmp_path / "mlruns").exists()


def test_join_location_keeps_a_uri_query_at_the_end():
    assert ckpt.join_location("/runs", "a", "step_1") == "/runs/a/step_1"
    assert ckpt.join_location("s3://b/runs/", "a") == "s3://b/runs/a"
    assert (
        ckpt.join_location("s3://b/runs?endpoint_override=h:9000&scheme=http", "a", "step_1")
        == "s3://b/runs/a/step_1?endpoint_override=h:9000&scheme=http"
    )


def test_evaluation_samples_whole_row_groups_split_across_ranks(small_fmnist_shards, tmp_path):
    from pipeline.data.labelled import load_labelled
    from pipeline.data.manifest import read_manifest, sample_row_groups
    from pipeline.data.prepare import prepare

    out = tmp_path / "small-groups"
    prepare(f"imagefolder:{small_fmnist_shards.parent / 'src'}", str(out), row_group_rows=50, log=lambda *a: None)
    groups = sample_row_groups(str(out), "train", 230)
    assert sum(g.take for g in groups) == 230 and len(groups) == 5  # 4 whole groups of 50 + 30 rows of a fifth
    assert len({(g.shard, g.index) for g in groups}) == 5
    cfg = load_config("configs/fashion_mnist_cpu.yaml", [f"data.path={out}"])
    parts = [load_labelled(str(out), "train", cfg, 230, rank=r, world=2) for r in range(2)]
    assert sum(len(y) for _, y in parts) == 230  # every sampled image on exactly one rank
    whole = read_manifest(str(out))["splits"]["train"]["rows"]
    assert sum(g.take for g in sample_row_groups(str(out), "train", None)) == whole  # None: the whole split


def test_resume_from_a_missing_checkpoint_fails_before_ray_starts(tiny_cfg, monkeypatch):
    import ray

    from pipeline.train import pretrain

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    with pytest.raises(ConfigError, match="--resume /nonexistent/step_1: not a byol checkpoint"):
        pretrain(tiny_cfg(), resume="/nonexistent/step_1")


def test_checkpoint_step_reads_the_step_without_the_weights(tmp_path):
    ckpt.save_state(tmp_path / "c", {"step": 42, "w": torch.ones(1000)}, "x: 1\n")
    assert ckpt.checkpoint_step(tmp_path / "c") == 42


def test_eval_every_steps_replaces_every_epochs():
    from types import SimpleNamespace

    from pipeline.train.worker import is_eval_step

    cfg = load_config(None, ["eval.every_steps=15", "eval.every_epochs=1"])
    run = SimpleNamespace(cfg=cfg, plan=SimpleNamespace(steps_per_epoch=100), step=0)
    evaluated = [s for s in range(1, 101) if (setattr(run, "step", s) or is_eval_step(run, at_end=False))]
    assert evaluated == [15, 30, 45, 60, 75, 90]
    run.step = 31
    assert is_eval_step(run, at_end=True)


def test_eta_counts_from_the_first_log_step(monkeypatch):
    from pipeline.train import progress

    clock = iter([0.0, 100.0, 110.0, 130.0])  # loop start 0: 100 s to the first log step (stream start), then 1 s/step
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    eta = progress.Eta(start_step=0)
    assert eta.seconds_per_step(20) == 5.0  # before a second log step: from the loop's start
    assert eta.seconds_per_step(30) == 1.0
    assert eta.seconds_per_step(50) == 1.0
    assert progress.format_eta(3725) == "1h02m" and progress.format_eta(65) == "1m05s"


def test_eta_is_an_upper_bound_until_the_cache_is_full_then_measured_afresh(monkeypatch, capsys):
    """With the decoded cache, epoch 1 (steps 0-100) decodes at 2 s/step and later epochs read the cache at 1 s/step:
    the first ETA is said to be an upper bound, and after the first epoch the ETA counts cached steps only."""
    from pipeline.train import progress

    clock = iter([0.0, 40.0, 200.0, 220.0, 240.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    eta = progress.Eta(start_step=0, fill_until=100)
    line = {"epoch": 0.2, "loss": 1.0, "images_per_s": 100, "data_wait_fraction": 0.0, "collapse_std": 1.0}
    progress.print_progress({**line, "step": 20, "bad_records": 0}, 1000, None, eta)  # 40 s / 20 steps
    assert "ETA <32m40s (the first epoch fills the cache)" in capsys.readouterr().out  # 980 steps x 2 s, an upper bound
    assert eta.seconds_per_step(100) == 2.0 and eta.upper_bound  # still filling: (200 - 40) s / 80 steps
    assert eta.seconds_per_step(110) == 2.0 and eta.upper_bound  # the cache is full: measured afresh from here
    progress.print_progress({**line, "step": 130, "bad_records": 0}, 1000, None, eta)  # (240 - 220) s / 20 steps
    assert "ETA 14m30s\n" in capsys.readouterr().out  # 870 steps x 1 s, cached steps only


def test_startup_phases_are_named_by_where_they_end():
    from pipeline.train.progress import startup_phases

    marks = {"fit": 110.0, "command": 100.0, "first_step": 125.5, "ray_ready": 106.0}
    assert startup_phases(marks) == {"ray_ready": 6.0, "fit": 4.0, "first_step": 15.5}
    assert startup_phases({**marks, "first_step": None}) == {"ray_ready": 6.0, "fit": 4.0}  # nothing left to train


def test_one_reading_of_ray_address_for_pretrain_tune_and_prepare(monkeypatch, capsys):
    """pretrain and tune (connect), and prepare's --parallel auto read RAY_ADDRESS the same way."""
    import ray

    from pipeline.data.shard_jobs import use_ray
    from pipeline.errors import ConfigError
    from pipeline.train.cluster import cluster_address

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    for unset in (None, "", "local"):
        if unset is None:
            monkeypatch.delenv("RAY_ADDRESS", raising=False)
        else:
            monkeypatch.setenv("RAY_ADDRESS", unset)
        assert cluster_address() is None
        assert not use_ray("auto", 100)  # a few images, no cluster: in this process
    # many images, no cluster: a local Ray only where there are cores for it to pay its start
    for cores, want in ((2, False), (3, False), (4, True), (8, True)):
        monkeypatch.setattr("pipeline.train.cluster.available_cpus", lambda cores=cores: cores)
        assert use_ray("auto", 50_000) is want
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert cluster_address() == "10.0.0.5:6379" and use_ray("auto", 100)
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265")
    assert use_ray("ray", 100)  # asked for Ray: connect() then reads the address, and needs the GCS one
    with pytest.raises(ConfigError, match=r"RAY_ADDRESS=http://10.0.0.5:8265 is a job server.*HEAD:6379"):
        cluster_address()
    # a shell set up for `byol submit`: auto runs here, even where a local Ray would have been worth it
    assert not use_ray("auto", 10**6)
    assert "RAY_ADDRESS=http://10.0.0.5:8265 is a job server: running in this process" in capsys.readouterr().err
    assert not use_ray("off", 100)  # --parallel off never looks
