"""``byol embed``: a checkpoint's online encoder applied to a dataset with Ray Data batch inference.

    shards (read_parquet of the manifest's splits) or an image folder (read_binary_files): embed_input
      -> map_batches(Embedder)      an actor pool: each actor loads the encoder once, decodes a batch as evaluation
                                    does (shorter side resized, centre crop, the run's normalisation), embeds it in
                                    the run's precision on its GPU when the cluster has GPUs, and L2-normalises
      -> write_parquet(out)         key, split, label (-1 when unknown), embedding; local path or s3://...

``parallel="off"`` runs the same reads and the same ``Embedder`` batch after batch in this process and writes one
Parquet file into ``out``; ``auto`` (the default) does so unless there is a cluster to use (RAY_ADDRESS, a Ray this
process already joined, or more than one GPU here): on one machine Ray Data's start-up (worker processes, their
imports; seconds on a laptop) buys nothing, since one process already uses every core (bench/embed_pipeline.py).

Streaming: no process holds the whole dataset or all embeddings. A record that cannot be decoded is skipped and
counted under ``data.on_bad_record: skip`` (the run's), or stops the command naming it under ``fail``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
import torch

from pipeline.core.images import decode
from pipeline.core.step import autocast, autocast_dtype
from pipeline.core.storage import filesystem, is_uri
from pipeline.data.labelled import resize_uint8
from pipeline.errors import BadRecord, DataError
from pipeline.evaluation.embed_input import iter_images, read_images
from pipeline.train.cluster import available_cpus

PROGRESS_EVERY_S = 10.0
ROW_GROUP_ROWS = 8192  # embeddings per Parquet row group written in-process
ACTOR_START_TIMEOUT_S = 600  # Ray Data path: the first actor's wait for its resources before a clear error
MAX_CPU_ACTORS = 16


class Embedder:
    """The map's actor: one encoder per actor, loaded once."""

    def __init__(self, checkpoint: str, threads: int) -> None:
        from pipeline.core.checkpoint import load_encoder

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(threads)  # the machine's cores shared among the pool's actors
        encoder, cfg, _ = load_encoder(checkpoint)
        self.encoder, self.cfg = encoder.to(self.device), cfg
        self.dtype = autocast_dtype(cfg.train.precision, self.device)
        self.mean = torch.tensor(cfg.data.mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.data.std, device=self.device).view(1, -1, 1, 1)
        blank = torch.zeros(1, cfg.data.channels, cfg.data.image_size, cfg.data.image_size, device=self.device)
        with torch.no_grad():
            self.dim = int(self.encoder.eval()(blank).shape[1])  # the width of a batch whose records are all bad

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        data, size = self.cfg.data, self.cfg.data.image_size
        images, keep = [], []
        for i, record in enumerate(batch["image"]):
            try:
                images.append(resize_uint8(decode(record, data.channels), size))
                keep.append(i)
            except BadRecord as exc:
                if data.on_bad_record == "fail":
                    key = batch["key"][i]
                    raise BadRecord(f"bad record ({exc}), key {key}; or set data.on_bad_record=skip") from None
        if not images:
            return self.table([], [], [], np.zeros((0, self.dim), np.float32))
        x = torch.stack(images).to(self.device, non_blocking=True).float().div_(255)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(self.device.type, self.dtype):
            features = self.encoder(x)
        features = torch.nn.functional.normalize(features.float(), dim=1).cpu().numpy()
        key, split, label = (np.asarray(batch[c])[keep] for c in ("key", "split", "label"))
        return self.table(key.astype(str), split.astype(str), label, features)

    def table(self, key, split, label, embeddings: np.ndarray) -> pa.Table:
        """The output rows, one schema on both paths: ``embedding`` a fixed-size list of float32 (what pyarrow,
        pandas and polars read without Ray's tensor extension type)."""
        flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
        columns = [pa.array(key, pa.string()), pa.array(split, pa.string()), pa.array(label, pa.int64())]
        return pa.Table.from_arrays([*columns, pa.FixedSizeListArray.from_arrays(flat, self.dim)], schema=self.schema)

    @property
    def schema(self) -> pa.Schema:
        return output_schema(self.dim)


def output_schema(dim: int) -> pa.Schema:
    fields = [("key", pa.string()), ("split", pa.string()), ("label", pa.int64())]
    return pa.schema([*fields, ("embedding", pa.list_(pa.float32(), dim))])


def embed(
    checkpoint: str,
    data: str,
    out: str,
    splits: list[str] | None = None,
    batch_size: int = 256,
    parallel: str = "auto",
) -> dict:
    """Embed ``splits`` (default: all) of the shards at ``data``, or the image folder ``data``, into ``out``:
    with Ray Data (``parallel="ray"``), in this process (``"off"``), or ``"auto"`` (see the module's doc)."""
    started = time.time()
    out_dir = out if is_uri(out) else str(Path(out).resolve())
    _refuse_existing(out, out_dir)
    if not with_ray(parallel):
        return embed_in_process(checkpoint, data, out, out_dir, splits, batch_size, started)
    from pipeline.train.cluster import connect

    started_ray = connect()
    try:
        return embed_with_ray_data(checkpoint, data, out, out_dir, splits, batch_size, started)
    finally:
        if started_ray:
            ray.shutdown()


def with_ray(parallel: str) -> bool:
    from pipeline.train.cluster import on_ray

    return on_ray(parallel, torch.cuda.device_count() > 1)


