"""``byol prepare``: an image collection -> Parquet shards written with pyarrow, plus a manifest.

Layout under ``--out`` (a local path or any pyarrow filesystem URI such as ``s3://bucket/prefix``)::

    train/part-00000.parquet ...   columns: image (encoded bytes), label (int64, null if unknown), key (string)
    val/part-*.parquet             stratified labelled hold-out (kNN monitoring, tuning)
    test/part-*.parquet            when the source has a test split
    manifest.json                  written last: a crash never leaves a manifest that lists missing shards

Reading what this writes: ``pipeline.data.manifest``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pyarrow.fs as pafs

from pipeline.core.storage import filesystem
from pipeline.data.image_stats import describe, measure, sample_indices
from pipeline.data.manifest import MANIFEST
from pipeline.data.shard_jobs import (
    Progress,
    ShardJob,
    finished_shards,
    forget_plan,
    plan_fingerprint,
    run_jobs,
    start_plan,
    use_ray,
)
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
    parallel: str = "auto",
    log=print,
) -> dict:
    """Write the shards and the manifest; returns the manifest. ``parallel``: ``auto`` | ``ray`` | ``off`` (see
    :func:`pipeline.data.shard_jobs.use_ray`). An interrupted run of the same plan is resumed."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if on_bad_record not in ("skip", "fail"):
        raise ConfigError(f"--on-bad-record must be skip or fail, got {on_bad_record!r}")
    if parallel not in ("auto", "ray", "off"):
        raise ConfigError(f"--parallel must be auto, ray or off, got {parallel!r}")
    fs, root = filesystem(out)
    src = read_source(source)
    splits = _shuffled(_split_records(src, val_fraction, seed), seed)
    jobs = [
        ShardJob(split, i, chunk)
        for split, records in splits.items()
        for i, chunk in enumerate(_chunks(records, int(shard_mb * 2**20), min_shards))
    ]
    settings = {"source": src.name, "val_fraction": val_fraction, "seed": seed, "row_group_rows": row_group_rows}
    fingerprint = plan_fingerprint({**settings, "on_bad_record": on_bad_record}, jobs)
    done = _start_or_resume(fs, root, out, fingerprint, overwrite)
    todo = [job for job in jobs if job.rel not in done]
    if done:
        log(f"[prepare] resuming {out}: {len(done)} of {len(jobs)} shards already written, {len(todo)} to go")

    # Write the shards: this process, or one Ray task per shard
    images_todo = sum(len(j.records) for j in todo)
    with_ray = bool(todo) and use_ray(parallel, images_todo)
    results = dict(done)
    with contextlib.ExitStack() as cleanup:
        if with_ray:
            from pipeline.train.cluster import connect

            if connect(train_workers=0, cpus_per_worker=0):
                cleanup.callback(_shutdown_ray)
        progress = Progress(len(todo), images_todo, log)
        for result in run_jobs(out, todo, row_group_rows, on_bad_record, with_ray):
            results[result["path"]] = result
            progress.add(result)

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
    for split, records in splits.items():
        entry = _split_entry(records, [j for j in jobs if j.split == split], results, seed, log)
        if not entry["rows"]:
            bad = entry["unreadable_skipped"]["count"]
            raise DataError(f"no readable images in the {split} split of {source} ({bad} unreadable)")
        entry["images"] = measure([r.payload() for r in entry.pop("sample")], entry["rows"], seed)
        manifest["splits"][split] = entry
        log(f"{split}: {entry['rows']} images in {len(entry['shards'])} shards; {describe(entry['images'])}")
    tmp = f"{root}/{MANIFEST}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(manifest, indent=2).encode())
    fs.move(tmp, f"{root}/{MANIFEST}")
    forget_plan(out)
    return manifest


def _shuffled(splits: dict[str, list[Record]], seed: int) -> dict[str, list[Record]]:
    """Rows shuffled once here so no shard holds one class (sources are often sorted by class); Ray Data then
    reshuffles the shard order every epoch and mixes rows in a local buffer."""
    rng = np.random.default_rng(seed)
    return {split: [records[i] for i in rng.permutation(len(records))] for split, records in splits.items()}


def _start_or_resume(fs: pafs.FileSystem, root: str, out: str, fingerprint: str, overwrite: bool) -> dict:
    """The shards already written by an interrupted run of this same plan; else an empty ``out`` (emptied with
    ``overwrite``) where this plan starts."""
    existing = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=False))
    if existing and not overwrite:
        done = None if any(i.base_name == MANIFEST for i in existing) else finished_shards(out, fingerprint)
        if done is not None:
            return done
        raise DataError(f"{out} is not empty; pass --overwrite to replace it")
    if overwrite:
        fs.delete_dir_contents(root, missing_dir_ok=True)  # the old manifest goes first
    fs.create_dir(root, recursive=True)
    start_plan(out, fingerprint)
    return {}


def _split_entry(records: list[Record], jobs: list[ShardJob], results: dict, seed: int, log) -> dict:
    """One split of the manifest from its shards' results: rows, classes, what was skipped, and the seeded sample
    of the rows written whose statistics the caller measures."""
    shard_results = [results[job.rel] for job in jobs]
    skipped = [key for r in shard_results for key in r["skipped"]]
    skipped_set = set(skipped)
    kept = [r for r in records if r.key not in skipped_set]
    labels = [label for r in shard_results for label in r["labels"]]
    counts = Counter(label for label in labels if label is not None)
    first = sorted(skipped)[:5]
    if skipped:
        log(f"skipped {len(skipped)} unreadable image(s): {', '.join(first)}{' ...' if len(skipped) > 5 else ''}")
    return {
        "rows": len(kept),
        "class_counts": {str(k): counts[k] for k in sorted(counts)},
        "unlabelled": sum(label is None for label in labels),
        "unreadable_skipped": {"count": len(skipped), "first": first},
        "sample": [kept[i] for i in sample_indices(len(kept), seed=seed)],
        "shards": [{k: r[k] for k in ("path", "rows", "bytes", "sha256")} for r in shard_results if r["rows"]],
    }


def _shutdown_ray() -> None:
    import ray

    ray.shutdown()
