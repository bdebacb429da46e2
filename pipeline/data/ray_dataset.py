"""Ray Data input pipeline: Parquet shards (or an image folder) -> decoded -> two augmented views.

The whole run is ONE streaming execution, planned once::

    ray.data.range(epochs x units)              one item per (epoch, read unit); the unit order is reshuffled
                                                per epoch (``unit_order``), so epoch e+1's reads start while
                                                epoch e's last batches are still being trained on
      -> map_batches(two_view_batches)          Ray Data CPU tasks (``two_views.py``): read one shard (or 256
                                                image files) batch by batch, decode, two augmented views, streamed
                                                out in blocks of whole worker batches
                                                (data.decode=worker: only read; the worker decodes and crops,
                                                JPEGs on its GPU, see ``decode_and_crop``)
      -> streaming_split across Train workers   (Ray Train's DataConfig)
      -> iter_batches(local shuffle buffer)     on each worker: see ``iter_train_batches``

Re-executing a per-epoch pipeline costs seconds of planning and start-up at every epoch boundary; one
stream of all the epochs pays it once. ``data.cache``: for a split that fits in a fraction of the object
store, the first epoch's tasks hand what they decoded (uint8 arrays, one object per read unit) to a
``DecodedCache`` actor, and later epochs only augment (``auto`` decides from the manifest's image size,
see ``use_cache``).

Every output row carries ``ok``: a record that could not be decoded is flagged (not replaced by a
silent blank image) and dropped on the worker, which counts it and logs the first keys
(``data.on_bad_record: skip``); with ``fail`` the task (the worker, with ``data.decode=worker``) raises an error
naming the shard and key.
Good rows left over from a batch with bad rows are carried into the next batch, so every batch a
worker trains on is full; how many batches the ranks can make may still differ, and the training
loop ends each pass on all ranks together (``pipeline.train.sync``).
Shards are checked against the manifest (footer, row count) before the run (``check_shards``): an
unreadable shard fails the run, or with ``skip`` is left out and its rows counted as bad records.

CPU budget on small machines: see ``pipeline.train.cluster`` (the single place that decides it).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import ray
import torch
from ray.data import Dataset

from pipeline.config import Config
from pipeline.core.augment import TwoViewAugment, fresh_generator, random_resized_crop
from pipeline.core.images import decode_many, to_device
from pipeline.data.bad_records import BadRecordLog
from pipeline.data.execution import (
    GpuSchedulingLoopBackoff,
    NoProgressBarNotice,
    SchedulingLoopBackoff,
    TwoViewBatches,
)
from pipeline.data.read_units import decoded_bytes, expected_size, list_units, unit_order
from pipeline.data.two_views import bad_record_error
from pipeline.ray_compat import EXECUTION_CALLBACKS

BLOCK_BYTES = 8 * 2**20
CACHE_FRACTION = 0.25  # data.cache=auto: decoded split at most this share of the driver node's object store


# ---------------------------------------------------------------------------------------------
# The decoded cache (data.cache)
# ---------------------------------------------------------------------------------------------


def use_cache(cfg: Config, rows: int, epochs: int) -> bool:
    """``data.cache``: on, off, or auto = more than one epoch is trained and the decoded split is known to fit in
    CACHE_FRACTION of this node's object store (the cache actor lives here, beside the driver)."""
    if cfg.data.cache != "auto":
        return cfg.data.cache == "on"
    if cfg.data.decode == "worker":  # nothing is decoded in Ray Data
        return False
    size = decoded_bytes(cfg.data.path, rows, cfg.data.channels)
    return epochs > 1 and size is not None and size <= CACHE_FRACTION * local_object_store_bytes()


def local_object_store_bytes() -> float:
    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("NodeID") == here]
    return nodes[0]["Resources"].get("object_store_memory", 0) if nodes else 0


