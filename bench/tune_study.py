"""The Fashion-MNIST tuning study, end to end, and whether what it chose beats the hand-set values.

    python bench/tune_study.py [--config configs/tune_fashion_mnist_cpu.yaml] [--out FILE]
        -> bench/results/tune_study/<stamp>-<precision_kind>.json

1. ``byol tune --config CONFIG --json`` (the study: trials scored by val kNN top-1);
2. ``byol pretrain --config <best_config.yaml> --set train.max_steps=1`` (the chosen YAML runs unchanged);
3. the chosen config and the hand-set one (the study's base config: the demo's tau 0.99 cosine, LR 1.0, 1 warmup
   epoch, cosine) pretrained with the same budget, then ``byol eval --splits test`` on each (kNN and linear probe).

With ``--demo-config CONFIG --seeds 0,1`` (a multi-fidelity study: short trials choose, the full budget decides),
step 3 is instead: the best trial's values applied to CONFIG, and CONFIG as written, each run by
``byol demo --config ... --set train.seed=S --json`` (the demo's full budget, test kNN and linear probe) for every
seed, alternating; the result file is rewritten after each run, so a cut-off session keeps the runs it finished.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from quality import last_json, run_streaming  # (bench/, this script's directory)
from results_io import write_result

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


def with_values(tree: dict, values: dict) -> dict:
    """``tree`` (a YAML config) with dotted ``values`` (a trial's) set in it."""
    for dotted, value in values.items():
        section, key = dotted.split(".", 1)
        tree.setdefault(section, {})[key] = value
    return tree


def demo_runs(study: dict, demo_config: str, seeds: list[int], stamp: str, out: Path, result: dict) -> None:
    """The best trial's values and the demo's own at the demo's full budget, ``byol demo`` per seed; ``result``
    gains each run as it ends and is written to ``out`` each time."""
    chosen = with_values(yaml.safe_load((ROOT / demo_config).read_text()), study["best_values"])
    chosen_path = ROOT / "bench" / "work" / "tune" / f"chosen-demo-{stamp}.yaml"
    chosen_path.write_text(yaml.safe_dump(chosen, sort_keys=False))
    result["chosen_demo_config"] = chosen
    result["demo_runs"] = []
    for seed in seeds:
        for which, config in (("chosen", chosen_path), ("demo", ROOT / demo_config)):
            child = ["demo", "--config", str(config), "--set", f"train.seed={seed}", "--json"]
            child[-1:-1] = ["--set", f"run.name={which}-seed{seed}-{stamp}"]
            print("$ byol " + " ".join(child), flush=True)
            started = time.time()
            rc, lines = run_streaming([*BYOL, *child])
            summary = last_json(lines)
            if rc != 0 or summary is None:
                raise SystemExit(f"bench/tune_study.py: byol {' '.join(child)} failed (exit {rc})")
            result["demo_runs"].append(
                {
                    "config": which,
                    "seed": seed,
                    "command_minutes": round((time.time() - started) / 60, 2),
                    "pretrain_minutes": summary["pretrain_minutes"],
                    "test_knn_top1": summary["test_knn_top1"],
                    "test_linear_top1": summary["test_linear_top1"],
                    "val_knn_top1": summary.get("knn_top1"),
                    "precision": summary.get("precision"),
                    "run_name": summary.get("run_name"),
                }
            )
            result["comparison"] = compare_runs(result["demo_runs"])
            write_result("tune_study", result, out)


def compare_runs(runs: list[dict]) -> dict:
    """Per config, the mean over its seeds of each test score; and chosen minus demo where both have runs."""
    keys = ("test_knn_top1", "test_linear_top1", "val_knn_top1")
    means = {}
    for which in ("chosen", "demo"):
        mine = [r for r in runs if r["config"] == which]
        if mine:
            means[which] = {f"{k}_mean": mean_of(r[k] for r in mine) for k in keys}
            means[which]["seeds"] = [r["seed"] for r in mine]
    if len(means) == 2:
        means["chosen_minus_demo"] = {
            k: None if None in (c := means["chosen"][f"{k}_mean"], d := means["demo"][f"{k}_mean"]) else round(c - d, 4)
            for k in keys
        }
    return means


def mean_of(values) -> float | None:  # noqa: ANN001
    """The mean of the scores a run has (a run without a val kNN, say, is left out of that mean); None if none."""
    have = [v for v in values if v is not None]
    return round(sum(have) / len(have), 4) if have else None


def summarize(path: Path) -> None:
    """Adds ``comparison`` to a result file written before compare_runs existed (the runs themselves unchanged)."""
    record = json.loads(path.read_text())
    record["results"]["comparison"] = compare_runs(record["results"]["demo_runs"])
    record["results"]["comparison_added_by"] = f"python bench/tune_study.py --summarize {path.name}"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["results"]["comparison"], indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tune_fashion_mnist_cpu.yaml")
    parser.add_argument("--out", default=None, help="default: bench/results/tune_study/<stamp>-<kind>.json")
    parser.add_argument("--demo-config", default=None, help="compare at this config's budget with byol demo")
    parser.add_argument("--seeds", default="0,1", help="train.seed of each byol demo run (with --demo-config)")
    parser.add_argument("--summarize", default=None, help="a result file: add the chosen-vs-demo means, then stop")
    args = parser.parse_args()
    if args.summarize:
        summarize(Path(args.summarize))
        return 0
    work = ROOT / "bench" / "work" / "tune"
    work.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    storage = f"run.storage_path={work / 'runs'}"
    study, study_seconds = run_json(
        ["tune", "--config", args.config, "--set", storage, "--set", f"tune.name=study-{stamp}"]
    )
    best = Path(study["best_config"])
    print(f"study: {study_seconds / 60:.1f} min, best trial {study['best_trial']} {study['best_values']}", flush=True)
    smoke, _ = run_json(
        ["pretrain", "--config", str(best), "--set", "train.max_steps=1", "--set", f"run.name=smoke-{stamp}"]
    )

    if args.demo_config:
        result = {
            "config": args.config,
            "demo_config": args.demo_config,
            "study_minutes": round(study_seconds / 60, 2),
            "study": {
                k: study[k] for k in ("study", "best_trial", "best_knn_top1", "best_values", "concurrency", "trials")
            },
            "best_config_runs_unchanged": smoke["steps"] == 1,
        }
        out = Path(args.out) if args.out else ROOT / "bench" / "results" / "tune_study" / f"{stamp}-dogfood.json"
        demo_runs(study, args.demo_config, [int(s) for s in args.seeds.split(",")], stamp, out, result)
        print(json.dumps(result["demo_runs"], indent=2))
        print(f"wrote {out}")
        return 0

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
