"""A study's configuration: a pretraining config plus a ``tune:`` section (search space, searcher, scheduler).

Validated before any Ray resource starts, like every config: the search space's keys are dotted config keys,
and every value a trial could get (bounds of ranges, each choice) is applied to the pretraining config and
validated there, so ``optim.base_lr: {type: loguniform, low: -1, ...}`` fails naming the key.

A trial's config = the pretraining config + its sampled values (:func:`trial_config`). ``ema.tau_base`` is
searched on 1 - tau (``one_minus_loguniform``): what matters is the EMA's horizon, 1 / (1 - tau).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from pipeline.config import (
    Config,
    ConfigError,
    _format_errors,
    _Section,
    apply_overrides,
    config_from_dict,
)

ONE_MINUS = "@one_minus"  # a searcher sees "ema.tau_base@one_minus" ~ loguniform; the trial gets 1 - value
# What PBT may change between chunks: both act through the schedules, recomputed from the config at every step.
PBT_MUTABLE = ["optim.base_lr", "ema.tau_base"]
METRIC = "knn_top1"  # weighted kNN top-1 of the online encoder on the labelled val split: never the BYOL loss


class Distribution(_Section):
    type: Literal["loguniform", "uniform", "one_minus_loguniform", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _complete(self) -> Distribution:
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"type {self.type} needs a non-empty 'values' list")
        else:
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"type {self.type} needs low < high")
            if self.type != "uniform" and self.low <= 0:
                raise ValueError(f"type {self.type} needs low > 0")
        return self

    def extremes(self) -> list[Any]:
        """Every value a trial could get at the edges (validated against the config before the study starts)."""
        if self.values is not None:
            return list(self.values)
        if self.type == "one_minus_loguniform":
            return [1 - self.low, 1 - self.high]
        return [self.low, self.high]


class AshaSection(_Section):
    grace_epochs: float = Field(1.0, gt=0)  # no trial is stopped before this many epochs
    reduction_factor: int = Field(2, ge=2)


class PbtSection(_Section):
    interval_epochs: float = Field(1.0, gt=0)  # a chunk: train this many epochs, checkpoint, maybe exploit/explore
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)
    mutate: list[str] = ["optim.base_lr", "ema.tau_base"]
    synch: bool = True  # every trial reaches the same epoch before exploiting (comparable kNN)


class CollapseSection(_Section):
    patience: int = Field(2, ge=1)  # reports in a row with the collapse monitor under log.collapse_warn
    chance_margin: float = Field(0.02, ge=0)  # kNN top-1 <= 1/classes + this: collapsed


class TuneSection(_Section):
    name: str | None = None  # the study's folder under run.storage_path and its MLflow parent run
    num_samples: int | None = Field(None, ge=1)  # random/optuna: trials (default 4); grid: repeats (default 1)
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: as many as the cluster's CPUs/GPUs fit
    searcher: Literal["random", "grid", "optuna"] = "random"
    scheduler: Literal["fifo", "asha", "pbt"] = "asha"
    report_every_epochs: float = Field(1.0, gt=0)  # kNN on val -> one Tune result (fractions of an epoch work)
    stall_minutes: float = Field(10.0, ge=0)  # no report and resources waited for this long: stop (0: never)
    seed: int = 0
    space: dict[str, Distribution]
    asha: AshaSection = AshaSection()
    pbt: PbtSection = PbtSection()
    collapse: CollapseSection = CollapseSection()

    @property
    def samples(self) -> int:
        return self.num_samples or (1 if self.searcher == "grid" else 4)

    @model_validator(mode="after")
    def _searcher_fits(self) -> TuneSection:
        kinds = {d.type for d in self.space.values()}
        if self.searcher == "grid" and kinds - {"grid", "choice"}:
            raise ValueError("searcher grid needs every space entry to be of type grid or choice")
        if self.searcher == "optuna" and "grid" in kinds:
            raise ValueError("searcher optuna cannot take type grid entries (use choice)")
        if self.scheduler == "pbt":
            if self.searcher == "optuna":
                raise ValueError("scheduler pbt explores by itself: use searcher random (or grid) with it")
            missing = [k for k in self.pbt.mutate if k not in self.space]
            if missing:
                raise ValueError(f"pbt.mutate keys {missing} are not in the search space")
            unsafe = [k for k in self.pbt.mutate if k not in PBT_MUTABLE]
            if unsafe:
                raise ValueError(
                    f"pbt.mutate keys {unsafe} cannot change in a running trial (a restored optimizer keeps the "
                    f"source's other settings; batch size and budget change what a step means): use {PBT_MUTABLE}"
                )
            bad = [k for k in self.pbt.mutate if self.space[k].type == "grid"]
            if bad:
                raise ValueError(f"pbt.mutate keys {bad} must be ranges or choices, not grid")
        return self


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, TuneSection]:
    """Read a tune config (``--set tune.num_samples=8`` overrides the study, other keys the pretraining)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return study_from_dict(apply_overrides(tree, list(overrides)), str(path))


