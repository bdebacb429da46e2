"""How cluster users break a run, on a local Ray with 2 CPU workers: corrupt and truncated shards, all-bad
data, a NaN on one rank, a bad record under ``fail``. Each must end on every rank, never hang (test timeouts),
with one readable last line."""

import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli.main import main as cli
from pipeline.data.manifest import read_manifest
from pipeline.errors import DataError, NonFiniteLossError
from pipeline.train import pretrain, train_func

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def corrupt_image_column(shard_path, seed=0):
    """Same rows and row groups, every image replaced by random bytes (a valid Parquet file of bad records)."""
    table = pq.read_table(shard_path)
    rng = np.random.default_rng(seed)
    junk = pa.array([rng.bytes(300) for _ in range(table.num_rows)], pa.binary())
    pq.write_table(table.set_column(0, "image", junk), shard_path, row_group_size=1024, compression="none")
    return table.num_rows


@pytest.fixture
def shards_copy(small_fmnist_shards, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(small_fmnist_shards, root)
    return root


def train_shards(root):
    return [root / s["path"] for s in read_manifest(str(root))["splits"]["train"]["shards"]]


def test_corrupt_and_truncated_shards_two_workers_same_steps(ray_local, tiny_cfg, shards_copy, capfd):
    # 4 train shards of 270: one with every image replaced by garbage, one truncated (unreadable footer).
    paths = train_shards(shards_copy)
    corrupted = corrupt_image_column(paths[0])
    truncated_rows = read_manifest(str(shards_copy))["splits"]["train"]["shards"][1]["rows"]
    paths[1].write_bytes(paths[1].read_bytes()[:1000])
    cfg = tiny_cfg(
        f"data.path={shards_copy}",
        "train.num_workers=2",
        "data.shuffle_buffer=0",
        "train.epochs=1",
        "log.every_steps=4",
    )
    summary = pretrain(cfg)
    # 810 readable rows / 64 = 12 steps planned; the good rows of the corrupt shard are 0, so the ranks' passes
    # end at different batches: every rank still takes the same steps (no DDP hang) and the run completes.
    assert summary["steps"] == summary["total_steps"] == 810 // 64
    # The skipped shard's rows always count; the corrupt shard's count as the ranks consume them (summed over ranks).
    # Blocks arrive in completion order: the 12 steps may end before a rank has taken any corrupt block (CI saw 0),
    # or a rank given most of them runs out of good rows and every rank starts a new pass over the stream (CI saw
    # 810 = 3 x 270 after 2 passes). Each pass of the Ray stream holds epochs + 1 epochs of the corrupt shard.
    assert summary["resumed_from_step"] == 0  # data_passes counts this attempt; bad_records would carry earlier ones
    consumed = summary["bad_records"] - truncated_rows
    stream_epochs = cfg.train.epochs + 1
    assert summary["data_passes"] >= 1
    assert 0 <= consumed <= stream_epochs * corrupted * summary["data_passes"]
    corrupt_keys = set(pq.read_table(paths[0], columns=["key"]).column("key").to_pylist())
    assert set(summary["bad_record_keys"]) <= corrupt_keys, summary["bad_record_keys"]  # no good record counted
    out = capfd.readouterr()
    text = out.out + out.err
    assert "part-00001.parquet" in text and "unreadable" in text
    assert text.count("skipping bad record") <= 2 * 5  # first keys per rank, then counts only


def test_all_bad_split_fails_fast_naming_the_split(ray_local, tiny_cfg, shards_copy):
    for i, path in enumerate(train_shards(shards_copy)):
        corrupt_image_column(path, seed=i)
    cfg = tiny_cfg(f"data.path={shards_copy}", "train.num_workers=2", "train.epochs=1")
    # The kNN monitor's bank (labelled train rows) or the step loop finds it first; either names the split.
    with pytest.raises(DataError, match=r"split 'train' has no usable|the train split yielded no full batch"):
        pretrain(cfg)


def nan_on_rank_1_at_step_3(config):
    """The real worker, with the loss of rank 1's third step made NaN (the other rank's loss stays finite)."""
    import ray.train

    import pipeline.core.step as step_module

    if ray.train.get_context().get_world_rank() == 1:
        real_loss, calls = step_module.byol_loss, [0]

        def poisoned(*args):
            calls[0] += 1
            loss = real_loss(*args)
            return loss * float("nan") if calls[0] == 3 else loss

        step_module.byol_loss = poisoned
    return train_func(config)


def test_nan_on_one_rank_stops_every_rank(ray_local, tiny_cfg):
    import mlflow

    cfg = tiny_cfg(
        "train.num_workers=2",
        "train.max_steps=10",
        "checkpoint.every_steps=2",
        "run.name=nan",
        "data.deterministic=true",
    )
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3 on rank\(s\) \[1\].*checkpoint is kept"):
        pretrain(cfg, train_loop=nan_on_rank_1_at_step_3)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cfg.run.storage_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.info.status == "FAILED"


def test_cli_last_line_names_the_shard_and_key(ray_local, tiny_cfg, shards_copy, tmp_path, capsys):
    """data.on_bad_record=fail on a record, and a truncated shard: one `byol pretrain: error:` line each."""
    corrupt_image_column(train_shards(shards_copy)[2])
    args = [
        "pretrain", "--config", "configs/fashion_mnist_cpu.yaml",
        "--set", f"data.path={shards_copy}", "--set", f"run.storage_path={tmp_path / 'runs'}",
        "--set", "data.on_bad_record=fail", "--set", "train.max_steps=40", "--set", "train.batch_size=64",
        "--set", "model.cnn_width=8", "--set", "eval.every_epochs=0",
    ]  # fmt: skip
    assert cli(args) == 2  # in this process, on the session's Ray: what `byol pretrain` prints last
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("byol pretrain: error:") and "bad record" in last, last
    assert "part-00002.parquet" in last and "key" in last and "byol prepare" in last, last

    shard = train_shards(shards_copy)[3]
    shard.write_bytes(shard.read_bytes()[:1000])  # found before Ray starts: a whole process, its last line
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=120)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and last.startswith("byol pretrain: error: shard train/part-00003.parquet"), last
    assert "unreadable" in last and "byol prepare" in last, last
