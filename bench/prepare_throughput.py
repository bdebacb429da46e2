"""`byol prepare` images/s: in one process against Ray tasks (one per shard), on a local Ray of 1 and 2 CPUs and on
a multi-node Ray on this machine (a 0-CPU head and worker nodes of 1 CPU each), over a synthetic JPEG folder.

    python bench/prepare_throughput.py [--images 20000] [--size 96] [--nodes 2] [--repeats 3]

Each setting prepares the same folder into a new output, ``--repeats`` times (the median run is reported, every
run's seconds kept); the Ray start is timed apart from the prepare
(``ray_start_s``), so ``images_per_s`` is what prepare itself sustains (listing, shards, the manifest's statistics).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import write_result  # noqa: E402  (bench/, this script's directory)
from synthetic_jpeg import write_folder  # noqa: E402

from pipeline.data.prepare import prepare  # noqa: E402


def timed_prepare(source: str, out: Path, parallel: str, repeats: int = 1) -> dict:
    """``repeats`` prepares of the same folder, each into a new output: the median run's figures, every run's
    seconds."""
    runs = []
    for i in range(repeats):
        start = time.perf_counter()
        manifest = prepare(source, str(out / f"run{i}"), min_shards=16, parallel=parallel, log=lambda *a: None)
        seconds = time.perf_counter() - start
        rows = sum(split["rows"] for split in manifest["splits"].values())
        shards = sum(len(split["shards"]) for split in manifest["splits"].values())
        runs.append(
            {"seconds": round(seconds, 2), "images": rows, "shards": shards, "images_per_s": round(rows / seconds)}
        )
    median = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    return {**median, "seconds_each": [r["seconds"] for r in runs]}


def on_local_ray(source: str, out: Path, cpus: int, repeats: int) -> dict:
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter() - start
    try:
        return {**timed_prepare(source, out, "ray", repeats), "ray_start_s": round(started, 2), "cpus": cpus}
    finally:
        ray.shutdown()


def on_nodes(source: str, out: Path, nodes: int, repeats: int) -> dict:
    """Worker nodes of 1 CPU each under a 0-CPU head (the driver's node): tasks go to the worker nodes."""
    import ray
    from ray.cluster_utils import Cluster

    start = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(nodes):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    started = time.perf_counter() - start
    try:
        return {
            **timed_prepare(source, out, "ray", repeats),
            "ray_start_s": round(started, 2),
            "nodes": nodes,
            "cpus": nodes,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting, odd (the median is reported)")
    parser.add_argument("--out", help="result file (default: bench/results/prepare_throughput/...)")
    args = parser.parse_args()
    if args.repeats < 1 or args.repeats % 2 == 0:
        parser.error(f"--repeats {args.repeats}: give an odd number of runs (1, 3, 5...), so the median is one run")
    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as tmp:
        folder = Path(tmp) / "src"
        write_folder(folder, args.images, args.size)
        source = f"imagefolder:{folder}"
        runs = {"one_process": timed_prepare(source, Path(tmp) / "off", "off", args.repeats)}
        print("one_process", runs["one_process"], flush=True)
        for cpus in (1, 2):
            runs[f"ray_local_{cpus}cpu"] = on_local_ray(source, Path(tmp) / f"ray{cpus}", cpus, args.repeats)
            print(f"ray_local_{cpus}cpu", runs[f"ray_local_{cpus}cpu"], flush=True)
        runs[f"ray_{args.nodes}_nodes"] = on_nodes(source, Path(tmp) / "nodes", args.nodes, args.repeats)
        print(f"ray_{args.nodes}_nodes", runs[f"ray_{args.nodes}_nodes"], flush=True)
    base = runs["one_process"]["images_per_s"]
    results = {
        "images": args.images,
        "size_px": args.size,
        "repeats": args.repeats,
        "runs": runs,
        "speedup_vs_one_process": {k: round(v["images_per_s"] / base, 2) for k, v in runs.items()},
    }
    print("wrote", write_result("prepare_throughput", results, out=args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
