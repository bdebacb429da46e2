"""The Python API, for notebooks and scripts: the ``byol`` commands as functions that return what ``--json`` prints.

    from pipeline import api
    run = api.pretrain("configs/fashion_mnist_cpu.yaml", ["train.epochs=3"])      # or a dict instead of a file
    api.evaluate(run["checkpoint"], "data/fashion-mnist", ["test"])
    api.embed(run["checkpoint"], "data/photos", "embeddings/")
    api.export(run["checkpoint"], "backbone.pt")

``config`` is a YAML file, a dict of sections, or None (the defaults); ``overrides`` are ``section.key=value``
strings, as ``--set`` takes them. Errors the user can fix raise ``pipeline.errors.UserError`` subclasses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Config, apply_overrides, config_from_dict, load_config
from pipeline.errors import ConfigError

ConfigSource = str | Path | dict[str, Any] | None


def config(source: ConfigSource = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A validated config from a file, a dict or the defaults, with ``overrides`` applied."""
    if isinstance(source, dict):
        return config_from_dict(apply_overrides(source, list(overrides)))
    return load_config(source, overrides)


def pretrain(
    source: ConfigSource = None, overrides: list[str] | tuple[str, ...] = (), resume: str | None = None
) -> dict[str, Any]:
    """``byol pretrain``: on the cluster in RAY_ADDRESS or a local Ray; the summary plus ``history``."""
    from pipeline.train.driver import pretrain as run

    return run(config(source, overrides), resume=resume)


def tune(
    source: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    resume: str | None = None,
) -> dict[str, Any]:
    """``byol tune``: a study of a config with a ``tune:`` section; ``resume=STUDY_PATH`` continues a study
    (``byol tune --resume``)."""
    from pipeline.tune.space import study_from_dict
    from pipeline.tune.study import resume_study, run_study

    if resume is not None:
        return resume_study(resume)
    if source is None:
        raise ConfigError("tune needs a config (a file or a dict with a tune: section) or resume=STUDY_PATH")
    if isinstance(source, dict):
        return run_study(*study_from_dict(apply_overrides(source, list(overrides))))
    from pipeline.tune.space import load_study

    return run_study(*load_study(source, overrides))


def evaluate(
    checkpoint: str, data: str, splits: list[str] | tuple[str, ...] = ("val", "test"), linear: bool = True
) -> dict[str, Any]:
    """``byol eval``: kNN (and linear-probe) top-1 of a checkpoint's online encoder on ``splits`` of ``data``."""
    from pipeline.evaluation.checkpoint_eval import evaluate_checkpoint

    return evaluate_checkpoint(checkpoint, data, splits=list(splits), linear=linear)


def embed(
    checkpoint: str, data: str, out: str, splits: list[str] | None = None, parallel: str = "auto"
) -> dict[str, Any]:
    """``byol embed``: L2-normalised embeddings of ``data`` (shards or an image folder) written to ``out`` (Parquet);
    Ray Data on a cluster, else this process (``parallel``: auto | ray | off)."""
    from pipeline.evaluation.embed import embed as run

    return run(checkpoint, data, out, splits, parallel=parallel)


def export(checkpoint: str, out: str, fmt: str = "state_dict") -> dict[str, str | None]:
    """``byol export``: the backbone as a state_dict (with the code that loads it) or TorchScript."""
    from pipeline.core.export import export_backbone

    return export_backbone(checkpoint, out, fmt)
