"""End-to-end representation quality: `byol demo` as a user runs it, its minutes and test kNN / linear probe.

    python bench/quality.py [--which demo|30min] [--set k=v ...] [--out FILE]
        -> bench/results/quality/<stamp>-<precision_kind>.json

``--which demo`` runs ``byol demo --json`` (configs/fashion_mnist_cpu.yaml, 2 workers: the Quickstart's command);
``--which 30min`` runs ``byol demo --config configs/fashion_mnist_30min.yaml --json``; each ``--set`` is passed on.
The child's console streams through to this terminal while it is kept: the result holds the summary that
``byol demo --json`` prints (pretraining minutes, steps, test kNN@200 and linear-probe top-1, the val kNN monitor,
the start-up phases), the first console line (the run's plan: workers, steps, batch, precision) and figures from
the progress line's log windows (images/s from step 100 on, the val kNN monitor at each epoch's end).
Run it with the machine to itself.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_io import write_result  # noqa: E402  (bench/, this script's directory)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"demo": "configs/fashion_mnist_cpu.yaml", "30min": "configs/fashion_mnist_30min.yaml"}
PROGRESS = re.compile(
    r"\[byol\] step (\d+)/\d+ epoch ([\d.]+) loss \S+ knn (\S+) (\d+) img/s data-wait (\d+)%"
)  # pipeline/train/progress.py's print_progress
KEEP = ("run_name", "steps", "total_steps", "precision", "bad_records", "startup_s")


def run_streaming(command: list[str]) -> tuple[int, list[str]]:
    """Runs ``command`` in the project root; its stdout and stderr go to this terminal as they come and are kept."""
    lines = []
    with subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line.rstrip("\n"))
    return proc.returncode, lines


def last_json(lines: list[str]) -> dict | None:
    """The last JSON object printed (``byol demo --json`` prints its summary indented, from a line "{" to "}")."""
    for start in range(len(lines) - 1, -1, -1):
        if lines[start].strip() != "{":
            continue
        for end in range(start, len(lines)):
            if lines[end].rstrip() == "}":
                try:
                    return json.loads("\n".join(lines[start : end + 1]))
                except json.JSONDecodeError:
                    break
    return None


def parse_windows(lines: list[str]) -> list[dict]:
    windows = []
    for line in lines:
        m = PROGRESS.search(line)
        if m:
            knn = None if m.group(3) == "-" else float(m.group(3))
            windows.append(
                {"step": int(m.group(1)), "epoch": float(m.group(2)), "val_knn": knn, "img_s": int(m.group(4))}
                | {"data_wait": int(m.group(5)) / 100}
            )
    return windows


def window_stats(windows: list[dict]) -> dict:
    """Images/s over the log windows from step 100 on (the first hold the stream's start), and the val kNN
    monitor at each epoch's end (the value the last window of each whole epoch shows)."""
    rates = [w["img_s"] for w in windows if w["step"] >= 100]
    out: dict = {"windows": len(windows)}
    if len(rates) >= 2:
        cuts = statistics.quantiles(rates, n=20, method="inclusive")
        out |= {"mean_images_per_s": round(statistics.mean(rates), 1), "p5_images_per_s": round(cuts[0], 1)}
        out |= {"p95_images_per_s": round(cuts[-1], 1)}
    waits = [w["data_wait"] for w in windows if w["step"] >= 100 and "data_wait" in w]
    if waits:
        out["mean_data_wait"] = round(statistics.mean(waits), 3)
    by_epoch: dict[int, float] = {}
    for w in windows:
        if w.get("val_knn") is not None and w.get("epoch", 0) >= 1:
            by_epoch[math.floor(w["epoch"])] = w["val_knn"]
    if by_epoch:
        out["val_knn_by_epoch"] = [by_epoch.get(k) for k in range(1, max(by_epoch) + 1)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--which", choices=sorted(CONFIGS), default="demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="passed on to byol demo")
    ap.add_argument("--out", default=None, help="result file (default: bench/results/quality/<stamp>-<kind>.json)")
    args = ap.parse_args()
    child = ["demo", "--config", CONFIGS[args.which], *(x for o in args.overrides for x in ("--set", o)), "--json"]
    started = time.time()
    rc, lines = run_streaming([sys.executable, "-m", "pipeline.cli", *child])
    command_minutes = round((time.time() - started) / 60, 2)  # prepare (if needed) + pretraining + test evaluation
    summary = last_json(lines)
    if rc != 0 or summary is None:
        print(f"bench/quality.py: byol {' '.join(child)} failed (exit {rc}); no result written", file=sys.stderr)
        return rc or 1
    results = {
        "which": args.which,
        "child_command": "byol " + " ".join(child),
        "first_line": lines[0] if lines else "",
        "plan_line": next((x for x in lines if "[byol]" in x and "worker(s):" in x), None),
        "pretrain_minutes": summary["pretrain_minutes"],
        "command_minutes": command_minutes,
        "test_knn_top1": summary["test_knn_top1"],
        "test_linear_top1": summary["test_linear_top1"],
        "val_knn_top1": summary.get("knn_top1"),
        **{k: summary.get(k) for k in KEEP},
        "log_windows": window_stats(parse_windows(lines)),
    }
    path = write_result("quality", results, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
