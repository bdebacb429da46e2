"""augment.device=data and augment.device=worker are the same augmentation: the views they produce have the
same distributions (per view: brightness, contrast, colour, the blur and solarize rates of the paper's pair).

Both paths run as in training, without Ray: ``two_views`` is the Ray Data map's batch function, and
``iter_train_batches`` is what a Train worker runs on what it receives (the colour work there for ``worker``).
"""

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.data import ray_dataset, two_views
from pipeline.data.bad_records import BadRecordLog

N, SIZE = 1536, 24


class OneBatchShard:
    """Stands in for a Train worker's dataset shard: one batch, as Ray Data would deliver it."""

    def __init__(self, batch):
        self.batch = batch

    def iter_batches(self, **_):
        yield self.batch


def images():
    """Smooth colour images with structure at several scales (crops, flips and blur all change them)."""
    gen = torch.Generator().manual_seed(0)
    low = torch.rand(N, 3, 4, 4, generator=gen)
    mid = torch.rand(N, 3, 8, 8, generator=gen) * 0.3
    x = torch.nn.functional.interpolate(low, size=32, mode="bilinear") + torch.nn.functional.interpolate(mid, size=32)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def views(device: str, monkeypatch):
    cfg = load_config(
        None,
        [
            "data.channels=3",
            f"data.image_size={SIZE}",
            "data.mean=[0.5,0.5,0.5]",
            "data.std=[0.25,0.25,0.25]",
            f"augment.device={device}",
            "data.shuffle_buffer=0",
        ],
    )
    # Seeded generators (training draws fresh ones from the OS): the comparison below is statistical, and a
    # fixed draw makes it pass or fail the same way every time.
    seeds = iter(range(100))
    monkeypatch.setattr(
        ray_dataset, "fresh_generator", lambda device="cpu": torch.Generator(device).manual_seed(next(seeds))
    )
    imgs = images()
    batch = two_views.two_views(imgs, np.ones(N, dtype=bool), [str(i) for i in range(N)], cfg)
    (v1, v2), *_ = ray_dataset.iter_train_batches(OneBatchShard(batch), N, cfg, torch.device("cpu"), BadRecordLog())
    return v1, v2


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance between two 1-d samples."""
    a, b = np.sort(a.numpy()), np.sort(b.numpy())
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def summaries(view: torch.Tensor) -> dict[str, torch.Tensor]:
    gray = view.mean(1)
    dx = (view[..., 1:] - view[..., :-1]).abs().mean((1, 2, 3))  # sharpness: blur lowers it
    return {
        "mean": view.mean((1, 2, 3)),
        "std": view.std((1, 2, 3)),
        "saturation": (view - gray[:, None]).abs().mean((1, 2, 3)),
        "red_minus_blue": (view[:, 0] - view[:, 2]).mean((1, 2)),
        "sharpness": dx,
        "max": view.amax((1, 2, 3)),
    }


def test_data_side_and_worker_side_augmentation_have_the_same_distributions(monkeypatch):
    data, worker = views("data", monkeypatch), views("worker", monkeypatch)
    # 0.1% critical value of the two-sample KS distance for n = m = 1536: 1.95 * sqrt(2 / 1536) = 0.070.
    critical = 1.95 * (2 / N) ** 0.5
    for index, name in enumerate(("view1", "view2")):
        a, b = summaries(data[index]), summaries(worker[index])
        for stat in a:
            d = ks_statistic(a[stat], b[stat])
            assert d < critical, f"{name} {stat}: KS distance {d:.3f} >= {critical:.3f}"
    # The test can see a real difference: the paper's two views (blur always on view 1, 10% on view 2; solarize
    # on view 2) are told apart by the same statistics, on both paths.
    for v1, v2 in (data, worker):
        assert ks_statistic(summaries(v1)["sharpness"], summaries(v2)["sharpness"]) > 2 * critical
        assert ks_statistic(summaries(v1)["max"], summaries(v2)["max"]) > 2 * critical
