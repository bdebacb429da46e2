"""How soon a Ray Data stream of its own keeps every core busy: its data tasks' start times on a fresh local Ray,
with Ray Data's autoscaling coordinator started beforehand (``warm_data_workers`` does it) or left to the stream
(under Ray Train its controller starts the coordinator first, so training streams always found it running).

    python bench/stream_start.py [--data data/fashion-mnist] [--repeats 3]  -> bench/results/stream_start/<stamp>.json

Each run starts a local Ray with 2 CPUs, warms 2 data worker processes (torch and torchvision imported), then times
one epoch of Fashion-MNIST (``data.cache=off``, batch 256, shuffle buffer off) consumed in this process as fast as
it comes, as bench/data_throughput.py does. Ray's task timeline (``ray.timeline``) gives when each worker process
started its first data task: until the coordinator has answered, the executor runs one task at a time. The two
variants alternate, ``--repeats`` times each. Prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import torch  # noqa: E402
from data_throughput import time_ray_stream  # noqa: E402  (bench/, this script's directory)
from results_io import write_result  # noqa: E402

import pipeline.data.warm_up as warm_up  # noqa: E402
from pipeline.config import load_config  # noqa: E402

START_COORDINATOR = warm_up.start_data_autoscaling_coordinator

MAP_TASK = "ray.data._internal.execution.operators.map_operator._map_task"


def one_run(cfg, coordinator_first: bool) -> dict:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # the same warm-up either way; without the coordinator, the stream starts it as before the change
        warm_up.start_data_autoscaling_coordinator = START_COORDINATOR if coordinator_first else (lambda: None)
        ray.get(warm_up.warm_data_workers(2))
        stream_start = time.time()
        timing = time_ray_stream(cfg, 256, epochs=1)
        first_task: dict[str, float] = {}
        for event in ray.timeline():
            if event.get("name", "").startswith(MAP_TASK):
                worker = event["tid"]
                first_task[worker] = min(first_task.get(worker, float("inf")), event["ts"] / 1e6)
    finally:
        ray.shutdown()
    starts = sorted(t - stream_start for t in first_task.values())
    return {
        "first_task_starts_s": starts,
        "second_lane_after_first_s": starts[1] - starts[0] if len(starts) > 1 else None,
        **timing,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/fashion-mnist")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="default: bench/results/stream_start/<stamp>-<kind>.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(
        "configs/fashion_mnist_cpu.yaml", [f"data.path={args.data}", "data.shuffle_buffer=0", "data.cache=off"]
    )
    variants = {"coordinator started beforehand": True, "coordinator started by the stream": False}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, first in variants.items():
            runs[name].append(one_run(cfg, first))
            r = runs[name][-1]
            print(
                f"{name}: second process's first task {r['second_lane_after_first_s']:.2f} s after the first's, "
                f"{r['images_per_s']:.0f} img/s",
                flush=True,
            )
    print(
        "\n| coordinator | second process's first task after the first's, s (each run) | images/s (each run) |"
        "\n|---|---|---|"
    )
    for name, rs in runs.items():
        gaps = ", ".join(f"{r['second_lane_after_first_s']:.2f}" for r in rs)
        rates = ", ".join(f"{r['images_per_s']:.0f}" for r in rs)
        print(f"| {name} | {gaps} | {rates} |")
    print(f"wrote {write_result('stream_start', {'runs': runs}, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
