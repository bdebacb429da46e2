"""Typed, validated run configuration: YAML files plus dotted ``--set`` overrides.

Everything is checked here, before any Ray resource starts: unknown keys, wrong types and
out-of-range values raise :class:`ConfigError` with the dotted key and what is allowed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

BACKBONES = ("small_cnn", "small_resnet", "resnet18", "resnet34", "resnet50")
SMALL_IMAGE = 64  # model.small_stem when unset: on for images of at most this many pixels a side


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    path: str = "data/fashion-mnist"
    # Unset (null): taken from the data's image statistics when a run starts (pipeline/data/data_config.py);
    # a value set here that contradicts the data is refused unless accept_mismatch is true.
    image_size: int | None = Field(None, ge=8, le=1024)
    channels: Literal[1, 3] | None = None
    # Per-channel normalisation applied after augmentation (dataset statistics).
    mean: list[float] | None = None
    std: list[float] | None = None
    accept_mismatch: bool = False
    on_bad_record: Literal["skip", "fail"] = "skip"
    shuffle_buffer: int = Field(2048, ge=0)
    prefetch_batches: int = Field(2, ge=0)
    # Decode once into the object store, then only augment per epoch: auto = when the decoded split is known to
    # fit in a quarter of the object store (pipeline/data/ray_dataset.py, use_cache).
    cache: Literal["auto", "on", "off"] = "auto"
    # Where images are decoded: data = Ray Data's CPU tasks; worker = the training worker (on a GPU worker JPEGs
    # are decoded by nvJPEG and cropped there: Ray Data only reads bytes). worker needs augment.device=worker.
    decode: Literal["data", "worker"] = "data"

    @field_validator("cache", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value  # YAML 1.1 on/off

    # Bit-reproducible runs (resume replays the exact images): a Ray-free reader (data/deterministic_reader.py).
    deterministic: bool = False

    @model_validator(mode="after")
    def _stats_match_channels(self) -> DataConfig:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and self.channels is not None and len(values) != self.channels:
                raise ValueError(f"data.{name} has {len(values)} values but data.channels is {self.channels}")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(f"data.mean has {len(self.mean)} values but data.std has {len(self.std)}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("data.std values must be > 0")
        return self


class ViewConfig(_Section):
    """The probabilities that differ between the two views (paper, Table 6)."""

    blur_prob: float = Field(1.0, ge=0, le=1)
    solarize_prob: float = Field(0.0, ge=0, le=1)


class AugmentConfig(_Section):
    device: Literal["data", "worker"] = "data"
    crop_scale_min: float = Field(0.08, gt=0, le=1)
    crop_scale_max: float = Field(1.0, gt=0, le=1)
    hflip_prob: float = Field(0.5, ge=0, le=1)
    jitter_prob: float = Field(0.8, ge=0, le=1)
    brightness: float = Field(0.4, ge=0)
    contrast: float = Field(0.4, ge=0)
    saturation: float = Field(0.2, ge=0)
    hue: float = Field(0.1, ge=0, le=0.5)
    grayscale_prob: float = Field(0.2, ge=0, le=1)
    blur: bool = True  # the small-image preset turns blur off on both views
    view1: ViewConfig = ViewConfig(blur_prob=1.0, solarize_prob=0.0)
    view2: ViewConfig = ViewConfig(blur_prob=0.1, solarize_prob=0.2)
    # Not in the paper; off by default.
    rotation_degrees: float = Field(0.0, ge=0, le=180)
    erase_prob: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _scale_range(self) -> AugmentConfig:
        if self.crop_scale_min > self.crop_scale_max:
            raise ValueError("augment.crop_scale_min must be <= augment.crop_scale_max")
        return self


class ModelConfig(_Section):
    # A short name (BACKBONES), torchvision:<classification model> (e.g. torchvision:convnext_tiny) or
    # timm:<model> (pip install -e '.[timm]'); randomly initialised, or from model.init (a local state_dict file).
    backbone: str = "small_cnn"
    init: str | None = None
    # 3x3 stride-1 first conv, no max-pool (ResNets: the short names, torchvision:resnet*); unset: on for images
    # of at most SMALL_IMAGE px (28-px digits, 32-px CIFAR), off for photos (the library's own stem).
    small_stem: bool | None = None
    cnn_width: int = Field(32, ge=4)  # small_cnn, small_resnet: stage widths w, 2w, 4w, 8w
    proj_hidden: int = Field(4096, ge=1)
    proj_dim: int = Field(256, ge=1)
    pred_hidden: int = Field(4096, ge=1)
    predictor: Literal["mlp", "none"] = "mlp"  # none: the ablation that collapses (tests of collapse handling)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        library, sep, name = value.partition(":")
        plain_name = name.replace("_", "").replace(".", "").isalnum()
        if value in BACKBONES or (sep and library in ("torchvision", "timm") and plain_name):
            return value
        quoted = ", ".join(f"'{b}'" for b in BACKBONES)
        raise ValueError(f"Input should be {quoted}, 'torchvision:<model>' or 'timm:<model>'")


class TrainConfig(_Section):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    batch_size: int = Field(256, ge=2)  # global, split across workers
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1)
    grad_accum: int = Field(1, ge=1)
    seed: int = 0
    # torch.compile the online and target forwards (minutes of compiling on a CPU; pays on long GPU runs).
    compile: bool = False
    # Autocast dtype of the forwards (weights, EMA and optimizer stay fp32). auto: bf16 on a GPU and on a CPU
    # with bf16 instructions (AMX or AVX-512 BF16; bench/cpu_precision.py measures both), fp32 elsewhere.
    precision: Literal["auto", "bf16", "fp32"] = "auto"

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainConfig:
        per_worker = self.batch_size // (self.num_workers * self.grad_accum)
        if self.batch_size % (self.num_workers * self.grad_accum) or per_worker < 2:
            raise ValueError(
                f"train.batch_size={self.batch_size} must split into >= 2 images per worker per micro-step "
                f"(train.num_workers={self.num_workers}, train.grad_accum={self.grad_accum})"
            )
        return self


class OptimConfig(_Section):
    name: Literal["lars", "sgd", "adamw"] = "lars"
    base_lr: float = Field(0.2, gt=0)  # scaled by global batch / 256
    weight_decay: float = Field(1.5e-6, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    trust_coefficient: float = Field(1e-3, gt=0)  # LARS eta
    warmup_epochs: float = Field(10.0, ge=0)
    lr_schedule: Literal["cosine", "linear", "step", "constant"] = "cosine"


class EmaConfig(_Section):
    tau_base: float = Field(0.99, ge=0, lt=1)
    schedule: Literal["cosine", "constant"] = "cosine"  # cosine: tau rises from tau_base to 1 (the paper)
    # Set by a PBT exploit, not by hand: [from_step, from_tau, blend_steps] (see core.schedules.Schedule).
    handover: tuple[int, float, int] | None = None
    check_every: int = Field(100, ge=1)  # steps between cross-rank target checksums


class EvalConfig(_Section):
    every_epochs: int = Field(1, ge=0)  # also at the end of every run (or chunk); 0: only at the end
    every_steps: int | None = Field(None, ge=1)  # instead of every_epochs (a tuning study's report cadence)
    knn_k: int = Field(200, ge=1)
    knn_temperature: float = Field(0.07, gt=0)
    max_train_images: int | None = Field(None, ge=1)  # cap the kNN memory bank (a sample, read by row groups)
    max_val_images: int | None = Field(10000, ge=1)  # cap the kNN queries from val


class CheckpointConfig(_Section):
    every_steps: int = Field(500, ge=1)
    keep: int = Field(2, ge=1)


class LogConfig(_Section):
    every_steps: int = Field(20, ge=1)
    collapse_warn: float = Field(0.1, ge=0)  # warn when std(normalised z) * sqrt(d) falls below


class TrackingConfig(_Section):
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<abs runs dir>/mlflow.db
    experiment: str = Field("byol", min_length=1)


class RunConfigSection(_Section):
    name: str | None = None
    storage_path: str = "runs"
    max_failures: int = Field(3, ge=0)  # worker-group restarts from the last checkpoint (lost node, OOM)


class Config(_Section):
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    ema: EmaConfig = EmaConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    tracking: TrackingConfig = TrackingConfig()
    run: RunConfigSection = RunConfigSection()

    @model_validator(mode="after")
    def _small_stem_for_small_images(self) -> Config:
        if self.model.small_stem is None and self.data.image_size is not None:
            self.model.small_stem = self.data.image_size <= SMALL_IMAGE
        return self

    @model_validator(mode="after")
    def _decode_on_the_worker(self) -> Config:
        if self.data.decode == "worker":
            if self.augment.device != "worker":
                raise ValueError("data.decode=worker needs augment.device=worker (the crops follow the decode)")
            if self.data.cache == "on":
                raise ValueError(
                    "data.cache=on caches decoded images; with data.decode=worker nothing is decoded "
                    "in Ray Data (use data.cache=auto or off)"
                )
            if self.data.deterministic:
                raise ValueError("data.decode=worker is not supported with data.deterministic=true")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="python")

    def flat(self) -> dict[str, Any]:
        """``{"train.batch_size": 256, ...}`` for MLflow params."""
        return flatten(self.to_dict())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.base_lr=0.3"`` -> (["optim", "base_lr"], 0.3); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.strip().split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    tree = copy.deepcopy(tree)
    for text in overrides:
        keys, value = parse_override(text)
        node = tree
        for i, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(keys[: i + 1])} is not a section")
            node = child
        node[keys[-1]] = value
    return tree


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            lines.append(f"{key}: unknown key (allowed: {', '.join(allowed)})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            shown = "" if e["type"] == "value_error" else f" (got {e.get('input')!r})"
            lines.append(f"{key}: {msg}{shown}" if loc else msg)  # a check across sections names its keys
    return "invalid config:\n  " + "\n  ".join(lines)


def config_from_dict(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path`` (YAML; None means all defaults), apply ``section.key=value`` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        tree = loaded or {}
    return config_from_dict(apply_overrides(tree, list(overrides)))


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
