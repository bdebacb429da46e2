"""Ray Data input pipeline: Parquet shards (or an image folder) -> decoded -> two augmented views.

The whole run is ONE streaming execution, planned once::

    ray.data.range(epochs x units)              one item per (epoch, read unit); the unit order is reshuffled
                                                per epoch (``unit_order``), so epoch e+1's reads start while
                                                epoch e's last batches are still being trained on
      -> map_batches(TwoViewTask)               Ray Data CPU tasks: read one Parquet row group (or a chunk
                                                of an image folder), decode, two augmented views, streamed
                                                out batch by batch with bounded memory
      -> streaming_split across Train workers   (Ray Train's DataConfig)
      -> iter_batches(local shuffle buffer)     on each worker: see ``iter_train_batches``

Re-executing a per-epoch pipeline cost 2.5-8 s of planning and start-up at every epoch boundary; one
stream of all the epochs pays it once. ``data.cache``: for a split that fits in a fraction of the object
store, the first epoch's tasks hand what they decoded (uint8 arrays, one object per read unit) to a
``DecodedCache`` actor, and later epochs only augment (``auto`` decides from the manifest's image size,
see ``use_cache``).

Every output row carries ``ok``: a record that could not be decoded is flagged (not replaced by a
silent blank image) and dropped on the worker, which counts it and logs the first keys
(``data.on_bad_record: skip``); with ``fail`` the task raises an error naming the shard and key.
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
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from ray.data import Dataset

from pipeline.config import Config
from pipeline.core.augment import TwoViewAugment, fresh_generator, random_resized_crop
from pipeline.core.images import BadRecord, decode
from pipeline.data.bad_records import BadRecordLog  # noqa: F401  (re-exported)
from pipeline.data.shards import IMAGE_EXTENSIONS, PrepareError, read_manifest, resolve_output, split_shards

FOLDER_CHUNK = 256  # image-folder files per read unit
BLOCK_BYTES = 8 * 2**20
CACHE_FRACTION = 0.25  # data.cache=auto: decoded split at most this share of the cluster's object store


# ---------------------------------------------------------------------------------------------
# Read units: what one Ray Data task reads
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadUnit:
    """What one Ray Data task reads: a shard, or a chunk of an image folder's files. Whole shards, not row
    groups: Ray Data dispatches ~10 tasks/s here, so a task must be a second or so of work to keep CPUs busy."""

    name: str  # the shard's path in the manifest (errors name it), or the folder chunk's first file
    rows: int
    files: tuple[str, ...] = ()  # an image-folder chunk


def list_units(path: str, split: str = "train", shards: list[dict] | None = None) -> list[ReadUnit]:
    """The read units of ``split`` (prepared shards: the given manifest entries, default all) or of an image folder."""
    fs, root = resolve_output(path)
    if fs.get_file_info(f"{root}/manifest.json").is_file:
        shards = split_shards(path, split) if shards is None else shards
        return [ReadUnit(s["path"], s["rows"]) for s in shards]
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise PrepareError(f"data.path {path}: not found (expected shards with manifest.json, or an image folder)")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(i.path for i in infos if i.is_file and _extension(i.path) in IMAGE_EXTENSIONS)
    if not files:
        extensions = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        raise PrepareError(f"data.path {path}: no image files ({extensions})")
    chunks = [tuple(files[i : i + FOLDER_CHUNK]) for i in range(0, len(files), FOLDER_CHUNK)]
    return [ReadUnit(chunk[0], len(chunk), files=chunk) for chunk in chunks]


def _extension(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""


def unit_order(num_units: int, epochs: int, seed: int | None) -> np.ndarray:
    """[epochs * num_units] unit indices: every epoch visits every unit once, in its own seeded order."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(num_units) for _ in range(epochs)])


def read_records(path: str, unit: ReadUnit, batch_size: int) -> Iterator[tuple[list, list[str]]]:
    """(encoded images, keys) of one unit, ``batch_size`` records at a time (a shard is never held whole)."""
    fs, root = resolve_output(path)
    if not unit.files:
        with fs.open_input_file(f"{root}/{unit.name}") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=["image", "key"]):
                yield batch.column("image").to_pylist(), batch.column("key").to_pylist()
        return
    for start in range(0, len(unit.files), batch_size):
        files = unit.files[start : start + batch_size]
        images = []
        for file in files:
            with fs.open_input_stream(file) as f:
                images.append(f.read())
        yield images, list(files)


def decode_records(
    images: list, keys: list[str], unit: ReadUnit, cfg: Config, expected_hw: tuple[int, int] | None
) -> list[torch.Tensor | None]:
    """Decoded images; None for a bad record under ``data.on_bad_record=skip``, an error naming it under ``fail``."""
    decoded: list[torch.Tensor | None] = []
    for data, key in zip(images, keys, strict=True):
        try:
            decoded.append(decode(data, cfg.data.channels, expected_hw))
        except BadRecord as exc:
            if cfg.data.on_bad_record == "fail":
                raise BadRecord(
                    f"bad record ({exc}) in shard {unit.name}, key {key}; re-run `byol prepare` for this data, "
                    "or set data.on_bad_record=skip"
                ) from None
            decoded.append(None)  # counted and logged (first keys only) by the worker
    return decoded


