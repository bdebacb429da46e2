"""``byol tune``, the study driver: which tau and learning-rate schedules should this data be pretrained with?

    tune config -> data check (before Ray) -> concurrency -> MLflow parent run -> Tuner(run_trial) .fit()
      -> table, best config YAML (runs with ``byol pretrain --config``), plot, JSON

``byol tune --resume STUDY_PATH`` continues a study whose driver died: the config and the parent run saved in
``STUDY_FILE`` at its start, Tune's ``Tuner.restore`` (finished trials kept, unfinished and errored ones resumed
from their last checkpoints), the same parent and nested MLflow runs.

Trials are scored by the weighted-kNN top-1 of the online encoder on the labelled val split (the code of
``byol eval``), never by the BYOL loss: a collapsed network has the lowest loss. Collapsed trials are stopped.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from pipeline.config import Config
from pipeline.core.models import check_networks
from pipeline.core.plan import RunPlan
from pipeline.core.storage import is_uri, join_location, read_bytes, write_bytes
from pipeline.data.data_config import resolve_data_config
from pipeline.data.labelled import has_labelled
from pipeline.data.manifest import read_manifest
from pipeline.data.read_units import readable_train_data
from pipeline.errors import ConfigError, DataError, StudyError
from pipeline.tracking import resolve_tracking_uri, tracked_run
from pipeline.train.cluster import available_cpus, cluster_address, connect
from pipeline.tune.monitor import STATE_FILE, CollapseRule, StudyMonitor, TrialStopper
from pipeline.tune.space import METRIC, TuneSection, search_bounds, search_key, study_from_dict, tune_space
from pipeline.tune.stall import StallWatch, stalled_since
from pipeline.tune.summary import format_table, summarize
from pipeline.tune.trial import StudySpec, run_trial, study_storage

# Not at the top of the study folder: Tune copies the .json/.pkl files there to its staging folder on a restore
# and uploads them back at every sync, over anything written since.
STUDY_FILE = "byol/study.json"  # in <run.storage_path>/<study>: what `byol tune --resume` continues from
DRIVER_RESOURCE = "tune_driver"  # trial drivers take this, not a CPU (a CPU each would starve 2-core machines)


def trial_cpus(cfg: Config) -> float:
    """CPUs one trial keeps busy: its train workers, plus one for its Ray Data pipeline."""
    return cfg.train.num_workers * cfg.train.cpus_per_worker + (0 if cfg.data.deterministic else 1)


def choose_concurrency(
    cfg: Config, study: TuneSection, cpus: float, gpus: float, driver_cpu: float = 0.0
) -> tuple[int, str]:
    """How many trials run at once: what the cluster's CPUs (and GPUs) fit, capped by the study."""
    per_trial = trial_cpus(cfg) + driver_cpu
    fit = int(cpus // per_trial)
    why = f"{cpus:g} CPUs / {per_trial:g} per trial"
    if cfg.train.use_gpu:
        gpu_fit = int(gpus // cfg.train.num_workers)
        why += f", {gpus:g} GPUs / {cfg.train.num_workers} per trial"
        fit = min(fit, gpu_fit)
    n = max(1, fit)
    if study.max_concurrent_trials is not None and study.max_concurrent_trials < n:
        n, why = study.max_concurrent_trials, f"tune.max_concurrent_trials={study.max_concurrent_trials}"
    return n, why


def build_scheduler(study: TuneSection, budget_epochs: float):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if study.scheduler == "asha":
        return ASHAScheduler(
            time_attr="epoch",
            max_t=budget_epochs,
            grace_period=study.asha.grace_epochs,
            reduction_factor=study.asha.reduction_factor,
        )
    if study.scheduler == "pbt":
        space = tune_space(study)
        mutations = {}
        for key in study.pbt.mutate:
            name = search_key(key, study.space[key])
            mutations[name] = space[name]
        return PopulationBasedTraining(
            time_attr="epoch",
            perturbation_interval=study.pbt.interval_epochs,
            hyperparam_mutations=mutations,
            quantile_fraction=study.pbt.quantile_fraction,
            resample_probability=study.pbt.resample_probability,
            synch=study.pbt.synch,
        )
    return FIFOScheduler()


def build_searcher(study: TuneSection, concurrency: int):
    """Optuna (capped by ``TuneConfig.max_concurrent_trials``), or random/grid variants with their own cap (Tune
    ignores ``max_concurrent_trials`` for a variant generator passed as ``search_alg``)."""
    if study.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=study.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=study.seed, max_concurrent=concurrency)


def tensorboard_scalars():
    """Tune's TensorBoard logger without the list-valued ``log_history`` (it warns on every result otherwise)."""
    from ray.tune.logger import TBXLoggerCallback

    class ScalarsOnly(TBXLoggerCallback):
        def log_trial_result(self, iteration, trial, result):
            super().log_trial_result(iteration, trial, {k: v for k, v in result.items() if k != "log_history"})

    return ScalarsOnly()


def absolute_paths(cfg: Config) -> Config:
    """Trials run in their own working directories: data and storage paths must not be relative."""
    data = cfg.data.path if is_uri(cfg.data.path) else str(Path(cfg.data.path).resolve())
    storage = cfg.run.storage_path if is_uri(cfg.run.storage_path) else str(Path(cfg.run.storage_path).resolve())
    return cfg.model_copy(
        update={
            "data": cfg.data.model_copy(update={"path": data}),
            "run": cfg.run.model_copy(update={"storage_path": storage, "name": None}),
        }
    )


@dataclass(frozen=True)
class ResolvedStudy:
    """Everything decided about a study before Ray starts."""

    cfg: Config  # absolute data and storage paths, no run name (trials name themselves)
    name: str
    num_images: int
    classes: int
    plan: RunPlan
    budget_epochs: float
    tracking_uri: str
    data_line: str  # what the data keys were resolved to, and from what (the parent run's data.resolved tag)


@dataclass(frozen=True)
class StudyResources:
    started_ray: bool
    concurrency: int
    why: str  # what limits the concurrency, for the console
    driver_resources: dict[str, float]  # what each trial's driver process takes


@dataclass(frozen=True)
class ContinuedStudy:
    path: str  # <run.storage_path>/<study>: Tune's experiment folder
    parent_run_id: str | None


def resume_study(path: str) -> dict[str, Any]:
    """Continue the study at ``path`` (``byol tune --resume``) with the config it was started with."""
    path = path if is_uri(path) else str(Path(path).resolve())
    try:
        saved = json.loads(read_bytes(join_location(path, STUDY_FILE)))
    except OSError:
        raise ConfigError(
            f"--resume {path}: no {STUDY_FILE} there; give the study's folder, <run.storage_path>/<study name>"
        ) from None
    cfg, study = study_from_dict(saved["config"], f"{path}/{STUDY_FILE}")
    return run_study(cfg, study, ContinuedStudy(path, saved.get("parent_run_id")))


def run_study(cfg: Config, study: TuneSection, continued: ContinuedStudy | None = None) -> dict[str, Any]:
    """Run the study (or continue one); returns the summary ``byol tune --json`` prints."""
    started_at = time.time()
    resolved = resolve_study(cfg, study)
    with contextlib.ExitStack() as cleanup:
        resources = connect_for_study(resolved.cfg, study)
        if resources.started_ray:
            cleanup.callback(ray.shutdown)
        announce(resolved, study, resources)
        parent = cleanup.enter_context(
            tracked_run(
                resolved.tracking_uri,
                cfg.tracking.experiment,
                resolved.name,
                tags={"tune.study": resolved.name, "data.resolved": resolved.data_line[:5000]},
                run_id=continued.parent_run_id if continued else None,
            )
        )
        if continued is None:
            parent.log_params(study_params(resolved, study, resources.concurrency))
            save_study_file(resolved, study, parent.run_id)

        rule = CollapseRule(
            cfg.log.collapse_warn, study.collapse.patience, 1 / resolved.classes, study.collapse.chance_margin
        )
        state_file = join_location(resolved.cfg.run.storage_path, resolved.name, STATE_FILE)
        monitor = StudyMonitor(resolved.cfg, study, rule, resolved.tracking_uri, parent.run_id, state_file)
        if continued is None:
            monitor.save()  # a new study of an earlier one's name starts with an empty record
        need = f"{trial_cpus(resolved.cfg):g} CPU" + (f" + {cfg.train.num_workers} GPU" if cfg.train.use_gpu else "")
        study_path = join_location(resolved.cfg.run.storage_path, resolved.name)
        stall = StallWatch(study.stall_minutes, need, study_path)
        build_tuner(resolved, study, resources, monitor, TrialStopper(rule, stall), continued).fit()
        stalled = stall.reason or stalled_since(study_path, started_at)  # (a resumed study: Tune's restored copy)
        if stalled:
            raise StudyError(stalled)
        # A resumed study's callbacks are Tune's restored copies: the record they kept is read back from the file.
        monitor.load(json.loads(read_bytes(state_file)))
        staging = Path(tempfile.mkdtemp(prefix="byol-tune-"))
        cleanup.callback(shutil.rmtree, staging, ignore_errors=True)
        summary = summarize(resolved.cfg, study, monitor, staging, resolved.name, parent)
        summary.update(
            parent_run_id=parent.run_id,
            tracking_uri=resolved.tracking_uri,
            experiment=cfg.tracking.experiment,
            concurrency=resources.concurrency,
            minutes=round((time.time() - started_at) / 60, 2),
        )
        parent.log_metrics({f"best_{METRIC}": summary["best_knn_top1"], "minutes": summary["minutes"]}, 0)
        print(format_table(summary["trials"]), flush=True)
        print(
            f"[byol-tune] best: trial {summary['best_trial']} (val kNN top-1 {summary['best_knn_top1']:.4f}); "
            f"config {summary['best_config']}",
            flush=True,
        )
        return summary


def save_study_file(resolved: ResolvedStudy, study: TuneSection, parent_run_id: str | None) -> None:
    """The study's config (paths absolute, its name fixed) and parent run, for ``byol tune --resume``."""
    tree = {**resolved.cfg.to_dict(), "tune": {**study.model_dump(exclude_none=True), "name": resolved.name}}
    saved = {"config": tree, "parent_run_id": parent_run_id}
    write_bytes(join_location(resolved.cfg.run.storage_path, resolved.name, STUDY_FILE), json.dumps(saved).encode())


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def resolve_study(cfg: Config, study: TuneSection) -> ResolvedStudy:
    """Paths, name, the readable data, a labelled val split to score on, and a budget the reports fit in."""
    cfg, data_line = resolve_data_config(absolute_paths(cfg))  # every trial gets the same resolved data keys
    check_networks(cfg.model, cfg.data.channels, cfg.data.image_size)  # a bad backbone/init fails before Ray
    print(f"[byol-tune] {data_line}", flush=True)
    num_images, _, _ = readable_train_data(cfg)  # a bad shard fails here, before Ray starts
    if not has_labelled(cfg.data.path, "val"):
        raise DataError(
            f"data.path {cfg.data.path}: no labelled val split; trials are scored by kNN on it "
            "(`byol prepare --val-fraction 0.1`)"
        )
    plan = RunPlan.from_config(cfg, num_images)
    budget_epochs = plan.total_steps / plan.steps_per_epoch
    if study.report_every_epochs > budget_epochs or (
        study.scheduler == "pbt" and study.pbt.interval_epochs >= budget_epochs
    ):
        raise StudyError(
            f"the trial budget is {budget_epochs:g} epochs (train.epochs / train.max_steps): tune.report_every_epochs "
            "and tune.pbt.interval_epochs must be shorter"
        )
    storage = cfg.run.storage_path
    return ResolvedStudy(
        cfg=cfg,
        name=study.name or time.strftime("tune-%Y%m%d-%H%M%S"),
        num_images=num_images,
        classes=len(read_manifest(cfg.data.path).get("classes") or []) or 10,
        plan=plan,
        budget_epochs=budget_epochs,
        tracking_uri=resolve_tracking_uri(cfg.tracking.uri, storage if not is_uri(storage) else "runs"),
        data_line=data_line,
    )


def connect_for_study(cfg: Config, study: TuneSection) -> StudyResources:
    """Start a local Ray sized for the study's concurrency, or join a cluster and fit the concurrency to it."""
    if not ray.is_initialized() and not cluster_address():
        gpus = local_gpus() if cfg.train.use_gpu else 0
        concurrency, why = choose_concurrency(cfg, study, available_cpus(), gpus)
        started_ray = connect(
            concurrency * cfg.train.num_workers, cfg.train.cpus_per_worker, resources={DRIVER_RESOURCE: concurrency}
        )
        if started_ray:
            return StudyResources(started_ray, concurrency, why, {DRIVER_RESOURCE: 1})
        # joined the Ray already running on this machine: sized by whoever started it, counted like a cluster
    else:
        started_ray = connect()
    res = ray.cluster_resources()
    drivers = res.get(DRIVER_RESOURCE, 0)
    # Without the custom resource a driver takes a sliver of CPU, counted so the workers still fit.
    driver_resources = {DRIVER_RESOURCE: 1} if drivers >= 1 else {"CPU": 0.01}
    concurrency, why = choose_concurrency(
        cfg, study, res.get("CPU", 0), res.get("GPU", 0), driver_cpu=driver_resources.get("CPU", 0)
    )
    if 1 <= drivers < concurrency:
        concurrency, why = int(drivers), f"{drivers:g} {DRIVER_RESOURCE} resources on the cluster"
    return StudyResources(started_ray, concurrency, why, driver_resources)


def announce(resolved: ResolvedStudy, study: TuneSection, resources: StudyResources) -> None:
    cfg = resolved.cfg
    print(
        f"[byol-tune] study {resolved.name}: up to {resources.concurrency} trial(s) at once ({resources.why}); "
        f"each trial: {cfg.train.num_workers} worker(s) x {cfg.train.cpus_per_worker:g} CPU"
        f"{' + GPU' if cfg.train.use_gpu else ''}, budget {resolved.budget_epochs:g} epochs "
        f"({resolved.plan.total_steps} steps), scored by val kNN top-1; searcher {study.searcher}, scheduler "
        f"{study.scheduler}; trial drivers take "
        + (
            "the tune_driver resource"
            if DRIVER_RESOURCE in resources.driver_resources
            else "0.01 CPU (no tune_driver resource)"
        ),
        flush=True,
    )


def study_params(resolved: ResolvedStudy, study: TuneSection, concurrency: int) -> dict[str, Any]:
    """The parent MLflow run's parameters: the search space, the study settings and the base config."""
    return {
        **{f"tune.space.{k}": json.dumps(d.model_dump(exclude_none=True)) for k, d in study.space.items()},
        **{f"tune.{k}": v for k, v in study.model_dump(exclude={"space"}).items()},
        "tune.samples": study.samples,
        "tune.concurrency": concurrency,
        "tune.budget_epochs": resolved.budget_epochs,
        **resolved.cfg.flat(),
    }


def build_tuner(
    resolved: ResolvedStudy,
    study: TuneSection,
    resources: StudyResources,
    monitor: StudyMonitor,
    stopper: TrialStopper,
    continued: ContinuedStudy | None = None,
):
    """A Tuner of ``run_trial`` (each trial: Ray Train pretraining in chunks) with the study's search and scheduler;
    or, continuing a study, Tune's own restore of it (its searcher, scheduler, stopper and callbacks as they were
    saved; the monitor reads its record back from the study's folder)."""
    from ray import tune

    cfg = resolved.cfg
    spec = StudySpec(
        name=resolved.name,
        base=cfg.to_dict(),
        num_train_images=resolved.num_images,
        report_every_epochs=study.report_every_epochs,
        chunk_epochs=study.pbt.interval_epochs if study.scheduler == "pbt" else None,
        storage=study_storage(cfg.run.storage_path, resolved.name),
        bounds=search_bounds(study),
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), resources.driver_resources)
    if continued is not None:
        return tune.Tuner.restore(
            continued.path, trainable, resume_unfinished=True, resume_errored=True, param_space=tune_space(study)
        )
    return tune.Tuner(
        trainable,
        param_space=tune_space(study),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            scheduler=build_scheduler(study, resolved.budget_epochs),
            search_alg=build_searcher(study, resources.concurrency),
            num_samples=study.samples,
            max_concurrent_trials=resources.concurrency if study.searcher == "optuna" else None,
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=resolved.name,
            storage_path=cfg.run.storage_path,
            callbacks=[monitor, tensorboard_scalars()],
            stop=stopper,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),  # PBT restores need older ones
            # a failed trial (its actor or node lost) restarts and goes on from its last checkpoint (run_trial)
            failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures),
            verbose=1,
        ),
    )


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count()
