"""Reading a prepared dataset (no Ray): its manifest, its splits' shards, every shard's footer checked against
the manifest before a run, and whole Parquet row groups sampled for evaluation (a split is never read whole
except by :func:`read_split_table`, for small splits)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.core.storage import filesystem
from pipeline.errors import DataError

SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("key", pa.string())])
MANIFEST = "manifest.json"


def has_manifest(path: str) -> bool:
    """Whether ``path`` holds prepared shards (else it may be an image folder)."""
    fs, root = filesystem(path)
    return fs.get_file_info(f"{root}/{MANIFEST}").is_file


def read_manifest(path: str) -> dict:
    fs, root = filesystem(path)
    info = fs.get_file_info(f"{root}/{MANIFEST}")
    if not info.is_file:
        raise DataError(f"{path}: no {MANIFEST} (write shards with `byol prepare --out {path}`)")
    with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
        return json.loads(f.read())


def split_shards(path: str, split: str) -> list[dict]:
    """The manifest entries of ``split``'s shards; an error naming the splits there are if it has none."""
    manifest = read_manifest(path)
    if split not in manifest["splits"]:
        raise DataError(f"{path}: no {split!r} split (has: {', '.join(manifest['splits'])})")
    return manifest["splits"][split]["shards"]


def read_split_table(
    path: str, split: str, columns: list[str] | None = None, shards: list[dict] | None = None
) -> pa.Table:
    """A whole split (or the given manifest shards of it) as one table: small splits only."""
    fs, root = filesystem(path)
    shards = split_shards(path, split) if shards is None else shards
    return pa.concat_tables([pq.read_table(f"{root}/{s['path']}", filesystem=fs, columns=columns) for s in shards])


@dataclass(frozen=True)
class UnreadableShard:
    path: str  # as in the manifest, e.g. train/part-00003.parquet
    rows: int  # the manifest's row count: records lost if the shard is skipped
    reason: str


def read_footers(path: str, shards: list[dict]) -> list[pq.FileMetaData | str]:
    """Each shard's Parquet footer (in parallel: cheap on object stores too), or why it cannot be read."""
    from concurrent.futures import ThreadPoolExecutor

    fs, root = filesystem(path)

    def footer(shard: dict) -> pq.FileMetaData | str:
        full = f"{root}/{shard['path']}"
        if fs.get_file_info(full).type == pafs.FileType.NotFound:
            return "missing"
        try:
            with fs.open_input_file(full) as f:
                return pq.ParquetFile(f).metadata
        except Exception as exc:  # pyarrow raises several types for a damaged footer
            return f"not a readable Parquet file ({str(exc).splitlines()[0][:120]})"

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(shards)))) as pool:
        return list(pool.map(footer, shards))


def check_shards(path: str, split: str) -> tuple[list[dict], list[UnreadableShard]]:
    """(readable shards, unreadable ones) of ``split``: each shard's Parquet footer and row count against the manifest.

    Reads only the footers (cheap on object stores too), so a truncated or replaced shard is found
    before any worker starts, and named. Record-level damage inside a valid shard is left to the
    decoder (``data.on_bad_record``).
    """
    shards = split_shards(path, split)

    def problem(shard: dict, footer: pq.FileMetaData | str) -> str | None:
        if isinstance(footer, str):
            return footer
        return (
            None if footer.num_rows == shard["rows"] else f"{footer.num_rows} rows, the manifest says {shard['rows']}"
        )

    reasons = [problem(s, f) for s, f in zip(shards, read_footers(path, shards), strict=True)]
    good = [s for s, r in zip(shards, reasons, strict=True) if r is None]
    bad = [UnreadableShard(s["path"], s["rows"], r) for s, r in zip(shards, reasons, strict=True) if r is not None]
    return good, bad


@dataclass(frozen=True)
class RowGroup:
    shard: str  # as in the manifest, e.g. val/part-00001.parquet
    index: int  # row group within the shard
    take: int  # rows to use, from the group's start


def sample_row_groups(path: str, split: str, max_rows: int | None, seed: int = 0) -> list[RowGroup]:
    """Whole Parquet row groups of ``split`` drawn at random until they hold ``max_rows`` rows (all: None).

    ``byol prepare`` shuffles rows before writing, so a row group is a random sample of the split, and reading
    whole groups reads exactly the sample (rows drawn one by one would touch nearly every group of a large
    split). Only footers are read here.
    """
    shards = split_shards(path, split)
    groups = [
        (shard["path"], g, footer.row_group(g).num_rows)
        for shard, footer in zip(shards, read_footers(path, shards), strict=True)
        if not isinstance(footer, str)  # unreadable: the readers skip or fail on it with its name
        for g in range(footer.num_row_groups)
    ]
    order = np.arange(len(groups)) if max_rows is None else np.random.default_rng(seed).permutation(len(groups))
    picked, total = [], 0
    for i in order:
        if max_rows is not None and total >= max_rows:
            break
        shard, index, rows = groups[i]
        take = rows if max_rows is None else min(rows, max_rows - total)
        picked.append(RowGroup(shard, index, take))
        total += take
    return picked


def iter_row_groups(
    path: str, groups: list[RowGroup], columns: list[str], skip_unreadable: bool = False
) -> Iterator[pa.Table]:
    """The given row groups, one small table each: memory stays at one row group however large the split is
    (the whole-split read of ``read_split_table`` is for small splits). An unreadable shard raises
    :class:`DataError` naming it, or is skipped with ``skip_unreadable``."""
    fs, root = filesystem(path)
    for group in groups:
        try:
            with fs.open_input_file(f"{root}/{group.shard}") as f:
                table = pq.ParquetFile(f).read_row_group(group.index, columns=columns)
        except (OSError, pa.ArrowException) as exc:
            if skip_unreadable:
                continue
            raise DataError(
                f"{path}: shard {group.shard} is unreadable ({str(exc).splitlines()[0][:120]}); "
                f"re-run `byol prepare` to rewrite it"
            ) from None
        yield table.slice(0, group.take)