# ---------------------------------------------------------------------------------------------
# The decoded cache (data.cache)
# ---------------------------------------------------------------------------------------------


def decoded_bytes(path: str, rows: int, channels: int) -> int | None:
    """Bytes of a split decoded to uint8, from the manifest's uniform image size (None: sizes vary)."""
    try:
        image = read_manifest(path).get("image") or {}
    except PrepareError:  # an image folder
        return None
    return rows * channels * image["height"] * image["width"] if "height" in image else None


def use_cache(cfg: Config, rows: int, epochs: int) -> bool:
    """``data.cache``: on, off, or auto = the decoded split is known to fit in CACHE_FRACTION of the object store
    and more than one epoch reads it."""
    if cfg.data.cache != "auto":
        return cfg.data.cache == "on"
    size = decoded_bytes(cfg.data.path, rows, cfg.data.channels)
    store = ray.cluster_resources().get("object_store_memory", 0)
    return epochs > 1 and size is not None and size <= CACHE_FRACTION * store


def pack_unit(decoded: list[torch.Tensor | None], keys: list[str], channels: int) -> dict:
    """A decoded unit as the cache keeps it: images (one uint8 [n, C, H, W] array when they share a size, else a
    list of [C, H, W]), ok (False: a bad record, its image a placeholder) and keys."""
    ok = np.array([d is not None for d in decoded], dtype=bool)
    shapes = {tuple(d.shape) for d in decoded if d is not None}
    blank = torch.zeros((channels, 1, 1), dtype=torch.uint8)
    if len(shapes) == 1:
        blank = torch.zeros(shapes.pop(), dtype=torch.uint8)
        images = torch.stack([d if d is not None else blank for d in decoded]).numpy()
    else:
        images = [(d if d is not None else blank).numpy() for d in decoded]
    return {"images": images, "ok": ok, "keys": keys}


@ray.remote(num_cpus=0)
class DecodedCache:
    """``data.cache``: the decoded units, in the object store, owned by this actor (it lives as long as the
    driver that holds it: the run). The first epoch's tasks decode a unit anyway and hand it here; later
    epochs' tasks take it from here, and decode again only a unit that is not in yet (at the first epoch's end,
    where epochs overlap). No task ever waits for another, and nothing is decoded twice in steady state."""

    def __init__(self) -> None:
        self.units: dict[int, ray.ObjectRef] = {}

    def add(self, index: int, unit: dict) -> None:
        self.units.setdefault(index, ray.put(unit))

    def get(self, index: int) -> list[ray.ObjectRef]:
        return [self.units[index]] if index in self.units else []  # in a list: handed over, not resolved


def start_cache(cfg: Config, split: str = "train", shards: list[dict] | None = None, epochs: int = 1):
    """The run's :class:`DecodedCache` (an actor handle) when ``data.cache`` says so (see ``use_cache``), else None."""
    units = list_units(cfg.data.path, split, shards)
    return DecodedCache.remote() if use_cache(cfg, sum(u.rows for u in units), epochs) else None


# ---------------------------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------------------------


def two_view_batches(
    items: dict[str, np.ndarray],
    *,
    cfg: Config,
    units: list[ReadUnit],
    order: np.ndarray,
    expected_hw: tuple[int, int] | None,
    rows: int,
    cache=None,
) -> Iterator[dict[str, np.ndarray]]:
    """The Ray Data map: stream item ids -> their unit's rows as two views, ``rows`` rows per output block."""
    for item in items["id"]:
        index = int(order[item])
        unit = units[index]
        stored = ray.get(cache.get.remote(index)) if cache is not None and item >= len(units) else []
        if stored:
            yield from views_from_cache(ray.get(stored[0]), rows, cfg)
            continue
        decoded_unit, keys_unit = [], []
        for encoded, keys in read_records(cfg.data.path, unit, rows):
            decoded = decode_records(encoded, keys, unit, cfg, expected_hw)
            ok = np.array([d is not None for d in decoded], dtype=bool)
            yield two_views([d for d in decoded if d is not None], ok, keys, cfg)
            if cache is not None:
                decoded_unit += decoded
                keys_unit += keys
        if cache is not None:
            cache.add.remote(index, pack_unit(decoded_unit, keys_unit, cfg.data.channels))


def views_from_cache(arrays: dict, rows: int, cfg: Config) -> Iterator[dict[str, np.ndarray]]:
    """A cached unit (read-only views of the object store) as two-view blocks: only augmentation left to do."""
    for start in range(0, len(arrays["keys"]), rows):
        part = slice(start, start + rows)
        ok, images = arrays["ok"][part], arrays["images"][part]
        if isinstance(images, np.ndarray):  # one size: the good rows in one copy
            good = torch.from_numpy(images[ok])
        else:
            good = [torch.from_numpy(np.array(a)) for a, keep in zip(images, ok, strict=True) if keep]
        yield two_views(good, ok, arrays["keys"][part], cfg)


