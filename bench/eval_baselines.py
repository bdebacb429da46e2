"""Reference points for the Fashion-MNIST accuracy numbers, with this project's own evaluation code.

    python bench/eval_baselines.py [--checkpoint runs/<run>/step_XXXXXXXX]

Raw pixels and a randomly initialised backbone (the demo config's), evaluated exactly as ``byol eval``
does (features L2-normalised for kNN k=200 T=0.07; linear probe on standardised frozen features),
training images = the prepared train split, queries = the 10k test split. Writes
bench/results/eval_baselines/<stamp>-<precision_kind>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import write_result  # noqa: E402  (bench/, this script's directory)

from pipeline.config import load_config  # noqa: E402
from pipeline.core.models import build_backbone  # noqa: E402
from pipeline.data.labelled import load_labelled  # noqa: E402
from pipeline.evaluation.checkpoint_eval import evaluate_checkpoint  # noqa: E402
from pipeline.evaluation.metrics import extract_features, knn_accuracy, linear_probe_accuracy  # noqa: E402


def score(train_f, train_y, test_f, test_y) -> dict:
    return {
        "knn_top1": knn_accuracy(train_f, train_y, test_f, test_y, 200, 0.07),
        "linear_top1": linear_probe_accuracy(train_f, train_y, test_f, test_y),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/fashion_mnist_cpu.yaml")
    ap.add_argument("--data", default="data/fashion-mnist")
    ap.add_argument("--checkpoint", help="also evaluate this checkpoint")
    ap.add_argument("--out", default=None, help="default: bench/results/eval_baselines/<stamp>-<kind>.json")
    args = ap.parse_args()
    cfg = load_config(args.config, [f"data.path={args.data}"])
    train_x, train_y = load_labelled(args.data, "train", cfg, None)
    test_x, test_y = load_labelled(args.data, "test", cfg, None)
    rows = {}
    rows["raw pixels"] = score(train_x.flatten(1).float() / 255, train_y, test_x.flatten(1).float() / 255, test_y)
    print("raw pixels", rows["raw pixels"], flush=True)
    torch.manual_seed(cfg.train.seed)
    encoder, _ = build_backbone(cfg.model.backbone, cfg.data.channels, cfg.model.small_stem, cfg.model.cnn_width)
    d = cfg.data
    rows["random init"] = score(
        extract_features(encoder, train_x, d.mean, d.std),
        train_y,
        extract_features(encoder, test_x, d.mean, d.std),
        test_y,
    )
    print("random init", rows["random init"], flush=True)
    if args.checkpoint:
        r = evaluate_checkpoint(args.checkpoint, args.data, ["test"])["splits"]["test"]
        rows["BYOL checkpoint"] = {"knn_top1": r["knn_top1"], "linear_top1": r["linear_top1"]}
        print("checkpoint", rows["BYOL checkpoint"], flush=True)
    print("\n| features | kNN@200 top-1 | linear probe top-1 |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['knn_top1']:.2%} | {r['linear_top1']:.2%} |")
    result = {
        "threads": torch.get_num_threads(),
        "train_images": len(train_y),
        "test_images": len(test_y),
        "checkpoint": args.checkpoint,
        "features": rows,
    }
    print(f"wrote {write_result('eval_baselines', result, args.out)}")


if __name__ == "__main__":
    main()
