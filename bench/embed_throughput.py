"""How fast the kNN monitor and ``byol eval`` embed images: float32 vs channels_last vs bf16 autocast.

    python bench/embed_throughput.py [--config configs/fashion_mnist_cpu.yaml] [--images 10000]
        -> bench/results/embed_throughput/<stamp>-<precision_kind>.json

The config's encoder, randomly initialised, on random uint8 images of the config's size, one torch thread,
``extract_features`` as the monitor (training precision) and ``byol eval`` (float32) call it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import write_result  # noqa: E402  (bench/, this script's directory)

from pipeline.config import load_config  # noqa: E402
from pipeline.core.models import build_backbone  # noqa: E402
from pipeline.evaluation.metrics import extract_features  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/fashion_mnist_cpu.yaml")
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--out", default=None, help="default: bench/results/embed_throughput/<stamp>-<kind>.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, [])
    m, d = cfg.model, cfg.data
    images = torch.randint(0, 256, (args.images, d.channels, d.image_size, d.image_size), dtype=torch.uint8)
    cases = {  # name: (the model in channels_last, autocast dtype)
        "float32, contiguous model": (False, None),
        "float32, channels_last (byol eval)": (True, None),
        "bf16 autocast, channels_last (the monitor in a bf16 run)": (True, torch.bfloat16),
    }
    results = {}
    for name, (channels_last, dtype) in cases.items():
        model, _ = build_backbone(m.backbone, d.channels, m.small_stem, m.cnn_width)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        extract_features(model, images[:512], d.mean, d.std, autocast_dtype=dtype)  # warm-up
        start = time.perf_counter()
        extract_features(model, images, d.mean, d.std, autocast_dtype=dtype)
        results[name] = round(time.perf_counter() - start, 2)
        print(f"| {name} | {results[name]} s |", flush=True)
    out = {"config": args.config, "threads": 1, "images": args.images, "seconds": results}
    print(f"wrote {write_result('embed_throughput', out, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