def study_from_dict(tree: dict[str, Any], where: str = "the config") -> tuple[Config, TuneSection]:
    """A tune config's sections (overrides applied) -> (pretraining config, study), both validated."""
    tree = dict(tree)
    if "tune" not in tree:
        raise ConfigError(f"{where}: no tune: section (the search space); see configs/tune_fashion_mnist_cpu.yaml")
    tune_tree = tree.pop("tune")
    cfg = config_from_dict(tree)
    try:
        study = TuneSection.model_validate(tune_tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err).replace("\n  ", "\n  tune.")) from None
    check_space(cfg, study)
    return cfg, study


def check_space(cfg: Config, study: TuneSection) -> None:
    """Every key is a config key, and every edge value passes the config's own validation."""
    for key, dist in study.space.items():
        for value in dist.extremes():
            try:
                trial_config(cfg, {search_key(key, dist): searcher_value(dist, value)})
            except ConfigError as err:
                raise ConfigError(f"tune.space.{key} = {value!r}: {err}") from None


def search_key(key: str, dist: Distribution) -> str:
    return key + ONE_MINUS if dist.type == "one_minus_loguniform" else key


def searcher_value(dist: Distribution, value: Any) -> Any:
    return 1 - value if dist.type == "one_minus_loguniform" else value


def config_values(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled values as config keys: ``{"ema.tau_base@one_minus": 0.01}`` -> ``{"ema.tau_base": 0.99}``."""
    out = {}
    for key, value in params.items():
        if key.endswith(ONE_MINUS):
            out[key.removesuffix(ONE_MINUS)] = 1 - float(value)
        else:
            out[key] = value
    return out


def trial_config(base: Config, params: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The pretraining config of one trial: ``base`` with its values (validated as ``--set`` values are)."""
    tree = copy.deepcopy(base.to_dict())
    for key, value in config_values(params).items():
        node, parts = tree, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{key}: {part} is not a config section")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"{key}: unknown key (allowed in {'.'.join(parts[:-1])}: {', '.join(sorted(node))})")
        node[parts[-1]] = value
    return config_from_dict(apply_overrides(tree, list(overrides)))


def tune_space(study: TuneSection) -> dict[str, Any]:
    """The search space as Ray Tune sampling objects (keys as the searcher sees them)."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, d in study.space.items():
        if d.type in ("loguniform", "one_minus_loguniform"):
            space[search_key(key, d)] = tune.loguniform(d.low, d.high)
        elif d.type == "uniform":
            space[key] = tune.uniform(d.low, d.high)
        elif d.type == "choice" and study.searcher != "grid":
            space[key] = tune.choice(d.values)
        else:
            space[key] = tune.grid_search(d.values)
    return space


def search_bounds(study: TuneSection) -> dict[str, tuple[float, float]]:
    """The ranges as the searcher sees them (PBT's explore multiplies by 0.8 / 1.2 without looking at them)."""
    return {search_key(k, d): (d.low, d.high) for k, d in study.space.items() if d.low is not None}


def clip_to_space(params: dict[str, Any], bounds: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Values kept inside their declared ranges (a perturbed 1 - tau may otherwise leave [0, 1])."""
    out = dict(params)
    for key, (low, high) in bounds.items():
        if isinstance(out.get(key), int | float):
            out[key] = min(max(out[key], low), high)
    return out


def shown_params(params: dict[str, Any]) -> dict[str, Any]:
    """The values a person reads (tau, not 1 - tau)."""
    return config_values({k: v for k, v in params.items() if not k.startswith("_")})
