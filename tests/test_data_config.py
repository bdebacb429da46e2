"""Configs that know their data: the manifest's image statistics, the data keys resolved from them, the refusals of
values that contradict the data, old manifests, image folders given directly, and evaluation of any image shape."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.config import load_config
from pipeline.core.images import decode
from pipeline.data.data_config import resolve_data_config, train_image_stats
from pipeline.data.image_stats import measure
from pipeline.data.labelled import resize_uint8
from pipeline.data.manifest import read_split_table
from pipeline.data.prepare import prepare
from pipeline.errors import ConfigError
from tests.imagegen import hue_classes

QUIET = {"log": lambda *a: None}


@pytest.fixture(scope="module")
def hue_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("hue")
    prepare(f"imagefolder:{hue_classes(root / 'src')}", str(root / "shards"), val_fraction=0.25, **QUIET)
    return root


def test_manifest_records_modes_sizes_and_statistics_as_training_decodes(hue_shards):
    manifest = json.loads((hue_shards / "shards" / "manifest.json").read_text())
    stats = manifest["splits"]["train"]["images"]
    assert stats["modes"] == {"RGB": 90} and stats["sampled"] == stats["rows"] == 90 and stats["channels"] == 3
    assert stats["height"] == {"min": 48, "median": 48, "max": 48} and stats["width"]["median"] == 64
    assert stats["short_side"]["median"] == 48
    # mean / std against numpy over the same images, decoded the way training decodes them
    table = read_split_table(str(hue_shards / "shards"), "train", ["image"])
    pixels = (
        np.concatenate([decode(b, 3).numpy().reshape(3, -1) for b in table.column("image").to_pylist()], axis=1) / 255.0
    )
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=1), atol=1e-4)
    np.testing.assert_allclose(stats["std"], pixels.std(axis=1), atol=1e-4)


def test_mixed_modes_are_counted_and_the_majority_wins():
    rgb = [_png(np.full((20, 30, 3), 100, np.uint8)) for _ in range(3)]
    gray = [_png(np.full((20, 30), 50, np.uint8))]
    stats = measure([*rgb, *gray, b"not an image"], rows=5)
    assert stats["modes"] == {"RGB": 3, "L": 1, "unreadable": 1} and stats["channels"] == 3
    assert len(stats["mean"]) == 3  # the grayscale image decoded as RGB, as training converts it


def test_only_data_path_set_resolves_the_data_keys(hue_shards):
    cfg, line = resolve_data_config(load_config(None, [f"data.path={hue_shards / 'shards'}"]))
    assert cfg.data.channels == 3 and cfg.data.image_size == 48 and len(cfg.data.mean) == 3
    assert "data.channels=3" in line and "data.image_size=48 (the median short side)" in line and "RGB 90" in line


def test_photos_of_at_least_224_px_resolve_to_224(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((240, 320, 3), 90 + i, np.uint8)).save(folder / f"{i}.jpg")
    cfg, line = resolve_data_config(load_config(None, [f"data.path={folder}"]))  # a folder given directly
    assert cfg.data.image_size == 224 and cfg.data.channels == 3 and "measured on a sample of the folder" in line


def test_contradicting_values_are_refused_naming_the_key_and_the_override(hue_shards):
    shards = hue_shards / "shards"
    with pytest.raises(ConfigError) as err:
        resolve_data_config(load_config(None, [f"data.path={shards}", "data.channels=1"]))
    assert (
        "data.channels=1" in str(err.value)
        and "RGB" in str(err.value)
        and "data.accept_mismatch=true" in str(err.value)
    )
    with pytest.raises(ConfigError, match=r"data.image_size=200 .*\(95% are at most 48 px"):
        resolve_data_config(load_config(None, [f"data.path={shards}", "data.image_size=200"]))
    cfg, _ = resolve_data_config(
        load_config(None, [f"data.path={shards}", "data.channels=1", "data.accept_mismatch=true"])
    )
    assert cfg.data.channels == 1 and len(cfg.data.mean) == 1


def test_grayscale_data_refuses_three_channels(small_fmnist_shards):
    with pytest.raises(ConfigError, match="data.channels=3 .*grayscale"):
        resolve_data_config(load_config(None, [f"data.path={small_fmnist_shards}", "data.channels=3"]))


def test_a_manifest_without_statistics_is_measured_on_first_use(hue_shards, tmp_path, capsys):
    old = tmp_path / "old"
    import shutil

    shutil.copytree(hue_shards / "shards", old)
    manifest = json.loads((old / "manifest.json").read_text())
    for split in manifest["splits"].values():
        split.pop("images")
    (old / "manifest.json").write_text(json.dumps(manifest))
    stats, origin = train_image_stats(str(old))
    assert stats["channels"] == 3 and stats["rows"] == 90 and "sample of the shards" in origin
    assert "re-run `byol prepare`" in capsys.readouterr().out


def test_evaluation_resizes_the_short_side_then_centre_crops():
    image = torch.zeros((3, 40, 80), dtype=torch.uint8)
    image[:, :, 20:60] = 255  # a white centre square, black left and right quarters
    out = resize_uint8(image, 20)
    assert out.shape == (3, 20, 20)
    assert out.float().mean() > 240  # the centre crop: the square, not a squashed whole (which is half black)


def _png(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_rgb_photos_train_as_rgb_from_data_path_alone_and_beat_grayscale(ray_local, hue_shards, tmp_path):
    """Hue-only classes at equal luminance: with only data.path (and a tiny budget) set, pretraining resolves
    3 channels and the manifest's size, and its val kNN is far above the same data trained as grayscale."""
    from pipeline.train import pretrain

    common = [
        f"data.path={hue_shards / 'shards'}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "data.deterministic=true",
        "train.num_workers=1",
        "train.batch_size=30",
        "train.max_steps=3",
        "model.cnn_width=8",
        "model.proj_hidden=64",
        "model.pred_hidden=64",
        "model.proj_dim=32",
        "eval.knn_k=20",
    ]
    rgb = pretrain(load_config(None, [*common, "run.name=rgb"]))
    gray = pretrain(load_config(None, [*common, "run.name=gray", "data.channels=1", "data.accept_mismatch=true"]))
    rgb_params = _logged_params(rgb)
    assert rgb_params["data.channels"] == "3" and rgb_params["data.image_size"] == "48"
    print(f"val kNN top-1: RGB {rgb['knn_top1']:.3f}, grayscale {gray['knn_top1']:.3f}")
    assert rgb["knn_top1"] >= 0.9 and gray["knn_top1"] <= 0.6  # 3 classes: chance is 0.33


