"""Ray Data pipeline on a local Ray: shapes, ranges, two different views, per-epoch order, bad records."""

import collections
import subprocess
import sys

import numpy as np
import pytest
import ray
import torch
from ray import cloudpickle

from pipeline.config import load_config
from pipeline.data.bad_records import BadRecordLog
from pipeline.data.execution import (
    GpuSchedulingLoopBackoff,
    NoProgressBarNotice,
    SchedulingLoopBackoff,
)
from pipeline.data.manifest import read_manifest
from pipeline.data.prepare import prepare
from pipeline.data.ray_dataset import build_train_dataset, iter_train_batches
from pipeline.data.read_units import list_units, unit_order
from pipeline.errors import BadRecord, DataError
from tests.imagegen import bad_files, image_bytes, random_array

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def gray_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("gray")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "src" / f"c{c}").mkdir(parents=True)
        for i in range(96):
            (root / "src" / f"c{c}" / f"{i}.png").write_bytes(image_bytes(random_array(rng, 28, 28, 1)))
    prepare(f"imagefolder:{root / 'src'}", str(root / "shards"), val_fraction=0.0, min_shards=6, **QUIET)
    return root / "shards"


def cfg_for(path, *extra):
    return load_config("configs/fashion_mnist_cpu.yaml", [f"data.path={path}", "data.shuffle_buffer=0", *extra])


def stream_keys(ds):
    return [k for b in ds.iter_batches(batch_size=32, batch_format="numpy") for k in b["key"]]


def test_epoch_shapes_ranges_views_and_order(ray_local, gray_shards):
    cfg = cfg_for(gray_shards)
    ds = build_train_dataset(cfg, seed=0, batch_size=32)
    # the executor's callbacks: CPU training gets the 100 ms scheduling period, GPU training 25 ms; no bar notice
    assert {SchedulingLoopBackoff, NoProgressBarNotice} <= set(ds.context.custom_execution_callback_classes)
    gpu_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"use_gpu": True})})
    assert GpuSchedulingLoopBackoff in build_train_dataset(gpu_cfg).context.custom_execution_callback_classes
    bad = BadRecordLog()
    batches = list(iter_train_batches(ds.iterator(), 32, cfg, torch.device("cpu"), bad))
    assert len(batches) == 192 // 32 and bad.count == 0
    lo, hi = (0 - 0.286) / 0.353, (1 - 0.286) / 0.353
    for v1, v2 in batches:
        assert v1.shape == v2.shape == (32, 1, 28, 28)
        assert v1.dtype == v2.dtype == torch.float32
        assert v1.min() >= lo - 1e-4 and v1.max() <= hi + 1e-4
        assert not torch.allclose(v1, v2)


def test_the_plan_loads_without_torch(ray_local, gray_shards):
    """Train's dataset manager and the split coordinator unpickle the plan on the way to the first step and never
    run its map: loading it must not import torch (~2 CPU-seconds in each); the map still runs in a data task."""
    cfg = cfg_for(gray_shards, "data.cache=on")
    ds = build_train_dataset(cfg, seed=0, batch_size=32, epochs=2)
    probe = (  # a new process joined to this Ray (the cache actor's handle needs one)
        "import sys, ray, ray.cloudpickle as cp; ray.init(address=sys.argv[1], log_to_driver=False); "
        "cp.loads(sys.stdin.buffer.read()); print('torch' in sys.modules)"
    )
    address = ray.get_runtime_context().gcs_address
    loaded = subprocess.run(
        [sys.executable, "-c", probe, address], input=cloudpickle.dumps(ds), capture_output=True, timeout=120
    )
    assert loaded.returncode == 0, loaded.stderr.decode()[-2000:]
    assert loaded.stdout.decode().split() == ["False"]
    assert sum(len(b["key"]) for b in ds.iter_batches(batch_size=None)) == 2 * 192


@pytest.mark.parametrize("cache", ["off", "on"])
def test_one_stream_holds_every_epoch_each_in_its_own_order(ray_local, gray_shards, cache):
    cfg = cfg_for(gray_shards, f"data.cache={cache}")
    units = list_units(str(gray_shards))
    order = unit_order(len(units), 3, seed=0)
    assert all(sorted(order[e * len(units) : (e + 1) * len(units)]) == list(range(len(units))) for e in range(3))
    assert len({tuple(order[e * len(units) : (e + 1) * len(units)]) for e in range(3)}) > 1  # reshuffled
    keys = stream_keys(build_train_dataset(cfg, seed=0, batch_size=32, epochs=3))
    counts = collections.Counter(keys)
    assert len(counts) == 192 and set(counts.values()) == {3}  # every image once per epoch, one execution


def test_worker_stage_augmentation(ray_local, gray_shards):
    cfg = cfg_for(gray_shards, "augment.device=worker")
    ds = build_train_dataset(cfg, seed=1, batch_size=32)
    raw = next(iter(ds.iter_batches(batch_size=32, batch_format="numpy")))
    assert raw["view1"].dtype == np.uint8  # only decode + crop ran in Ray Data
    v1, v2 = next(iter_train_batches(ds.iterator(), 32, cfg, torch.device("cpu"), BadRecordLog()))
    assert v1.dtype == torch.float32 and v1.shape == (32, 1, 28, 28) and not torch.allclose(v1, v2)


