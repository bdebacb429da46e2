"""``byol prepare``: image collections -> Parquet shards written with pyarrow, plus a manifest.

Layout under ``--out`` (a local path or any pyarrow filesystem URI such as ``s3://bucket/prefix``)::

    train/part-00000.parquet ...   columns: image (encoded bytes), label (int64, null if unknown), key (string)
    val/part-*.parquet             stratified labelled hold-out (kNN monitoring, tuning)
    test/part-*.parquet            when the source has a test split
    manifest.json                  written last: a crash never leaves a manifest that lists missing shards
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import pickle
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist

SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("key", pa.string())])
MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class PrepareError(ValueError):
    """The source or output cannot be used; the message names the path."""


@dataclass
class Record:
    key: str
    image: bytes | Path  # a Path is read when its shard is written, so sources never sit in memory whole
    label: int | None

    def payload(self) -> bytes:
        return self.image.read_bytes() if isinstance(self.image, Path) else self.image

    def size(self) -> int:
        return self.image.stat().st_size if isinstance(self.image, Path) else len(self.image)


@dataclass
class Source:
    """What a reader found: records per split (lazily encoded), class names, image geometry."""

    name: str
    splits: dict[str, list[Record]]
    classes: list[str] = field(default_factory=list)
    image: dict = field(default_factory=dict)  # {"height", "width", "mode"} when uniform


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def _array_records(prefix: str, images: np.ndarray, labels: np.ndarray) -> list[Record]:
    from pipeline.core.images import encode_png  # here: this module stays torch-free (see pipeline.data.execution)

    return [Record(f"{prefix}-{i:06d}", encode_png(images[i]), int(labels[i])) for i in range(len(labels))]


def read_fashion_mnist(directory: str) -> Source:
    if not Path(directory).is_dir():
        raise PrepareError(f"fashion-mnist source not found: {directory} (apt-get install -y dataset-fashion-mnist)")
    try:
        train_x, train_y = load_fashion_mnist(directory, "train")
        test_x, test_y = load_fashion_mnist(directory, "test")
    except (FileNotFoundError, ValueError) as exc:
        raise PrepareError(str(exc)) from None
    return Source(
        name=f"fashion-mnist:{directory}",
        splits={"train": _array_records("train", train_x, train_y), "test": _array_records("test", test_x, test_y)},
        classes=list(FASHION_MNIST_CLASSES),
        image={"height": 28, "width": 28, "mode": "L"},
    )


def read_imagefolder(directory: str) -> Source:
    root = Path(directory)
    if not root.is_dir():
        raise PrepareError(f"imagefolder source not found: {directory}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_dirs:
        classes = [p.name for p in class_dirs]
        files = [(f, label) for label, d in enumerate(class_dirs) for f in sorted(d.rglob("*")) if _is_image(f)]
    else:
        classes = []
        files = [(f, None) for f in sorted(root.iterdir()) if _is_image(f)]
    if not files:
        raise PrepareError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {directory}")
    # Bytes are stored as they are (JPEG/PNG untouched); other formats decode through PIL later.
    records = [Record(f.relative_to(root).as_posix(), f, label) for f, label in files]
    return Source(name=f"imagefolder:{directory}", splits={"train": records}, classes=classes)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def read_cifar(directory: str) -> Source:
    root = Path(directory)
    if not root.is_dir():
        raise PrepareError(f"cifar source not found: {directory}")

    def load(name: str) -> dict:
        with open(root / name, "rb") as f:
            return pickle.load(f, encoding="latin1")  # the dataset's own format; only read trusted copies

    if (root / "data_batch_1").exists():  # CIFAR-10
        batches = [load(f"data_batch_{i}") for i in range(1, 6) if (root / f"data_batch_{i}").exists()]
        train = {
            "data": np.concatenate([b["data"] for b in batches]),
            "labels": [y for b in batches for y in b["labels"]],
        }
        test = load("test_batch") if (root / "test_batch").exists() else None
        classes = load("batches.meta")["label_names"] if (root / "batches.meta").exists() else []
        label_key = "labels"
    elif (root / "train").exists():  # CIFAR-100
        train = load("train")
        test = load("test") if (root / "test").exists() else None
        classes = load("meta")["fine_label_names"] if (root / "meta").exists() else []
        label_key = "fine_labels"
    else:
        raise PrepareError(f"{directory}: no CIFAR-10 (data_batch_1..5) or CIFAR-100 (train/test) pickle files")

    def records(prefix: str, batch: dict) -> list[Record]:
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return _array_records(prefix, images, np.asarray(batch[label_key]))

    splits = {"train": records("train", train)}
    if test is not None:
        splits["test"] = records("test", test)
    return Source(
        name=f"cifar:{directory}",
        splits=splits,
        classes=list(classes),
        image={"height": 32, "width": 32, "mode": "RGB"},
    )


def read_source(spec: str) -> Source:
    kind, _, arg = spec.partition(":")
    if kind == "fashion-mnist":
        return read_fashion_mnist(arg or FASHION_MNIST_DIR)
    if kind in ("imagefolder", "cifar") and not arg:
        raise PrepareError(f"--source {kind}:PATH needs a path")
    if kind == "imagefolder":
        return read_imagefolder(arg)
    if kind == "cifar":
        return read_cifar(arg)
    raise PrepareError(f"unknown source {spec!r} (allowed: fashion-mnist[:DIR], imagefolder:PATH, cifar:PATH)")


# ---------------------------------------------------------------------------------------------
# Splitting and writing
# ---------------------------------------------------------------------------------------------


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


def resolve_output(out: str) -> tuple[pafs.FileSystem, str]:
    """A local path or a filesystem URI -> (pyarrow filesystem, path inside it)."""
    if "://" in out:
        return pafs.FileSystem.from_uri(out)
    return pafs.LocalFileSystem(), str(Path(out).resolve())


def prepare(
    source: str,
    out: str,
    val_fraction: float = 0.1,
    shard_mb: float = 64.0,
    min_shards: int = 8,
    row_group_rows: int = 1024,
    overwrite: bool = False,
    seed: int = 0,
    log=print,
) -> dict:
    """Write the shards and the manifest; returns the manifest."""
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    fs, root = resolve_output(out)
    existing = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=False))
    if existing and not overwrite:
        raise PrepareError(f"{out} is not empty; pass --overwrite to replace it")
    src = read_source(source)
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
        manifest["splits"][split] = {
            "rows": len(records),
            "class_counts": {str(k): counts[k] for k in sorted(counts)},
            "unlabelled": sum(r.label is None for r in records),
            "shards": shards,
        }
        log(f"{split}: {len(records)} images in {len(shards)} shards")
    tmp = f"{root}/{MANIFEST}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(manifest, indent=2).encode())
    fs.move(tmp, f"{root}/{MANIFEST}")
    return manifest


def read_manifest(path: str) -> dict:
    fs, root = resolve_output(path)
    info = fs.get_file_info(f"{root}/{MANIFEST}")
    if not info.is_file:
        raise PrepareError(f"{path}: no {MANIFEST} (write shards with `byol prepare --out {path}`)")
    with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
        return json.loads(f.read())


def split_shards(path: str, split: str) -> list[dict]:
    """The manifest entries of ``split``'s shards; an error naming the splits there are if it has none."""
    manifest = read_manifest(path)
    if split not in manifest["splits"]:
        raise PrepareError(f"{path}: no {split!r} split (has: {', '.join(manifest['splits'])})")
    return manifest["splits"][split]["shards"]


def read_split_table(
    path: str, split: str, columns: list[str] | None = None, shards: list[dict] | None = None
) -> pa.Table:
    """A whole split (or the given manifest shards of it) as one table: small splits only."""
    fs, root = resolve_output(path)
    shards = split_shards(path, split) if shards is None else shards
    return pa.concat_tables([pq.read_table(f"{root}/{s['path']}", filesystem=fs, columns=columns) for s in shards])
