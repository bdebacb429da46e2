"""Image collections on disk that ``byol prepare`` reads (no Ray): Fashion-MNIST IDX files, image folders,
CIFAR pickles, each as a :class:`Source` of lazily read records per split."""

from __future__ import annotations

import functools
import gzip
import io
import pickle
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow.fs as pafs

from pipeline.core.storage import filesystem, is_uri
from pipeline.errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4")}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally .gz) as a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated IDX file ({array.size} values, header says {shape})")
    return array.reshape(shape)


def _idx_file(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: missing {stem}(.gz) (a Fashion-MNIST folder holds the four IDX files)")


def load_fashion_mnist(
    directory: str | Path = FASHION_MNIST_DIR, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) for split 'train' (60k) or 'test' (10k)."""
    directory = Path(directory)
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(_idx_file(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_file(directory, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{directory}: {split} has {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


@dataclass
class Record:
    key: str
    # Read or encoded only when its shard is written, so a source never sits in memory whole: a local file (Path),
    # a file on object storage (its URI), pixels (PNG-encoded then) or encoded bytes.
    image: bytes | Path | str | np.ndarray
    label: int | None
    nbytes: int | None = None  # an object's size, from its listing
    root: str | None = None  # an object's folder URI (``image`` is then its key under it)

    def is_file(self) -> bool:
        return isinstance(self.image, Path | str)

    def is_local_file(self) -> bool:
        return isinstance(self.image, Path)

    def open(self) -> BinaryIO:
        return self.image.open("rb") if isinstance(self.image, Path) else io.BytesIO(self.payload())

    def payload(self) -> bytes:
        if isinstance(self.image, Path):
            return self.image.read_bytes()
        if isinstance(self.image, str):
            fs, base = _folder_filesystem(self.root)
            with fs.open_input_stream(f"{base}/{self.image}") as f:
                return f.read()
        if isinstance(self.image, np.ndarray):
            from pipeline.core.images import encode_png  # here: this module stays torch-free (pipeline.data.execution)

            return encode_png(self.image)
        return self.image

    def size(self) -> int:
        if isinstance(self.image, Path):
            return self.image.stat().st_size
        if isinstance(self.image, str):
            return self.nbytes or 0
        return self.image.nbytes if isinstance(self.image, np.ndarray) else len(self.image)


@dataclass
class Source:
    """What a reader found: records per split (lazily encoded), class names, image geometry."""

    name: str
    splits: dict[str, list[Record]]
    classes: list[str] = field(default_factory=list)
    image: dict = field(default_factory=dict)  # {"height", "width", "mode"} when uniform


def _array_records(prefix: str, images: np.ndarray, labels: np.ndarray) -> list[Record]:
    return [Record(f"{prefix}-{i:06d}", images[i], int(labels[i])) for i in range(len(labels))]


def read_fashion_mnist(directory: str) -> Source:
    if not Path(directory).is_dir():
        raise DataError(f"fashion-mnist source not found: {directory} (apt-get install -y dataset-fashion-mnist)")
    try:
        train_x, train_y = load_fashion_mnist(directory, "train")
        test_x, test_y = load_fashion_mnist(directory, "test")
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(str(exc)) from None
    return Source(
        name=f"fashion-mnist:{directory}",
        splits={"train": _array_records("train", train_x, train_y), "test": _array_records("test", test_x, test_y)},
        classes=list(FASHION_MNIST_CLASSES),
        image={"height": 28, "width": 28, "mode": "L"},
    )


def read_imagefolder(directory: str) -> Source:
    """``<class>/<image>`` (any depth below the class) or a flat folder of images, local or on object storage."""
    files = _list_uri_folder(directory) if is_uri(directory) else _list_folder(directory)
    subfolders = sorted({rel.split("/", 1)[0] for rel, _, _ in files if "/" in rel} | _empty_subfolders(directory))
    root = directory if is_uri(directory) else None
    if subfolders:
        classes = subfolders
        counts = Counter(rel.split("/", 1)[0] for rel, _, _ in files if "/" in rel)
        empty = [c for c in classes if not counts[c]]
        if empty and len(empty) < len(classes):  # a class with no images would shift every label after it
            raise DataError(
                f"class folder(s) {', '.join(empty)} in {directory} hold no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images to them or remove them"
            )
        label = {c: i for i, c in enumerate(classes)}
        records = [
            Record(rel, image, label[rel.split("/", 1)[0]], size, root) for rel, image, size in files if "/" in rel
        ]
    else:
        classes = []
        records = [Record(rel, image, None, size, root) for rel, image, size in files]
    if not records:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {directory}")
    # Bytes are stored as they are (JPEG/PNG untouched); other formats decode through PIL later.
    return Source(name=f"imagefolder:{directory}", splits={"train": records}, classes=classes)


def _list_folder(directory: str) -> list[tuple[str, Path, None]]:
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"imagefolder source not found: {directory}")
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if _is_image(path) and not any(part.startswith(".") for part in rel.split("/")):
            files.append((rel, path, None))
    return files


def _list_uri_folder(directory: str) -> list[tuple[str, str, int]]:
    """The images under a folder URI (s3://bucket/prefix...): (key under the folder, the same key, its size)."""
    fs, root = filesystem(directory)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root.rstrip("/"), recursive=True))
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"imagefolder source not readable: {directory} ({exc})") from None
    files = []
    for info in sorted(infos, key=lambda i: i.path):
        rel = info.path[len(root.rstrip("/")) + 1 :]
        if info.type == pafs.FileType.File and Path(rel).suffix.lower() in IMAGE_EXTENSIONS:
            files.append((rel, rel, info.size))  # read under the folder's filesystem; sizes from the listing
    return files


@functools.lru_cache(maxsize=8)
def _folder_filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    fs, base = filesystem(root)
    return fs, base.rstrip("/")


def _empty_subfolders(directory: str) -> set[str]:
    """Class folders with no image at all (a local folder; object stores have no empty folders)."""
    if is_uri(directory):
        return set()
    root = Path(directory)
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def read_cifar(directory: str) -> Source:
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"cifar source not found: {directory}")

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
        raise DataError(f"{directory}: no CIFAR-10 (data_batch_1..5) or CIFAR-100 (train/test) pickle files")

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
        raise DataError(f"--source {kind}:PATH needs a path")
    if kind == "imagefolder":
        return read_imagefolder(arg)
    if kind == "cifar":
        return read_cifar(arg)
    raise DataError(f"unknown source {spec!r} (allowed: fashion-mnist[:DIR], imagefolder:PATH, cifar:PATH)")
