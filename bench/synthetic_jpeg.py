"""Synthetic labelled JPEG shards for GPU checks (no download): N images of SIZE px in 10 classes, each class a
colour and a stripe orientation plus noise, written as an image folder and prepared as shards.

    python bench/synthetic_jpeg.py OUT [--images 6000] [--size 32]      # OUT/shards is a byol data.path
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.prepare import prepare  # noqa: E402


def write_folder(out: Path, images: int, size: int, seed: int = 0) -> None:
    """``out/class<k>/<i>.jpg``: ``images`` JPEGs of ``size`` px in 10 classes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(images):
        label = i % 10
        colour = np.array([(label * 25) % 256, (label * 70) % 256, (255 - label * 20) % 256], dtype=np.float32)
        angle = label * np.pi / 10
        stripes = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 0.8)
        image = colour * stripes[..., None] + rng.normal(0, 25, (size, size, 3))
        folder = out / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    out = Path(args.out)
    write_folder(out / "src", args.images, args.size)
    prepare(
        f"imagefolder:{out / 'src'}", str(out / "shards"), val_fraction=0.1, min_shards=8, overwrite=True, log=print
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
