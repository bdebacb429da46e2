"""``byol pretrain``: BYOL on Ray Train (DDP workers), fed by the Ray Data pipeline, tracked in MLflow.

Driver (``pretrain``):  config -> Ray -> dataset -> MLflow run -> TorchTrainer(train_func).fit() -> export
Worker (``train_func``): networks (same seed on every rank; DDP also broadcasts rank 0's weights)
    -> restore checkpoint if any -> for each batch of two views: ``train_step`` (core)
    -> every ema.check_every steps: all ranks compare target checksums
    -> every log.every_steps: metrics to Ray, MLflow and the console
    -> every checkpoint.every_steps: a checkpoint (online, target, optimizer, step, RNG, config)

``train_func`` runs from a start checkpoint to a stop step, so a caller (Tune/PBT) can train a
trial in chunks: pass ``resume`` and ``stop_step`` in the loop config.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.checkpoint import load_state, rng_state, save_state, set_rng_state
from pipeline.cluster import connect
from pipeline.config import Config, config_from_dict, dump_config
from pipeline.data import BadRecordLog, build_train_dataset, iter_train_batches
from pipeline.evaluate import extract_features, knn_accuracy
from pipeline.images import BadRecord, decode
from pipeline.models import build_networks, state_checksum
from pipeline.optim import build_optimizer
from pipeline.reader import DeterministicReader
from pipeline.schedules import Schedule, scaled_lr
from pipeline.shards import IMAGE_EXTENSIONS, PrepareError, read_manifest, read_split_table, resolve_output
from pipeline.step import NonFiniteLossError, train_step, unwrap
from pipeline.tracking import Tracker, resolve_tracking_uri


class TargetsOutOfSyncError(RuntimeError):
    """The EMA targets of the data-parallel ranks are no longer bit-identical."""


# ---------------------------------------------------------------------------------------------
# Planning (driver) and schedules
# ---------------------------------------------------------------------------------------------


def count_train_images(path: str) -> int:
    try:
        return int(read_manifest(path)["splits"]["train"]["rows"])
    except PrepareError:
        fs, root = resolve_output(path)
        from pyarrow.fs import FileSelector

        infos = fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True))
        n = sum(1 for i in infos if i.is_file and Path(i.path).suffix.lower() in IMAGE_EXTENSIONS)
        if n == 0:
            raise PrepareError(f"data.path {path}: no prepared shards and no images") from None
        return n


def plan_run(cfg: Config, num_train_images: int) -> dict[str, Any]:
    """Step budget and per-worker sizes. ``total_steps`` counts optimizer steps of the whole run."""
    t = cfg.train
    steps_per_epoch = num_train_images // t.batch_size
    if steps_per_epoch < 1:
        raise PrepareError(f"{num_train_images} training images are fewer than train.batch_size={t.batch_size}")
    total = t.epochs * steps_per_epoch
    if t.max_steps is not None:
        total = min(total, t.max_steps)
    return {
        "num_train_images": num_train_images,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        "micro_batch": t.batch_size // (t.num_workers * t.grad_accum),  # per worker, per micro-step
        "warmup_steps": round(cfg.optim.warmup_epochs * steps_per_epoch),
        "peak_lr": scaled_lr(cfg.optim.base_lr, t.batch_size),
    }


def make_schedule(cfg: Config, plan: dict[str, Any]) -> Schedule:
    return Schedule(
        total_steps=plan["total_steps"],
        peak_lr=scaled_lr(cfg.optim.base_lr, cfg.train.batch_size),
        warmup_steps=plan["warmup_steps"],
        lr_schedule=cfg.optim.lr_schedule,
        tau_base=cfg.ema.tau_base,
        tau_schedule=cfg.ema.schedule,
    )


# ---------------------------------------------------------------------------------------------
# Worker helpers
# ---------------------------------------------------------------------------------------------


def check_targets_in_sync(target: nn.Module, step: int) -> str:
    """All ranks compare a SHA-256 of their target's parameters and buffers; raise on any difference."""
    digest = state_checksum(target)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        digests: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest)
        differing = [r for r, d in enumerate(digests) if d != digests[0]]
        if differing:
            raise TargetsOutOfSyncError(
                f"EMA targets out of sync at step {step}: rank(s) {differing} differ from rank 0 "
                f"({', '.join(f'rank {r}: {d[:12]}' for r, d in enumerate(digests))})"
            )
    return digest


