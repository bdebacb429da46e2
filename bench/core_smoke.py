"""Single-process BYOL on real Fashion-MNIST with the core only (no Ray): does it learn?

    python bench/core_smoke.py --config configs/fashion_mnist_cpu.yaml --steps 300

Prints loss / collapse monitor / kNN as it goes and writes bench/results/core_smoke/<stamp>-<precision_kind>.json
(bench/results_io.py). The 6-epoch recipe probes are runs of it: bench/results/core_smoke/probes.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import write_result  # noqa: E402  (bench/, this script's directory)

from pipeline.config import load_config  # noqa: E402
from pipeline.core.augment import TwoViewAugment  # noqa: E402
from pipeline.core.models import build_networks  # noqa: E402
from pipeline.core.optim import build_optimizer  # noqa: E402
from pipeline.core.schedules import Schedule, scaled_lr  # noqa: E402
from pipeline.core.step import autocast_dtype, precision_name, train_step  # noqa: E402
from pipeline.data.sources import FASHION_MNIST_DIR, load_fashion_mnist  # noqa: E402
from pipeline.evaluation.metrics import extract_features, knn_accuracy, linear_probe_accuracy  # noqa: E402


def evaluate(encoder, cfg, train_x, train_y, test_x, test_y, linear: bool) -> dict:
    ftr = extract_features(encoder, train_x, cfg.data.mean, cfg.data.std)
    fte = extract_features(encoder, test_x, cfg.data.mean, cfg.data.std)
    out = {"knn_top1": knn_accuracy(ftr, train_y, fte, test_y, cfg.eval.knn_k, cfg.eval.knn_temperature)}
    if linear:
        out["linear_top1"] = linear_probe_accuracy(ftr, train_y, fte, test_y)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/fashion_mnist_cpu.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=0, help="kNN on 10k test every N steps (0: end only)")
    ap.add_argument("--linear", action="store_true", help="also a linear probe at the end")
    ap.add_argument("--data", default=FASHION_MNIST_DIR)
    ap.add_argument("--out", default=None, help="default: bench/results/core_smoke/<stamp>-<kind>.json")
    args = ap.parse_args()

    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(cfg.train.seed)
    images, labels = load_fashion_mnist(args.data, "train")
    test_images, test_labels = load_fashion_mnist(args.data, "test")
    train_x = torch.from_numpy(images.copy()).unsqueeze(1)
    test_x = torch.from_numpy(test_images.copy()).unsqueeze(1)
    train_y, test_y = torch.from_numpy(labels), torch.from_numpy(test_labels)

    online, target = build_networks(cfg.model, cfg.data.channels)
    # channels_last: ~30% faster convolutions on CPU (oneDNN) for this CNN.
    online, target = online.to(memory_format=torch.channels_last), target.to(memory_format=torch.channels_last)
    batch = cfg.train.batch_size
    steps_per_epoch = train_x.shape[0] // batch
    schedule = Schedule(
        total_steps=args.steps,
        peak_lr=scaled_lr(cfg.optim.base_lr, batch),
        warmup_steps=round(cfg.optim.warmup_epochs * steps_per_epoch),
        lr_schedule=cfg.optim.lr_schedule,
        tau_base=cfg.ema.tau_base,
        tau_schedule=cfg.ema.schedule,
    )
    optimizer = build_optimizer(online, cfg.optim, schedule.peak_lr)
    augment = TwoViewAugment(cfg.augment, cfg.data.image_size, cfg.data.mean, cfg.data.std)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    autocast = autocast_dtype(cfg.train.precision, torch.device("cpu"))

    initial = evaluate(online.encoder, cfg, train_x, train_y, test_x, test_y, args.linear)
    print(f"random init: {initial}", flush=True)
    history, start, perm, cursor = [], time.time(), torch.randperm(train_x.shape[0], generator=gen), 0
    for step in range(args.steps):
        if cursor + batch > perm.numel():
            perm, cursor = torch.randperm(train_x.shape[0], generator=gen), 0
        idx = perm[cursor : cursor + batch]
        cursor += batch
        v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in augment(train_x[idx], gen))
        m = train_step(online, target, optimizer, [(v1, v2)], step, schedule, autocast)
        if step % 20 == 0 or step == args.steps - 1:
            m = {k: float(v) for k, v in m.items()} | {"step": step}  # read off the device on log steps only
            m["elapsed_s"] = time.time() - start
            print(
                f"step {step:5d}/{args.steps} loss {m['loss']:.4f} collapse_std {m['collapse_std']:.3f} "
                f"lr {m['lr']:.4f} tau {m['tau']:.5f} {m['elapsed_s']:.0f}s",
                flush=True,
            )
            history.append(m)
        if args.eval_every and step and step % args.eval_every == 0:
            knn = evaluate(online.encoder, cfg, train_x, train_y, test_x, test_y, False)
            print(f"  step {step}: {knn}", flush=True)
    train_s = time.time() - start
    final = evaluate(online.encoder, cfg, train_x, train_y, test_x, test_y, args.linear)
    print(f"final ({train_s / 60:.1f} min of pretraining): {final}", flush=True)
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "precision": precision_name(autocast),
        "train_seconds": round(train_s, 1),
        "images_per_s": round(args.steps * batch / train_s, 1),
        "random_init": initial,
        "final": final,
        "first_loss": history[0]["loss"],
        "last_loss": history[-1]["loss"],
        "min_collapse_std": min(h["collapse_std"] for h in history),
        "history": history,
    }
    assert all(math.isfinite(h["loss"]) for h in history)
    print(f"wrote {write_result('core_smoke', result, args.out)}")


if __name__ == "__main__":
    main()
