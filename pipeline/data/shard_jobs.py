"""The shards of ``byol prepare`` as jobs: each reads its images, skips the unreadable ones and writes one Parquet
file, in this process or as Ray tasks across a cluster's cores; finished shards are recorded, so a re-run after a
crash or a lost node writes only the missing ones.

Progress is recorded under ``<out>/_prepare/``: ``plan.json`` (a fingerprint of the settings and of every shard's
keys: a re-run resumes only the same plan) and one ``<split>-part-NNNNN.json`` per finished shard. ``prepare``
deletes the folder once the manifest is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.core.storage import filesystem, join_location, write_bytes
from pipeline.data.manifest import SCHEMA
from pipeline.data.sources import Record
from pipeline.errors import DataError

PROGRESS_DIR = "_prepare"
# On one machine without a cluster, a local Ray is started for prepare only from this many images and cores: on 2
# cores its start costs more than the cores save (bench/prepare_throughput.py); 4 is a judgement, not a measurement.
PARALLEL_FROM_IMAGES = 20_000
PARALLEL_FROM_CORES = 4


@dataclass
class ShardJob:
    split: str
    index: int
    records: list[Record]

    @property
    def rel(self) -> str:
        return f"{self.split}/part-{self.index:05d}.parquet"

    @property
    def progress_name(self) -> str:
        return f"{self.split}-part-{self.index:05d}.json"


# ---------------------------------------------------------------------------------------------
# One shard
# ---------------------------------------------------------------------------------------------


def screen_unreadable(records: list[Record], on_bad_record: str) -> tuple[list[Record], list[str]]:
    """Files that PIL cannot identify or verify are skipped (``skip``, their keys returned) or stop prepare naming
    the file (``fail``). In-memory records (encoded here) are trusted; a file truncated past its header is still
    caught at training time by ``data.on_bad_record``."""
    from PIL import Image

    kept, bad = [], []
    for record in records:
        if not record.is_file():
            kept.append(record)
            continue
        data = record.payload()  # a storage error (timeout, access denied) fails the shard: it is retried, not skipped
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
            kept.append(Record(record.key, data, record.label))
        except Exception as exc:  # noqa: BLE001  (PIL raises many kinds; the file is named either way)
            if on_bad_record == "fail":
                raise DataError(
                    f"unreadable image {record.image} ({type(exc).__name__}: {exc}); "
                    "remove it or run with --on-bad-record skip"
                ) from None
            bad.append(record.key)
    return kept, bad


def write_shard(out: str, job: ShardJob, row_group_rows: int, on_bad_record: str) -> dict:
    """Screen, encode and write one shard (written beside, then moved into place), then record it as finished.
    Returns its manifest entry plus ``skipped`` (unreadable keys) and ``labels`` (of the rows written)."""
    fs, root = filesystem(out)
    kept, skipped = screen_unreadable(job.records, on_bad_record)
    result = {"path": job.rel, "rows": len(kept), "skipped": skipped, "labels": [r.label for r in kept]}
    if kept:
        table = pa.table(
            {
                "image": pa.array([r.payload() for r in kept], pa.binary()),
                "label": pa.array([r.label for r in kept], pa.int64()),
                "key": pa.array([r.key for r in kept], pa.string()),
            },
            schema=SCHEMA,
        )
        path, partial = f"{root}/{job.rel}", f"{root}/{job.rel}.partial"
        fs.create_dir(f"{root}/{job.split}", recursive=True)
        with fs.open_output_stream(partial) as f:
            pq.write_table(table, f, row_group_size=row_group_rows, compression="none")  # JPEG/PNG don't compress
        fs.move(partial, path)
        with fs.open_input_stream(path) as f:
            data = f.read()
        result.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    write_bytes(join_location(out, PROGRESS_DIR, job.progress_name), json.dumps(result).encode())  # whole or not
    return result


# ---------------------------------------------------------------------------------------------
# The plan: start, or resume the same one
# ---------------------------------------------------------------------------------------------


def plan_fingerprint(settings: dict, jobs: list[ShardJob]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for job in jobs:
        digest.update(job.rel.encode())
        for record in job.records:
            digest.update(f"{record.key}\0{record.size()}\0".encode())
    return digest.hexdigest()


def finished_shards(out: str, fingerprint: str) -> dict[str, dict] | None:
    """The shards an earlier run of this same plan finished (by shard path), or None when ``out`` holds no such run."""
    fs, root = filesystem(out)
    try:
        with fs.open_input_stream(f"{root}/{PROGRESS_DIR}/plan.json") as f:
            if json.loads(f.read()).get("fingerprint") != fingerprint:
                return None
    except (FileNotFoundError, OSError, ValueError):
        return None
    done = {}
    for info in fs.get_file_info(pafs.FileSelector(f"{root}/{PROGRESS_DIR}", allow_not_found=True)):
        if info.base_name != "plan.json" and info.base_name.endswith(".json"):
            try:
                with fs.open_input_stream(info.path) as f:
                    result = json.loads(f.read())
            except (OSError, ValueError):  # a record cut short: its shard is written again
                continue
            done[result["path"]] = result
    return done


def start_plan(out: str, fingerprint: str) -> None:
    fs, root = filesystem(out)
    fs.create_dir(f"{root}/{PROGRESS_DIR}", recursive=True)
    with fs.open_output_stream(f"{root}/{PROGRESS_DIR}/plan.json") as f:
        f.write(json.dumps({"fingerprint": fingerprint}).encode())


def forget_plan(out: str) -> None:
    fs, root = filesystem(out)
    fs.delete_dir(f"{root}/{PROGRESS_DIR}")


# ---------------------------------------------------------------------------------------------
# Running the jobs
# ---------------------------------------------------------------------------------------------


def use_ray(parallel: str, images: int) -> bool:
    """``ray``: always; ``off``: never; ``auto``: on a cluster (RAY_ADDRESS, or Ray already running in this
    process), or for at least PARALLEL_FROM_IMAGES images on a machine of at least PARALLEL_FROM_CORES cores."""
    from pipeline.train.cluster import available_cpus, on_ray

    return on_ray(parallel, images >= PARALLEL_FROM_IMAGES and available_cpus() >= PARALLEL_FROM_CORES)


def run_jobs(out: str, jobs: list[ShardJob], row_group_rows: int, on_bad_record: str, with_ray: bool) -> Iterator[dict]:
    """Each job's result as it finishes: in this process, or one Ray task per shard (1 CPU each, retried if its
    node is lost). Tasks that read local files run on this node when it has CPUs (only it is sure to see them);
    from a node without CPUs (a KubeRay head) they run anywhere, so the folder must be on storage every node
    mounts (or on object storage)."""
    if not with_ray:
        for job in jobs:
            yield write_shard(out, job, row_group_rows, on_bad_record)
        return
    import ray
    from ray.exceptions import RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=1, max_retries=3)(write_shard)
    local_files = any(r.is_local_file() for job in jobs for r in job.records[:1])
    node = ray.get_runtime_context().get_node_id()
    if local_files and _node_cpus(node) >= 1:
        task = task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
    pending = [task.remote(out, job, row_group_rows, on_bad_record) for job in jobs]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            yield ray.get(done[0])
        except RayTaskError as exc:  # the task's own error (a named unreadable file), not Ray's wrapping of it
            for ref in pending:
                ray.cancel(ref)
            raise exc.cause if isinstance(exc.cause, DataError | OSError) else exc from None


def _node_cpus(node_id: str) -> float:
    import ray

    return next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node_id and n["Alive"]), 0)


class Progress:
    """One line at most every ``every_s`` seconds and at the end: shards, images, images/s."""

    def __init__(self, total_shards: int, total_images: int, log: Callable[[str], None], every_s: float = 5.0):
        self.total_shards, self.total_images, self.log, self.every_s = total_shards, total_images, log, every_s
        self.shards = self.images = 0
        self.started = self.said = time.monotonic()

    def add(self, result: dict) -> None:
        self.shards += 1
        self.images += result["rows"] + len(result["skipped"])
        now = time.monotonic()
        if now - self.said >= self.every_s or self.shards == self.total_shards:
            self.said = now
            rate = self.images / max(now - self.started, 1e-9)
            self.log(
                f"[prepare] {self.shards}/{self.total_shards} shards, {self.images:,}/{self.total_images:,} images, "
                f"{rate:,.0f} images/s"
            )