def embed_with_ray_data(
    checkpoint: str, data: str, out: str, out_dir: str, splits: list[str] | None, batch_size: int, started: float
) -> dict:
    dataset, rows = read_images(data, splits)
    one_node = sum(1 for node in ray.nodes() if node["Alive"]) == 1
    pool = actor_pool(ray.cluster_resources(), available_cpus() if one_node else None)
    where = f"up to {pool['actors']} {'GPU' if pool['num_gpus'] else 'CPU'} actor(s)"
    print(f"[embed] {rows} images of {data} with Ray Data, {where} -> {out}", flush=True)
    embedded = dataset.map_batches(
        Embedder,
        fn_constructor_kwargs={"checkpoint": checkpoint, "threads": pool["threads"]},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool["actors"]),
        num_gpus=pool["num_gpus"],
        num_cpus=pool["num_cpus"],
    )
    embedded.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S  # Ray's default waits forever
    try:
        embedded.write_parquet(out_dir)
    except ray.exceptions.GetTimeoutError as exc:
        free = ray.available_resources()
        raise DataError(
            f"byol embed: no Embedder actor could start in {ACTOR_START_TIMEOUT_S} s (each needs "
            f"{pool['num_gpus']} GPU, {pool['num_cpus']} CPU; the cluster has {free.get('GPU', 0):g} GPU and "
            f"{free.get('CPU', 0):g} CPU free); free them (`ray status`) or run with --parallel off"
        ) from exc
    ended = time.time()
    written = ray.data.read_parquet(out_dir).count()
    device = "cuda" if pool["num_gpus"] else "cpu"
    return _summary(out, written, rows, f"Ray Data, {where}", device, pool["actors"], started, ended)


def actor_pool(cluster: dict[str, float], cores_here: int | None = None) -> dict:
    """How many Embedder actors at most, and what each asks for, from the whole cluster's resources (not this
    machine's: the driver of a job often runs on a head with no CPUs for work). One per GPU when there are GPUs.
    Else one per 4 CPUs, each with 4 torch threads and 1 CPU reserved: the reservation places actors on nodes that
    have CPUs (never a 0-CPU head) and Ray Data spreads them; the other CPUs decode for the reads.
    ``cores_here``: the cores of a one-node cluster, whose declared CPUs may be more (a local Ray started by byol)."""
    gpus, cpus = int(cluster.get("GPU", 0)), int(cluster.get("CPU", 0))
    cpus = min(cpus, cores_here) if cores_here else cpus
    if gpus:
        return {"actors": gpus, "threads": max(1, min(8, cpus // gpus)), "num_gpus": 1, "num_cpus": 1 if cpus else 0}
    actors = max(1, min(MAX_CPU_ACTORS, cpus // 4))
    return {
        "actors": actors,
        "threads": max(1, min(4, cpus // actors)),
        "num_gpus": 0,
        "num_cpus": 1 if cpus >= 2 else 0,  # one CPU: the read tasks need it
    }


def embed_in_process(
    checkpoint: str, data: str, out: str, out_dir: str, splits: list[str] | None, batch_size: int, started: float
) -> dict:
    import pyarrow.parquet as pq

    threads = torch.get_num_threads()
    try:
        embedder = Embedder(checkpoint, available_cpus())
        batches, rows = iter_images(data, splits, batch_size)
        where = f"this process ({embedder.device.type})"
        print(f"[embed] {rows} images of {data} in {where} -> {out}", flush=True)
        fs, root = filesystem(out_dir)
        fs.create_dir(root, recursive=True)
        written, seen, said, pending = 0, 0, time.time(), []
        with pq.ParquetWriter(f"{root}/part-00000.parquet", embedder.schema, filesystem=fs) as writer:
            for batch in batches:
                pending.append(embedder(batch))
                seen += len(batch["key"])
                if sum(t.num_rows for t in pending) >= ROW_GROUP_ROWS:
                    written += _write(writer, pending)
                if time.time() - said >= PROGRESS_EVERY_S:
                    said = time.time()
                    print(f"[embed] {seen}/{rows} images, {seen / (said - started):.0f} images/s", flush=True)
            written += _write(writer, pending)
    finally:
        torch.set_num_threads(threads)  # the caller's (a notebook's, a test session's) setting
    return _summary(out, written, rows, where, embedder.device.type, 0, started)


def _write(writer, tables: list[pa.Table]) -> int:  # noqa: ANN001  (a pyarrow ParquetWriter)
    """The tables as row groups of ROW_GROUP_ROWS or fewer; the list emptied; the rows written."""
    rows = sum(t.num_rows for t in tables)
    if rows:
        writer.write_table(pa.concat_tables(tables), row_group_size=ROW_GROUP_ROWS)
    tables.clear()
    return rows


def _summary(
    out: str, written: int, rows: int, where: str, device: str, actors: int, started: float, ended: float | None = None
) -> dict:
    seconds = (ended or time.time()) - started  # ended: before the Ray path counts what it wrote
    return {
        "out": out,
        "rows": written,
        "input_rows": rows,
        "skipped": rows - written,
        "where": where,
        "actors": actors,
        "device": device,
        "seconds": round(seconds, 1),
        "images_per_s": round(written / max(seconds, 1e-9), 1),
    }


def _refuse_existing(out: str, out_dir: str) -> None:
    """Writing into a folder that holds files would mix old embeddings with new ones (and miscount them)."""
    fs, root = filesystem(out_dir)
    if fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=False)):
        raise DataError(f"--out {out} is not empty; give a new folder or delete this one")
