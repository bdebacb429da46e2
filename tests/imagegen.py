"""Small generated images for tests (no downloads)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    im = Image.fromarray(array)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def random_array(rng: np.random.Generator, h: int, w: int, channels: int = 3) -> np.ndarray:
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def make_class_folder(root: Path, classes: int = 3, per_class: int = 10, size: int = 32, seed: int = 0) -> dict:
    """root/<class>/<i>.png|jpg; returns {relative path: (bytes, label)}."""
    rng = np.random.default_rng(seed)
    written = {}
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
            data = image_bytes(random_array(rng, size, size), fmt)
            rel = f"class{c}/{i:03d}.{ext}"
            (root / rel).write_bytes(data)
            written[rel] = (data, c)
    return written


def bad_files(rng: np.random.Generator) -> dict[str, bytes]:
    """The bad inputs the pipeline must survive, by name."""
    good_jpeg = image_bytes(random_array(rng, 48, 48), "JPEG")
    a16 = (rng.random((40, 40)) * 65535).astype(np.uint16)
    return {
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "random.jpg": rng.bytes(700),
        "text.jpg": b"this is a text file, not an image\n" * 5,
        "tiny_1x1.png": image_bytes(np.zeros((1, 1, 3), dtype=np.uint8)),
        "cmyk.jpg": image_bytes(random_array(rng, 40, 40), "JPEG", mode="CMYK"),
        "gray16.png": image_bytes(a16),
    }


LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma: what a grayscale decode keeps


def hue_classes(root: Path, per_class: int = 40, height: int = 48, width: int = 64, seed: int = 0) -> Path:
    """Three classes of RGB JPEGs that differ only in hue, at equal luminance: each pixel is a random gray level
    (the same distribution in every class) plus the class's chroma, a colour with zero luma."""
    rng = np.random.default_rng(seed)
    chroma = []
    for direction in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]):
        v = np.array(direction) - LUMA * (np.dot(LUMA, direction) / np.dot(LUMA, LUMA))
        chroma.append(60 * v / np.abs(v).max())
    for c, offset in enumerate(chroma):
        (root / f"hue{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            gray = rng.uniform(70, 185) + rng.normal(0, 12, size=(height, width, 1))
            pixels = np.clip(gray + offset, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"hue{c}" / f"{i:03d}.jpg", quality=95)
    return root
