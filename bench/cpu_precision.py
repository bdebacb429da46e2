"""Images/s of one training step of a config's network in fp32 and in bf16 autocast, on this machine's CPU.

    python bench/cpu_precision.py [--config configs/fashion_mnist_cpu.yaml] [--threads 1] [--batch 128] [--compile]
    # -> bench/results/cpu_precision/<stamp>-<precision_kind>.json

``--compile`` adds a row: bf16 autocast with the forwards compiled as ``train.compile`` does (``compile_forwards``);
the seconds the compilation and first step took are reported apart (on-disk inductor caches make reruns faster).

What ``train.precision: auto`` decides from: on a CPU with bf16 dot-product instructions (Intel AMX, AVX-512
BF16) bf16 autocast is faster; elsewhere it is emulated and slower. Same network, channels_last, optimizer and step
function as a Train worker (default batch 128: the demo's global batch, one worker's batch when it runs alone);
random views.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import write_result  # noqa: E402  (bench/, this script's directory)

from bench.step_throughput import time_steps  # noqa: E402  (the step benchmark's timing loop)
from pipeline.config import load_config  # noqa: E402
from pipeline.core.models import build_networks  # noqa: E402
from pipeline.core.optim import build_optimizer  # noqa: E402
from pipeline.core.schedules import Schedule  # noqa: E402
from pipeline.core.step import compile_forwards, cpu_bf16_flags, train_step  # noqa: E402


def images_per_s(
    cfg, batch: int, autocast: torch.dtype | None, steps: int, warmup: int, compile_seconds: dict | None = None
) -> float:
    """Timed steps; with ``compile_seconds`` the forwards are compiled and the first step's seconds stored there."""
    torch.manual_seed(0)
    online, target = build_networks(cfg.model, cfg.data.channels)
    online, target = online.to(memory_format=torch.channels_last), target.to(memory_format=torch.channels_last)
    if compile_seconds is not None:
        compile_forwards(online, target)
    optimizer = build_optimizer(online, cfg.optim, 1.0)
    schedule = Schedule(steps + warmup, 1.0, 0, "constant", cfg.ema.tau_base, cfg.ema.schedule)
    size = cfg.data.image_size
    views = torch.randn(batch, cfg.data.channels, size, size).contiguous(memory_format=torch.channels_last)

    def step(i: int) -> None:
        train_step(online, target, optimizer, [(views, views)], i, schedule, autocast, check_finite=False)

    if compile_seconds is not None:  # compilation happens in the first call: timed apart from the steps
        start = time.perf_counter()
        step(0)
        compile_seconds["compile_and_first_step_s"] = round(time.perf_counter() - start, 1)
    return steps * batch / time_steps(step, steps, warmup, torch.device("cpu"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/fashion_mnist_cpu.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="add bf16 autocast with compiled forwards")
    parser.add_argument("--out", default=None, help="default: bench/results/cpu_precision/<stamp>-<kind>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    rows = {
        name: round(images_per_s(cfg, args.batch, dtype, args.steps, args.warmup), 1)
        for name, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16))
    }
    compile_seconds: dict = {}
    if args.compile:
        rows["bf16 compiled"] = round(
            images_per_s(cfg, args.batch, torch.bfloat16, args.steps, args.warmup, compile_seconds), 1
        )
    ratio = round(rows["bf16 autocast"] / rows["fp32"], 2)
    print(f"{'precision':<16}{'images/s':>10}")
    for name, value in rows.items():
        print(f"{name:<16}{value:>10}")
    flags = cpu_bf16_flags()
    print(f"bf16 / fp32: {ratio}  (bf16 CPU flags: {', '.join(flags) or 'none'}; auto picks bf16 with any)")
    if compile_seconds:
        print(f"compilation and first step: {compile_seconds['compile_and_first_step_s']} s (not in the images/s)")
    result = {
        "threads": args.threads,
        "config": args.config,
        "overrides": args.overrides,
        "batch": args.batch,
        "images_per_s": rows,
        "bf16_over_fp32": ratio,
        **compile_seconds,
    }
    print(f"wrote {write_result('cpu_precision', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
