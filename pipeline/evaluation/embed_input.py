"""What ``byol embed`` reads: rows of key, split, label and image bytes from the shards of a manifest or from an
image folder, local or on object storage.

Kept free of torch: the read tasks that run these maps import this module, and importing torch there would cost
each of them seconds of CPU beside the actors that embed.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray

from pipeline.core.storage import filesystem, is_uri, join_location
from pipeline.data.manifest import read_manifest
from pipeline.errors import DataError

COLUMNS = ["image", "label", "key"]
READ_THREADS = 16  # files of an image folder read at once by the in-process path


def read_images(data: str, splits: list[str] | None) -> tuple[ray.data.Dataset, int]:
    """(a dataset of rows key, split, label, image bytes; its row count)."""
    shards = _split_shards(data, splits)
    if shards is None:
        return _read_folder(data)
    parts, rows = [], 0
    for split, (files, count) in shards.items():
        part = ray.data.read_parquet(files, columns=COLUMNS)
        parts.append(part.map_batches(_with_split, fn_kwargs={"split": split}, batch_format="numpy"))
        rows += count
    return (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]), rows


def iter_images(data: str, splits: list[str] | None, batch_size: int) -> tuple[Iterator[dict[str, Any]], int]:
    """The same rows as :func:`read_images`, as batches read in this process (no Ray); their row count."""
    shards = _split_shards(data, splits)
    if shards is None:
        fs, root, files, classes = _list_folder(data)

        def folder_batches() -> Iterator[dict[str, Any]]:
            # threads, because on object storage each file is one request whose latency would otherwise add up
            with ThreadPoolExecutor(READ_THREADS) as pool:
                for i in range(0, len(files), batch_size):
                    paths = files[i : i + batch_size]
                    images = list(pool.map(partial(_read_file, fs), paths))
                    yield _folder_rows({"path": paths, "bytes": images}, root, classes)

        return folder_batches(), len(files)

    def shard_batches() -> Iterator[dict[str, Any]]:
        import pyarrow.parquet as pq

        for split, (files, _) in shards.items():
            for location in files:
                fs, path = filesystem(location)
                with fs.open_input_file(path) as f:
                    for batch in pq.ParquetFile(f).iter_batches(batch_size, columns=COLUMNS):
                        yield _with_split(batch.to_pydict(), split)

    return shard_batches(), sum(count for _, count in shards.values())


def _split_shards(data: str, splits: list[str] | None) -> dict[str, tuple[list[str], int]] | None:
    """Each chosen split's shard files and rows; None when ``data`` has no manifest (an image folder)."""
    try:
        manifest = read_manifest(data)
    except DataError:
        return None
    chosen = splits or list(manifest["splits"])
    missing = [s for s in chosen if s not in manifest["splits"]]
    if missing:
        raise DataError(f"--data {data}: no split {', '.join(missing)} (has: {', '.join(manifest['splits'])})")
    return {
        split: (
            [join_location(data, s["path"]) for s in manifest["splits"][split]["shards"]],
            manifest["splits"][split]["rows"],
        )
        for split in chosen
    }


def _with_split(batch: dict[str, Any], split: str) -> dict[str, Any]:
    """Unknown labels as -1: None from pyarrow, NaN from Ray Data (its numpy batches make a nullable int a float)."""
    labels = np.asarray([-1 if v is None or v != v else int(v) for v in batch["label"]], dtype=np.int64)
    return {"image": batch["image"], "key": batch["key"], "label": labels, "split": np.full(len(labels), split)}


def _read_folder(data: str) -> tuple[ray.data.Dataset, int]:
    fs, root, files, classes = _list_folder(data)
    dataset = ray.data.read_binary_files(files, include_paths=True, filesystem=fs)
    rows = dataset.map_batches(_folder_rows, fn_kwargs={"root": root, "classes": classes}, batch_format="numpy")
    return rows, len(files)


def _list_folder(data: str) -> tuple[Any, str, list[str], list[str]]:
    """An image folder, local or on object storage: its filesystem, root, files (paths in that filesystem) and
    class folders (the top-level ones, sorted, hidden ones left out, as ``byol prepare`` numbers them)."""
    from pipeline.data.read_units import list_units

    location = data if is_uri(data) else str(Path(data).resolve())
    fs, root = filesystem(location)
    root = root.rstrip("/")
    files = sorted(f for unit in list_units(location) for f in unit.files)
    relative = [f[len(root) :].lstrip("/") for f in files]
    classes = sorted({k.split("/")[0] for k in relative if "/" in k and not k.startswith(".")})
    return fs, root, files, classes


def _folder_rows(batch: dict[str, Any], root: str, classes: list[str]) -> dict[str, Any]:
    """key = the path under the folder, label = its class folder's index, else -1."""
    keys = [p[len(root) :].lstrip("/") for p in batch["path"]]
    labels = [classes.index(k.split("/")[0]) if k.split("/")[0] in classes else -1 for k in keys]
    return {"image": batch["bytes"], "key": np.asarray(keys), "label": np.asarray(labels, dtype=np.int64),
            "split": np.full(len(keys), "folder")}  # fmt: skip


def _read_file(fs: Any, path: str) -> bytes:
    with fs.open_input_stream(path) as f:  # a stream: on object storage one GET, no size request first
        return f.read()
