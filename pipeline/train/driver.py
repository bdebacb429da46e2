"""``byol pretrain``, the driver, in named stages::

    resolve_run      config -> absolute paths, run name, data check, plan, resume step (no Ray yet)
    connect          join the cluster in RAY_ADDRESS or start a local one
    open_tracking    the MLflow run (a run whose store is unreachable trains untracked)
    build_trainer    TorchTrainer(train_func) with the Ray Data stream as its dataset
    fit              Ray Train runs train_func on every worker; restarts from checkpoints on failures
    publish          summary, backbone, curves: next to the checkpoints and in the MLflow run

The driver plans nothing a worker needs frozen: it sends the resolved config and the number of readable
training images, and every worker derives its plan and schedules (``core.plan.RunPlan``). Cleanup is in one
place (an ``ExitStack``): the MLflow run ends FINISHED, FAILED or KILLED (Ctrl-C), the staging directory is
removed, and a Ray this run started is shut down.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from pipeline.config import Config, dump_config
from pipeline.core.checkpoint import STATE_FILE, backbone_state, checkpoint_step, load_state, local_checkpoint
from pipeline.core.models import check_networks
from pipeline.core.plan import RunPlan
from pipeline.core.storage import is_uri
from pipeline.data.data_config import resolve_data_config
from pipeline.data.labelled import has_labelled
from pipeline.data.ray_dataset import build_train_dataset, start_cache
from pipeline.data.read_units import readable_train_data
from pipeline.data.warm_up import warm_data_workers
from pipeline.errors import ConfigError, TrackingError, TrainingError
from pipeline.ray_compat import train_bound_to_this_cluster, train_controller_runtime_env
from pipeline.tracking import Tracker, is_file_store, resolve_tracking_uri, tracked_run
from pipeline.train.cluster import available_cpus, connect, train_log_level, verbose
from pipeline.train.outputs import RunOutputs, checkpoint_location, plot_history
from pipeline.train.progress import mark, startup_marks, startup_phases
from pipeline.train.sync import readable_line
from pipeline.train.worker import train_func


@dataclass(frozen=True)
class ResolvedRun:
    """Everything decided about a run before Ray starts."""

    cfg: Config  # data.path made absolute (Ray workers run in other directories)
    storage: str  # run.storage_path: absolute, or a URI
    name: str
    num_images: int  # readable training images
    shards: list[dict] | None  # readable manifest shards (None: an image folder)
    lost_records: int  # rows of shards left out as unreadable
    plan: RunPlan
    resume: str | None
    start_step: int
    stop_step: int | None
    tracking_uri: str
    data_line: str  # what the data keys were resolved to, and from what


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
    mark("pretrain")
    run = resolve_run(cfg, resume, stop_step)
    cfg = run.cfg  # the data keys resolved from the data, data.path absolute
    store = Tracker.prepare_store(run.tracking_uri, cfg.tracking.experiment) if track else None
    with contextlib.ExitStack() as cleanup:
        started_ray = connect(cfg.train.num_workers, cfg.train.cpus_per_worker)
        if started_ray:
            cleanup.callback(ray.shutdown)
        cleanup.enter_context(train_bound_to_this_cluster())  # Train's processes never find another Ray
        mark("ray_ready")
        epochs = run.plan.epochs_to_train(run.start_step, run.stop_step)
        cache = None if cfg.data.deterministic else start_cache(cfg, run.num_images, epochs)
        if cache is not None and not started_ray:  # a joined cluster: free its object store at the end
            cleanup.callback(ray.kill, cache)
        tracker = cleanup.enter_context(open_tracking(run, store, track))
        outputs = RunOutputs(run.storage, run.name, tracker)
        cleanup.callback(outputs.close)
        outputs.publish("config.yaml", lambda p: p.write_text(dump_config(cfg)))
        mark("tracking_ready")
        trainer = build_trainer(run, tracker.run_id, train_loop, callbacks, cache, epochs)
        if started_ray and not cfg.data.deterministic and (runtime_env := train_controller_runtime_env()) is not None:
            # The stream's first tasks get processes that imported torch while Train's workers started.
            warm_data_workers(min(available_cpus(), 4), runtime_env)
        mark("fit")
        result, out = fit(trainer, cfg)
        return publish(run, result, out, outputs, tracker)


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def resolve_run(cfg: Config, resume: str | None, stop_step: int | None) -> ResolvedRun:
    """Paths, name, the readable training data, the plan and the step to start from: every check that can fail
    without Ray fails here (a missing checkpoint, an unreadable shard)."""
    if not is_uri(cfg.data.path):
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(Path(cfg.data.path).resolve())})})
    cfg, data_line = resolve_data_config(cfg)  # unset data keys from the data; contradictions refused
    check_networks(cfg.model, cfg.data.channels, cfg.data.image_size)  # a bad backbone/init fails before Ray
    print(f"[byol] {data_line}", flush=True)
    storage = cfg.run.storage_path if is_uri(cfg.run.storage_path) else str(Path(cfg.run.storage_path).resolve())
    num_images, shards, lost_records = readable_train_data(cfg)
    start_step = 0
    if resume:
        with local_checkpoint(resume) as local:
            if not (local / STATE_FILE).is_file():
                raise ConfigError(f"--resume {resume}: not a byol checkpoint (no {STATE_FILE})")
            start_step = checkpoint_step(local)
    return ResolvedRun(
        cfg=cfg,
        storage=storage,
        name=cfg.run.name or time.strftime("byol-%Y%m%d-%H%M%S"),
        num_images=num_images,
        shards=shards,
        lost_records=lost_records,
        plan=RunPlan.from_config(cfg, num_images),
        resume=resume,
        start_step=start_step,
        stop_step=stop_step,
        tracking_uri=resolve_tracking_uri(cfg.tracking.uri, storage if not is_uri(storage) else "runs"),
        data_line=data_line,
    )


@contextlib.contextmanager
def open_tracking(run: ResolvedRun, store, track: bool) -> Iterator[Tracker]:
    """The run's MLflow run (none without ``track``), its parameters logged, ended with the run's status."""
    if track:
        refuse_local_store_on_multinode(run.tracking_uri)
        store.join(timeout=60)  # an unreachable server: tracked_run says so
    with tracked_run(run.tracking_uri, run.cfg.tracking.experiment, run.name, enabled=track) as tracker:
        tracker.log_params({**run.cfg.flat(), **{f"plan.{k}": v for k, v in run.plan.summary().items()}})
        tracker.set_tag("data.resolved", run.data_line[:5000])
        yield tracker


def build_trainer(run: ResolvedRun, run_id: str | None, train_loop, callbacks: list | None, cache, epochs: int):
    """A TorchTrainer of ``train_loop`` over the run's Ray Data stream (none for the deterministic reader)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg, t = run.cfg, run.cfg.train
    datasets, dataset_config = None, None
    if not cfg.data.deterministic:  # the deterministic reader reads shards itself, in the workers
        # Seeded from the start step: a resumed run (a tuning chunk) does not replay epoch 0's file order.
        # One spare epoch: bad records or uneven ranks may need it; only what is read ahead is read.
        stream = build_train_dataset(
            cfg,
            seed=t.seed + run.start_step,
            batch_size=run.plan.micro_batch,
            shards=run.shards,
            epochs=epochs + 1,
            cache=cache,
        )
        datasets, dataset_config = {"train": stream}, DataConfig(datasets_to_split=["train"])
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "config": cfg.to_dict(),
            "num_train_images": run.num_images,
            "shards": run.shards,
            "lost_records": run.lost_records,
            "knn": has_labelled(cfg.data.path, "val"),
            "cache": cache is not None,
            "driver_node": ray.get_runtime_context().get_node_id(),
            "resume": run.resume,
            "stop_step": run.stop_step,
            "run_id": run_id,
            "tracking_uri": run.tracking_uri,
        },
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=run.name,
            storage_path=run.storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=[failure_notice(cfg.run.max_failures), *(callbacks or [])],
            logging_config=LoggingConfig(log_level=train_log_level()),
        ),
        datasets=datasets,
        dataset_config=dataset_config,
    )


