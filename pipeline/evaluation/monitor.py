"""The kNN monitor during pretraining: weighted kNN top-1 of the ONLINE encoder on the labelled val split.

Every training rank holds its part of the memory bank (a sample of ``eval.max_train_images`` labelled
train images) and of the queries (``eval.max_val_images`` of val), extracts their features, and the
features are exchanged so every rank computes the same score. So no rank waits long for another
(a rank-0-only evaluation could outlast the others' collective timeouts), the work is split, and no
rank reads more than its part of the sample.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import Config
from pipeline.data.labelled import has_labelled, load_labelled
from pipeline.evaluation.metrics import extract_features, knn_accuracy


class KnnMonitor:
    def __init__(self, cfg: Config, device: torch.device, sync: Any = None) -> None:
        """``sync``: an object with ``rank``, ``world`` and ``gather_objects`` (``pipeline.train.sync.RankSync``)."""
        self.cfg, self.device, self.sync = cfg, device, sync
        rank, world = (sync.rank, sync.world) if sync is not None else (0, 1)
        path, e = cfg.data.path, cfg.eval
        self.bank_x, self.bank_y = load_labelled(path, "train", cfg, e.max_train_images, rank, world)
        self.query_x, self.query_y = load_labelled(path, "val", cfg, e.max_val_images, rank, world, seed=1)

    @staticmethod
    def available(cfg: Config) -> bool:
        return has_labelled(cfg.data.path, "val")

    def _features(self, encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
        d = self.cfg.data
        return extract_features(encoder, images, d.mean, d.std, device=self.device)

    def __call__(self, encoder: nn.Module) -> float:
        parts = (self._features(encoder, self.bank_x), self.bank_y, self._features(encoder, self.query_x), self.query_y)
        if self.sync is not None and self.sync.world > 1:
            gathered = self.sync.gather_objects(parts)
            parts = tuple(torch.cat([g[i] for g in gathered]) for i in range(4))
        bank, bank_y, query, query_y = parts
        return knn_accuracy(bank, bank_y, query, query_y, self.cfg.eval.knn_k, self.cfg.eval.knn_temperature)
