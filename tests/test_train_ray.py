"""Ray Train pretraining: synchronized EMA targets, resume, fault tolerance (local Ray, CPU, gloo)."""

import json
import time
from pathlib import Path

import pytest
import torch

from pipeline.core.checkpoint import load_state
from pipeline.errors import TargetsOutOfSyncError, TrainingError, UserError
from pipeline.train import check_targets_in_sync, pretrain

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


class ChecksumsPerRank:  # also used by tests/test_mlflow.py
    """A Ray Train UserCallback (runs in the controller) that appends every rank's target checksum to a file."""

    def __new__(cls, path):
        from ray.train import UserCallback

        class _Cb(UserCallback):
            def after_report(self, run_context, metrics, checkpoint):
                with open(path, "a") as f:
                    f.write(json.dumps([(m.get("step"), m.get("target_checksum")) for m in metrics]) + "\n")

        return _Cb()


def _perturbing_train_func(config):
    import ray.train
    import ray.train.torch

    from pipeline.config import ModelConfig
    from pipeline.core.models import build_networks

    torch.manual_seed(0)
    online, target = build_networks(ModelConfig(cnn_width=4, proj_hidden=8, pred_hidden=8, proj_dim=4), 1)
    ray.train.torch.prepare_model(online)
    check_targets_in_sync(target, step=6)  # identical: passes
    if ray.train.get_context().get_world_rank() == 1:
        with torch.no_grad():
            next(target.parameters()).view(-1)[0] += 1e-6
    check_targets_in_sync(target, step=7)


def test_perturbed_target_fails_the_check(ray_local):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _perturbing_train_func,
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name=f"perturb-{time.time_ns()}"),
    )
    with pytest.raises(Exception) as err:
        trainer.fit()
    text = str(err.value) + repr(err.value)
    assert "EMA targets out of sync at step 7" in text and "rank(s) [1]" in text


def test_check_is_a_noop_without_process_group():
    from pipeline.config import ModelConfig
    from pipeline.core.models import build_networks

    _, target = build_networks(ModelConfig(cnn_width=4, proj_hidden=8, pred_hidden=8, proj_dim=4), 1)
    assert len(check_targets_in_sync(target, 0)) == 64
    assert issubclass(TargetsOutOfSyncError, TrainingError) and issubclass(TrainingError, UserError)


def test_resume_continues_schedules_and_weights_exactly(ray_local, tiny_cfg):
    # 1,080 training images / 128 = 8 steps per epoch; 2 epochs = 16 steps. The uninterrupted run's checkpoint at
    # step 5 (mid-epoch) is what a run stopped there leaves; a new run resumed from it must end identical.
    common = ["train.epochs=2", "train.batch_size=128", "data.deterministic=true", "checkpoint.every_steps=5"]
    full = pretrain(tiny_cfg(*common, "run.name=full", "checkpoint.keep=5"))
    mid_epoch = Path(full["checkpoint"]).parent / "step_00000005"
    assert load_state(mid_epoch)["step"] == 5
    resumed = pretrain(tiny_cfg(*common, "run.name=resumed"), resume=str(mid_epoch))
    assert full["steps"] == resumed["steps"] == full["total_steps"] == 16 and resumed["resumed_from_step"] == 5

    def by_step(summary):
        hist = load_state(summary["checkpoint"])["history"]
        return {h["step"]: h for h in hist}

    a, b = by_step(full), by_step(resumed)
    for step in range(6, 17):
        assert a[step]["lr"] == b[step]["lr"] and a[step]["tau"] == b[step]["tau"], step
    assert sorted(b) == list(range(1, 17))  # no step counted twice, none missing
    sa, sb = load_state(full["checkpoint"]), load_state(resumed["checkpoint"])
    for name in ("online", "target"):
        for key, tensor in sa[name].items():
            torch.testing.assert_close(sb[name][key], tensor, atol=1e-6, rtol=0, msg=f"{name}.{key}")


def _record_data_pids(config):
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    pids = {int(p) for batch in shard.iter_batches(batch_size=None) for p in batch["pid"]}
    Path(config["out"]).write_text(json.dumps(sorted(pids)))


def test_warmed_processes_serve_the_train_data_tasks(ray_local, tmp_path, monkeypatch):
    """`byol pretrain` starts its stream's worker processes before the fit (torch imported while Train starts):
    Ray Train's data tasks must land in them. Ray reuses a process only for a task of the same runtime_env, read
    from Ray Train's internals (``ray_compat.train_controller_runtime_env``): a Ray upgrade that changes them fails
    here."""
    import os

    import numpy as np
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.data.warm_up import warm_data_workers
    from pipeline.ray_compat import train_controller_runtime_env

    # A value of a variable Train propagates that no other test uses: idle processes left by earlier runs differ.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.4999")
    runtime_env = train_controller_runtime_env()
    assert runtime_env is not None and runtime_env["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.4999"
    warm_pids = set(ray.get(warm_data_workers(2, runtime_env), timeout=120))
    ds = ray.data.range(6, override_num_blocks=6).map_batches(lambda b: {"pid": np.full(len(b["id"]), os.getpid())})
    out = tmp_path / "pids.json"
    TorchTrainer(
        _record_data_pids,
        train_loop_config={"out": str(out)},
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(name="warm", storage_path=str(tmp_path)),
        datasets={"train": ds},
    ).fit()
    data_pids = set(json.loads(out.read_text()))
    assert data_pids & warm_pids, (data_pids, warm_pids)
