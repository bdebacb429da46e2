"""Training state on disk: its layout, how it is built and restored, and where it may live (no Ray).

A checkpoint is a directory with ``state.pt`` (loads with ``torch.load(weights_only=True)``: tensors,
numbers, strings, lists and dicts only) and ``config.yaml`` (the resolved run config). It may be a local
path or a filesystem URI (``s3://``, ``gs://``, ``file://``...): :func:`local_checkpoint` gives a local
view of either.

Layout of ``state.pt`` (``byol-ray-checkpoint/1``), built by :func:`build_state` and applied by
:func:`restore_state` (the one place that knows it, like DINO's ``restart_from_checkpoint``):
step, epochs_done, online (encoder + projector + predictor), target (encoder + projector), optimizer,
rng, history (metrics at log steps), model and data (what ``byol eval`` needs to rebuild the encoder).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from pipeline.config import Config, config_from_dict, dump_config
from pipeline.core.models import build_backbone
from pipeline.core.storage import download_dir, is_file, is_uri, join_location

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
FORMAT = "byol-ray-checkpoint/1"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def build_state(
    cfg: Config,
    step: int,
    steps_per_epoch: int,
    online: nn.Module,
    target: nn.Module,
    optimizer: torch.optim.Optimizer,
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """Everything needed to continue a run exactly (``online``/``target`` unwrapped from DDP)."""
    return {
        "format": FORMAT,
        "step": step,
        "epochs_done": step / steps_per_epoch,
        "online": online.state_dict(),
        "target": target.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "history": history,
        "model": cfg.model.model_dump(),
        "data": {
            "channels": cfg.data.channels,
            "image_size": cfg.data.image_size,
            "mean": cfg.data.mean,
            "std": cfg.data.std,
        },
    }


def restore_state(
    state: dict[str, Any],
    online: nn.Module,
    target: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """Load weights (and optimizer, RNG) from ``state``; returns (step, history) to continue from.

    The optimizer's learning rate is not taken from the state: the schedule sets it every step, so a
    changed ``optim.base_lr`` (a PBT mutation) takes effect from the first step after the restore.
    """
    online.load_state_dict(state["online"])
    target.load_state_dict(state["target"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
    return int(state["step"]), list(state.get("history", []))


def save_state(directory: str | Path, state: dict[str, Any], config: Config | str) -> Path:
    """Write ``state`` and the resolved config so that a reader never sees a half-written file.

    A new directory is filled under a temporary name and renamed into place; an existing one has each
    file replaced by ``os.replace`` (atomic per file), so the old checkpoint stays loadable until the
    new one is complete.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    config_yaml = config if isinstance(config, str) else dump_config(config)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (tmp / CONFIG_FILE).write_text(config_yaml)
        torch.save(state, tmp / STATE_FILE)
        if directory.is_dir():
            for name in (CONFIG_FILE, STATE_FILE):  # the state last: it is what readers look for
                os.replace(tmp / name, directory / name)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


@contextlib.contextmanager
def local_checkpoint(location: str | Path) -> Iterator[Path]:
    """A local directory holding the checkpoint at ``location`` (a path, or a URI copied to a temp dir)."""
    if not is_uri(location):
        yield Path(location)
        return
    if not is_file(join_location(str(location), STATE_FILE)):
        raise FileNotFoundError(f"{location}: not a byol checkpoint (no {STATE_FILE})")
    with tempfile.TemporaryDirectory(prefix="byol-ckpt-") as tmp:
        download_dir(str(location), tmp)
        yield Path(tmp)


def load_state(location: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    with local_checkpoint(location) as directory:
        path = directory / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{location}: not a byol checkpoint (no {STATE_FILE})")
        return torch.load(path, map_location=map_location, weights_only=True)


def checkpoint_step(directory: str | Path) -> int:
    """The step a local checkpoint was written at (the weights are memory-mapped, not read)."""
    state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    return int(state["step"])


def load_config_text(location: str | Path) -> str:
    with local_checkpoint(location) as directory:
        return (directory / CONFIG_FILE).read_text()


def last_metric(history: list[dict[str, Any]], key: str) -> float | None:
    """The latest value of ``key`` in a metric history (kNN is measured at epoch ends, not every log step)."""
    return next((h[key] for h in reversed(history) if key in h), None)


def backbone_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The online encoder's weights (what BYOL keeps), keys as in the bare backbone."""
    prefix = "encoder."
    return {k[len(prefix) :]: v for k, v in state["online"].items() if k.startswith(prefix)}


def load_encoder(checkpoint: str | Path) -> tuple[torch.nn.Module, Config, int]:
    """(online encoder in eval mode and channels_last, the run's config, the checkpoint's step)."""
    with local_checkpoint(checkpoint) as local:
        state = load_state(local)  # weights_only: first, before anything else of the checkpoint is read
        cfg = config_from_dict(yaml.safe_load(load_config_text(local)))
    encoder, _ = build_backbone(cfg.model.backbone, cfg.data.channels, cfg.model.small_stem, cfg.model.cnn_width)
    encoder.load_state_dict(backbone_state(state))
    return encoder.to(memory_format=torch.channels_last).eval(), cfg, int(state["step"])
