"""What a pretraining run leaves behind, next to its checkpoints and in its MLflow run: the resolved config, the
exported backbone, the loss/tau/lr/kNN curves and the summary (no Ray import: the driver passes Ray's results in).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.core.storage import is_uri, join_location, upload_file
from pipeline.tracking import Tracker


class RunOutputs:
    """Files written locally (in the run directory, or a staging directory for a URI) then published."""

    def __init__(self, storage: str, name: str, tracker: Tracker) -> None:
        self.run_dir = join_location(storage, name)
        self.remote = is_uri(storage)
        self.staging = Path(tempfile.mkdtemp(prefix="byol-run-")) if self.remote else Path(self.run_dir)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.tracker = tracker

    def publish(self, name: str, write) -> str:
        """``write(path)`` makes the file; it goes next to the run's checkpoints and into the MLflow run."""
        local = self.staging / name
        write(local)
        self.tracker.log_artifact(local)
        return upload_file(local, join_location(self.run_dir, name))

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self.staging, ignore_errors=True)


def plot_history(history: list[dict[str, Any]], out: Path) -> None:
    """Loss, tau, learning rate and kNN against the step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    steps = [h["step"] for h in history]
    for ax, key in zip(axes, ("loss", "tau", "lr", "knn_top1"), strict=True):
        pts = [(s, h[key]) for s, h in zip(steps, history, strict=True) if key in h]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o" if key == "knn_top1" else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def checkpoint_location(checkpoint_path: str, storage: str, name: str) -> str:
    """A Ray checkpoint's location as the user can pass it back: a local path, or a URI on remote storage
    (built from ``run.storage_path`` as given, so a host, port or query in it is kept)."""
    if not is_uri(storage):
        return checkpoint_path
    return join_location(storage, name, Path(checkpoint_path).name)