def load_labelled(path: str, split: str, cfg: Config, max_images: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A labelled split as uint8 [N, C, S, S] at data.image_size (whole image resized) + labels."""
    table = read_split_table(path, split, ["image", "label"])
    if max_images is not None and table.num_rows > max_images:
        idx = np.random.default_rng(0).choice(table.num_rows, size=max_images, replace=False)
        table = table.take(np.sort(idx))
    images, labels = [], []
    for data, label in zip(table["image"].to_pylist(), table["label"].to_pylist(), strict=True):
        if label is None:
            continue
        try:
            im = decode(data, cfg.data.channels)
        except BadRecord:
            continue
        if im.shape[-2:] != (cfg.data.image_size, cfg.data.image_size):
            im = (
                F.interpolate(
                    im[None].float(),
                    size=(cfg.data.image_size,) * 2,
                    mode="bilinear",
                    antialias=True,
                    align_corners=False,
                )[0]
                .round()
                .clamp(0, 255)
                .to(torch.uint8)
            )
        images.append(im)
        labels.append(label)
    if not images:
        raise PrepareError(f"{path}: split {split!r} has no labelled images")
    return torch.stack(images), torch.tensor(labels)


class KnnMonitor:
    """Weighted kNN of the online encoder: memory bank = labelled train images, queries = the val split."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.bank_x, self.bank_y = load_labelled(cfg.data.path, "train", cfg, cfg.eval.max_train_images)
        self.query_x, self.query_y = load_labelled(cfg.data.path, "val", cfg, None)

    def __call__(self, encoder: nn.Module) -> float:
        d = self.cfg.data
        bank = extract_features(encoder, self.bank_x, d.mean, d.std, device=self.device)
        query = extract_features(encoder, self.query_x, d.mean, d.std, device=self.device)
        return knn_accuracy(bank, self.bank_y, query, self.query_y, self.cfg.eval.knn_k, self.cfg.eval.knn_temperature)


def _has_labelled_val(path: str) -> bool:
    try:
        splits = read_manifest(path)["splits"]
    except PrepareError:
        return False
    return "val" in splits and splits["val"]["rows"] > 0 and splits["train"]["unlabelled"] < splits["train"]["rows"]


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


# ---------------------------------------------------------------------------------------------
# The training function (every Ray Train worker)
# ---------------------------------------------------------------------------------------------


def train_func(config: dict[str, Any]) -> dict[str, Any] | None:
    cfg = config_from_dict(config["config"])
    plan = config["plan"]
    stop_step = min(config.get("stop_step") or plan["total_steps"], plan["total_steps"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    use_gpu = device.type == "cuda"
    if not use_gpu:
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))

    # Same seed on every rank -> identical online and target weights; DDP broadcasts rank 0's anyway.
    torch.manual_seed(cfg.train.seed)
    online, target = build_networks(cfg.model, cfg.data.channels)
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # Ray restarted the group after a failure, or the run was continued
        with checkpoint.as_directory() as d:
            state = load_state(d)
    elif config.get("resume"):
        state = load_state(config["resume"])
    if state is not None:
        online.load_state_dict(state["online"])
        target.load_state_dict(state["target"])
    if use_gpu:
        # Cross-device BN, as every multi-device BYOL anchor (SyncBatchNorm raises on CPU DDP).
        online = nn.SyncBatchNorm.convert_sync_batchnorm(online)
        target = nn.SyncBatchNorm.convert_sync_batchnorm(target)
    memory_format = torch.channels_last
    online, target = online.to(memory_format=memory_format), target.to(memory_format=memory_format)
    online = ray.train.torch.prepare_model(online)
    target = ray.train.torch.prepare_model(target, parallel_strategy=None)
    schedule = make_schedule(cfg, plan)
    optimizer = build_optimizer(online, cfg.optim, schedule.peak_lr)
    step = 0
    history: list[dict[str, Any]] = []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        step = int(state["step"])
        history = list(state.get("history", []))
    autocast = torch.bfloat16 if use_gpu else None

    tracker = Tracker(config["tracking_uri"], config.get("run_id"), enabled=rank == 0)
    knn = KnnMonitor(cfg, device) if rank == 0 and cfg.eval.every_epochs and _has_labelled_val(cfg.data.path) else None
    shard = ray.train.get_dataset_shard("train")
    bad = BadRecordLog()
    steps_per_epoch, accum = plan["steps_per_epoch"], cfg.train.grad_accum
    start_step, t_start = step, time.perf_counter()
    window = {"t": time.perf_counter(), "wait": 0.0, "images": 0}
    last_knn: float | None = history[-1].get("knn_top1") if history else None
    checksum = state_checksum(target)
    if rank == 0:
        print(
            f"[byol] rank 0/{world}: steps {step} -> {stop_step} of {plan['total_steps']} "
            f"({steps_per_epoch}/epoch), batch {cfg.train.batch_size} = {world} x {plan['micro_batch']} x {accum}",
            flush=True,
        )

    reader = DeterministicReader(cfg, rank, world) if cfg.data.deterministic else None
    while step < stop_step:
        if reader is not None:  # exactly one epoch per pass, resumable mid-epoch
            skip = (step % steps_per_epoch) * accum
            batches = (
                (v1.to(device), v2.to(device))
                for v1, v2 in reader.epoch(step // steps_per_epoch, plan["micro_batch"], steps_per_epoch * accum, skip)
            )
        else:  # Ray Data: one pass over this worker's stream of the split
            batches = iter(iter_train_batches(shard, plan["micro_batch"], cfg, device, bad))
        consumed = 0
        micro: list[tuple[torch.Tensor, torch.Tensor]] = []
        while step < stop_step:
            t0 = time.perf_counter()
            try:
                views = next(batches)
            except StopIteration:
                break
            window["wait"] += time.perf_counter() - t0
            consumed += 1
            if use_gpu:
                views = tuple(v.contiguous(memory_format=memory_format) for v in views)
            micro.append(views)
            if len(micro) < accum:
                continue
            try:
                metrics = train_step(online, target, optimizer, micro, step, schedule, autocast)
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(f"{exc}; the last good checkpoint is kept") from None
            window["images"] += sum(v1.shape[0] for v1, _ in micro) * world
            micro = []
            step += 1

            at_end = step == stop_step
            do_check = step % cfg.ema.check_every == 0 or at_end
            do_ckpt = step % cfg.checkpoint.every_steps == 0 or at_end
            do_eval = cfg.eval.every_epochs > 0 and (
                at_end or (step % steps_per_epoch == 0 and (step // steps_per_epoch) % cfg.eval.every_epochs == 0)
            )
            do_log = step % cfg.log.every_steps == 0 or do_check or do_ckpt or do_eval
            if do_check:
                checksum = check_targets_in_sync(unwrap(target), step)
            if not do_log:
                continue
            now = time.perf_counter()
            elapsed = max(now - window["t"], 1e-9)
            metrics.update(
                step=step,
                epoch=step / steps_per_epoch,
                images_per_s=window["images"] / elapsed,
                data_wait_fraction=min(window["wait"] / elapsed, 1.0),
                bad_records=bad.count,
            )
            window = {"t": now, "wait": 0.0, "images": 0}
            if do_eval and knn is not None:
                last_knn = knn(unwrap(online).encoder)
                metrics["knn_top1"] = last_knn
            if rank == 0:
                _print_progress(metrics, stop_step, last_knn, (now - t_start) / max(step - start_step, 1))
                if metrics["collapse_std"] < cfg.log.collapse_warn:
                    print(
                        f"[byol] WARNING: collapse monitor {metrics['collapse_std']:.3f} < "
                        f"{cfg.log.collapse_warn} at step {step}: representations are collapsing",
                        flush=True,
                    )
                if bad.count and bad.first_keys:
                    metrics["bad_record_keys"] = ",".join(bad.first_keys)
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
            history.append({k: v for k, v in metrics.items() if isinstance(v, int | float)})
            report = dict(metrics, target_checksum=checksum)
            if do_ckpt:
                _report_with_checkpoint(report, rank, step, steps_per_epoch, online, target, optimizer, history, cfg)
            else:
                ray.train.report(report)
        if consumed == 0:
            raise PrepareError(f"data.path {cfg.data.path}: the training split yielded no batches")

    if rank == 0:
        summary = {
            "steps": step,
            "start_step": start_step,  # > 0 when this attempt resumed (Ray restart after a failure, or --resume)
            "target_checksum": checksum,
            "knn_top1": last_knn,
            "bad_records": bad.count,
            "bad_record_keys": bad.first_keys,
            "history": history,
        }
        tracker.set_tag("target_checksum", checksum)
        return summary
    return None


def _print_progress(m: dict[str, Any], stop_step: int, knn: float | None, seconds_per_step: float) -> None:
    knn_text = f"{knn:.3f}" if knn is not None else "-"
    print(
        f"[byol] step {m['step']}/{stop_step} epoch {m['epoch']:.2f} loss {m['loss']:.4f} knn {knn_text} "
        f"{m['images_per_s']:.0f} img/s data-wait {m['data_wait_fraction']:.0%} collapse {m['collapse_std']:.2f} "
        f"ETA {_fmt_eta((stop_step - m['step']) * seconds_per_step)}",
        flush=True,
    )


def _report_with_checkpoint(metrics, rank, step, steps_per_epoch, online, target, optimizer, history, cfg) -> None:
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=f"step_{step:08d}")
        return
    state = {
        "format": "byol-ray-checkpoint/1",
        "step": step,
        "epochs_done": step / steps_per_epoch,
        "online": unwrap(online).state_dict(),
        "target": unwrap(target).state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "history": history,
        "model": cfg.model.model_dump(),
        "data": {
            "channels": cfg.data.channels,
            "image_size": cfg.data.image_size,
            "mean": cfg.data.mean,
            "std": cfg.data.std,
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        save_state(Path(tmp) / "ckpt", state, dump_config(cfg))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(Path(tmp) / "ckpt")),
            checkpoint_dir_name=f"step_{step:08d}",
        )


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def export_backbone(checkpoint_dir: str | Path, out: str | Path) -> Path:
    """The online encoder's state_dict (what BYOL keeps), loadable into torchvision / SmallCNN."""
    state = load_state(checkpoint_dir)
    prefix = "encoder."
    backbone = {k[len(prefix) :]: v for k, v in state["online"].items() if k.startswith(prefix)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(backbone, out)
    return out


def plot_history(history: list[dict[str, Any]], out: Path) -> Path | None:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    steps = [h["step"] for h in history]
    for ax, key in zip(axes, ("loss", "tau", "lr", "knn_top1"), strict=True):
        pts = [(s, h[key]) for s, h in zip(steps, history, strict=True) if key in h]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o" if key == "knn_top1" else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def pretrain(
    cfg: Config,
    resume: str | None = None,
    stop_step: int | None = None,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Run (or continue) one pretraining job; returns the summary printed by ``byol pretrain --json``."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    if "://" not in cfg.data.path:  # Ray workers run in other directories
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(Path(cfg.data.path).resolve())})})
    started_ray = connect(t.num_workers, t.cpus_per_worker)
    try:
        plan = plan_run(cfg, count_train_images(cfg.data.path))
        storage = cfg.run.storage_path if "://" in cfg.run.storage_path else str(Path(cfg.run.storage_path).resolve())
        name = cfg.run.name or time.strftime("byol-%Y%m%d-%H%M%S")
        tracking_uri = resolve_tracking_uri(cfg.tracking.uri, storage if "://" not in storage else "runs")
        try:
            run_id = Tracker.create_run(tracking_uri, cfg.tracking.experiment, name)
        except Exception as exc:  # an unreachable server must not stop the job
            print(f"[byol] WARNING: MLflow unavailable at {tracking_uri} ({type(exc).__name__}); not tracking")
            run_id = None
        tracker = Tracker(tracking_uri, run_id)
        tracker.log_params({**cfg.flat(), **{f"plan.{k}": v for k, v in plan.items()}})
        run_dir = Path(storage) / name if "://" not in storage else Path("runs") / name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        tracker.log_artifact(run_dir / "config.yaml")

        dataset = build_train_dataset(cfg, seed=t.seed, batch_size=plan["micro_batch"])
        trainer = TorchTrainer(
            train_func,
            train_loop_config={
                "config": cfg.to_dict(),
                "plan": plan,
                "resume": resume,
                "stop_step": stop_step,
                "run_id": run_id,
                "tracking_uri": tracking_uri,
            },
            scaling_config=ScalingConfig(
                num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}
            ),
            run_config=RunConfig(
                name=name,
                storage_path=storage,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
                failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                callbacks=callbacks or [],
            ),
            datasets={"train": dataset},
            dataset_config=DataConfig(datasets_to_split=["train"]),
        )
        try:
            result = trainer.fit()
        except Exception:
            tracker.finish("FAILED")
            raise
        out = result.return_value or {}
        checkpoint = result.checkpoint.path if result.checkpoint else None
        summary: dict[str, Any] = {
            "run_id": run_id,
            "run_name": name,
            "steps": out.get("steps"),
            "resumed_from_step": out.get("start_step"),
            "total_steps": plan["total_steps"],
            "checkpoint": checkpoint,
            "knn_top1": out.get("knn_top1"),
            "target_checksum": out.get("target_checksum"),
            "bad_records": out.get("bad_records"),
            "tracking_uri": tracking_uri,
            "experiment": cfg.tracking.experiment,
        }
        if checkpoint:
            summary["backbone"] = str(export_backbone(checkpoint, run_dir / "backbone.pt"))
            tracker.log_artifact(summary["backbone"])
            tracker.set_tag("checkpoint", checkpoint)
        plot = plot_history(out.get("history", []), run_dir / "curves.png")
        if plot:
            tracker.log_artifact(plot)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        tracker.log_artifact(run_dir / "summary.json")
        tracker.finish()
        return summary
    finally:
        if started_ray:
            ray.shutdown()
