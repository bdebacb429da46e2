"""A short single-process BYOL run of the core on real Fashion-MNIST images: the loss falls, no collapse."""

import torch

from pipeline.config import load_config
from pipeline.core.augment import TwoViewAugment
from pipeline.core.models import build_networks
from pipeline.core.optim import build_optimizer
from pipeline.core.schedules import Schedule, scaled_lr
from pipeline.core.step import train_step
from pipeline.data.sources import load_fashion_mnist


def test_loss_falls_and_representations_do_not_collapse(fashion_mnist_dir):
    cfg = load_config(
        "configs/fashion_mnist_cpu.yaml",
        [
            "model.cnn_width=16",
            "model.proj_hidden=256",
            "model.pred_hidden=256",
            "model.proj_dim=64",
            "train.batch_size=128",
        ],
    )
    images, _ = load_fashion_mnist(fashion_mnist_dir, "train")
    x = torch.from_numpy(images[:4096].copy()).unsqueeze(1)
    online, target = build_networks(cfg.model, 1)
    steps = 30
    schedule = Schedule(steps, scaled_lr(cfg.optim.base_lr, 128), 5, "cosine", cfg.ema.tau_base, "cosine")
    optimizer = build_optimizer(online, cfg.optim, schedule.peak_lr)
    augment = TwoViewAugment(cfg.augment, 28, cfg.data.mean, cfg.data.std)
    gen = torch.Generator().manual_seed(0)
    history = []
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        history.append(train_step(online, target, optimizer, [augment(x[idx], gen)], step, schedule))
    first = sum(h["loss"] for h in history[:3]) / 3
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert min(h["collapse_std"] for h in history) > 0.3
    assert history[-1]["tau"] > history[0]["tau"]
