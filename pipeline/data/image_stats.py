"""What a dataset's images are (no Ray): modes, sizes and per-channel statistics, measured on a seeded sample.

``byol prepare`` stores them per split in the manifest (``splits.<split>.images``); a folder given directly as
``data.path``, or a manifest written before they existed, gets them from a sample when a run starts
(``pipeline.data.data_config``). The pixels are decoded exactly as training decodes them
(``core.images.decode`` at the majority mode's channel count), so the mean and std are the ones the
normalisation needs.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

SAMPLE_SIZE = 10_000
# PIL modes that hold one channel; every other mode (RGB, RGBA, P, CMYK, YCbCr...) is decoded as RGB.
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def channels_of(mode: str) -> int:
    return 1 if mode in GRAY_MODES else 3


def sample_indices(total: int, sample_size: int = SAMPLE_SIZE, seed: int = 0) -> np.ndarray:
    """A seeded, sorted sample of ``min(total, sample_size)`` row indices."""
    if total <= sample_size:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=sample_size, replace=False))


def measure(payloads: Sequence[bytes] | Callable[[], Sequence[bytes]], rows: int, seed: int = 0) -> dict:
    """The statistics of a sample of encoded images (``payloads``: the sample, already drawn) of a split of
    ``rows`` images: mode counts, height/width min/median/max, short-side p5/median/p95, the majority channel
    count, and the per-channel mean and std of pixels in [0, 1] decoded at that channel count."""
    from PIL import Image

    from pipeline.core.images import decode
    from pipeline.errors import BadRecord

    payloads = payloads() if callable(payloads) else payloads
    modes: Counter[str] = Counter()
    sizes = []
    readable = []
    for data in payloads:
        try:
            with Image.open(io.BytesIO(data)) as image:  # the header only: mode and size
                modes[image.mode] += 1
                sizes.append(image.size[::-1])  # (height, width)
            readable.append(data)
        except Exception:  # noqa: BLE001  (PIL raises many kinds; an unreadable image is counted, not fatal)
            modes["unreadable"] += 1
    if not readable:
        return {"rows": rows, "sampled": len(payloads), "modes": dict(modes), "seed": seed}
    by_channels = Counter({c: 0 for c in (1, 3)})
    for mode, count in modes.items():
        if mode != "unreadable":
            by_channels[channels_of(mode)] += count
    channels = 3 if by_channels[3] > by_channels[1] else 1
    total, total_sq, pixels = np.zeros(channels), np.zeros(channels), 0
    for data in readable:
        try:
            image = decode(data, channels, min_side=1).numpy().reshape(channels, -1).astype(np.float64) / 255.0
        except BadRecord:
            continue
        total += image.sum(axis=1)
        total_sq += np.square(image).sum(axis=1)
        pixels += image.shape[1]
    mean = total / max(pixels, 1)
    std = np.sqrt(np.maximum(total_sq / max(pixels, 1) - np.square(mean), 1e-12))
    heights, widths = np.array([s[0] for s in sizes]), np.array([s[1] for s in sizes])
    short = np.minimum(heights, widths)
    return {
        "rows": rows,
        "sampled": len(payloads),
        "seed": seed,
        "modes": dict(sorted(modes.items(), key=lambda kv: -kv[1])),
        "channels": channels,
        "height": _spread(heights),
        "width": _spread(widths),
        "short_side": {
            "p5": int(np.percentile(short, 5)),
            "median": int(np.median(short)),
            "p95": int(np.percentile(short, 95)),
        },
        "mean": [round(float(m), 4) for m in mean],
        "std": [round(float(s), 4) for s in std],
    }


def _spread(values: np.ndarray) -> dict[str, int]:
    return {"min": int(values.min()), "median": int(np.median(values)), "max": int(values.max())}


def describe(stats: dict) -> str:
    """One line of a split's statistics for the console."""
    modes = ", ".join(f"{m} {n}" for m, n in stats["modes"].items())
    if "channels" not in stats:
        return f"no readable image in a sample of {stats['sampled']} ({modes})"
    h, w = stats["height"], stats["width"]
    return (
        f"{modes} (of {stats['sampled']} sampled), {h['median']}x{w['median']} px median "
        f"({h['min']}-{h['max']} x {w['min']}-{w['max']}), mean {stats['mean']}, std {stats['std']}"
    )
