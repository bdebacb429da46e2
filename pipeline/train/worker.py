"""The Ray Train worker: ``train_func(config)`` runs on every data-parallel rank.

One batch, top-down::

    Ray Data shard (or the deterministic reader) --iter_train_batches--> full (view1, view2) batches
      -> RankSync.agree_to_step        every rank has a batch (else all end the epoch), no data error
      -> train_step (core)             forward both views, summed symmetric loss, DDP backward,
                                       optimizer step, EMA update of the target with tau(step)
      -> RankSync.check_finite         a NaN/Inf on any rank stops every rank (CPU: each step; GPU: log steps)
      -> check_targets_in_sync         every ema.check_every steps: SHA-256 of the targets across ranks
      -> log / kNN / checkpoint        metrics read from the device only here (``report_step``)

Split the way DINO splits ``train_dino``/``train_one_epoch``: ``setup_run`` (networks, optimizer,
restore), ``run_steps`` (the step loop), ``save_and_report`` (checkpoint + ``ray.train.report``).
The run trains from its start (or a checkpoint) to ``stop_step``, so a tuning trial can train in chunks.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from pipeline.config import Config, config_from_dict
from pipeline.core.checkpoint import build_state, last_metric, load_state, restore_state, save_state
from pipeline.core.images import to_device
from pipeline.core.models import TargetNetwork, build_networks, state_checksum
from pipeline.core.optim import build_optimizer, set_lr
from pipeline.core.plan import RunPlan
from pipeline.core.step import autocast_dtype, compile_forwards, precision_name, train_step, unwrap
from pipeline.data.bad_records import BadRecordLog
from pipeline.data.deterministic_reader import DeterministicReader
from pipeline.data.ray_dataset import iter_train_batches
from pipeline.errors import DataError, TargetsOutOfSyncError
from pipeline.evaluation.monitor import KnnMonitor
from pipeline.tracking import Tracker
from pipeline.train.cluster import quiet_report_logs
from pipeline.train.progress import Eta, Window, print_progress
from pipeline.train.sync import RankSync, StopRun, check_targets_in_sync

Views = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TrainingRun:
    """The state one worker trains: networks, optimizer, where it is, and what it has measured."""

    cfg: Config
    plan: RunPlan
    device: torch.device
    online: nn.Module  # DDP-wrapped OnlineNetwork
    target: TargetNetwork
    optimizer: torch.optim.Optimizer
    step: int = 0
    start_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    last_knn: float | None = None
    last_checkpoint_step: int | None = None
    checksum: str = ""
    start_checksum: str = ""  # the target's at the start (a tuning test checks an exploit copied the source's)
    start_lr: float = 0.0  # the optimizer's learning rate after setup (a PBT mutation must be in it)
    bad_records_before: float = 0.0  # skipped shards' rows + what earlier attempts counted (from the checkpoint)
    first_step_at: float | None = None  # wall clock (time.time()) after the first step: start-up is measured to here
    last_step_at: float | None = None  # ... and after the last optimizer step: shut-down from here
    timeline: dict[str, float] = field(default_factory=dict)  # start-up marks (wall clock): driver.pretrain's startup_s
    autocast: torch.dtype | None = None  # train.precision resolved for this device, once (read every step)
    # Passes started over the data in this attempt: on the Ray path one pass is the whole stream (epochs + 1
    # epochs), normally 1, more when a rank's share of good rows ran out early; on the deterministic reader, epochs.
    data_passes: int = 0


# ---------------------------------------------------------------------------------------------
# Setup and restore
# ---------------------------------------------------------------------------------------------


def setup_run(cfg: Config, plan: RunPlan, device: torch.device, resume: str | None) -> TrainingRun:
    """Networks (same seed on every rank; DDP also broadcasts rank 0's weights), optimizer, and the state
    to continue from: Ray's checkpoint after a worker-group restart, else ``resume`` (a path or URI)."""
    torch.manual_seed(cfg.train.seed)
    online, target = build_networks(cfg.model, cfg.data.channels)
    if device.type == "cuda":
        # Cross-device BN, as every multi-device BYOL anchor (SyncBatchNorm raises on CPU DDP).
        online = nn.SyncBatchNorm.convert_sync_batchnorm(online)
        target = nn.SyncBatchNorm.convert_sync_batchnorm(target)
    online = ray.train.torch.prepare_model(online.to(memory_format=torch.channels_last))
    target = ray.train.torch.prepare_model(target.to(memory_format=torch.channels_last), parallel_strategy=None)
    if cfg.train.compile:  # in place: the parameters, state_dict keys and the eager EMA/optimizer are unchanged
        compile_forwards(online, target)
    optimizer = build_optimizer(unwrap(online), cfg.optim, plan.schedule.peak_lr)
    state, restarted = None, False
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # Ray restarted the group after a failure, or the run was started again
        with checkpoint.as_directory() as d:
            state, restarted = load_state(d, map_location=device), True
    elif resume:
        state = load_state(resume, map_location=device)
    # Every rank loads the same state after DDP's broadcast, and the optimizer's on the parameters' device.
    step, history = restore_state(state, unwrap(online), target, optimizer) if state is not None else (0, [])
    # The restored optimizer holds this run's learning rate from the start (a PBT mutation of optim.base_lr
    # included); the schedule continues from the restored step: no new warmup, no tau restart.
    set_lr(optimizer, plan.schedule.lr(step))
    run = TrainingRun(cfg, plan, device, online, target, optimizer, step=step, start_step=step, history=history)
    run.autocast = autocast_dtype(cfg.train.precision, device)
    run.last_knn = last_metric(history, "knn_top1")
    run.bad_records_before = last_metric(history, "bad_records") or 0.0
    run.last_checkpoint_step = step if state is not None else None
    run.checksum = run.start_checksum = state_checksum(target)
    run.start_lr = optimizer.param_groups[0]["lr"]
    if restarted and ray.train.get_context().get_world_rank() == 0:
        print(f"[byol] resuming from checkpoint step {step} (Ray restarted the worker group)", flush=True)
    return run


# ---------------------------------------------------------------------------------------------
# The step loop
# ---------------------------------------------------------------------------------------------


def epoch_batches(run: TrainingRun, shard, reader: DeterministicReader | None, bad: BadRecordLog) -> Iterator[Views]:
    """One pass over this rank's data: Ray Data's stream, or the deterministic reader from the right batch."""
    plan, accum = run.plan, run.cfg.train.grad_accum
    if reader is None:
        return iter_train_batches(shard, plan.micro_batch, run.cfg, run.device, bad)
    skip = (run.step % plan.steps_per_epoch) * accum  # resumable mid-epoch
    epoch = run.step // plan.steps_per_epoch
    return (
        (to_device(v1, run.device), to_device(v2, run.device))
        for v1, v2 in reader.epoch(epoch, plan.micro_batch, plan.steps_per_epoch * accum, skip, bad)
    )


def next_micro_batches(batches: Iterator[Views], accum: int, window: Window) -> tuple[list[Views], Exception | None]:
    micro: list[Views] = []
    t0 = time.perf_counter()
    try:
        for _ in range(accum):
            views = next(batches, None)
            if views is None:
                break
            micro.append(tuple(v.contiguous(memory_format=torch.channels_last) for v in views))
    except Exception as exc:  # a data error (bad record under "fail", unreadable file): stop all ranks
        return [], exc
    finally:
        window.wait += time.perf_counter() - t0
    return micro, None


def run_steps(
    run: TrainingRun,
    stop_step: int,
    shard,
    reader: DeterministicReader | None,
    sync: RankSync,
    tracker: Tracker,
    knn: KnnMonitor | None,
    cached: bool = False,
) -> BadRecordLog:
    """Train from ``run.step`` to ``stop_step``; every rank takes exactly the same steps. ``cached``: the stream
    reads through the decoded cache, which this attempt's first epoch fills (the ETA says so)."""
    cfg, plan = run.cfg, run.plan
    bad, window = BadRecordLog(), Window()
    eta = Eta(run.step, fill_until=run.step + plan.steps_per_epoch if cached else None)
    check_every_step = run.device.type != "cuda"  # reading the loss is free on CPU, a device sync on GPU
    while run.step < stop_step:
        batches = epoch_batches(run, shard, reader, bad)
        run.data_passes += 1
        steps_this_pass = 0
        while run.step < stop_step:
            micro, error = next_micro_batches(batches, cfg.train.grad_accum, window)
            if run.first_step_at is None:  # the first batch's arrival, once (no clock read on later steps)
                run.timeline["worker_first_batch"] = time.time()
            if not sync.agree_to_step(len(micro) == cfg.train.grad_accum, error):
                break  # some rank's pass is over: every rank starts the next epoch now
            metrics = train_step(
                run.online, run.target, run.optimizer, micro, run.step, plan.schedule, run.autocast, check_finite=False
            )
            window.images += sum(v1.shape[0] for v1, _ in micro) * sync.world
            run.step += 1
            run.last_step_at = time.time()  # the step is queued on a GPU: start-up/shut-down figures, not step times
            run.first_step_at = run.first_step_at or run.last_step_at
            steps_this_pass += 1
            at_end = run.step == stop_step
            is_log = (
                run.step % cfg.log.every_steps == 0
                or run.step % cfg.ema.check_every == 0
                or run.step % cfg.checkpoint.every_steps == 0
                or is_eval_step(run, at_end)
                or at_end
            )
            if check_every_step or is_log:
                sync.check_finite(metrics["loss"], run.step, run.last_checkpoint_step)
            if run.step % cfg.ema.check_every == 0 or at_end:
                run.checksum = check_targets_in_sync(unwrap(run.target), run.step, sync)
            if is_log:
                report_step(run, metrics, window, bad, sync, tracker, knn, at_end, stop_step, eta)
                window = Window()
        if steps_this_pass == 0:
            total_bad = sync.total(bad.count)
            raise StopRun(
                DataError(
                    f"data.path {cfg.data.path}: the train split yielded no full batch of {plan.micro_batch} "
                    f"images on at least one rank ({total_bad:.0f} bad records skipped); check the data or "
                    "re-run `byol prepare`"
                )
            )
    return bad


def is_eval_step(run: TrainingRun, at_end: bool) -> bool:
    if run.cfg.eval.every_steps:
        return at_end or run.step % run.cfg.eval.every_steps == 0
    every = run.cfg.eval.every_epochs
    epoch_end = run.step % run.plan.steps_per_epoch == 0
    return at_end or (every > 0 and epoch_end and (run.step // run.plan.steps_per_epoch) % every == 0)


def report_step(
    run: TrainingRun,
    metrics: dict[str, Any],
    window: Window,
    bad: BadRecordLog,
    sync: RankSync,
    tracker: Tracker,
    knn: KnnMonitor | None,
    at_end: bool,
    stop_step: int,
    eta: Eta,
) -> None:
    """A log step: read the metrics off the device, kNN at epoch ends, print, track, report, checkpoint."""
    cfg, step = run.cfg, run.step
    out: dict[str, Any] = {
        "loss": float(metrics["loss"]),
        "collapse_std": float(metrics["collapse_std"]),
        "lr": metrics["lr"],
        "tau": metrics["tau"],
        "step": step,
        "epoch": step / run.plan.steps_per_epoch,
        **window.rates(),
        "bad_records": run.bad_records_before + sync.total(bad.count),  # all ranks, skipped shards, earlier attempts
    }
    if knn is not None and is_eval_step(run, at_end):
        run.last_knn = knn(unwrap(run.online).encoder)
        out["knn_top1"] = run.last_knn
    if sync.rank == 0:
        print_progress(out, stop_step, run.last_knn, eta)
        if out["collapse_std"] < cfg.log.collapse_warn:
            print(
                f"[byol] WARNING: collapse monitor {out['collapse_std']:.3f} < {cfg.log.collapse_warn} at step "
                f"{step}: representations are collapsing",
                flush=True,
            )
    tracker.log_metrics({k: v for k, v in out.items() if k != "step"}, step)
    run.history.append({k: v for k, v in out.items() if isinstance(v, int | float)})
    out["target_checksum"] = run.checksum
    if step % cfg.checkpoint.every_steps == 0 or at_end:
        save_and_report(run, out, sync.rank)
    else:
        ray.train.report(out)


def save_and_report(run: TrainingRun, metrics: dict[str, Any], rank: int) -> None:
    """Rank 0 writes the checkpoint (layout: ``core.checkpoint.build_state``); every rank reports."""
    name = f"step_{run.step:08d}"
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    state = build_state(
        run.cfg, run.step, run.plan.steps_per_epoch, unwrap(run.online), unwrap(run.target), run.optimizer, run.history
    )
    with tempfile.TemporaryDirectory() as tmp:
        save_state(Path(tmp) / "ckpt", state, run.cfg)
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(str(Path(tmp) / "ckpt")), checkpoint_dir_name=name
        )
    run.last_checkpoint_step = run.step


# ---------------------------------------------------------------------------------------------
# The training function (every Ray Train worker)
# ---------------------------------------------------------------------------------------------


def check_tracking_node(config: dict[str, Any], rank: int) -> None:
    """A file-backed MLflow store lives on the driver's node: rank 0 elsewhere (an autoscaled worker node)
    would write to a file nobody reads, so the run stops instead of losing its tracking silently."""
    from pipeline.errors import TrackingError
    from pipeline.tracking import is_file_store

    if rank != 0 or not config.get("run_id") or not is_file_store(config["tracking_uri"]):
        return
    here = ray.get_runtime_context().get_node_id()
    if config.get("driver_node") and here != config["driver_node"]:
        raise TrackingError(
            f"MLflow store {config['tracking_uri']} is a file on the driver's node, but rank 0 runs on another node: "
            "run `mlflow server` where every node can reach it and set tracking.uri=http://HOST:5000"
        )


def train_func(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's per-worker function. ``config`` (from the driver):

    config            the resolved run config (dict)
    num_train_images  readable training images (the plan and schedules are derived here from it)
    shards, lost_records   the readable manifest shards (deterministic reader) and the rows of skipped ones
    knn               whether to run the kNN monitor (decided once, by the driver)
    cache             whether the stream reads through the decoded cache (filled by this attempt's first epoch)
    driver_node       the driver's Ray node id (a file-backed MLflow store must be written from there)
    resume            a checkpoint path/URI to continue from (ignored after a Ray restart: Ray's wins)
    stop_step         train up to this global step (None: the whole budget)
    run_id, tracking_uri   the MLflow run rank 0 logs to

    Rank 0 returns the summary (or ``{"error": ...}`` when every rank stopped together); others None.
    """
    started = time.time()
    quiet_report_logs()  # in this worker process
    cfg = config_from_dict(config["config"])
    ctx = ray.train.get_context()
    plan = RunPlan.from_config(cfg, config["num_train_images"], ctx.get_world_size())
    stop_step = plan.stop_step(config.get("stop_step"))
    device = ray.train.torch.get_device()
    if device.type != "cuda":
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    sync, run = RankSync(), None
    # First: Ray Data's split coordinator (a new process) starts while this worker builds its networks.
    shard = ray.train.get_dataset_shard("train") if not cfg.data.deterministic else None
    try:
        setup_error = None
        try:
            run = setup_run(cfg, plan, device, config.get("resume"))
            if not run.history:  # a fresh start: the rows of shards the driver left out are bad records too
                run.bad_records_before = float(config.get("lost_records", 0))
            # Whether to evaluate is decided by the driver, the same for every rank (the monitor exchanges data).
            knn = KnnMonitor(cfg, device, sync, run.autocast) if config.get("knn", False) else None
            reader = None
            if cfg.data.deterministic:
                reader = DeterministicReader(cfg, sync.rank, sync.world, shards=config.get("shards"))
            check_tracking_node(config, sync.rank)
        except Exception as exc:  # a setup error on one rank must not leave the others waiting in a collective
            setup_error = exc
        # Nothing above calls a collective: a rank that failed must meet the others here, at the first one.
        sync.agree_to_step(True, setup_error)  # raises StopRun on every rank if any rank failed
        if knn is not None:
            try:
                knn.check_sample()
            except DataError as exc:  # the same on every rank
                raise StopRun(exc) from None
        tracker = Tracker(config["tracking_uri"], config.get("run_id"), enabled=sync.rank == 0)
        if run.step > 0:
            tracker.continue_after("loss")
        run.timeline.update(worker_started=started, worker_ready=time.time())
        if sync.rank == 0:
            print(
                f"[byol] {sync.world} worker(s): steps {run.step} -> {stop_step} of {plan.total_steps} "
                f"({plan.steps_per_epoch}/epoch), batch {cfg.train.batch_size} = {sync.world} x {plan.micro_batch} "
                f"x {cfg.train.grad_accum}, {precision_name(run.autocast)}",
                flush=True,
            )
        bad = run_steps(run, stop_step, shard, reader, sync, tracker, knn, cached=bool(config.get("cache")))
    except (StopRun, TargetsOutOfSyncError) as stop:
        error = stop.error if isinstance(stop, StopRun) else stop
        steps = run.step if run is not None else None
        return {"error": error, "steps": steps} if sync.rank == 0 else None
    keys = [k for ks in sync.gather_objects(bad.first_keys) for k in ks][:10]
    total_bad = run.bad_records_before + sync.total(bad.count)
    if sync.rank != 0:
        return None
    tracker.set_tag("target_checksum", run.checksum)
    tracker.set_tag("precision", precision_name(run.autocast))  # what train.precision=auto resolved to
    return {
        "steps": run.step,
        "start_step": run.start_step,  # > 0 when this attempt resumed (Ray restart after a failure, or --resume)
        "start_target_checksum": run.start_checksum,
        "start_lr": run.start_lr,
        "start_tau": plan.schedule.tau(run.start_step),
        "target_checksum": run.checksum,
        "knn_top1": run.last_knn,
        "bad_records": int(total_bad),
        "bad_record_keys": keys,
        "data_passes": run.data_passes,
        "precision": precision_name(run.autocast),
        "first_step_at": run.first_step_at,
        "last_step_at": run.last_step_at,
        "timeline": {**run.timeline, "first_step": run.first_step_at},
        "history": run.history,
    }