def _logged_params(summary: dict) -> dict:
    import mlflow

    return mlflow.MlflowClient(summary["tracking_uri"]).get_run(summary["run_id"]).data.params


def no_ray_connect(monkeypatch) -> list:
    """Records every call of pretrain's connect (the first Ray resource a run takes) instead of connecting."""
    import pipeline.train.driver as driver

    calls: list = []
    monkeypatch.setattr(driver, "connect", lambda *a, **k: calls.append(a) or False)
    return calls


def test_the_cli_refuses_a_contradiction_before_ray_starts(hue_shards, capsys, monkeypatch):
    from pipeline.cli.main import main as cli

    connects = no_ray_connect(monkeypatch)

    args = ["pretrain", "--set", f"data.path={hue_shards / 'shards'}", "--set", "data.channels=1"]
    assert cli(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "data.channels=1" in last and "data.accept_mismatch=true" in last and "colour" in last
    assert not connects


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_the_stream_trains_with_unset_data_keys_and_records_what_it_resolved(ray_local, fmnist_full_shards, tmp_path):
    """The Ray Data stream (and its decoded cache, sized from the manifest's uniform 28x28 and the resolved channel
    count) with only data.path set."""
    from pipeline.train import pretrain

    summary = pretrain(
        load_config(
            None,
            [
                f"data.path={fmnist_full_shards}",
                f"run.storage_path={tmp_path / 'runs'}",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                "train.num_workers=1",
                "train.batch_size=32",
                "train.max_steps=2",
                "model.cnn_width=8",
                "eval.every_epochs=0",
            ],
        )
    )
    assert summary["steps"] == 2
    written = yaml.safe_load((Path(summary["backbone"]).parent / "config.yaml").read_text())
    assert written["data"]["channels"] == 1 and written["data"]["image_size"] == 28
    assert len(written["data"]["mean"]) == 1 and 0.2 < written["data"]["mean"][0] < 0.4


def test_a_backbone_that_cannot_take_the_data_stops_before_ray(hue_shards, tmp_path, capsys, monkeypatch):
    """Checked on the driver with the resolved size: a ViT made for 224 px on 48-px images, a model.init that is
    missing or of another network, a model with auxiliary outputs; each in one last line naming the key."""
    from pipeline.cli.main import main as cli

    connects = no_ray_connect(monkeypatch)
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pt")
    cases = {
        "model.backbone=torchvision:vit_b_16": "model.backbone=torchvision:vit_b_16 does not take 48x48 images",
        f"model.init={tmp_path / 'missing.pt'}": "missing.pt: no such file",
        f"model.init={tmp_path / 'other.pt'}": "does not load into model.backbone=small_cnn with strict=True",
        "model.backbone=torchvision:googlenet": "auxiliary classifier outputs",
    }
    for override, message in cases.items():
        assert cli(["pretrain", "--set", f"data.path={hue_shards / 'shards'}", "--set", override]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in last, (override, last)
    assert not connects


def test_small_stem_follows_the_image_size_unless_set():
    assert load_config(None, ["data.image_size=32"]).model.small_stem is True
    assert load_config(None, ["data.image_size=224"]).model.small_stem is False
    assert load_config(None, ["data.image_size=224", "model.small_stem=true"]).model.small_stem is True
    assert load_config(None).model.small_stem is None  # settled when data.image_size is resolved from the data
