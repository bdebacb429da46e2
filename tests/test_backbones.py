"""Backbones from torchvision and timm by name, exports that load without this package, and ``byol embed``."""

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.core.backbones import build_library_backbone
from pipeline.core.checkpoint import load_encoder, save_state
from pipeline.core.export import export_backbone
from pipeline.core.models import build_backbone, build_networks
from pipeline.errors import ConfigError
from tests.imagegen import random_array

LIBRARY_BACKBONES = ["torchvision:mobilenet_v3_small", "torchvision:efficientnet_b0", "timm:resnet18"]


@pytest.mark.parametrize(
    "spec, head, dim",
    [
        ("torchvision:mobilenet_v3_small", "classifier.3", 1024),
        ("torchvision:efficientnet_b0", "classifier.1", 1280),
        ("torchvision:convnext_tiny", "classifier.2", 768),
        ("torchvision:resnet18", "fc", 512),
    ],
)
def test_torchvision_classifier_removed_and_feature_width_found(spec, head, dim):
    net, feature_dim, how = build_library_backbone(spec, 3, small_stem=False)
    assert feature_dim == dim and how.head == head
    with torch.no_grad():
        assert net.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, dim)


def test_grayscale_and_small_stem_adapt_the_input():
    net, dim = build_backbone("torchvision:efficientnet_b0", in_channels=1)
    with torch.no_grad():
        assert net.eval()(torch.zeros(2, 1, 32, 32)).shape == (2, dim)
    net, _, how = build_library_backbone("torchvision:resnet34", 1, small_stem=True)
    assert how.small_stem and net.conv1.kernel_size == (3, 3) and isinstance(net.maxpool, torch.nn.Identity)


def test_unknown_names_and_missing_timm_say_what_to_do(monkeypatch):
    with pytest.raises(
        ConfigError, match="torchvision:resnet500.*not a torchvision classification model.*close: resnet50"
    ):
        build_backbone("torchvision:resnet500")
    with pytest.raises(ConfigError, match="timm:not_a_model.*not a timm model"):
        build_backbone("timm:not_a_model")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[timm\]'"):
        build_backbone("timm:resnet18")
    with pytest.raises(ConfigError, match="model.backbone"):
        load_config(None, ["model.backbone=keras:resnet50"])


def tiny_checkpoint(tmp_path: Path, backbone: str, channels: int = 3, size: int = 32, *overrides: str) -> Path:
    """A checkpoint of a randomly initialised run (the export and embed paths do not depend on training)."""
    stats = [f"data.mean={[0.5] * channels}", f"data.std={[0.25] * channels}"]
    cfg = load_config(
        None,
        [f"model.backbone={backbone}", f"data.channels={channels}", f"data.image_size={size}", *stats, *overrides],
    )
    online, _ = build_networks(cfg.model, channels)
    torch.manual_seed(0)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, as after training
        online.encoder.train()(torch.rand(8, channels, size, size))
    return save_state(tmp_path / f"ckpt-{backbone.replace(':', '-')}", {"step": 2, "online": online.state_dict()}, cfg)


LOAD_AND_COMPARE = """
import sys, torch
scripted = torch.jit.load(sys.argv[2])  # loaded before the loader code runs: needs nothing but torch
exec(open(sys.argv[1]).read())  # the loading code byol export wrote, as a user would paste it
x, expected = torch.load(sys.argv[3])
with torch.no_grad():
    errors = [float((m.eval()(x) - expected).abs().max()) for m in (model, scripted)]
assert not any(m == "pipeline" or m.startswith("pipeline.") for m in sys.modules), "imported pipeline"
print(*errors)
"""


def assert_exports_load_without_this_package(checkpoint: Path, tmp_path: Path) -> None:
    """The state_dict export (through the loader it writes) and the TorchScript export (loaded first, before any
    loader code), in a fresh process that never imports ``pipeline``, give the checkpoint's encoder's features
    (1e-5)."""
    encoder, cfg, _ = load_encoder(checkpoint)
    size = cfg.data.image_size
    x = torch.rand(3, cfg.data.channels, size, size)
    with torch.no_grad():
        expected = encoder.to(memory_format=torch.contiguous_format).eval()(x)
    torch.save((x, expected), tmp_path / "io.pt")
    written = export_backbone(checkpoint, tmp_path / "backbone.pt")
    assert Path(f"{written['out']}.load.py").read_text() == written["loader"]
    scripted = export_backbone(checkpoint, tmp_path / "backbone.ts", "torchscript")
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_COMPARE, f"{written['out']}.load.py", scripted["out"], str(tmp_path / "io.pt")],
        cwd=tmp_path,  # not the project root: `pipeline` is not importable from here but for the editable install
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    state_dict_error, torchscript_error = map(float, done.stdout.strip().splitlines()[-1].split())
    assert state_dict_error < 1e-5 and torchscript_error < 1e-5, done.stdout


def test_exports_of_the_built_in_resnet_load_strictly_without_this_package(tmp_path):
    # The library backbones' exports are loaded from their trained checkpoints (the two-step pretraining below).
    assert_exports_load_without_this_package(tiny_checkpoint(tmp_path, "resnet18"), tmp_path)


