"""``byol eval``: kNN and linear-probe top-1 of a checkpoint's ONLINE encoder (no Ray needed).

The checkpoint may be a local path or a URI. The figures are logged to the MLflow run that made the
checkpoint (``--run``, or found through the run's ``summary.json`` next to its checkpoints) as
``<split>_knn_top1`` and ``<split>_linear_top1``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.checkpoint import load_encoder
from pipeline.core.storage import join_location, read_bytes
from pipeline.data.labelled import load_labelled
from pipeline.data.manifest import read_manifest
from pipeline.errors import DataError
from pipeline.evaluation.metrics import extract_features, knn_accuracy, linear_probe_accuracy
from pipeline.tracking import Tracker, resolve_tracking_uri


def resolve_checkpoint(checkpoint: str | None, run_id: str | None, tracking_uri: str | None) -> str:
    if checkpoint:
        return checkpoint
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    run = client.get_run(run_id)
    path = run.data.tags.get("checkpoint")
    if not path:
        raise FileNotFoundError(f"MLflow run {run_id} has no recorded checkpoint (tag 'checkpoint')")
    return path


def run_of_checkpoint(checkpoint: str) -> tuple[str | None, str | None]:
    """(run_id, tracking_uri) from the ``summary.json`` a finished pretraining run wrote next to its checkpoints."""
    parent = checkpoint.rstrip("/").rsplit("/", 1)[0]
    try:
        summary = json.loads(read_bytes(join_location(parent, "summary.json")))
    except (OSError, ValueError):
        return None, None
    return summary.get("run_id"), summary.get("tracking_uri")


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str,
    splits: list[str],
    linear: bool = True,
    max_train_images: int | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Score ``splits`` with the labelled train split as kNN bank / probe training set; log to ``run_id`` if given."""
    encoder, cfg, step = load_encoder(checkpoint)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": data})})
    available = read_manifest(data)["splits"]
    missing = [s for s in splits if s not in available]
    if missing:
        raise DataError(f"{data}: no split(s) {missing} (has: {', '.join(available)})")
    d = cfg.data
    train_x, train_y = load_labelled(data, "train", cfg, max_train_images)
    train_f = extract_features(encoder, train_x, d.mean, d.std)
    out: dict[str, Any] = {"checkpoint": str(checkpoint), "train_images": len(train_y), "splits": {}}
    metrics: dict[str, float] = {}
    for split in splits:
        x, y = load_labelled(data, split, cfg, None)
        f = extract_features(encoder, x, d.mean, d.std)
        r = {
            "images": len(y),
            "knn_top1": knn_accuracy(train_f, train_y, f, y, cfg.eval.knn_k, cfg.eval.knn_temperature),
        }
        if linear:
            r["linear_top1"] = linear_probe_accuracy(train_f, train_y, f, y)
        out["splits"][split] = r
        metrics.update({f"{split}_{k}": v for k, v in r.items() if k != "images"})
    if run_id is None and tracking_uri is None:
        run_id, tracking_uri = run_of_checkpoint(str(checkpoint))
    if run_id:
        tracker = Tracker(resolve_tracking_uri(tracking_uri), run_id)
        tracker.log_metrics(metrics, step=step)
        out["run_id"] = run_id if tracker.enabled else None
    return out