@ray.remote(num_cpus=0)
class DecodedCache:
    """``data.cache``: the decoded units, in the object store, owned by this actor (it lives as long as the
    driver that holds it: the run). The first epoch's tasks decode a unit anyway and hand it here; later
    epochs' tasks take it from here, and decode again only a unit that is not in yet (at the first epoch's end,
    where epochs overlap) or if the cache is lost. No task waits for another; nothing is decoded twice in steady
    state. The first epoch's task holds its decoded shard until the shard's end (memory: one decoded shard per
    running task, plus a copy while packing)."""

    def __init__(self) -> None:
        self.units: dict[int, ray.ObjectRef] = {}

    def add(self, index: int, unit: dict) -> None:
        self.units.setdefault(index, ray.put(unit))

    def get(self, index: int) -> list[ray.ObjectRef]:
        return [self.units[index]] if index in self.units else []  # in a list: handed over, not resolved


def start_cache(cfg: Config, rows: int, epochs: int) -> ray.actor.ActorHandle | None:
    """The run's :class:`DecodedCache` when ``data.cache`` says so for ``rows`` images trained ``epochs`` epochs
    (see ``use_cache``), else None. On this node (its store was sized for it); the caller kills it at the run's end."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not use_cache(cfg, rows, epochs):
        return None
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return DecodedCache.options(scheduling_strategy=here).remote()


# ---------------------------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------------------------


def build_train_dataset(
    cfg: Config,
    split: str = "train",
    seed: int | None = None,
    batch_size: int = 256,
    shards: list[dict] | None = None,
    epochs: int = 1,
    cache: ray.actor.ActorHandle | None | str = "auto",
) -> Dataset:
    """The streaming two-view training dataset of ``epochs`` passes over ``cfg.data.path`` (shards with a
    manifest, or an image folder), executed once.

    ``shards``: the manifest entries to read (default all; the driver passes the readable ones).
    ``cache``: what :func:`start_cache` returned (a :class:`DecodedCache`, or None for none), or "auto": start it
    here, as ``data.cache`` says. The caller keeps it for as long as the dataset runs.
    """
    path = cfg.data.path
    units = list_units(path, split, shards)
    expected_hw = expected_size(path)
    if isinstance(cache, str):
        cache = start_cache(cfg, sum(u.rows for u in units), epochs)
    order = unit_order(len(units), epochs, seed)
    rows = block_rows(cfg, batch_size)
    ds = ray.data.range(len(order), override_num_blocks=len(order)).map_batches(
        TwoViewBatches(),  # calls two_view_batches
        fn_kwargs={
            "cfg": cfg,
            "units": units,
            "order": order,
            "expected_hw": expected_hw,
            "rows": rows,
            "cache": cache,
        },
        batch_format="numpy",
        batch_size=None,
    )
    # Each output is one block (Ray Data would otherwise concatenate outputs up to 128 MiB, holding a unit back
    # from the workers, or split them): a limit under one output's bytes, and over 1/1.5 of it (no slicing).
    ds.context.target_max_block_size = int(0.9 * rows * view_bytes(cfg))
    ds.context.enable_progress_bars = False  # the training progress line says it; a context made before
    # RAY_DATA_DISABLE_PROGRESS_BARS was set (imported early) would draw bars in every Train worker's console
    ds.context.memory_usage_poll_interval_s = None  # a per-task thread reading /proc for a metric: CPU on small nodes
    if EXECUTION_CALLBACKS:  # a Ray that moved its callback class runs its executor as shipped
        ds.context.custom_execution_callback_classes = [
            *ds.context.custom_execution_callback_classes,
            GpuSchedulingLoopBackoff if cfg.train.use_gpu else SchedulingLoopBackoff,
            NoProgressBarNotice,
        ]
    return ds


def view_bytes(cfg: Config) -> int:
    """Bytes of one output row's two views."""
    itemsize = 4 if cfg.augment.device == "data" else 1
    return 2 * cfg.data.channels * cfg.data.image_size**2 * itemsize


