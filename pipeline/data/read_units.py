"""Read units: what one Ray Data task of the training stream reads (no Ray, no torch here).

A unit is a whole prepared shard, or 256 files of an image folder; ``unit_order`` visits every unit once per
epoch in a seeded per-epoch order; ``read_records`` reads a unit batch by batch (a shard is never held whole).
The training stream's plan holds ``ReadUnit``s: Ray's dataset processes import this module when they load the
plan, so it stays free of torch (see ``pipeline.data.execution``); decoding is in ``pipeline.data.two_views``.
``readable_train_data`` is what a run can read of its train split, checked before any worker starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import Config
from pipeline.core.storage import filesystem
from pipeline.data.manifest import check_shards, has_manifest, read_manifest, split_shards
from pipeline.data.sources import IMAGE_EXTENSIONS
from pipeline.errors import DataError

FOLDER_CHUNK = 256  # image-folder files per read unit


@dataclass(frozen=True)
class ReadUnit:
    """What one Ray Data task reads: a shard, or a chunk of an image folder's files. Whole shards, not row
    groups: Ray Data dispatches ~10 tasks/s here, so a task must be a second or so of work to keep CPUs busy."""

    name: str  # the shard's path in the manifest (errors name it), or the folder chunk's first file
    rows: int
    files: tuple[str, ...] = ()  # an image-folder chunk


def list_units(path: str, split: str = "train", shards: list[dict] | None = None) -> list[ReadUnit]:
    """The read units of ``split`` (prepared shards: the given manifest entries, default all) or of an image folder."""
    fs, root = filesystem(path)
    if has_manifest(path):
        shards = split_shards(path, split) if shards is None else shards
        return [ReadUnit(s["path"], s["rows"]) for s in shards]
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise DataError(f"data.path {path}: not found (expected shards with manifest.json, or an image folder)")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(i.path for i in infos if i.is_file and _extension(i.path) in IMAGE_EXTENSIONS)
    if not files:
        extensions = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        raise DataError(f"data.path {path}: no image files ({extensions})")
    # Shuffled once (seeded) before chunking: a sorted class/xxx.jpg listing would make each chunk one class.
    files = [files[i] for i in np.random.default_rng(0).permutation(len(files))]
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
    fs, root = filesystem(path)
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


def expected_size(path: str) -> tuple[int, int] | None:
    """The manifest's uniform image size, if the source had one (records of another size are bad)."""
    try:
        image = read_manifest(path).get("image") or {}
    except DataError:  # an image folder
        return None
    return (image["height"], image["width"]) if "height" in image else None


def decoded_bytes(path: str, rows: int, channels: int) -> int | None:
    """Bytes of a split decoded to uint8, from the manifest's uniform image size (None: sizes vary)."""
    hw = expected_size(path)
    return rows * channels * hw[0] * hw[1] if hw is not None else None


def readable_train_data(cfg: Config) -> tuple[int, list[dict] | None, int]:
    """(readable training images, readable shards or None for an image folder, records lost to skipped shards).

    Every shard's footer and row count are checked against the manifest: with ``data.on_bad_record=fail`` an
    unreadable shard stops the run here, naming it; with ``skip`` it is left out with a warning and
    its manifest rows count as bad records.
    """
    path = cfg.data.path
    try:
        read_manifest(path)
    except DataError:
        return sum(u.rows for u in list_units(path)), None, 0  # an image folder (or an error naming the path)
    good, unreadable = check_shards(path, "train")
    for shard in unreadable:
        message = f"shard {shard.path} of {path} is unreadable ({shard.reason})"
        if cfg.data.on_bad_record == "fail":
            raise DataError(
                f"{message}; re-run `byol prepare ... --out {path} --overwrite`, or set data.on_bad_record=skip"
            )
        print(f"[byol] WARNING: {message}: skipped, its {shard.rows} records counted as bad", flush=True)
    if not good:
        raise DataError(f"{path}: no readable shard in the train split; re-run `byol prepare`")
    return sum(s["rows"] for s in good), good, sum(s.rows for s in unreadable)