@pytest.mark.integration
@pytest.mark.timeout(900)
@pytest.mark.parametrize("backbone", LIBRARY_BACKBONES)
def test_two_step_pretraining_with_library_backbones(backbone, ray_local, tmp_path):
    """Each library backbone trains through the real Ray Train path, and its export is the trained encoder."""
    if backbone.startswith("timm:"):
        pytest.importorskip("timm")
    from pipeline.train import pretrain

    folder = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for c in range(2):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"c{c}" / f"{i}.png")
    cfg = load_config(
        None,
        [
            f"data.path={folder}",
            f"model.backbone={backbone}",
            f"run.storage_path={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "data.deterministic=true",
            "train.batch_size=8",
            "train.max_steps=2",
            "model.proj_hidden=32",
            "model.pred_hidden=32",
            "model.proj_dim=16",
            "eval.every_epochs=0",
        ],
    )
    summary = pretrain(cfg)
    assert summary["steps"] == 2 and summary["checkpoint"]
    _, trained_cfg, step = load_encoder(summary["checkpoint"])
    assert step == 2 and trained_cfg.model.backbone == backbone and trained_cfg.data.channels == 3
    assert_exports_load_without_this_package(Path(summary["checkpoint"]), tmp_path)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_embed_the_fashion_mnist_test_split(ray_local, fmnist_full_shards, tmp_path):
    """10,000 rows, each with its key and label, and a sample equal to the in-process features."""
    from pipeline.data.labelled import resize_uint8
    from pipeline.data.manifest import read_split_table
    from pipeline.evaluation.embed import embed

    # fp32, to compare at 1e-5 (bf16 autocast, the default on CPUs that have it, rounds at ~1e-3).
    checkpoint = tiny_checkpoint(tmp_path, "small_cnn", 1, 28, "train.precision=fp32")
    summary = embed(str(checkpoint), str(fmnist_full_shards), str(tmp_path / "emb.parquet"), ["test"])
    assert summary["rows"] == 10_000 and summary["skipped"] == 0
    assert summary["where"].startswith("Ray Data")  # auto: this process has joined a Ray
    table = pq.read_table(tmp_path / "emb.parquet")
    assert table.num_rows == 10_000 and set(table.column("split").to_pylist()) == {"test"}
    rows = {
        k: (lab, np.asarray(e))
        for k, lab, e in zip(*(table.column(c).to_pylist() for c in ("key", "label", "embedding")), strict=True)
    }
    source = read_split_table(str(fmnist_full_shards), "test").slice(0, 64)
    encoder, cfg, _ = load_encoder(checkpoint)
    from pipeline.core.images import decode

    x = torch.stack([resize_uint8(decode(b, 1), 28) for b in source.column("image").to_pylist()]).float().div(255)
    with torch.no_grad():
        want = torch.nn.functional.normalize(encoder((x - 0.5) / 0.25), dim=1).numpy()
    for i, key in enumerate(source.column("key").to_pylist()):
        label, got = rows[key]
        assert label == source.column("label")[i].as_py()
        np.testing.assert_allclose(got, want[i], atol=1e-5)
    print(json.dumps(summary))

    # The same embeddings from this process alone (what auto picks without a cluster).
    local = embed(str(checkpoint), str(fmnist_full_shards), str(tmp_path / "emb-local"), ["test"], parallel="off")
    assert local["rows"] == 10_000 and local["where"] == "this process (cpu)"
    assert_same_embeddings(pq.read_table(tmp_path / "emb-local"), table)


