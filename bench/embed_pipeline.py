"""Is ``byol embed`` as fast as a plain in-process loop over the same images and CPUs?

    python bench/embed_pipeline.py [--data data/fashion-mnist] [--split test train]
        [--config configs/fashion_mnist_cpu.yaml]
        -> bench/results/embed_pipeline/<stamp>-<precision_kind>.json

All embed the split with the same randomly initialised encoder of the config (a checkpoint written here), the
same preprocessing (decode, shorter side + centre crop, normalisation), the same precision (the config's
``train.precision``) and every CPU of the machine. The loop reads the split's shards with pyarrow, decodes and
embeds batch after batch in this process (torch's threads on all cores; the encoder loaded before its clock
starts). ``byol embed`` runs both ways: ``--parallel off`` (what ``auto`` picks on a machine without a cluster: this
process, Parquet written, the encoder's load counted) and ``--parallel ray`` (Ray Data batch inference on a local
Ray started for it; Ray's start-up not counted; its seconds are the read, the actor pool, the map and the Parquet
write). ``ratio`` is the first against the loop, ``ray_data_ratio`` the second. Run it with the machine to itself.

With two splits or more, the Ray Data path's seconds are fitted as fixed + rows / marginal rate (least squares
over the splits): ``embed_fixed_s`` is what it pays however few images it reads (worker processes for the read
and the actor, their imports, the first batch), ``embed_marginal_images_per_s`` its rate beyond that, and
``rows_for_ratio_0.8`` the split size from which it reaches 0.8x the loop's rate on the largest split.
``actor_startup_s`` is measured apart, on the same Ray: an ``Embedder`` actor created and waited for alone.
Before any clock, one untimed in-process embed of the first split warms torch and the page cache for every path.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import write_result  # noqa: E402  (bench/, this script's directory)

from pipeline.config import load_config  # noqa: E402
from pipeline.core.checkpoint import load_encoder, save_state  # noqa: E402
from pipeline.core.images import decode  # noqa: E402
from pipeline.core.models import build_networks  # noqa: E402
from pipeline.core.step import autocast, autocast_dtype  # noqa: E402
from pipeline.data.data_config import resolve_data_config  # noqa: E402
from pipeline.data.labelled import resize_uint8  # noqa: E402
from pipeline.data.manifest import iter_row_groups, sample_row_groups  # noqa: E402


def in_process_loop(checkpoint: Path, data: str, split: str, batch_size: int) -> tuple[int, float]:
    encoder, cfg, _ = load_encoder(checkpoint)
    mean = torch.tensor(cfg.data.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, -1, 1, 1)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    dtype = autocast_dtype(cfg.train.precision, torch.device("cpu"))
    started, rows = time.perf_counter(), 0
    for table in iter_row_groups(data, sample_row_groups(data, split, None), ["image"]):
        images = table.column("image").to_pylist()
        for i in range(0, len(images), batch_size):
            x = torch.stack(
                [resize_uint8(decode(b, cfg.data.channels), cfg.data.image_size) for b in images[i : i + batch_size]]
            )
            x = ((x.float().div_(255) - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), autocast("cpu", dtype):  # the run's precision, as embed's actors use it
                torch.nn.functional.normalize(encoder(x).float(), dim=1)
            rows += len(x)
    return rows, time.perf_counter() - started


def actor_startup_seconds(checkpoint: Path) -> float:
    """Seconds from asking for an ``Embedder`` actor to its constructor having run (process, imports, encoder)."""
    import ray

    from pipeline.evaluation.embed import Embedder

    started = time.perf_counter()
    actor = ray.remote(num_cpus=0)(Embedder).remote(str(checkpoint), 1)
    ray.get(actor.__ray_ready__.remote())
    seconds = time.perf_counter() - started
    ray.kill(actor)
    return seconds


def warm_up(checkpoint: Path, data: str, split: str, batch_size: int, folder: Path) -> None:
    """One untimed in-process embed of the first split, so that no timed path pays torch's first-call costs and
    the first read of the shards (the path timed first used to)."""
    from pipeline.evaluation.embed import embed

    embed(str(checkpoint), data, str(folder / "warm-up"), [split], batch_size, parallel="off")


def compare(checkpoint: Path, data: str, split: str, batch_size: int, folder: Path) -> dict:
    """The loop and ``byol embed`` both ways over one split (Ray already up for the Ray Data path)."""
    from pipeline.evaluation.embed import embed

    loop_rows, loop_s = in_process_loop(checkpoint, data, split, batch_size)
    here = embed(str(checkpoint), data, str(folder / f"here-{split}"), [split], batch_size, parallel="off")
    ray_data = embed(str(checkpoint), data, str(folder / f"ray-{split}"), [split], batch_size, parallel="ray")
    loop_rate = loop_rows / loop_s
    return {
        "split": split,
        "rows": loop_rows,
        "loop_images_per_s": round(loop_rate, 1),
        "in_process_images_per_s": here["images_per_s"],
        "ratio": round(here["images_per_s"] / loop_rate, 3),
        "embed_images_per_s": ray_data["images_per_s"],
        "embed_seconds": ray_data["seconds"],
        "embed_actors": ray_data["actors"],
        "ray_data_ratio": round(ray_data["images_per_s"] / loop_rate, 3),
    }


def fixed_and_marginal(rows: list[dict]) -> dict:
    """Ray Data embed seconds = fixed + rows / rate, fitted over the splits; where 0.8x of the loop is reached."""
    if len({r["rows"] for r in rows}) < 2:
        return {}
    n = [r["rows"] for r in rows]
    t = [r["embed_seconds"] for r in rows]
    mean_n, mean_t = sum(n) / len(n), sum(t) / len(t)
    slope = sum((a - mean_n) * (b - mean_t) for a, b in zip(n, t, strict=True)) / sum((a - mean_n) ** 2 for a in n)
    fixed = mean_t - slope * mean_n
    loop_rate = max(rows, key=lambda r: r["rows"])["loop_images_per_s"]
    # fixed + N * slope <= N / (0.8 * loop_rate)  <=>  N >= fixed / (1 / (0.8 * loop_rate) - slope)
    margin = 1 / (0.8 * loop_rate) - slope
    return {
        "embed_fixed_s": round(fixed, 1),
        "embed_marginal_images_per_s": round(1 / slope, 1) if slope > 0 else None,
        "rows_for_ratio_0.8": round(fixed / margin) if margin > 0 else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/fashion-mnist")
    ap.add_argument("--split", nargs="+", default=["test", "train"])
    ap.add_argument("--config", default="configs/fashion_mnist_cpu.yaml")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", default=None, help="default: bench/results/embed_pipeline/<stamp>-<kind>.json")
    args = ap.parse_args()
    cfg, _ = resolve_data_config(load_config(args.config, [f"data.path={args.data}"]))
    with tempfile.TemporaryDirectory() as tmp:
        online, _ = build_networks(cfg.model, cfg.data.channels)
        checkpoint = save_state(Path(tmp) / "ckpt", {"step": 0, "online": online.state_dict()}, cfg)
        import ray

        from pipeline.train.cluster import connect

        connect()
        try:
            startup_s = actor_startup_seconds(checkpoint)
            warm_up(checkpoint, args.data, args.split[0], args.batch_size, Path(tmp))
            rows = [compare(checkpoint, args.data, split, args.batch_size, Path(tmp)) for split in args.split]
        finally:
            ray.shutdown()
    results = {
        "precision": str(autocast_dtype(cfg.train.precision, torch.device("cpu")) or torch.float32),
        "batch_size": args.batch_size,
        "actor_startup_s": round(startup_s, 2),
        "splits": rows,
        **fixed_and_marginal(rows),
    }
    print(results)
    print(f"wrote {write_result('embed_pipeline', results, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
