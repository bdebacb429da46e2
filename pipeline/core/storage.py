"""Where files live: local paths and filesystem URIs (``s3://``, ``gs://``, ``file://``...) through pyarrow (no Ray).

Every place that reads or writes shards, checkpoints, summaries or exports goes through these helpers, so a
URI's query (``?endpoint_override=...`` for an S3-compatible store) is kept wherever a path is joined.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def join_location(base: str, *parts: str) -> str:
    """``base/part/...`` for a path or URI; a URI's query (``?endpoint_override=...``) stays at the end."""
    root, sep, query = str(base).partition("?")
    joined = "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return f"{joined}{sep}{query}"


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """A local path or a filesystem URI -> (pyarrow filesystem, path inside it)."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(str(location))
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def is_file(location: str | Path) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(location: str | Path) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write one file at a path or URI (its parent created), whole or not at all: a local file is written beside
    and renamed over the old one (a process killed mid-write leaves the old file); an object-store PUT is atomic."""
    if not is_uri(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_bytes(data)
        os.replace(partial, path)
        return
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(data)


def upload_file(local: str | Path, destination: str) -> str:
    """Copy one local file to a path or URI (its parent created); returns ``destination``."""
    if not is_uri(destination):
        Path(destination).parent.mkdir(parents=True, exist_ok=True)
        if Path(local).resolve() != Path(destination).resolve():
            shutil.copyfile(local, destination)
        return destination
    fs, path = filesystem(destination)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with open(local, "rb") as src, fs.open_output_stream(path) as out:
        shutil.copyfileobj(src, out)
    return destination


def download_dir(location: str, destination: str | Path) -> None:
    """Copy the directory at a URI into a local directory."""
    fs, path = filesystem(location)
    pafs.copy_files(path, str(destination), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
