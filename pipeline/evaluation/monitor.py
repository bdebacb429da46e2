"""The kNN monitor during pretraining: weighted kNN top-1 of the ONLINE encoder on the labelled val split.

Every training rank holds its part of the memory bank (a sample of ``eval.max_train_images`` labelled
train images, drawn as whole Parquet row groups) and of the queries (``eval.max_val_images`` of val) and
embeds them. The query features are exchanged (every rank gets all queries), each rank finds the k nearest
of its bank part, and only those (k similarities and labels per query) are exchanged and merged: every rank
computes the same score, the work is split, no rank waits long for another (a rank-0-only evaluation could
outlast the others' collective timeouts), and no bank feature crosses the network.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import Config
from pipeline.data.labelled import has_labelled, load_labelled, no_usable_images
from pipeline.evaluation.metrics import extract_features, knn_neighbors, knn_vote, merge_neighbors


class KnnMonitor:
    def __init__(
        self, cfg: Config, device: torch.device, sync: Any = None, autocast_dtype: torch.dtype | None = None
    ) -> None:
        """``sync``: an object with ``rank``, ``world`` and ``gather_objects`` (``pipeline.train.sync.RankSync``);
        ``autocast_dtype``: the training precision, used for the embeddings too (kNN itself runs in float32)."""
        self.cfg, self.device, self.sync, self.autocast_dtype = cfg, device, sync, autocast_dtype
        rank, world = (sync.rank, sync.world) if sync is not None else (0, 1)
        path, e = cfg.data.path, cfg.eval
        self.bank_x, self.bank_y = load_labelled(path, "train", cfg, e.max_train_images, rank, world)
        self.query_x, self.query_y = load_labelled(path, "val", cfg, e.max_val_images, rank, world, seed=1)

    def check_sample(self) -> None:
        """A rank's part of the sample may be empty, the whole sample must not be: a collective, so called by
        every rank after setup (raises the same :class:`DataError` on every rank)."""
        if self.sync is None or self.sync.world == 1:
            return  # load_labelled already raised
        for split, labels in (("train", self.bank_y), ("val", self.query_y)):
            if self.sync.total(len(labels)) == 0:
                raise no_usable_images(self.cfg.data.path, split)

    @staticmethod
    def available(cfg: Config) -> bool:
        return has_labelled(cfg.data.path, "val")

    def _features(self, encoder: nn.Module, images: torch.Tensor) -> torch.Tensor | None:
        if images.shape[0] == 0:
            return None  # this rank's part of the sample is empty
        d = self.cfg.data
        return extract_features(encoder, images, d.mean, d.std, device=self.device, autocast_dtype=self.autocast_dtype)

    def __call__(self, encoder: nn.Module) -> float:
        e, distributed = self.cfg.eval, self.sync is not None and self.sync.world > 1
        query, query_y = self._features(encoder, self.query_x), self.query_y
        if distributed:  # every rank scores all queries against its part of the bank
            mine = (query.half(), query_y) if query is not None else None
            gathered = [g for g in self.sync.gather_objects(mine) if g is not None]
            query, query_y = torch.cat([g[0] for g in gathered]).float(), torch.cat([g[1] for g in gathered])
        bank = self._features(encoder, self.bank_x)
        neighbors = knn_neighbors(bank, self.bank_y, query, e.knn_k) if bank is not None else None
        parts = self.sync.gather_objects(neighbors) if distributed else [neighbors]
        parts = [p for p in parts if p is not None]  # a rank with an empty bank part has no neighbours
        sims, labels = merge_neighbors(parts, e.knn_k)
        num_classes = 1 + int(max(labels.max(), query_y.max()))  # from exchanged data: the same on every rank
        pred = knn_vote(sims, labels, num_classes, e.knn_temperature)
        return float((pred == query_y).float().mean())
