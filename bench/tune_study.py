"""The Fashion-MNIST tuning study, end to end, and whether what it chose beats the hand-set values.

    python bench/tune_study.py [--config configs/tune_fashion_mnist_cpu.yaml] [--out FILE]
        -> bench/results/tune_study/<stamp>-<precision_kind>.json

1. ``byol tune --config CONFIG --json`` (the study: trials scored by val kNN top-1);
2. ``byol pretrain --config <best_config.yaml> --set train.max_steps=1`` (the chosen YAML runs unchanged);
3. the chosen config and the hand-set one (the study's base config: the demo's tau 0.99 cosine, LR 1.0, 1 warmup
   epoch, cosine) pretrained with the same budget, then ``byol eval --splits test`` on each (kNN and linear probe).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from results_io import write_result  # (bench/, this script's directory)

ROOT = Path(__file__).resolve().parents[1]
BYOL = [sys.executable, "-m", "pipeline.cli"]


def run_json(args: list[str]) -> tuple[dict, float]:
    start = time.time()
    print("$ byol " + " ".join(args), flush=True)
    out = subprocess.run([*BYOL, *args, "--json"], cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1]), time.time() - start


def pretrain_and_test(config: Path, name: str, data: str) -> dict:
    summary, seconds = run_json(["pretrain", "--config", str(config), "--set", f"run.name={name}"])
    scores, _ = run_json(["eval", "--checkpoint", summary["checkpoint"], "--data", data, "--splits", "test"])
    test = scores["splits"]["test"]
    return {
        "minutes": round(seconds / 60, 2),
        "test_knn_top1": test["knn_top1"],
        "test_linear_top1": test["linear_top1"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tune_fashion_mnist_cpu.yaml")
    parser.add_argument("--out", default=None, help="default: bench/results/tune_study/<stamp>-<kind>.json")
    args = parser.parse_args()
    work = ROOT / "bench" / "work" / "tune"
    work.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    storage = f"run.storage_path={work / 'runs'}"
    study, study_seconds = run_json(
        ["tune", "--config", args.config, "--set", storage, "--set", f"tune.name=study-{stamp}"]
    )
    best = Path(study["best_config"])
    smoke, _ = run_json(
        ["pretrain", "--config", str(best), "--set", "train.max_steps=1", "--set", f"run.name=smoke-{stamp}"]
    )

    # The hand-set config: the study's pretraining config as written (no tune section), same budget and model.
    tree = yaml.safe_load((ROOT / args.config).read_text())
    tree.pop("tune")
    tree.setdefault("run", {})["storage_path"] = str(work / "runs")
    hand_set = work / "hand_set.yaml"
    hand_set.write_text(yaml.safe_dump(tree, sort_keys=False))
    data = yaml.safe_load(best.read_text())["data"]["path"]
    chosen = pretrain_and_test(best, f"chosen-{stamp}", data)
    baseline = pretrain_and_test(hand_set, f"hand-set-{stamp}", data)

    result = {
        "config": args.config,
        "study_minutes": round(study_seconds / 60, 2),
        "study": {
            k: study[k] for k in ("study", "best_trial", "best_knn_top1", "best_values", "concurrency", "trials")
        },
        "best_config_runs_unchanged": smoke["steps"] == 1,
        "chosen": chosen,
        "hand_set": baseline,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "study"}, indent=2))
    print(f"wrote {write_result('tune_study', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