def test_worker_decode_ships_bytes_and_decodes_on_the_worker(ray_local, gray_shards):
    cfg = cfg_for(gray_shards, "augment.device=worker", "data.decode=worker")
    ds = build_train_dataset(cfg, seed=1, batch_size=32, epochs=2)
    raw = next(iter(ds.iter_batches(batch_size=32, batch_format="numpy")))
    assert set(raw) == {"encoded", "ok", "key", "unit"} and raw["encoded"][0][:4] == b"\x89PNG"  # bytes as stored
    bad = BadRecordLog()
    batches = list(iter_train_batches(ds.iterator(), 32, cfg, torch.device("cpu"), bad))
    assert len(batches) == 2 * 192 // 32 and bad.count == 0
    lo, hi = (0 - 0.286) / 0.353, (1 - 0.286) / 0.353
    for v1, v2 in batches:
        assert v1.shape == v2.shape == (32, 1, 28, 28) and v1.dtype == torch.float32
        assert v1.min() >= lo - 1e-4 and v1.max() <= hi + 1e-4 and not torch.allclose(v1, v2)


@pytest.fixture(scope="module")
def folder_with_bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(3)
    (root / "src").mkdir()
    for i in range(40):
        (root / "src" / f"good{i:02d}.png").write_bytes(image_bytes(random_array(rng, 36, 36)))
    for name, data in bad_files(rng).items():
        (root / "src" / name).write_bytes(data)
    prepare(f"imagefolder:{root / 'src'}", str(root / "shards"), min_shards=3, **QUIET)
    return root


def rgb_cfg(path, *extra):
    return load_config(
        None,
        [
            f"data.path={path}",
            "data.channels=3",
            "data.mean=[0.5,0.5,0.5]",
            "data.std=[0.25,0.25,0.25]",
            "data.image_size=16",
            "data.shuffle_buffer=0",
            *extra,
        ],
    )


BAD = {"truncated.jpg", "random.jpg", "text.jpg", "tiny_1x1.png"}  # CMYK and 16-bit PNG decode (converted)
# byol prepare already skips (and counts) the files PIL cannot identify; the shards keep the two that fail later.
BAD_IN_SHARDS = {"truncated.jpg", "tiny_1x1.png"}


def test_prepare_skipped_the_unidentifiable_files(folder_with_bad_files):
    skipped = read_manifest(str(folder_with_bad_files / "shards"))["splits"]["train"]["unreadable_skipped"]
    assert skipped["count"] == 2 and set(skipped["first"]) == BAD - BAD_IN_SHARDS


@pytest.mark.parametrize(
    "source, decode", [("shards", "data"), ("src", "data"), ("shards", "worker")], ids=["shards", "src", "worker"]
)
def test_bad_records_are_skipped_and_counted(ray_local, folder_with_bad_files, source, decode):
    worker = ["data.decode=worker", "augment.device=worker"] if decode == "worker" else []
    cfg = rgb_cfg(folder_with_bad_files / source, *worker)
    ds = build_train_dataset(cfg, seed=0, batch_size=8)
    bad = BadRecordLog()
    # batches of 7: the good rows of batches with bad ones are carried over, so all 42 arrive in full batches
    n = sum(v1.shape[0] for v1, _ in iter_train_batches(ds.iterator(), 7, cfg, torch.device("cpu"), bad))
    expected_bad = BAD_IN_SHARDS if source == "shards" else BAD
    assert bad.count == len(expected_bad)
    assert {k.rsplit("/", 1)[-1] for k in bad.first_keys} == expected_bad
    assert n == 42  # 40 good + CMYK + 16-bit


def test_bad_records_stay_bad_in_the_cache(ray_local, folder_with_bad_files):
    cfg = rgb_cfg(folder_with_bad_files / "shards", "data.cache=on")
    ds = build_train_dataset(cfg, seed=0, batch_size=8, epochs=3)
    bad = BadRecordLog()
    n = sum(v1.shape[0] for v1, _ in iter_train_batches(ds.iterator(), 7, cfg, torch.device("cpu"), bad))
    # decoded and cached or not, every epoch has the same rows
    assert bad.count == 3 * len(BAD_IN_SHARDS) and n == 3 * 42


@pytest.mark.parametrize("decode", ["data", "worker"])
def test_bad_record_fail_policy_names_shard_and_key(ray_local, folder_with_bad_files, decode):
    worker = ["data.decode=worker", "augment.device=worker"] if decode == "worker" else []
    cfg = rgb_cfg(folder_with_bad_files / "shards", "data.on_bad_record=fail", *worker)
    ds = build_train_dataset(cfg, seed=0, batch_size=8)
    with pytest.raises(Exception) as err:
        for _ in iter_train_batches(ds.iterator(), 8, cfg, torch.device("cpu"), BadRecordLog()):
            pass
    text = str(err.value)
    assert BadRecord.__name__ in text or "bad record" in text
    assert "part-" in text and any(name in text for name in BAD)


def test_missing_and_empty_data_paths(ray_local, tmp_path):
    with pytest.raises(DataError, match="not found"):
        build_train_dataset(cfg_for(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no image files"):
        build_train_dataset(cfg_for(tmp_path / "empty"))
