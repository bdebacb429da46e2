"""Labelled images for evaluation (kNN bank and queries, linear probe), read as sampled row groups (no Ray).

A sample is a set of whole Parquet row groups (``sample_row_groups``), read one at a time, each image decoded
and resized as it arrives: an ImageNet run reads ``eval.max_train_images`` images, not the train split, and
``rank``/``world`` give every training worker its own row groups of the sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.core.images import decode
from pipeline.data.manifest import iter_row_groups, read_manifest, sample_row_groups
from pipeline.errors import BadRecord, DataError


def resize_uint8(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [C, H, W] -> uint8 [C, size, size]: the shorter side resized to ``size`` (antialiased), then the
    centre ``size`` x ``size`` crop (the standard evaluation protocol; a non-square image is never squashed)."""
    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        image = (
            F.interpolate(
                image[None].float(), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
            )[0]
            .round()
            .clamp(0, 255)
            .to(torch.uint8)
        )
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[:, top : top + size, left : left + size].contiguous()


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

    The sample (``max_images`` rows as whole row groups, or all) is the same on every rank; rank r takes every
    world-th row group. Unlabelled and undecodable rows are left out. With one rank, a sample without a usable
    image raises :class:`DataError`; with several, a rank's part may be empty (the caller checks the total).
    """
    groups = sample_row_groups(path, split, max_images, seed)[rank::world]
    size, channels = cfg.data.image_size, cfg.data.channels
    images, labels = [], []
    skip = cfg.data.on_bad_record == "skip"
    for table in iter_row_groups(path, groups, ["image", "label"], skip_unreadable=skip):
        for data, label in zip(table["image"].to_pylist(), table["label"].to_pylist(), strict=True):
            if label is None:
                continue
            try:
                images.append(resize_uint8(decode(data, channels), size))
            except BadRecord:
                continue
            labels.append(label)
    if not images:
        if world == 1:
            raise no_usable_images(path, split)
        return torch.zeros((0, channels, size, size), dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    return torch.stack(images), torch.tensor(labels)


def no_usable_images(path: str, split: str) -> DataError:
    return DataError(
        f"{path}: split {split!r} has no usable labelled images in the evaluation sample (all undecodable or "
        "unlabelled); re-run `byol prepare`"
    )


def has_labelled(path: str, split: str) -> bool:
    """True when ``path`` has a manifest whose ``split`` holds labelled rows (and train is labelled)."""
    try:
        splits = read_manifest(path)["splits"]
    except DataError:
        return False
    return split in splits and splits[split]["rows"] > 0 and splits["train"]["unlabelled"] < splits["train"]["rows"]
