"""The GPU check's pretraining runs (bench/gpu_check.sh) as one result: steps done, images/s and data wait per log
window after the first, the val kNN monitor at the end, from each run's console.

    python bench/gpu_check_summary.py OUTDIR [--out FILE]   # reads OUTDIR/pretrain_<stage>.txt -> OUTDIR/gpu_check.json

gpu_check.sh calls it last, on the GPU machine (the header then names that machine); copy OUTDIR/gpu_check.json to
bench/results/gpu_check/ and OUTDIR/step_throughput_cuda.json to bench/results/step_throughput/.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from quality import parse_windows  # noqa: E402  (bench/, this script's directory)
from results_io import write_result  # noqa: E402

STAGES = {  # stage: the overrides gpu_check.sh gives it
    "data": "augment.device=data data.decode=data",
    "worker": "augment.device=worker data.decode=data",
    "decode": "augment.device=worker data.decode=worker",
}


def summarize(text: str) -> dict:
    windows = parse_windows(text.splitlines())
    plan = re.search(r"steps \d+ -> (\d+) of (\d+)", text)
    later = windows[1:]
    return {
        "steps": windows[-1]["step"] if windows else 0,
        "total_steps": int(plan.group(2)) if plan else None,
        "images_per_s": [w["img_s"] for w in later],
        "data_wait": [w["data_wait"] for w in later],
        "val_knn_end": windows[-1]["val_knn"] if windows else None,
        "finished": bool(windows) and plan is not None and windows[-1]["step"] == int(plan.group(2)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--out", default=None, help="default: OUTDIR/gpu_check.json")
    args = ap.parse_args()
    runs = {}
    for stage, overrides in STAGES.items():
        log = Path(args.outdir) / f"pretrain_{stage}.txt"
        if log.exists():
            runs[stage] = {"overrides": overrides, **summarize(log.read_text(errors="replace"))}
    out = args.out or Path(args.outdir) / "gpu_check.json"
    path = write_result("gpu_check", {"config": "configs/cifar10_resnet18.yaml", "runs": runs}, out)
    print(f"wrote {path}")
    return 0 if runs else 1


if __name__ == "__main__":
    sys.exit(main())