def block_rows(cfg: Config, batch_size: int) -> int:
    """Rows per output block: whole worker batches (sliced without a copy), about BLOCK_BYTES or one batch.
    Ray Data costs milliseconds of driver and worker time per block: small images need several batches a block."""
    return batch_size * max(1, BLOCK_BYTES // (batch_size * view_bytes(cfg)))


def iter_train_batches(
    dataset_shard,  # ray.data.DataIterator or Dataset
    batch_size: int,
    cfg: Config,
    device: torch.device,
    bad: BadRecordLog,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass of full (view1, view2) batches of ``batch_size`` on ``device``.

    Bad rows are dropped and counted into ``bad``; the good rows of a batch that had bad ones wait for
    the next batch, so every batch is full (BatchNorm and the loss see the configured batch size). A
    remainder smaller than a batch at the end of the pass is dropped.
    """
    augment = TwoViewAugment(cfg.augment, cfg.data.image_size, cfg.data.mean, cfg.data.std)
    gen = fresh_generator(device)
    expected_hw = expected_size(cfg.data.path) if cfg.data.decode == "worker" else None
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # good rows carried over, in order
    for batch in dataset_shard.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        drop_last=False,
        local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
        prefetch_batches=cfg.data.prefetch_batches,
    ):
        if "encoded" in batch:  # data.decode=worker: decoded and cropped here (JPEGs on the GPU when there is one)
            ok, v1, v2 = decode_and_crop(batch, cfg, device, expected_hw, gen)
            good = slice(None)  # v1, v2 hold the good rows only
        else:
            ok, good = batch["ok"], torch.from_numpy(batch["ok"])
            with warnings.catch_warnings():  # a whole block is passed on uncopied: read-only, and never written
                warnings.simplefilter("ignore", UserWarning)
                v1, v2 = torch.from_numpy(batch["view1"]), torch.from_numpy(batch["view2"])
        if not (ok.all() and not pending and len(ok) == batch_size):  # else the common case: no copy
            if not ok.all():
                bad.add(batch["key"][~ok])
            if ok.any():
                pending.append((v1[good], v2[good]))
            if sum(len(p[0]) for p in pending) < batch_size:
                continue
            v1, v2 = (torch.cat(parts) for parts in zip(*pending, strict=True))
            pending = [(v1[batch_size:], v2[batch_size:])] if len(v1) > batch_size else []
            v1, v2 = v1[:batch_size], v2[:batch_size]
        t1, t2 = to_device(v1, device), to_device(v2, device)
        if cfg.augment.device == "worker":
            if t1.dtype == torch.uint8:  # cropped in Ray Data
                t1, t2 = t1.float().div_(255), t2.float().div_(255)
            t1, t2 = augment.photometric(t1, t2, gen)
        yield t1, t2


def decode_and_crop(
    batch: dict[str, np.ndarray],
    cfg: Config,
    device: torch.device,
    expected_hw: tuple[int, int] | None,
    gen: torch.Generator,
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """data.decode=worker: records -> (ok, two cropped float views of the good rows in [0, 1], on ``device``)."""
    decoded = decode_many(list(batch["encoded"]), cfg.data.channels, expected_hw, device)
    ok = np.array([isinstance(d, torch.Tensor) for d in decoded], dtype=bool)
    if cfg.data.on_bad_record == "fail" and not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise bad_record_error(decoded[i], batch["unit"][i], batch["key"][i])
    images = [d for d in decoded if isinstance(d, torch.Tensor)]
    size = cfg.data.image_size
    if not images:
        empty = torch.zeros((0, cfg.data.channels, size, size), device=device)
        return ok, empty, empty
    if len({im.shape for im in images}) == 1:
        images = torch.stack(images)
    return ok, random_resized_crop(images, size, cfg.augment, gen), random_resized_crop(images, size, cfg.augment, gen)
