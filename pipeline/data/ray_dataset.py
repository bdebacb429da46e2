"""Ray Data input pipeline: Parquet shards (or an image folder) -> decoded -> two augmented views.

    read_parquet(shards, columns=[image, key], file order reshuffled every epoch)
      -> map_batches(decode_and_augment)         Ray Data CPU tasks, streaming, bounded memory
      -> streaming_split across Train workers    (Ray Train's DataConfig)
      -> iter_batches(local shuffle buffer)      on each worker: see ``iter_train_batches``

Every output row carries ``ok``: a record that could not be decoded is flagged (not replaced by a
silent blank image) and dropped on the worker, which counts it and logs the first keys
(``data.on_bad_record: skip``); with ``fail`` the task raises an error naming the shard and key.
Good rows left over from a batch with bad rows are carried into the next batch, so every batch a
worker trains on is full; how many batches the ranks can make may still differ, and the training
loop ends each epoch on all ranks together (``pipeline.train.sync``).
Shards are checked against the manifest (footer, row count) before the run (``check_shards``): an
unreadable shard fails the run, or with ``skip`` is left out and its rows counted as bad records.

CPU budget on small machines: see ``pipeline.train.cluster`` (the single place that decides it).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow.fs as pafs
import ray
import torch
from ray.data import Dataset
from ray.data.datasource import FileShuffleConfig

from pipeline.config import Config
from pipeline.core.augment import TwoViewAugment, fresh_generator, random_resized_crop
from pipeline.core.images import BadRecord, decode
from pipeline.data.bad_records import BadRecordLog  # noqa: F401  (re-exported)
from pipeline.data.shards import IMAGE_EXTENSIONS, PrepareError, read_manifest, resolve_output, split_shards

OUTPUT_BLOCK_BYTES = 8 * 2**20
# Ray wants extensions without the dot; the set itself lives with the shard writer.
FILE_EXTENSIONS = sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


def shard_uris(path: str, split: str, shards: list[dict] | None = None) -> list[str]:
    """Full paths of ``split``'s shards (or of the given manifest entries, e.g. the readable ones)."""
    shards = split_shards(path, split) if shards is None else shards
    base = path.rstrip("/") if "://" in path else resolve_output(path)[1]
    return [f"{base}/{s['path']}" for s in shards]


def expected_size(path: str) -> tuple[int, int] | None:
    """The manifest's uniform image size, if the source had one (records of another size are bad)."""
    image = read_manifest(path).get("image") or {}
    return (image["height"], image["width"]) if "height" in image else None


def read_split(
    path: str,
    split: str,
    seed: int | None = None,
    columns: tuple[str, ...] = ("image", "key"),
    shards: list[dict] | None = None,
) -> Dataset:
    """Lazy read of one split with column projection; the file order is reshuffled each execution (epoch)."""
    ds = ray.data.read_parquet(
        shard_uris(path, split, shards),
        include_paths=True,
        shuffle=FileShuffleConfig(seed=seed) if seed is not None else None,
    )
    return ds.select_columns([*columns, "path"])  # projection is pushed down into the Parquet read


def read_image_folder(path: str, seed: int | None = None) -> Dataset:
    """An image folder as raw bytes. Not ``read_images``: it fails the whole epoch on one bad file, and the
    bad-record policy must apply here too."""
    try:
        ds = ray.data.read_binary_files(
            path,
            include_paths=True,
            file_extensions=FILE_EXTENSIONS,
            shuffle=FileShuffleConfig(seed=seed) if seed is not None else None,
        )
    except ValueError as exc:  # "No files found under ..."
        raise PrepareError(f"data.path {path}: no image files ({', '.join(FILE_EXTENSIONS)})") from exc
    return ds.map_batches(_binary_to_records, batch_format="numpy")


def _binary_to_records(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"image": batch["bytes"], "key": batch["path"], "path": batch["path"]}


def decode_and_augment(
    batch: dict[str, np.ndarray],
    *,
    cfg: Config,
    expected_hw: tuple[int, int] | None,
    stage: str,
) -> dict[str, np.ndarray]:
    """One Ray Data batch of encoded images -> two views per row.

    stage="data": full augmentation here, float32 normalised views.
    stage="worker": decode + crop here, uint8 views; colour/blur/solarize run on the training worker.
    """
    n, channels, size = len(batch["key"]), cfg.data.channels, cfg.data.image_size
    decoded: list[torch.Tensor | None] = []
    for i in range(n):
        try:
            decoded.append(decode(batch["image"][i], channels, expected_hw))
        except BadRecord as exc:
            where = f"shard {batch['path'][i]}, key {batch['key'][i]}"
            if cfg.data.on_bad_record == "fail":
                raise BadRecord(
                    f"bad record ({exc}) in {where}; re-run `byol prepare` for this data, "
                    "or set data.on_bad_record=skip"
                ) from None
            decoded.append(None)  # counted and logged (first keys only) by the worker
    ok = np.array([d is not None for d in decoded], dtype=bool)
    dtype = np.float32 if stage == "data" else np.uint8
    view1 = np.zeros((n, channels, size, size), dtype=dtype)
    view2 = np.zeros_like(view1)
    good = [d for d in decoded if d is not None]
    if good:
        images = torch.stack(good) if len({g.shape for g in good}) == 1 else good
        augment = TwoViewAugment(cfg.augment, size, cfg.data.mean, cfg.data.std)
        gen = fresh_generator()
        if stage == "data":
            v1, v2 = augment(images, gen)
        else:
            v1 = random_resized_crop(images, size, cfg.augment, gen).mul_(255).round_().to(torch.uint8)
            v2 = random_resized_crop(images, size, cfg.augment, gen).mul_(255).round_().to(torch.uint8)
        view1[ok], view2[ok] = v1.numpy(), v2.numpy()
    return {"view1": view1, "view2": view2, "ok": ok, "key": np.asarray(batch["key"]).astype(str)}


def build_train_dataset(
    cfg: Config,
    split: str = "train",
    seed: int | None = None,
    batch_size: int = 256,
    shards: list[dict] | None = None,
) -> Dataset:
    """The streaming two-view training dataset for ``cfg.data.path`` (shards with a manifest, or an image folder).

    ``shards``: the manifest entries to read (default all; the driver passes the readable ones).
    """
    path = cfg.data.path
    fs, root = resolve_output(path)
    if fs.get_file_info(f"{root}/manifest.json").is_file:
        ds, hw = read_split(path, split, seed, shards=shards), expected_size(path)
    elif fs.get_file_info(root).type == pafs.FileType.Directory:
        ds, hw = read_image_folder(path, seed), None
    else:
        raise PrepareError(f"data.path {path}: not found (expected shards with manifest.json, or an image folder)")
    ds = ds.map_batches(
        decode_and_augment,
        fn_kwargs={"cfg": cfg, "expected_hw": hw, "stage": cfg.augment.device},
        batch_format="numpy",
        batch_size=batch_size,
        zero_copy_batch=True,
    )
    # Ray Data concatenates map outputs up to target_max_block_size (128 MiB) before emitting a block, so a
    # whole shard would be augmented before the first batch reaches a worker. Small blocks keep it streaming.
    ds.context.target_max_block_size = OUTPUT_BLOCK_BYTES
    return ds


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
        t1 = torch.from_numpy(v1).to(device, non_blocking=True)
        t2 = torch.from_numpy(v2).to(device, non_blocking=True)
        if cfg.augment.device == "worker":
            t1, t2 = augment.photometric(t1.float().div_(255), t2.float().div_(255), gen)
        yield t1, t2
