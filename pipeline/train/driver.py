"""``byol pretrain``, the driver: config -> data check -> Ray -> MLflow run -> TorchTrainer(train_func).fit() -> export.

The driver plans nothing a worker needs frozen: it sends the resolved config and the number of
readable training images, and every worker derives its plan and schedules (``core.plan.RunPlan``).
Whatever happens, the MLflow run ends with the right status (FINISHED, FAILED, or KILLED on Ctrl-C).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch

from pipeline.config import Config, dump_config
from pipeline.core.checkpoint import (
    STATE_FILE,
    backbone_state,
    checkpoint_step,
    is_uri,
    join_location,
    load_state,
    local_checkpoint,
    upload_file,
)
from pipeline.core.images import BadRecord
from pipeline.core.plan import RunPlan
from pipeline.core.step import NonFiniteLossError
from pipeline.data.labelled import has_labelled
from pipeline.data.ray_dataset import build_train_dataset, start_cache
from pipeline.data.read_units import list_units
from pipeline.data.shard_reads import check_shards
from pipeline.data.shards import PrepareError, read_manifest
from pipeline.data.warm_up import warm_data_workers
from pipeline.tracking import Tracker, TrackingError, is_file_store, resolve_tracking_uri
from pipeline.train.cluster import available_cpus, connect, train_log_level, train_runtime_env, verbose
from pipeline.train.progress import mark, startup_marks, startup_phases
from pipeline.train.sync import TargetsOutOfSyncError, readable_line
from pipeline.train.worker import train_func


class TrainingError(RuntimeError):
    """The run could not finish; the message is one line saying why."""


# Errors every rank stopped on together (``train.sync.StopRun``), raised again here by name.
STOP_ERRORS: dict[str, type[Exception]] = {
    "NonFiniteLossError": NonFiniteLossError,
    "TargetsOutOfSyncError": TargetsOutOfSyncError,
    "PrepareError": PrepareError,
    "BadRecord": BadRecord,
}


# ---------------------------------------------------------------------------------------------
# Data check (before any worker starts)
# ---------------------------------------------------------------------------------------------


def readable_train_data(cfg: Config) -> tuple[int, list[dict] | None, int]:
    """(readable training images, readable shards or None for an image folder, records lost to skipped shards).

    Every shard's footer and row count are checked against the manifest: with ``data.on_bad_record=fail`` an
    unreadable shard stops the run here, naming it; with ``skip`` it is left out with a warning and
    its manifest rows count as bad records.
    """
    path = cfg.data.path
    try:
        read_manifest(path)
    except PrepareError:
        return sum(u.rows for u in list_units(path)), None, 0  # an image folder (or an error naming the path)
    good, unreadable = check_shards(path, "train")
    for shard in unreadable:
        message = f"shard {shard.path} of {path} is unreadable ({shard.reason})"
        if cfg.data.on_bad_record == "fail":
            raise PrepareError(
                f"{message}; re-run `byol prepare ... --out {path} --overwrite`, or set data.on_bad_record=skip"
            )
        print(f"[byol] WARNING: {message}: skipped, its {shard.rows} records counted as bad", flush=True)
    if not good:
        raise PrepareError(f"{path}: no readable shard in the train split; re-run `byol prepare`")
    return sum(s["rows"] for s in good), good, sum(s.rows for s in unreadable)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def export_backbone(checkpoint: str | Path, out: str | Path) -> str:
    """The online encoder's state_dict (what BYOL keeps), loadable into torchvision / SmallCNN / SmallResNet.

    ``checkpoint`` and ``out`` may be local paths or URIs (s3://, gs://, file://).
    """
    backbone = backbone_state(load_state(checkpoint))
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(backbone, Path(tmp) / "backbone.pt")
        return upload_file(Path(tmp) / "backbone.pt", str(out))


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


def checkpoint_location(checkpoint, storage: str, name: str) -> str:
    """A Ray ``Checkpoint``'s location as the user can pass it back: a local path, or a URI on remote storage
    (built from ``run.storage_path`` as given, so a host, port or query in it is kept)."""
    if not is_uri(storage):
        return checkpoint.path
    return join_location(storage, name, Path(checkpoint.path).name)


def failure_notice(max_failures: int):
    """A Ray Train callback (runs in the controller) that says on the console when a worker is lost."""
    from ray.train import UserCallback

    class FailureNotice(UserCallback):
        def __init__(self) -> None:
            self.step, self.checkpoint_step, self.failures = 0, None, 0

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics and "step" in metrics[0]:
                self.step = int(metrics[0]["step"])
                if checkpoint is not None:
                    self.checkpoint_step = self.step

        def after_exception(self, run_context, worker_exceptions) -> None:
            self.failures += 1
            ranks = sorted(worker_exceptions)
            why = readable_line(str(worker_exceptions[ranks[0]])) or "worker died"
            if self.failures <= max_failures:
                start = (
                    f"checkpoint step {self.checkpoint_step}"
                    if self.checkpoint_step
                    else "the start (no checkpoint yet)"
                )
                then = f"restarting from {start} ({self.failures}/{max_failures})"
            else:
                then = f"no restarts left (run.max_failures={max_failures})"
            print(f"[byol] worker lost at step {self.step} (rank(s) {ranks}: {why[:200]}); {then}", flush=True)

    return FailureNotice()


def refuse_local_store_on_multinode(tracking_uri: str) -> None:
    """A SQLite/file store lives on this machine: rank 0 on another node would write elsewhere, silently.
    (An autoscaling cluster may have one node now and more later: rank 0 checks its node again at setup.)"""
    if not is_file_store(tracking_uri):
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        raise TrackingError(
            f"MLflow store {tracking_uri} is a file on the driver's machine, but the cluster has {len(nodes)} nodes: "
            "rank 0 may run elsewhere and lose its metrics. Run `mlflow server --backend-store-uri "
            "sqlite:///PATH/mlflow.db --host 0.0.0.0` where every node can reach it and set "
            "tracking.uri=http://HOST:5000 (or MLFLOW_TRACKING_URI)"
        )


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def pretrain(
    cfg: Config,
    resume: str | None = None,
    stop_step: int | None = None,
    callbacks: list | None = None,
    train_loop=train_func,
    track: bool = True,
) -> dict[str, Any]:
    """Run (or continue) one pretraining job; returns the summary printed by ``byol pretrain --json``
    (plus ``history``, the metrics of every log step).

    ``resume``: a checkpoint path or URI to continue from (same step, same schedules). ``stop_step``:
    stop at this global step (the schedules keep the whole run's budget). ``train_loop``: the worker
    function (tests wrap ``train_func`` to inject faults). ``track=False``: no MLflow run (a tuning
    trial's chunk: the study logs its trials from one process).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    mark("pretrain")
    t = cfg.train
    if not is_uri(cfg.data.path):  # Ray workers run in other directories
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(Path(cfg.data.path).resolve())})})
    storage = cfg.run.storage_path if is_uri(cfg.run.storage_path) else str(Path(cfg.run.storage_path).resolve())
    name = cfg.run.name or time.strftime("byol-%Y%m%d-%H%M%S")
    num_images, shards, lost_records = readable_train_data(cfg)
    plan = RunPlan.from_config(cfg, num_images)
    start_step = 0
    if resume:  # a missing checkpoint fails here, before any worker starts
        with local_checkpoint(resume) as local:
            if not (local / STATE_FILE).is_file():
                raise FileNotFoundError(f"--resume {resume}: not a byol checkpoint (no {STATE_FILE})")
            start_step = checkpoint_step(local)
    tracking_uri = resolve_tracking_uri(cfg.tracking.uri, storage if not is_uri(storage) else "runs")

    store = Tracker.prepare_store(tracking_uri, cfg.tracking.experiment) if track else None
    started_ray = connect(t.num_workers, t.cpus_per_worker)
    mark("ray_ready")
    tracker, status, staging, cache = None, "FAILED", None, None
    try:
        epochs = plan.epochs_to_train(start_step, stop_step)
        cache = None if cfg.data.deterministic else start_cache(cfg, num_images, epochs)
        run_id = None
        if track:
            refuse_local_store_on_multinode(tracking_uri)
            store.join(timeout=60)  # an unreachable server: create_run below says so
            try:
                run_id = Tracker.create_run(tracking_uri, cfg.tracking.experiment, name)
            except Exception as exc:  # an unreachable server must not stop the job
                print(f"[byol] WARNING: MLflow unavailable at {tracking_uri} ({type(exc).__name__}); not tracking")
        tracker = Tracker(tracking_uri, run_id)
        tracker.log_params({**cfg.flat(), **{f"plan.{k}": v for k, v in plan.summary().items()}})
        run_dir = join_location(storage, name)
        staging = Path(tempfile.mkdtemp(prefix="byol-run-")) if is_uri(storage) else Path(run_dir)
        staging.mkdir(parents=True, exist_ok=True)

        def publish(local: Path) -> str:
            """An output file of the run: next to its checkpoints, and in the MLflow run."""
            tracker.log_artifact(local)
            return upload_file(local, join_location(run_dir, local.name))

        (staging / "config.yaml").write_text(dump_config(cfg))
        publish(staging / "config.yaml")

        mark("tracking_ready")
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "config": cfg.to_dict(),
                "num_train_images": num_images,
                "shards": shards,
                "lost_records": lost_records,
                "knn": has_labelled(cfg.data.path, "val"),
                "driver_node": ray.get_runtime_context().get_node_id(),
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
                callbacks=[failure_notice(cfg.run.max_failures), *(callbacks or [])],
                logging_config=LoggingConfig(log_level=train_log_level()),
            ),
            # Seeded from the start step: a resumed run (a tuning chunk) does not replay epoch 0's file order.
            # The deterministic reader reads shards itself: no Ray Data pipeline (and its coordinator) to start.
            datasets=None
            if cfg.data.deterministic
            else {
                "train": build_train_dataset(
                    cfg,
                    seed=t.seed + start_step,
                    batch_size=plan.micro_batch,
                    shards=shards,
                    # one spare epoch: bad records or uneven ranks may need it; only what is read ahead is read
                    epochs=epochs + 1,
                    cache=cache,
                )
            },
            dataset_config=None if cfg.data.deterministic else DataConfig(datasets_to_split=["train"]),
        )
        if started_ray and not cfg.data.deterministic and (runtime_env := train_runtime_env()) is not None:
            # On a cluster this run started: the stream's first tasks get processes that imported torch while
            # Train's controller and workers started (first batch 5.8-6.5 s -> 1.7-1.8 s after setup on 2 cores).
            warm_data_workers(min(available_cpus(), 4), runtime_env)
        mark("fit")
        try:
            result = trainer.fit()
        except Exception as exc:
            why = readable_line(str(exc)) or type(exc).__name__
            raise TrainingError(
                f"training failed after {cfg.run.max_failures} restart(s) allowed by run.max_failures: {why}"
            ) from exc
        out = result.return_value or {}
        if "error" in out:  # every rank stopped together (data error, divergence, targets out of sync)
            error = out["error"]
            raise STOP_ERRORS.get(error["type"], TrainingError)(error["message"])
        checkpoint = checkpoint_location(result.checkpoint, storage, name) if result.checkpoint else None
        summary: dict[str, Any] = {
            "run_id": run_id,
            "run_name": name,
            "steps": out.get("steps"),
            "resumed_from_step": out.get("start_step"),
            "start_target_checksum": out.get("start_target_checksum"),
            "start_lr": out.get("start_lr"),
            "start_tau": out.get("start_tau"),
            "total_steps": plan.total_steps,
            "checkpoint": checkpoint,
            "knn_top1": out.get("knn_top1"),
            "target_checksum": out.get("target_checksum"),
            "bad_records": out.get("bad_records") or 0,  # all ranks + skipped shards (counted in the worker)
            "bad_record_keys": out.get("bad_record_keys", []),
            # passes over the data this attempt started: the Ray stream's (epochs + 1 epochs each; another starts for
            # every rank when one rank's good rows run out), or the deterministic reader's epochs
            "data_passes": out.get("data_passes"),
            "tracking_uri": tracking_uri,
            "experiment": cfg.tracking.experiment,
            "precision": out.get("precision"),
            "first_step_at": out.get("first_step_at"),  # wall clock, for start-up / shut-down measurements
            "last_step_at": out.get("last_step_at"),
            # seconds from the command's start to the first step, by phase (each named by where it ends)
            "startup_s": startup_phases({**startup_marks(), **(out.get("timeline") or {})}),
        }
        if verbose():
            phases = ", ".join(f"{k} {v:.1f} s" for k, v in summary["startup_s"].items())
            print(f"[byol] start-up {sum(summary['startup_s'].values()):.1f} s: {phases}", flush=True)
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as d:
                torch.save(backbone_state(load_state(d)), staging / "backbone.pt")
            summary["backbone"] = publish(staging / "backbone.pt")
            tracker.set_tag("checkpoint", checkpoint)
        if plot_history(out.get("history", []), staging / "curves.png"):
            publish(staging / "curves.png")
        (staging / "summary.json").write_text(json.dumps(summary, indent=2))
        publish(staging / "summary.json")
        status = "FINISHED"
        return {**summary, "history": out.get("history", [])}
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracker is not None:
            tracker.finish(status)
        if staging is not None and is_uri(storage):
            shutil.rmtree(staging, ignore_errors=True)
        if cache is not None and not started_ray:  # a joined cluster: free its object store now
            ray.kill(cache)
        if started_ray:
            ray.shutdown()
