"""``byol embed``: a checkpoint's online encoder applied to a dataset with Ray Data batch inference.

    shards (read_parquet of the manifest's splits) or an image folder (read_binary_files)
      -> map_batches(Embedder)      an actor pool: each actor loads the encoder once, decodes a batch as evaluation
                                    does (shorter side resized, centre crop, the run's normalisation), embeds it in
                                    the run's precision on its GPU when the cluster has GPUs, and L2-normalises
      -> write_parquet(out)         key, split, label (null when unknown), embedding; local path or s3://...

Streaming: no process holds the whole dataset or all embeddings. A record that cannot be decoded is skipped and
counted under ``data.on_bad_record: skip`` (the run's), or stops the command naming it under ``fail``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import torch

from pipeline.core.images import decode
from pipeline.core.step import autocast, autocast_dtype
from pipeline.core.storage import filesystem, is_uri, join_location
from pipeline.data.labelled import resize_uint8
from pipeline.data.manifest import read_manifest
from pipeline.errors import BadRecord, DataError


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

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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
            empty = {"key": np.array([], dtype=str), "split": np.array([], dtype=str)}
            return {**empty, "label": np.array([], dtype=np.int64), "embedding": np.zeros((0, self.dim), np.float32)}
        x = torch.stack(images).to(self.device, non_blocking=True).float().div_(255)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(self.device.type, self.dtype):
            features = self.encoder(x)
        features = torch.nn.functional.normalize(features.float(), dim=1).cpu().numpy()
        return {
            "key": np.asarray(batch["key"])[keep].astype(str),
            "split": np.asarray(batch["split"])[keep].astype(str),
            "label": np.asarray(batch["label"])[keep],
            "embedding": features,
        }


def embed(checkpoint: str, data: str, out: str, splits: list[str] | None = None, batch_size: int = 256) -> dict:
    """Embed ``splits`` (default: all) of the shards at ``data``, or the image folder ``data``, into ``out``."""
    started = time.time()
    out_dir = out if is_uri(out) else str(Path(out).resolve())
    _refuse_existing(out, out_dir)
    dataset, rows = read_images(data, splits)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    actors = gpus if gpus else max(1, min(4, cores // 2))
    where = f"{gpus} GPU actor(s)" if gpus else f"{actors} CPU actor(s)"
    print(f"[embed] {rows} images of {data} with {where} -> {out} (Ray Data's progress bar follows)", flush=True)
    embedded = dataset.map_batches(
        Embedder,
        fn_constructor_kwargs={"checkpoint": checkpoint, "threads": max(1, cores // actors)},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0,
        num_cpus=0 if not gpus else 1,  # the actors' threads share the machine with the read tasks
    )
    embedded.write_parquet(out_dir)
    seconds = time.time() - started
    written = ray.data.read_parquet(out_dir).count()
    summary = {
        "out": out,
        "rows": written,
        "input_rows": rows,
        "skipped": rows - written,
        "actors": actors,
        "device": "cuda" if gpus else "cpu",
        "seconds": round(seconds, 1),
        "images_per_s": round(written / max(seconds, 1e-9), 1),
    }
    return summary


def _refuse_existing(out: str, out_dir: str) -> None:
    """Writing into a folder that holds files would mix old embeddings with new ones (and miscount them)."""
    fs, root = filesystem(out_dir)
    if fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=False)):
        raise DataError(f"--out {out} is not empty; give a new folder or delete this one")


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