def fit(trainer, cfg: Config):
    """(Ray's result, rank 0's return value); the error every rank stopped on is raised as itself."""
    try:
        result = trainer.fit()
    except Exception as exc:
        why = readable_line(str(exc)) or type(exc).__name__
        raise TrainingError(
            f"training failed after {cfg.run.max_failures} restart(s) allowed by run.max_failures: {why}"
        ) from exc
    out = result.return_value or {}
    if "error" in out:  # every rank stopped together (data error, divergence, targets out of sync)
        raise out["error"]
    return result, out


def publish(run: ResolvedRun, result, out: dict[str, Any], outputs: RunOutputs, tracker: Tracker) -> dict[str, Any]:
    """The run's summary (``byol pretrain --json``), its backbone and curves, published; returns the summary
    plus ``history``."""
    checkpoint = checkpoint_location(result.checkpoint.path, run.storage, run.name) if result.checkpoint else None
    summary: dict[str, Any] = {
        "run_id": tracker.run_id,
        "run_name": run.name,
        "steps": out.get("steps"),
        "resumed_from_step": out.get("start_step"),
        "start_target_checksum": out.get("start_target_checksum"),
        "start_lr": out.get("start_lr"),
        "start_tau": out.get("start_tau"),
        "total_steps": run.plan.total_steps,
        "checkpoint": checkpoint,
        "knn_top1": out.get("knn_top1"),
        "target_checksum": out.get("target_checksum"),
        "bad_records": out.get("bad_records") or 0,  # all ranks + skipped shards (counted in the worker)
        "bad_record_keys": out.get("bad_record_keys", []),
        # passes over the data this attempt started: the Ray stream's (epochs + 1 epochs each; another starts for
        # every rank when one rank's good rows run out), or the deterministic reader's epochs
        "data_passes": out.get("data_passes"),
        "tracking_uri": run.tracking_uri,
        "experiment": run.cfg.tracking.experiment,
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
            state = backbone_state(load_state(d))
        summary["backbone"] = outputs.publish("backbone.pt", lambda p: torch.save(state, p))
        tracker.set_tag("checkpoint", checkpoint)
    history = out.get("history", [])
    if history:
        outputs.publish("curves.png", lambda p: plot_history(history, p))
    outputs.publish("summary.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
    return {**summary, "history": history}


# ---------------------------------------------------------------------------------------------
# Checks and callbacks
# ---------------------------------------------------------------------------------------------


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
