"""Labelled images for evaluation (kNN bank and queries, linear probe), read by sampled rows (no Ray).

Only the Parquet row groups that hold the sampled rows are read, one at a time, and each image is
decoded and resized as it arrives: rank 0 of an ImageNet run reads ``eval.max_train_images`` images,
not the train split. ``rank``/``world`` split the sample so every training worker loads its part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.core.images import BadRecord, decode
from pipeline.data.shards import PrepareError, iter_rows, read_manifest, sample_rows


def resize_uint8(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [C, H, W] -> uint8 [C, size, size] (whole image, antialiased)."""
    if image.shape[-2:] == (size, size):
        return image
    resized = F.interpolate(
        image[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0].round().clamp(0, 255).to(torch.uint8)


def load_labelled(
    path: str,
    split: str,
    cfg: Config,
    max_images: int | None,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of a labelled sample of ``split``: uint8 [N, C, S, S] at data.image_size + labels.

    The sample (``max_images`` rows, or all) is the same on every rank; rank r takes every world-th row.
    Unlabelled and undecodable rows are left out.
    """
    rows = sample_rows(path, split, max_images, seed)[rank::world]
    size, channels = cfg.data.image_size, cfg.data.channels
    images, labels, undecodable = [], [], 0
    skip = cfg.data.on_bad_record == "skip"
    for table in iter_rows(path, split, rows, ["image", "label"], skip_unreadable=skip):
        for data, label in zip(table["image"].to_pylist(), table["label"].to_pylist(), strict=True):
            if label is None:
                continue
            try:
                images.append(resize_uint8(decode(data, channels), size))
            except BadRecord:
                undecodable += 1
                continue
            labels.append(label)
    if not images:
        if world > 1 and len(rows) == 0:  # more ranks than sampled rows: an empty part is fine
            return torch.zeros((0, channels, size, size), dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
        raise PrepareError(
            f"{path}: split {split!r} has no usable labelled images ({len(rows)} sampled, {undecodable} undecodable); "
            "re-run `byol prepare`"
        )
    return torch.stack(images), torch.tensor(labels)


def has_labelled(path: str, split: str) -> bool:
    """True when ``path`` has a manifest whose ``split`` holds labelled rows (and train is labelled)."""
    try:
        splits = read_manifest(path)["splits"]
    except PrepareError:
        return False
    return split in splits and splits[split]["rows"] > 0 and splits["train"]["unlabelled"] < splits["train"]["rows"]
