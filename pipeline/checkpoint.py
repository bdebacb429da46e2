"""Training state on disk: one ``state.pt`` (loads with ``torch.load(weights_only=True)``) + ``config.yaml``.

Written into a temporary directory and renamed into place, so a crash never leaves a half-written
checkpoint under its final name.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"


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


def save_state(directory: str | Path, state: dict[str, Any], config_yaml: str) -> Path:
    """Atomically write ``state`` (tensors, numbers, strings, nested dicts/lists) and the resolved config."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        torch.save(state, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(config_yaml)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a byol checkpoint (no {STATE_FILE})")
    return torch.load(path, map_location=map_location, weights_only=True)


def load_config_text(directory: str | Path) -> str:
    return (Path(directory) / CONFIG_FILE).read_text()
