"""``byol prepare``: an image collection -> Parquet shards written with pyarrow, plus a manifest.

Layout under ``--out`` (a local path or any pyarrow filesystem URI such as ``s3://bucket/prefix``)::

    train/part-00000.parquet ...   columns: image (encoded bytes), label (int64, null if unknown), key (string)
    val/part-*.parquet             stratified labelled hold-out (kNN monitoring, tuning)
    test/part-*.parquet            when the source has a test split
    manifest.json                  written last: a crash never leaves a manifest that lists missing shards

Reading what this writes: ``pipeline.data.manifest``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.core.storage import filesystem
from pipeline.data.image_stats import describe, measure, sample_indices
from pipeline.data.manifest import MANIFEST, SCHEMA
from pipeline.data.sources import Record, Source, read_source
from pipeline.errors import ConfigError, DataError


def stratified_holdout(labels: list[int | None], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a held-out subset with ``fraction`` of every class (none when unlabelled)."""
    labels_arr = np.array([-1 if y is None else y for y in labels])
    mask = np.zeros(len(labels_arr), dtype=bool)
    if fraction <= 0:
        return mask
    rng = np.random.default_rng(seed)
    for cls in np.unique(labels_arr[labels_arr >= 0]):
        idx = np.flatnonzero(labels_arr == cls)
        n = int(round(fraction * len(idx)))
        mask[rng.choice(idx, size=min(n, len(idx)), replace=False)] = True
    return mask


def screen_unreadable(records: list[Record], on_bad_record: str, log) -> tuple[list[Record], dict]:
    """Files that PIL cannot identify or verify are skipped and counted (``skip``) or stop prepare naming the
    file (``fail``). In-memory records (encoded here) are trusted; a file truncated past its header is still
    caught at training time by ``data.on_bad_record``."""
    from PIL import Image

    kept, bad = [], []
    for record in records:
        if not isinstance(record.image, Path):
            kept.append(record)
            continue
        try:
            with Image.open(record.image) as image:
                image.verify()
            kept.append(record)
        except Exception as exc:  # noqa: BLE001  (PIL raises many kinds; the file is named either way)
            if on_bad_record == "fail":
                raise DataError(
                    f"unreadable image {record.image} ({type(exc).__name__}: {exc}); "
                    "remove it or run with --on-bad-record skip"
                ) from None
            bad.append(record.key)
    if bad:
        log(f"skipped {len(bad)} unreadable image(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    return kept, {"count": len(bad), "first": bad[:5]}


def _split_records(source: Source, val_fraction: float, seed: int) -> dict[str, list[Record]]:
    splits = dict(source.splits)
    train = splits["train"]
    holdout = stratified_holdout([r.label for r in train], val_fraction, seed)
    if holdout.any():
        splits["train"] = [r for r, h in zip(train, holdout, strict=True) if not h]
        splits["val"] = [r for r, h in zip(train, holdout, strict=True) if h]
    return splits


def _chunks(records: list[Record], shard_bytes: int, min_shards: int) -> Iterator[list[Record]]:
    total = sum(r.size() for r in records)
    n_shards = max(min(min_shards, len(records)), math.ceil(total / shard_bytes), 1)
    rows = math.ceil(len(records) / n_shards)
    for start in range(0, len(records), rows):
        yield records[start : start + rows]


def _write_shard(fs: pafs.FileSystem, path: str, records: list[Record], row_group_rows: int) -> dict:
    table = pa.table(
        {
            "image": pa.array([r.payload() for r in records], pa.binary()),
            "label": pa.array([r.label for r in records], pa.int64()),
            "key": pa.array([r.key for r in records], pa.string()),
        },
        schema=SCHEMA,
    )
    with fs.open_output_stream(path) as out:
        pq.write_table(table, out, row_group_size=row_group_rows, compression="none")  # PNG/JPEG don't compress
    with fs.open_input_stream(path) as f:
        data = f.read()
    return {"rows": len(records), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def prepare(
    source: str,
    out: str,
    val_fraction: float = 0.1,
    shard_mb: float = 64.0,
    min_shards: int = 8,
    row_group_rows: int = 1024,
    overwrite: bool = False,
    seed: int = 0,
    on_bad_record: str = "skip",
    log=print,
) -> dict:
    """Write the shards and the manifest; returns the manifest."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    fs, root = filesystem(out)
    existing = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=False))
    if existing and not overwrite:
        raise DataError(f"{out} is not empty; pass --overwrite to replace it")
    if on_bad_record not in ("skip", "fail"):
        raise ConfigError(f"--on-bad-record must be skip or fail, got {on_bad_record!r}")
    src = read_source(source)
    unreadable = {}
    for split in list(src.splits):
        src.splits[split], unreadable[split] = screen_unreadable(src.splits[split], on_bad_record, log)
        if not src.splits[split]:
            bad = unreadable[split]["count"]
            raise DataError(f"no readable images in the {split} split of {source} ({bad} unreadable)")
    if overwrite:
        fs.delete_dir_contents(root, missing_dir_ok=True)  # the old manifest goes first
    fs.create_dir(root, recursive=True)
    splits = _split_records(src, val_fraction, seed)
    manifest: dict = {
        "format": "byol-ray-shards/1",
        "source": src.name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": src.classes,
        "image": src.image,
        "val_fraction": val_fraction,
        "seed": seed,
        "splits": {},
    }
    rng = np.random.default_rng(seed)
    for split, records in splits.items():
        # Rows are shuffled once here so no shard holds one class (sources are often sorted by class);
        # Ray Data then reshuffles the shard order every epoch and mixes rows in a local buffer.
        records = [records[i] for i in rng.permutation(len(records))]
        fs.create_dir(f"{root}/{split}", recursive=True)
        shards = []
        for i, chunk in enumerate(_chunks(records, int(shard_mb * 2**20), min_shards)):
            rel = f"{split}/part-{i:05d}.parquet"
            shards.append({"path": rel, **_write_shard(fs, f"{root}/{rel}", chunk, row_group_rows)})
        counts = Counter(r.label for r in records if r.label is not None)
        images = measure([records[i].payload() for i in sample_indices(len(records), seed=seed)], len(records), seed)
        manifest["splits"][split] = {
            "rows": len(records),
            "class_counts": {str(k): counts[k] for k in sorted(counts)},
            "unlabelled": sum(r.label is None for r in records),
            "unreadable_skipped": unreadable.get(split, {"count": 0, "first": []}),
            "images": images,
            "shards": shards,
        }
        log(f"{split}: {len(records)} images in {len(shards)} shards; {describe(images)}")
    tmp = f"{root}/{MANIFEST}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(manifest, indent=2).encode())
    fs.move(tmp, f"{root}/{MANIFEST}")
    return manifest
