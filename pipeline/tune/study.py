"""``byol tune``, the study driver: which tau and learning-rate schedules should this data be pretrained with?

    tune config -> data check (before Ray) -> concurrency -> MLflow parent run -> Tuner(run_trial) .fit()
      -> table, best config YAML (runs with ``byol pretrain --config``), plot, JSON

Trials are scored by the weighted-kNN top-1 of the online encoder on the labelled val split (the code of
``byol eval``), never by the BYOL loss: a collapsed network has the lowest loss. Collapsed trials are stopped.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from pipeline.config import Config, dump_config
from pipeline.core.checkpoint import is_uri, join_location, upload_file
from pipeline.core.plan import RunPlan
from pipeline.data.labelled import has_labelled
from pipeline.data.shards import PrepareError, read_manifest
from pipeline.tracking import Tracker, resolve_tracking_uri
from pipeline.train.cluster import available_cpus, connect
from pipeline.train.driver import readable_train_data
from pipeline.tune.monitor import CollapseRule, StudyMonitor, TrialStopper
from pipeline.tune.space import METRIC, TuneSection, search_bounds, search_key, trial_config, tune_space
from pipeline.tune.trial import StudySpec, run_trial, study_storage

DRIVER_RESOURCE = "tune_driver"  # trial drivers take this, not a CPU (a CPU each would starve 2-core machines)
TABLE_COLUMNS = ("trial", "tau_base", "tau_schedule", "base_lr", "warmup_epochs", "lr_schedule", METRIC, "status")


class TuneError(RuntimeError):
    """The study could not produce a result; the message says why."""


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


def run_study(cfg: Config, study: TuneSection) -> dict[str, Any]:
    """Run the study; returns the summary ``byol tune --json`` prints."""
    from ray import tune

    started_at = time.time()
    cfg = absolute_paths(cfg)
    name = study.name or time.strftime("tune-%Y%m%d-%H%M%S")
    num_images, _, _ = readable_train_data(cfg)  # a bad shard fails here, before Ray starts
    if not has_labelled(cfg.data.path, "val"):
        raise PrepareError(
            f"data.path {cfg.data.path}: no labelled val split; trials are scored by kNN on it "
            "(`byol prepare --val-fraction 0.1`)"
        )
    classes = len(read_manifest(cfg.data.path).get("classes") or []) or 10
    plan = RunPlan.from_config(cfg, num_images)
    budget_epochs = plan.total_steps / plan.steps_per_epoch
    if study.report_every_epochs > budget_epochs or (
        study.scheduler == "pbt" and study.pbt.interval_epochs >= budget_epochs
    ):
        raise TuneError(
            f"the trial budget is {budget_epochs:g} epochs (train.epochs / train.max_steps): tune.report_every_epochs "
            "and tune.pbt.interval_epochs must be shorter"
        )
    tracking_uri = resolve_tracking_uri(
        cfg.tracking.uri, cfg.run.storage_path if not is_uri(cfg.run.storage_path) else "runs"
    )

    local = not ray.is_initialized() and not _cluster_address()
    if local:
        gpus = local_gpus() if cfg.train.use_gpu else 0
        concurrency, why = choose_concurrency(cfg, study, available_cpus(), gpus)
        started_ray = connect(
            concurrency * cfg.train.num_workers, cfg.train.cpus_per_worker, resources={DRIVER_RESOURCE: concurrency}
        )
        driver_resources = {DRIVER_RESOURCE: 1}
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
    print(
        f"[byol-tune] study {name}: up to {concurrency} trial(s) at once ({why}); each trial: "
        f"{cfg.train.num_workers} worker(s) x {cfg.train.cpus_per_worker:g} CPU{' + GPU' if cfg.train.use_gpu else ''}"
        f", budget {budget_epochs:g} epochs ({plan.total_steps} steps), scored by val kNN top-1; "
        f"searcher {study.searcher}, scheduler {study.scheduler}; trial drivers take "
        + ("the tune_driver resource" if DRIVER_RESOURCE in driver_resources else "0.01 CPU (no tune_driver resource)"),
        flush=True,
    )

    parent, status, staging = None, "FAILED", None
    try:
        try:
            parent_id = Tracker.create_run(tracking_uri, cfg.tracking.experiment, name, tags={"tune.study": name})
        except Exception as exc:  # an unreachable server must not stop the study
            print(f"[byol-tune] WARNING: MLflow unavailable at {tracking_uri} ({type(exc).__name__}); not tracking")
            parent_id = None
        parent = Tracker(tracking_uri, parent_id)
        parent.log_params(
            {
                **{f"tune.space.{k}": json.dumps(d.model_dump(exclude_none=True)) for k, d in study.space.items()},
                **{f"tune.{k}": v for k, v in study.model_dump(exclude={"space"}).items()},
                "tune.samples": study.samples,
                "tune.concurrency": concurrency,
                "tune.budget_epochs": budget_epochs,
                **cfg.flat(),
            }
        )
        rule = CollapseRule(cfg.log.collapse_warn, study.collapse.patience, 1 / classes, study.collapse.chance_margin)
        monitor = StudyMonitor(cfg, study, rule, tracking_uri, parent_id)
        spec = StudySpec(
            name=name,
            base=cfg.to_dict(),
            num_train_images=num_images,
            report_every_epochs=study.report_every_epochs,
            chunk_epochs=study.pbt.interval_epochs if study.scheduler == "pbt" else None,
            storage=study_storage(cfg.run.storage_path, name),
            bounds=search_bounds(study),
        )
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(run_trial, spec=spec), driver_resources),
            param_space=tune_space(study),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                scheduler=build_scheduler(study, budget_epochs),
                search_alg=build_searcher(study, concurrency),
                num_samples=study.samples,
                max_concurrent_trials=concurrency if study.searcher == "optuna" else None,
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=cfg.run.storage_path,
                callbacks=[monitor, tensorboard_scalars()],
                stop=TrialStopper(rule),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),  # PBT restores need older ones
                verbose=1,
            ),
        )
        tuner.fit()
        staging = Path(tempfile.mkdtemp(prefix="byol-tune-"))
        summary = summarize(cfg, study, monitor, staging, name, parent)
        summary.update(
            parent_run_id=parent_id,
            tracking_uri=tracking_uri,
            experiment=cfg.tracking.experiment,
            concurrency=concurrency,
            minutes=round((time.time() - started_at) / 60, 2),
        )
        parent.log_metrics({f"best_{METRIC}": summary["best_knn_top1"], "minutes": summary["minutes"]}, 0)
        print(format_table(summary["trials"]), flush=True)
        print(
            f"[byol-tune] best: trial {summary['best_trial']} (val kNN top-1 {summary['best_knn_top1']:.4f}); "
            f"config {summary['best_config']}",
            flush=True,
        )
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if parent is not None:
            parent.finish(status)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if started_ray:
            ray.shutdown()


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _cluster_address() -> str | None:
    import os

    return os.environ.get("RAY_ADDRESS")


def summarize(
    cfg: Config, study: TuneSection, monitor: StudyMonitor, staging: Path, name: str, parent: Tracker
) -> dict[str, Any]:
    """The trials table, the best trial's config as YAML, a plot: written next to the study and to MLflow."""
    rows = []
    for trial_id, row in monitor.rows.items():
        tcfg = trial_config(cfg, monitor.params.get(trial_id, {}))
        rows.append(
            {
                "trial": trial_id,
                "tau_base": tcfg.ema.tau_base,
                "tau_schedule": tcfg.ema.schedule,
                "base_lr": tcfg.optim.base_lr,
                "warmup_epochs": tcfg.optim.warmup_epochs,
                "lr_schedule": tcfg.optim.lr_schedule,
                METRIC: row.get(METRIC),
                "status": row.get("status", "unknown"),
                "epochs": row.get("epoch"),
                "why": row.get("why", ""),
                "exploits": ", ".join(row.get("exploits", [])),
                "values": monitor.values(trial_id),
                "reports": row.get("reports", []),
            }
        )
    usable = [r for r in rows if r[METRIC] is not None and r["status"] not in ("collapsed", "failed")]
    if not usable:
        raise TuneError(
            f"no trial of study {name} produced a usable representation: "
            + "; ".join(f"{r['trial']} {r['status']} {r['why']}".strip() for r in rows)
        )
    best = max(usable, key=lambda r: r[METRIC])
    best_cfg = trial_config(cfg, monitor.params[best["trial"]])
    study_dir = join_location(cfg.run.storage_path, name)

    def publish(local: Path) -> str:
        parent.log_artifact(local)
        return upload_file(local, join_location(study_dir, local.name))

    (staging / "best_config.yaml").write_text(
        f"# byol tune study {name}: best trial {best['trial']}, val kNN top-1 {best[METRIC]:.4f}\n"
        + dump_config(best_cfg)
    )
    best_config = publish(staging / "best_config.yaml")
    with open(staging / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k not in ("values", "reports")])
        writer.writeheader()
        writer.writerows({k: v for k, v in r.items() if k not in ("values", "reports")} for r in rows)
    publish(staging / "trials.csv")
    if plot_study(rows, staging / "knn_vs_tau_lr.png"):
        publish(staging / "knn_vs_tau_lr.png")
    parent.set_tag("tune.best_trial", best["trial"])
    return {
        "study": name,
        "best_trial": best["trial"],
        "best_knn_top1": best[METRIC],
        "best_values": best["values"],
        "best_config": best_config,
        "trials": rows,
    }


def plot_study(rows: list[dict[str, Any]], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r[METRIC] is not None]
    if not points:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colours = {"finished": "tab:green", "exploited": "tab:blue", "collapsed": "tab:red"}
    for ax, (label, x) in zip(
        axes, (("1 - tau_base", lambda r: 1 - r["tau_base"]), ("optim.base_lr", lambda r: r["base_lr"])), strict=True
    ):
        for r in points:
            ax.scatter(x(r), r[METRIC], color=colours.get(r["status"], "tab:gray"), label=r["status"])
            ax.annotate(r["trial"][-5:], (x(r), r[METRIC]), fontsize=7)
        if all(x(r) > 0 for r in points):
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("val kNN top-1")
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axes[1].legend(unique.values(), unique.keys(), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(key: str, value: Any) -> str:
        if value is None:
            return "-"
        if key == METRIC:
            return f"{value:.4f}"
        if key == "base_lr":
            return f"{value:.3g}"
        if key == "tau_base":
            return f"{value:.5f}"
        return str(value)

    table = [list(TABLE_COLUMNS)] + [[cell(k, r.get(k)) for k in TABLE_COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in table]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