def assert_same_embeddings(got, want) -> None:
    """Two embedding tables with the same rows (keys, splits, labels) and embeddings (1e-5), in any order."""

    def by_key(table):
        columns = (table.column(c).to_pylist() for c in ("key", "split", "label", "embedding"))
        return {k: (split, label, np.asarray(e)) for k, split, label, e in zip(*columns, strict=True)}

    assert [(f.name, f.type) for f in got.schema] == [(f.name, f.type) for f in want.schema]
    got, want = by_key(got), by_key(want)
    assert got.keys() == want.keys()
    for key, (split, label, embedding) in want.items():
        assert got[key][:2] == (split, label)
        np.testing.assert_allclose(got[key][2], embedding, atol=1e-5)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_embed_an_image_folder_on_s3(ray_local, s3_endpoint, tmp_path):
    """Keys are paths under the folder, labels its class folders' indices (as prepare numbers them), a bad file
    is skipped and counted, and an output that already holds files is refused."""
    import pyarrow.fs as pafs

    from pipeline.errors import DataError
    from pipeline.evaluation.embed import embed

    s3 = pafs.S3FileSystem(endpoint_override=s3_endpoint)
    rng = np.random.default_rng(1)
    for name in ("cats/0.png", "cats/1.png", "dogs/0.png", ".thumbs/0.png", "loose.png"):
        with s3.open_output_stream(f"byol-test/photos/{name}") as f:
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(buffer, "PNG")
            f.write(buffer.getvalue())
    with s3.open_output_stream("byol-test/photos/dogs/broken.png") as f:
        f.write(b"not an image")
    checkpoint = tiny_checkpoint(tmp_path, "small_cnn", 3, 32, "train.precision=fp32")
    summary = embed(str(checkpoint), "s3://byol-test/photos", "s3://byol-test/embeddings")
    assert summary["input_rows"] == 6 and summary["rows"] == 5 and summary["skipped"] == 1
    table = pq.read_table("byol-test/embeddings", filesystem=s3)
    labels = dict(zip(table.column("key").to_pylist(), table.column("label").to_pylist(), strict=True))
    assert labels == {"cats/0.png": 0, "cats/1.png": 0, "dogs/0.png": 1, ".thumbs/0.png": -1, "loose.png": -1}
    norms = np.linalg.norm(np.asarray(table.column("embedding").to_pylist()), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    with pytest.raises(DataError, match="--out s3://byol-test/embeddings is not empty"):
        embed(str(checkpoint), "s3://byol-test/photos", "s3://byol-test/embeddings")
    local = embed(str(checkpoint), "s3://byol-test/photos", "s3://byol-test/embeddings-local", parallel="off")
    assert (local["rows"], local["skipped"]) == (5, 1)
    assert_same_embeddings(pq.read_table("byol-test/embeddings-local", filesystem=s3), table)


def flat_photos(folder: Path, count: int, seed: int) -> Path:
    """``count`` random 40x36 RGB PNGs in one folder, no class folders (so no labels)."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(random_array(rng, 40, 36)).save(folder / f"{i}.png")
    return folder


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_embed_unlabelled_shards_the_same_both_ways(ray_local, tmp_path):
    """Shards of a folder without class folders have no labels: -1 from both paths (Ray Data's numpy batches turn
    the null labels into NaN), and one output schema (a fixed-size float32 list any Parquet reader takes)."""
    from pipeline.data.prepare import prepare
    from pipeline.evaluation.embed import embed

    photos = flat_photos(tmp_path / "photos", 12, seed=2)
    prepare(f"imagefolder:{photos}", str(tmp_path / "shards"), log=lambda *a: None)
    checkpoint = tiny_checkpoint(tmp_path, "small_cnn", 3, 32, "train.precision=fp32")
    tables = {}
    for parallel in ("ray", "off"):
        summary = embed(str(checkpoint), str(tmp_path / "shards"), str(tmp_path / parallel), parallel=parallel)
        assert (summary["rows"], summary["skipped"]) == (12, 0), summary
        tables[parallel] = pq.read_table(tmp_path / parallel)
    assert set(tables["ray"].column("label").to_pylist()) == {-1}
    embedding = tables["off"].schema.field("embedding").type
    assert pa.types.is_fixed_size_list(embedding) and embedding.value_type == pa.float32()
    assert_same_embeddings(tables["off"], tables["ray"])


def test_the_embed_actor_pool_is_sized_from_the_cluster():
    """From the cluster's resources, not the driver's machine (a KubeRay head has none for work); a one-node Ray
    that declares more CPUs than its cores gets threads for its cores."""
    from pipeline.evaluation.embed import actor_pool

    # two 8-CPU workers behind a 0-CPU head: actors that reserve a CPU (so they run on the workers), 4 threads each
    assert actor_pool({"CPU": 16.0}) == {"actors": 4, "threads": 4, "num_gpus": 0, "num_cpus": 1}
    assert actor_pool({"CPU": 4.0}, cores_here=2) == {"actors": 1, "threads": 2, "num_gpus": 0, "num_cpus": 1}
    assert actor_pool({"CPU": 1.0})["num_cpus"] == 0  # the one CPU is the read tasks'
    assert actor_pool({"CPU": 32.0, "GPU": 4.0}) == {"actors": 4, "threads": 8, "num_gpus": 1, "num_cpus": 1}


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_embed_says_so_when_no_actor_can_start(ray_local, tmp_path, monkeypatch):
    """Ray Data waits forever for an actor by default (every GPU of a cluster busy, say): embed ends with one line
    that says what an actor needs and what is free, and leaves the CPUs to the next command."""
    from ray.util import placement_group, remove_placement_group

    import pipeline.evaluation.embed as embed_module
    from pipeline.errors import DataError

    photos = flat_photos(tmp_path / "photos", 4, seed=3)
    checkpoint = tiny_checkpoint(tmp_path, "small_cnn", 3, 32, "train.precision=fp32")
    monkeypatch.setattr(embed_module, "ACTOR_START_TIMEOUT_S", 5)
    holder = placement_group([{"CPU": ray_local.available_resources()["CPU"]}])
    ray_local.get(holder.ready(), timeout=60)
    try:
        started = time.time()
        with pytest.raises(DataError, match=r"no Embedder actor could start in 5 s \(each needs 0 GPU, 1 CPU"):
            embed_module.embed(str(checkpoint), str(photos), str(tmp_path / "emb"), parallel="ray")
        assert time.time() - started < 120
    finally:
        remove_placement_group(holder)
    summary = embed_module.embed(str(checkpoint), str(photos), str(tmp_path / "emb-after"), parallel="ray")
    assert summary["rows"] == 4
