"""End-to-end ``byol pretrain`` (Ray Data -> Ray Train) against a plain PyTorch loop, plus start-up and shut-down.

    python bench/pipeline_throughput.py [--config configs/fashion_mnist_cpu.yaml] [--steps 480]
        -> bench/results/pipeline_throughput/<stamp>-<precision_kind>.json

* plain loop: one process, the same networks, optimizer, schedules and ``train_step`` with the worker's torch
  threads (``train.cpus_per_worker``) and precision (``train.precision``), over two-view batches augmented once
  beforehand and held in memory: the cost of the steps alone; ``--plain-steps`` steps before and again after the
  Ray runs, averaged.
* plain loop fed by a DataLoader: the same loop, its batches augmented by one DataLoader worker process from the
  split's decoded images (what Ray Data's tasks do from ``data.cache``), measured like the plain loop: the cost
  of doing the data work beside the loop on the same cores, without Ray. 1 - Ray's rate / this rate is Ray's own
  share of the overhead.
* plain loop in a Ray Train worker: the plain loop as a 1-worker ``TorchTrainer``'s function on a fresh local Ray
  (no Ray Data, MLflow or checkpoints): the worker process and Ray's daemons alone. Measured once, between the
  DataLoader's first measurement and the Ray runs.
* ``byol pretrain`` with 1 and with 2 workers, ``--steps`` steps (crossing an epoch boundary at the demo's
  421 steps/epoch), as a user runs it (a fresh local Ray, MLflow, checkpoints, the kNN monitor at the epoch's
  end). Steady images/s: the log windows after the first; data stall: the share of the run's step loop spent
  waiting for data, every window included (epoch boundaries too); Ray overhead: 1 - steady / plain.
* start-up: command start -> the end of the first optimizer step; shut-down: the end of the last optimizer step ->
  the command's exit (checkpoint, backbone export, MLflow logging, Ray's shutdown), from 10-step runs with the
  same config, with the kNN monitor off (the train shards under a manifest without ``val``) and on (its final
  evaluation then counts in shut-down); the wall clock of the worker's first/last step is in the run's summary.

Run it with the machine to itself. Prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import write_result  # noqa: E402  (bench/, this script's directory)

from pipeline.config import load_config  # noqa: E402
from pipeline.core.augment import TwoViewAugment, fresh_generator  # noqa: E402
from pipeline.core.models import build_networks  # noqa: E402
from pipeline.core.optim import build_optimizer  # noqa: E402
from pipeline.core.plan import RunPlan  # noqa: E402
from pipeline.core.step import autocast_dtype, precision_name, train_step  # noqa: E402
from pipeline.data.manifest import read_manifest, read_split_table  # noqa: E402


def plain_loop(config: str, data: str, steps: int, feed: str = "memory", warmup: int = 5) -> dict:
    """Images/s of ``train_step`` in this process. ``feed="memory"``: 8 batches augmented beforehand, the steps
    alone. ``feed="dataloader"``: a torch DataLoader whose one worker process augments batches of the split's
    decoded images, as Ray Data's tasks do from ``data.cache`` (the same data work beside the loop, without Ray)."""
    from pipeline.core.images import decode

    cfg = load_config(config, [f"data.path={data}"])
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    plan = RunPlan.from_config(cfg, read_manifest(data)["splits"]["train"]["rows"], world_size=1)
    table = read_split_table(data, "train", ["image"])
    batch = cfg.train.batch_size
    encoded = table.column("image").to_pylist()[: None if feed == "dataloader" else 8 * batch]
    images = torch.stack([decode(b, cfg.data.channels) for b in encoded])
    augmented = AugmentedBatches(images, batch, cfg)
    if feed == "memory":
        batches = [tuple(v.contiguous(memory_format=torch.channels_last) for v in augmented[i]) for i in range(8)]
    else:
        loader = torch.utils.data.DataLoader(
            augmented, batch_size=None, shuffle=True, num_workers=1, persistent_workers=True
        )
        batches = (views for _ in range(1 + (warmup + steps) // len(augmented)) for views in loader)
    torch.manual_seed(cfg.train.seed)
    online, target = build_networks(cfg.model, cfg.data.channels)
    online, target = online.to(memory_format=torch.channels_last), target.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(online, cfg.optim, plan.schedule.peak_lr)
    autocast = autocast_dtype(cfg.train.precision, torch.device("cpu"))
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        v1, v2 = batches[step % 8] if feed == "memory" else next(batches)
        views = v1.contiguous(memory_format=torch.channels_last), v2.contiguous(memory_format=torch.channels_last)
        metrics = train_step(online, target, optimizer, [views], step, plan.schedule, autocast)
        float(metrics["loss"])
    seconds = time.perf_counter() - start
    return {
        "feed": feed,
        "steps": steps,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "precision": precision_name(autocast),
        "images_per_s": steps * batch / seconds,
    }


def _plain_loop_worker(config: dict) -> float:
    return plain_loop(config["config"], config["data"], config["steps"])["images_per_s"]


def plain_loop_in_ray_train(config: str, data: str, steps: int) -> dict:
    """The plain loop (in-memory batches) as the function of a 1-worker Ray Train run on a fresh local Ray: the
    worker process and Ray's daemons around it, without Ray Data, MLflow, checkpoints or logging."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    here = Path(__file__).resolve().parent
    ray.init(
        num_cpus=(os.cpu_count() or 1) + 1,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{here}"}},
    )
    try:
        with tempfile.TemporaryDirectory(prefix="byol-bench-") as tmp:
            result = TorchTrainer(
                _plain_loop_worker,
                train_loop_config={"config": str(Path(config).resolve()), "data": data, "steps": steps},
                scaling_config=ScalingConfig(num_workers=1),
                run_config=RunConfig(name="plain-loop", storage_path=tmp),
            ).fit()
    finally:
        ray.shutdown()
    return {"steps": steps, "images_per_s": result.return_value}


class AugmentedBatches(torch.utils.data.Dataset):
    """Batch i of decoded uint8 images -> its two augmented views (in a DataLoader worker: one torch thread, as
    torch sets it there; in this process for ``feed="memory"``: the loop's threads)."""

    def __init__(self, images: torch.Tensor, batch: int, cfg) -> None:  # noqa: ANN001
        self.images, self.batch, self.cfg = images, batch, cfg
        self.augment, self.gen = None, None

    def __len__(self) -> int:
        return len(self.images) // self.batch

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augment is None:  # built in the process that augments
            self.augment = TwoViewAugment(
                self.cfg.augment, self.cfg.data.image_size, self.cfg.data.mean, self.cfg.data.std
            )
            self.gen = fresh_generator()
        return self.augment(self.images[i * self.batch : (i + 1) * self.batch], self.gen)


def without_val(data: str, out: Path) -> str:
    """The same train shards (linked) under a manifest without the labelled ``val`` split: no kNN monitor."""
    out.mkdir(parents=True)
    manifest = read_manifest(data)
    manifest["splits"] = {"train": manifest["splits"]["train"]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "train").symlink_to(Path(data) / "train")
    return str(out)


def pretrain_run(config: str, data: str, overrides: list[str], workdir: Path) -> dict:
    """``byol pretrain ... --json`` as a user runs it; wall-clock start and end around the command."""
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "pretrain",
        "--config",
        config,
        "--json",
    ]
    for override in [f"data.path={data}", f"run.storage_path={workdir / 'runs'}", *overrides]:
        cmd += ["--set", override]
    cmd += ["--set", f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    end = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"byol pretrain failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "command_seconds": end - start,
        "startup_s": summary["first_step_at"] - start,
        "shutdown_s": end - summary["last_step_at"],
        "startup_phases": summary.get("startup_s"),  # where the start-up went (driver and rank-0 marks)
        "steps": summary["steps"],
        "windows": logged_windows(summary["tracking_uri"], summary["run_id"]),
        "console": proc.stdout.strip().splitlines()[:-1][-40:],
    }


def logged_windows(tracking_uri: str, run_id: str) -> list[dict]:
    """The run's log windows as MLflow recorded them: step, images/s, data-wait fraction."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    rates = {m.step: m.value for m in client.get_metric_history(run_id, "images_per_s")}
    waits = {m.step: m.value for m in client.get_metric_history(run_id, "data_wait_fraction")}
    return [{"step": s, "images_per_s": rates[s], "data_wait_fraction": waits[s]} for s in sorted(rates)]


def window_stats(windows: list[dict]) -> dict:
    """Steady images/s and the data stall over the windows after the first (the first holds the stream's start,
    counted in start-up); windows hold equal numbers of images, so a window's duration is 1 / its rate."""
    later = windows[1:]
    durations = [1 / w["images_per_s"] for w in later]
    total = sum(durations)
    return {
        "steady_images_per_s": len(later) / total,
        "data_stall_fraction": sum(w["data_wait_fraction"] * d for w, d in zip(later, durations, strict=True)) / total,
        "worst_window_stall": max(w["data_wait_fraction"] for w in later),
        "first_window_stall": windows[0]["data_wait_fraction"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/fashion_mnist_cpu.yaml")
    ap.add_argument("--data", default="data/fashion-mnist")
    ap.add_argument("--steps", type=int, default=480)
    ap.add_argument("--plain-steps", type=int, default=200, help="steps of each plain-loop measurement")
    ap.add_argument("--out", default=None, help="default: bench/results/pipeline_throughput/<stamp>-<kind>.json")
    args = ap.parse_args()
    data = str(Path(args.data).resolve())
    result: dict = {"config": args.config}
    # The plain loop runs before and after the Ray runs and the two are averaged: this VM's speed drifts within
    # minutes, and a single short measurement on one side of the runs moved the overhead by several points.
    before = plain_loop(args.config, data, steps=args.plain_steps)
    print(f"plain loop (before): {before['images_per_s']:.0f} img/s", flush=True)
    loader_before = plain_loop(args.config, data, steps=args.plain_steps, feed="dataloader")
    print(f"plain loop + DataLoader (before): {loader_before['images_per_s']:.0f} img/s", flush=True)
    in_train = plain_loop_in_ray_train(args.config, data, steps=args.plain_steps)
    print(f"plain loop in a Ray Train worker: {in_train['images_per_s']:.0f} img/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="byol-bench-") as tmp:
        result["startup"] = {}
        for eval_on, source in (("off", without_val(data, Path(tmp) / "no-val")), ("on", data)):
            short = pretrain_run(args.config, source, ["train.max_steps=10", "log.every_steps=5"], Path(tmp) / eval_on)
            result["startup"][f"eval_{eval_on}"] = {
                k: short[k] for k in ("command_seconds", "startup_s", "startup_phases", "shutdown_s", "console")
            }
            print(f"eval {eval_on}: start-up {short['startup_s']:.1f} s, shut-down {short['shutdown_s']:.1f} s")
        result["runs"] = []
        for workers in (1, 2):
            run = pretrain_run(
                args.config,
                data,
                [f"train.max_steps={args.steps}", f"train.num_workers={workers}", "log.every_steps=10"],
                Path(tmp) / f"w{workers}",
            )
            run.update(window_stats(run["windows"]))
            result["runs"].append({"workers": workers, **run})
            print(f"{workers} worker(s): {run['steady_images_per_s']:.0f} img/s", flush=True)
    loader_after = plain_loop(args.config, data, steps=args.plain_steps, feed="dataloader")
    print(f"plain loop + DataLoader (after): {loader_after['images_per_s']:.0f} img/s", flush=True)
    after = plain_loop(args.config, data, steps=args.plain_steps)
    print(f"plain loop (after): {after['images_per_s']:.0f} img/s", flush=True)
    for key, (first, last) in (("plain_loop", (before, after)), ("dataloader_loop", (loader_before, loader_after))):
        result[key] = {
            **first,
            "images_per_s": (first["images_per_s"] + last["images_per_s"]) / 2,
            "before_images_per_s": first["images_per_s"],
            "after_images_per_s": last["images_per_s"],
        }
    plain, one, two = result["plain_loop"]["images_per_s"], result["runs"][0], result["runs"][1]
    loader = result["dataloader_loop"]["images_per_s"]
    result["ray_overhead"] = 1 - one["steady_images_per_s"] / plain
    # The data work's share (augmenting beside the loop on the same cores) and Ray's own, apart:
    result["dataloader_overhead"] = 1 - loader / plain
    result["plain_loop_in_ray_train"] = in_train
    result["ray_overhead_vs_dataloader"] = 1 - one["steady_images_per_s"] / loader
    result["scaling_2_over_1"] = two["steady_images_per_s"] / one["steady_images_per_s"]
    print()
    print("| | images/s | data stall (worst window) | start-up s | shut-down s |")
    print("|---|---|---|---|---|")
    print(f"| plain PyTorch loop, 1 process | {plain:.0f} | - | - | - |")
    print(f"| plain loop fed by a DataLoader (1 worker augmenting) | {loader:.0f} | - | - | - |")
    print(f"| plain loop in a 1-worker Ray Train run (no Ray Data) | {in_train['images_per_s']:.0f} | - | - | - |")
    for run in result["runs"]:
        print(
            f"| byol pretrain, {run['workers']} worker(s) | {run['steady_images_per_s']:.0f} | "
            f"{run['data_stall_fraction']:.1%} ({run['worst_window_stall']:.0%}) | {run['startup_s']:.1f} | "
            f"{run['shutdown_s']:.1f} |"
        )
    for name, s in result["startup"].items():
        print(f"| byol pretrain, 10 steps, kNN {name} | - | - | {s['startup_s']:.1f} | {s['shutdown_s']:.1f} |")
    print(
        f"\nRay overhead (1 worker vs plain): {result['ray_overhead']:.1%} (DataLoader vs plain: "
        f"{result['dataloader_overhead']:.1%}; 1 worker vs DataLoader: {result['ray_overhead_vs_dataloader']:.1%}); "
        f"2 vs 1 workers: {result['scaling_2_over_1']:.2f}x"
    )
    print(f"wrote {write_result('pipeline_throughput', result, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
