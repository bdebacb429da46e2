"""Input-pipeline throughput: this project's Ray Data pipeline vs a torch DataLoader doing the same work.

    python bench/data_throughput.py [--workers 2] [--epochs 3] [--repeats 1]

Both sides read the same Parquet shards, decode with ``pipeline.core.images.decode`` and run the full
two-view augmentation (``TwoViewAugment``) with the same number of worker processes and one torch
thread each, for ``--epochs`` passes; the consumer only counts images. The DataLoader keeps its workers
between epochs (``persistent_workers``, its fastest setting); Ray Data streams all epochs in one execution
on a running local Ray whose data worker processes were started beforehand (``warm_data_workers``; the
start-up of a whole run is measured by bench/pipeline_throughput.py). Ray Data runs twice: ``data.cache=off``
(decodes every epoch: the same work as the DataLoader) and ``data.cache=on`` (the first epoch decodes and keeps
the decoded images in the object store, later epochs only augment: the default for a split that fits). Two shard sets:
  (i)  Fashion-MNIST (28 px, small-image preset, no blur), the train split;
  (ii) >= 2,000 natural-photo JPEGs around 500x375, made from scikit-image's bundled sample photos
       (random crops, flips, rescales), output at 224 px with the paper's augmentation (blur on).
Row shuffling is off on both sides (DataLoader has no local shuffle buffer); Ray Data still reshuffles
the shard order. Prints a table and writes bench/results/data_throughput/<stamp>-<kind>.json. Images/s count
images (two views each).
``--repeats N`` runs the DataLoader and both Ray Data variants N times in turn per case, each ratio against the
DataLoader run just before it (this VM's speed moves by 10-35% within minutes).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import write_result  # noqa: E402  (bench/, this script's directory)

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.core.augment import TwoViewAugment, fresh_generator  # noqa: E402
from pipeline.core.images import decode  # noqa: E402
from pipeline.data.manifest import read_manifest  # noqa: E402
from pipeline.data.prepare import prepare  # noqa: E402
from pipeline.errors import BadRecord  # noqa: E402

WORK = Path("bench/work")


def make_photo_folder(out: Path, count: int, seed: int = 0) -> None:
    """JPEGs of about 500x375 cut from scikit-image's sample photos (shipped in its wheel, no download)."""
    import skimage.data as sk
    from PIL import Image

    names = [
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "hubble_deep_field",
        "immunohistochemistry",
        "retina",
        "colorwheel",
        "camera",
        "moon",
        "grass",
        "gravel",
        "brick",
        "horse",
        "coins",
        "clock",
    ]
    photos = []
    for name in names:
        a = getattr(sk, name)()
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        photos.append(Image.fromarray(a.astype(np.uint8)))
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        im = photos[i % len(photos)]
        scale = rng.uniform(0.8, 1.6)
        im = im.resize((max(500, int(im.width * scale)), max(375, int(im.height * scale))), Image.BICUBIC)
        x0, y0 = rng.integers(0, im.width - 500 + 1), rng.integers(0, im.height - 375 + 1)
        crop = im.crop((x0, y0, x0 + 500, y0 + 375))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        (out / f"{i:05d}.jpg").write_bytes(buf.getvalue())


class ShardDataset(torch.utils.data.IterableDataset):
    """The DataLoader side: each worker reads its share of shards, decodes and augments batch by batch."""

    def __init__(self, shards: list[str], cfg: Config, batch_size: int, expected_hw) -> None:
        self.shards, self.cfg, self.batch_size, self.expected_hw = shards, cfg, batch_size, expected_hw

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.shards[info.id :: info.num_workers] if info else self.shards
        mine = [mine[i] for i in np.random.permutation(len(mine))]
        augment = TwoViewAugment(self.cfg.augment, self.cfg.data.image_size, self.cfg.data.mean, self.cfg.data.std)
        gen = fresh_generator()
        for shard in mine:
            pf = pq.ParquetFile(shard)
            for batch in pf.iter_batches(batch_size=self.batch_size, columns=["image"]):
                images = []
                for data in batch.column("image").to_pylist():
                    try:
                        images.append(decode(data, self.cfg.data.channels, self.expected_hw))
                    except BadRecord:
                        pass
                stacked = torch.stack(images) if len({i.shape for i in images}) == 1 else images
                yield augment(stacked, gen)


def bench_dataloader(shard_dir: Path, cfg: Config, workers: int, batch: int, epochs: int) -> dict:
    manifest = read_manifest(str(shard_dir))
    shards = [str(shard_dir / s["path"]) for s in manifest["splits"]["train"]["shards"]]
    hw = (manifest["image"]["height"], manifest["image"]["width"]) if manifest.get("image") else None
    ds = ShardDataset(shards, cfg, batch, hw)
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=workers, prefetch_factor=4, persistent_workers=True
    )
    return _time(lambda: (v1 for _ in range(epochs) for v1, _ in loader), start)


