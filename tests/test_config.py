import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  batch_size: 64\noptim:\n  name: adamw\n")
    cfg = load_config(
        f, ["optim.base_lr=0.003", "ema.tau_base=0.97", "augment.view2.solarize_prob=0.5", "train.max_steps=null"]
    )
    assert cfg.train.batch_size == 64 and cfg.optim.name == "adamw"
    assert cfg.optim.base_lr == 0.003 and cfg.ema.tau_base == 0.97
    assert cfg.augment.view2.solarize_prob == 0.5 and cfg.train.max_steps is None
    assert cfg.flat()["optim.base_lr"] == 0.003


@pytest.mark.parametrize(
    "override, names",
    [
        ("optim.base_lr=-0.1", ["optim.base_lr", "greater than 0"]),
        ("ema.tau_base=1.0", ["ema.tau_base", "less than 1"]),
        ("ema.tau_base=-0.5", ["ema.tau_base"]),
        ("train.batch_size=1", ["train.batch_size", "2"]),
        ("model.backbone=vgg16", ["model.backbone", "small_cnn", "resnet18", "resnet50"]),
        ("optim.name=adam", ["optim.name", "lars", "adamw"]),
        ("train.bogus=3", ["train.bogus", "unknown key", "batch_size"]),
        ("nosection.key=1", ["nosection", "unknown key"]),
        ("data.channels=2", ["data.channels"]),
        ("train.epochs=ten", ["train.epochs"]),
        ("data.on_bad_record=ignore", ["data.on_bad_record", "skip", "fail"]),
        ("data.mean=[0.1,0.2,0.3]", ["data.mean", "data.channels"]),
    ],
)
def test_bad_values_name_the_key(override, names):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override, "data.channels=1"] if override.startswith("data.mean") else [override])
    for name in names:
        assert name in str(err.value)


def test_batch_must_split_across_workers():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, ["train.batch_size=6", "train.num_workers=4"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["optim.base_lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_validate():
    import glob

    files = [f for f in glob.glob("configs/*.yaml") if not f.startswith("configs/tune_")]  # studies: test_tune_space
    assert files
    for f in files:
        load_config(f)


def test_worker_decode_needs_worker_augmentation_and_no_decoded_cache():
    with pytest.raises(ConfigError, match="data.decode=worker needs augment.device=worker"):
        load_config(None, ["data.decode=worker"])
    with pytest.raises(ConfigError, match="data.cache=on"):
        load_config(None, ["data.decode=worker", "augment.device=worker", "data.cache=on"])
    with pytest.raises(ConfigError, match="data.deterministic"):
        load_config(None, ["data.decode=worker", "augment.device=worker", "data.deterministic=true"])
    assert load_config(None, ["data.decode=worker", "augment.device=worker"]).data.decode == "worker"