def two_views(
    good: torch.Tensor | list[torch.Tensor], ok: np.ndarray, keys: list[str], cfg: Config
) -> dict[str, np.ndarray]:
    """The decoded good images of a batch (uint8, a [n, C, H, W] tensor or a list) and which rows they are
    (``ok``: False for a bad record) -> the row batch the workers receive.

    augment.device=data: full augmentation here, float32 normalised views.
    augment.device=worker: crop here, uint8 views; colour/blur/solarize run on the training worker.
    """
    n, channels, size = len(ok), cfg.data.channels, cfg.data.image_size
    dtype = np.float32 if cfg.augment.device == "data" else np.uint8
    view1 = np.zeros((n, channels, size, size), dtype=dtype)
    view2 = np.zeros_like(view1)
    if len(good):
        images = torch.stack(good) if isinstance(good, list) and len({g.shape for g in good}) == 1 else good
        gen = fresh_generator()
        if cfg.augment.device == "data":
            v1, v2 = TwoViewAugment(cfg.augment, size, cfg.data.mean, cfg.data.std)(images, gen)
        else:
            v1 = random_resized_crop(images, size, cfg.augment, gen).mul_(255).round_().to(torch.uint8)
            v2 = random_resized_crop(images, size, cfg.augment, gen).mul_(255).round_().to(torch.uint8)
        view1[ok], view2[ok] = v1.numpy(), v2.numpy()
    return {"view1": view1, "view2": view2, "ok": ok, "key": np.asarray(keys).astype(str)}


def _import_data_modules() -> None:
    import pipeline.data.ray_dataset  # noqa: F401  (torch, torchvision, pyarrow: ~4 s in a new process)


def warm_data_workers() -> list[ray.ObjectRef]:
    """Start Ray Data's worker processes now, with this module imported: their first tasks otherwise wait ~5 s.
    Returns at once (the refs, to wait on); idle workers are reused by the dataset's tasks. For a long-lived
    cluster (a benchmark, a notebook): in ``byol pretrain`` on a small machine it only moves that CPU time
    earlier, where the worker group's start needs it."""
    cpus = int(ray.available_resources().get("CPU", 1))
    warm = ray.remote(num_cpus=0)(_import_data_modules)  # takes no CPU the worker group may be waiting for
    return [warm.remote() for _ in range(min(max(1, cpus), 16))]


def build_train_dataset(
    cfg: Config,
    split: str = "train",
    seed: int | None = None,
    batch_size: int = 256,
    shards: list[dict] | None = None,
    epochs: int = 1,
    cache="auto",
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
        cache = start_cache(cfg, split, shards, epochs)
    order = unit_order(len(units), epochs, seed)
    rows = block_rows(cfg, batch_size)
    ds = ray.data.range(len(order), override_num_blocks=len(order)).map_batches(
        two_view_batches,
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
    return ds


def view_bytes(cfg: Config) -> int:
    """Bytes of one output row's two views."""
    itemsize = 4 if cfg.augment.device == "data" else 1
    return 2 * cfg.data.channels * cfg.data.image_size**2 * itemsize


def block_rows(cfg: Config, batch_size: int) -> int:
    """Rows per output block: whole worker batches (sliced without a copy), about BLOCK_BYTES or one batch.
    Ray Data costs ~10 ms of driver and worker time per block on 2 cores: small images need several batches a block."""
    return batch_size * max(1, BLOCK_BYTES // (batch_size * view_bytes(cfg)))


def expected_size(path: str) -> tuple[int, int] | None:
    """The manifest's uniform image size, if the source had one (records of another size are bad)."""
    try:
        image = read_manifest(path).get("image") or {}
    except PrepareError:  # an image folder
        return None
    return (image["height"], image["width"]) if "height" in image else None


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
    pending: list[tuple[np.ndarray, np.ndarray]] = []  # good rows carried over, in order
    for batch in dataset_shard.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        drop_last=False,
        local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
        prefetch_batches=cfg.data.prefetch_batches,
    ):
        ok = batch["ok"]
        if ok.all() and not pending and len(ok) == batch_size:
            v1, v2 = batch["view1"], batch["view2"]  # the common case: no copy
        else:
            if not ok.all():
                bad.add(batch["key"][~ok])
            if ok.any():
                pending.append((batch["view1"][ok], batch["view2"][ok]))
            if sum(len(p[0]) for p in pending) < batch_size:
                continue
            v1, v2 = (np.concatenate(parts) for parts in zip(*pending, strict=True))
            pending = [(v1[batch_size:], v2[batch_size:])] if len(v1) > batch_size else []
            v1, v2 = v1[:batch_size], v2[:batch_size]
        with warnings.catch_warnings():  # a whole block is passed on uncopied: read-only, and never written
            warnings.simplefilter("ignore", UserWarning)
            t1, t2 = torch.from_numpy(v1), torch.from_numpy(v2)
        t1, t2 = t1.to(device, non_blocking=True), t2.to(device, non_blocking=True)
        if cfg.augment.device == "worker":
            t1, t2 = augment.photometric(t1.float().div_(255), t2.float().div_(255), gen)
        yield t1, t2
