"""The issue-8 scenario: Fashion-MNIST with the image column of 2 of the 8 train shards replaced by random bytes,
pretrained with 2 workers for 1 epoch. Before the fix it stopped at step 140 of 210 forever (ranks disagreed on
the number of steps); now it must finish all 210 steps, count the bad records over all ranks and print only a few
bad-record lines.

    python bench/corrupt_shards.py [--data data/fashion-mnist]     # -> bench/results/corrupt_shards/<stamp>-<kind>.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from results_io import write_result  # (bench/, this script's directory)

ROOT = Path(__file__).resolve().parents[1]


def corrupt(shard: Path, seed: int) -> int:
    table = pq.read_table(shard)
    rng = np.random.default_rng(seed)
    junk = pa.array([rng.bytes(400) for _ in range(table.num_rows)], pa.binary())
    pq.write_table(table.set_column(0, "image", junk), shard, row_group_size=1024, compression="none")
    return table.num_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/fashion-mnist", help="prepared Fashion-MNIST shards (byol prepare)")
    parser.add_argument("--out", default=None, help="default: bench/results/corrupt_shards/<stamp>-<kind>.json")
    args = parser.parse_args()
    work = ROOT / "bench" / "work" / "corrupt"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(ROOT / args.data, work / "shards")
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    shards = [work / "shards" / s["path"] for s in manifest["splits"]["train"]["shards"]]
    corrupted = sum(corrupt(shards[i], seed=i) for i in (2, 5))
    command = [
        sys.executable, "-m", "pipeline.cli", "pretrain", "--config", "configs/fashion_mnist_cpu.yaml",
        "--set", "train.num_workers=2", "--set", "data.shuffle_buffer=0", "--set", "train.epochs=1",
        "--set", f"data.path={work / 'shards'}", "--set", f"run.storage_path={work / 'runs'}",
        "--set", "run.name=corrupt", "--json",
    ]  # fmt: skip
    start = time.time()
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    seconds = time.time() - start
    text = out.stdout + out.stderr
    summary = next((json.loads(x) for x in reversed(out.stdout.splitlines()) if x.startswith('{"run_id"')), None)
    result = {
        "child_command": "byol pretrain " + " ".join(command[4:]),
        "corrupted_rows": corrupted,
        "returncode": out.returncode,
        "seconds": round(seconds, 1),
        "steps": summary and summary["steps"],
        "total_steps": summary and summary["total_steps"],
        "bad_records": summary and summary["bad_records"],
        "bad_record_lines": text.count("skipping bad record"),
        "knn_top1_val": summary and summary["knn_top1"],
        "last_line": text.strip().splitlines()[-1][:300] if text.strip() else "",
    }
    print(json.dumps(result, indent=2))
    print(f"wrote {write_result('corrupt_shards', result, args.out)}")
    return 0 if out.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
