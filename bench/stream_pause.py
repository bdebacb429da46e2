"""Ray Data's training stream alone, consumed as fast as it comes, with the scheduling-loop pause three ways.

    python bench/stream_pause.py [--data data/fashion-mnist] [--repeats 2]  -> bench/results/stream_pause/<stamp>.json

Fashion-MNIST, ``data.cache=on``, 3 epochs, batch 256, shuffle buffer off, on a local Ray with 2 CPUs whose data
worker processes were started beforehand; the executor runs in this process (``ds.iterator()``), as in
bench/data_throughput.py. Pauses (``pipeline.data.execution.SchedulingLoopBackoff``): ``fixed`` (100 ms between
steps, the consumer not consulted), ``none`` (0 ms), ``consumer`` (100 ms, ended after ``WAITING_MIN_STEP_S`` when a
consumer waits: the default). Variants alternate, ``--repeats`` times each. Prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import torch  # noqa: E402
from data_throughput import time_ray_stream  # noqa: E402  (bench/, this script's directory)
from results_io import write_result  # noqa: E402

import pipeline.data.execution as execution  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.warm_up import warm_data_workers  # noqa: E402

WAITING = execution.stream_consumer_waiting


def set_pause(kind: str) -> None:
    execution.SchedulingLoopBackoff.MIN_STEP_S = 0.0 if kind == "none" else 0.1
    execution.stream_consumer_waiting = (lambda executor: False) if kind == "fixed" else WAITING


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/fashion-mnist")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="default: bench/results/stream_pause/<stamp>-<kind>.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(
        "configs/fashion_mnist_cpu.yaml", [f"data.path={args.data}", "data.shuffle_buffer=0", "data.cache=on"]
    )
    kinds = ("fixed", "none", "consumer")
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.get(warm_data_workers())
        for _ in range(args.repeats):
            for kind in kinds:
                set_pause(kind)
                rates[kind].append(time_ray_stream(cfg, 256, epochs=3)["images_per_s"])
                print(f"{kind}: {rates[kind][-1]:.0f} img/s", flush=True)
    finally:
        ray.shutdown()
    print("\n| pause | images/s (each run) | mean |\n|---|---|---|")
    for kind in kinds:
        print(f"| {kind} | {', '.join(f'{r:.0f}' for r in rates[kind])} | {sum(rates[kind]) / len(rates[kind]):.0f} |")
    result = {"waiting_min_step_s": execution.SchedulingLoopBackoff.WAITING_MIN_STEP_S, "images_per_s": rates}
    print(f"wrote {write_result('stream_pause', result, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
