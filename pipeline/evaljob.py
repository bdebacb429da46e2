"""``byol eval``: kNN and linear-probe top-1 of a checkpoint's ONLINE encoder (no Ray needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import load_config_text, load_state
from pipeline.config import config_from_dict
from pipeline.evaluate import extract_features, knn_accuracy, linear_probe_accuracy
from pipeline.models import build_backbone
from pipeline.shards import PrepareError, read_manifest
from pipeline.tracking import resolve_tracking_uri


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


def load_encoder(checkpoint: str | Path) -> tuple[torch.nn.Module, Any]:
    import yaml

    cfg = config_from_dict(yaml.safe_load(load_config_text(checkpoint)))
    state = load_state(checkpoint)
    encoder, _ = build_backbone(cfg.model.backbone, cfg.data.channels, cfg.model.small_stem, cfg.model.cnn_width)
    prefix = "encoder."
    encoder.load_state_dict({k[len(prefix) :]: v for k, v in state["online"].items() if k.startswith(prefix)})
    return encoder.eval(), cfg


def evaluate_checkpoint(
    checkpoint: str | Path, data: str, splits: list[str], linear: bool = True, max_train_images: int | None = None
) -> dict[str, Any]:
    from pipeline.train import load_labelled

    encoder, cfg = load_encoder(checkpoint)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": data})})
    available = read_manifest(data)["splits"]
    missing = [s for s in splits if s not in available]
    if missing:
        raise PrepareError(f"{data}: no split(s) {missing} (has: {', '.join(available)})")
    d = cfg.data
    train_x, train_y = load_labelled(data, "train", cfg, max_train_images)
    train_f = extract_features(encoder, train_x, d.mean, d.std)
    out: dict[str, Any] = {"checkpoint": str(checkpoint), "train_images": len(train_y), "splits": {}}
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
    return out
