"""A deterministic, Ray-free reader of a prepared split, for bit-reproducible runs (``data.deterministic``).

Ray Data's per-epoch reshuffle restarts its counter when a run resumes, and its tasks draw fresh
random augmentations, so a resumed run cannot replay the exact images an uninterrupted run saw.
This reader can: epoch ``e`` visits the rows in the order ``permutation(seed, e)``, rank ``r`` takes
every ``world``-th row, and batch ``i`` is augmented with a generator seeded by ``(seed, e, r, i)``.
It holds the split's encoded bytes in memory on every worker: meant for small datasets and checks. An image
folder given as ``data.path`` is read whole, in the fixed order of ``list_units``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pipeline.config import Config
from pipeline.core.augment import TwoViewAugment
from pipeline.core.images import decode
from pipeline.data.bad_records import BadRecordLog
from pipeline.data.manifest import has_manifest, read_split_table
from pipeline.data.read_units import FOLDER_CHUNK, list_units, read_records
from pipeline.errors import BadRecord


class DeterministicReader:
    def __init__(
        self, cfg: Config, rank: int, world: int, split: str = "train", shards: list[dict] | None = None
    ) -> None:
        """``shards``: the manifest entries to read (default all; the driver passes the readable ones)."""
        self.cfg, self.rank, self.world = cfg, rank, world
        if shards is None and not has_manifest(cfg.data.path):  # an image folder: every file, in a fixed order
            self.images, self.keys = [], []
            for unit in list_units(cfg.data.path):
                for images, keys in read_records(cfg.data.path, unit, FOLDER_CHUNK):
                    self.images += images
                    self.keys += keys
        else:
            table = read_split_table(cfg.data.path, split, ["image", "key"], shards)
            self.images, self.keys = table["image"].to_pylist(), table["key"].to_pylist()
        self.augment = TwoViewAugment(cfg.augment, cfg.data.image_size, cfg.data.mean, cfg.data.std)

    def epoch(
        self, epoch: int, batch_size: int, num_batches: int, skip_batches: int = 0, bad: BadRecordLog | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``skip_batches .. num_batches - 1`` of epoch ``epoch`` for this rank (bad records counted
        into ``bad`` and left out: that batch is smaller)."""
        order = np.random.default_rng([self.cfg.train.seed, epoch]).permutation(len(self.images))
        mine = order[self.rank :: self.world]
        for i in range(skip_batches, min(num_batches, len(mine) // batch_size)):
            images = []
            for j in mine[i * batch_size : (i + 1) * batch_size]:
                try:
                    images.append(decode(self.images[j], self.cfg.data.channels))
                except BadRecord:
                    if bad is not None:
                        bad.add([self.keys[j]])
                    continue
            gen = torch.Generator().manual_seed(hash((self.cfg.train.seed, epoch, self.rank, i)) % 2**62)
            yield self.augment(torch.stack(images), gen)