def bench_ray(shard_dir: Path, cfg: Config, workers: int, batch: int, epochs: int) -> dict:
    import ray

    from pipeline.data.warm_up import warm_data_workers

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        ray.get(warm_data_workers())
        return time_ray_stream(cfg, batch, epochs)
    finally:
        ray.shutdown()


def time_ray_stream(cfg: Config, batch: int, epochs: int) -> dict:
    """The training stream (``build_train_dataset``) on the running Ray, consumed in this process as the worker
    does (``iter_train_batches``), timed from its creation (also used by bench/stream_pause.py)."""
    from pipeline.data.bad_records import BadRecordLog
    from pipeline.data.ray_dataset import build_train_dataset, iter_train_batches

    start = time.perf_counter()
    ds = build_train_dataset(cfg, seed=0, batch_size=batch, epochs=epochs)
    bad = BadRecordLog()
    return _time(
        lambda: (v1 for v1, _ in iter_train_batches(ds.iterator(), batch, cfg, torch.device("cpu"), bad)), start
    )


def _time(batches, start: float) -> dict:
    """Images/s over all epochs from the pipeline's creation (first batch included), and after the first batch."""
    first, n = None, 0
    for v1 in batches():
        if first is None:
            first = time.perf_counter()
        n += v1.shape[0]
    end = time.perf_counter()
    return {
        "images": n,
        "seconds": end - start,
        "first_batch_s": first - start,
        "images_per_s": n / (end - start),
        "steady_images_per_s": n / max(end - first, 1e-9),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--photos", type=int, default=2000)
    ap.add_argument("--fmnist-images", type=int, default=0, help="cap the Fashion-MNIST epoch (0: whole train split)")
    ap.add_argument("--repeats", type=int, default=1, help="DataLoader, Ray Data off, on: this many times per case")
    ap.add_argument("--out", default=None, help="default: bench/results/data_throughput/<stamp>-<kind>.json")
    args = ap.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    torch.set_num_threads(1)

    fm = WORK / "fashion-mnist"
    if not (fm / "manifest.json").exists():
        prepare("fashion-mnist", str(fm), overwrite=True, log=lambda *a: None)
    photos_src, photos = WORK / "photos-src", WORK / "photos"
    if not (photos / "manifest.json").exists():
        make_photo_folder(photos_src, args.photos)
        prepare(
            f"imagefolder:{photos_src}",
            str(photos),
            val_fraction=0.0,
            min_shards=16,
            overwrite=True,
            log=lambda *a: None,
        )

    cases = {
        "fashion-mnist 28px": (
            fm,
            load_config("configs/fashion_mnist_cpu.yaml", [f"data.path={fm}", "data.shuffle_buffer=0"]),
            256,
        ),
        "photos 500x375 -> 224px": (
            photos,
            load_config(
                None,
                [
                    f"data.path={photos}",
                    "data.image_size=224",
                    "data.channels=3",
                    "data.mean=[0.485,0.456,0.406]",
                    "data.std=[0.229,0.224,0.225]",
                    "augment.blur=true",
                    "data.shuffle_buffer=0",
                ],
            ),
            64,
        ),
    }
    rows = []
    for name, (shard_dir, cfg, batch) in cases.items():
        for repeat in range(args.repeats):  # each Ray Data run is compared with the DataLoader run just before it
            loader = bench_dataloader(shard_dir, cfg, args.workers, batch, args.epochs)
            for cache in ("off", "on"):
                cached_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache": cache})})
                ray_res = bench_ray(shard_dir, cached_cfg, args.workers, batch, args.epochs)
                rows.append(
                    {
                        "shards": name,
                        "cache": cache,
                        "repeat": repeat,
                        "batch": batch,
                        "workers": args.workers,
                        "epochs": args.epochs,
                        "ray_data": ray_res,
                        "dataloader": loader,
                        "ratio": ray_res["images_per_s"] / loader["images_per_s"],
                        "steady_ratio": ray_res["steady_images_per_s"] / loader["steady_images_per_s"],
                    }
                )
                print(
                    f"{name} cache={cache}: ray {ray_res['images_per_s']:.0f} img/s, "
                    f"dataloader {loader['images_per_s']:.0f} img/s",
                    flush=True,
                )

    print()
    print(
        "| shards | data.cache | repeat | workers | epochs | Ray Data img/s | DataLoader img/s | ratio "
        "| first batch Ray / DL s | steady-state ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shards']} | {r['cache']} | {r['repeat']} | {r['workers']} | {r['epochs']} | "
            f"{r['ray_data']['images_per_s']:.0f} | {r['dataloader']['images_per_s']:.0f} | {r['ratio']:.2f} | "
            f"{r['ray_data']['first_batch_s']:.1f} / {r['dataloader']['first_batch_s']:.1f} | {r['steady_ratio']:.2f} |"
        )
    print(f"\nwrote {write_result('data_throughput', {'rows': rows}, args.out)}")


if __name__ == "__main__":
    main()
