"""What ``byol embed`` reads: rows of key, split, label and image bytes from the shards of a manifest or from an
image folder, local or on object storage.

Kept free of torch: the read tasks that run these maps import this module, and importing torch there would cost
each of them seconds of CPU beside the actors that embed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import ray

from pipeline.core.storage import filesystem, is_uri, join_location
from pipeline.data.manifest import read_manifest
from pipeline.errors import DataError


def read_images(data: str, splits: list[str] | None) -> tuple[ray.data.Dataset, int]:
    """(a dataset of rows key, split, label, image bytes; its row count)."""
    try:
        manifest = read_manifest(data)
    except DataError:
        return _read_folder(data)
    chosen = splits or list(manifest["splits"])
    missing = [s for s in chosen if s not in manifest["splits"]]
    if missing:
        raise DataError(f"--data {data}: no split {', '.join(missing)} (has: {', '.join(manifest['splits'])})")
    parts, rows = [], 0
    for split in chosen:
        files = [join_location(data, s["path"]) for s in manifest["splits"][split]["shards"]]
        part = ray.data.read_parquet(files, columns=["image", "label", "key"])
        parts.append(part.map_batches(_with_split, fn_kwargs={"split": split}, batch_format="numpy"))
        rows += manifest["splits"][split]["rows"]
    return (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]), rows


def _with_split(batch: dict[str, Any], split: str) -> dict[str, Any]:
    labels = np.asarray([-1 if v is None else v for v in batch["label"]], dtype=np.int64)
    return {"image": batch["image"], "key": batch["key"], "label": labels, "split": np.full(len(labels), split)}


def _read_folder(data: str) -> tuple[ray.data.Dataset, int]:
    """An image folder, local or on object storage: key = the path under it, label = its class folder's index
    among the top-level folders (sorted, hidden ones left out, as ``byol prepare`` numbers them), else -1."""
    from pipeline.data.read_units import list_units

    location = data if is_uri(data) else str(Path(data).resolve())
    fs, root = filesystem(location)
    root = root.rstrip("/")
    files = sorted(f for unit in list_units(location) for f in unit.files)  # paths in ``fs``, no scheme
    relative = [f[len(root) :].lstrip("/") for f in files]
    classes = sorted({k.split("/")[0] for k in relative if "/" in k and not k.startswith(".")})

    def rows(batch: dict[str, Any]) -> dict[str, Any]:
        keys = [p[len(root) :].lstrip("/") for p in batch["path"]]
        labels = [classes.index(k.split("/")[0]) if k.split("/")[0] in classes else -1 for k in keys]
        return {"image": batch["bytes"], "key": np.asarray(keys), "label": np.asarray(labels, dtype=np.int64),
                "split": np.full(len(keys), "folder")}  # fmt: skip

    dataset = ray.data.read_binary_files(files, include_paths=True, filesystem=fs)
    return dataset.map_batches(rows, batch_format="numpy"), len(files)
