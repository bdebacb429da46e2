"""One Tune trial: the real Ray Train pretraining (``pretrain``) with the trial's values, in chunks.

    params (sampled) -> trial config -> [fit a TorchTrainer from the last state to the chunk's end
                                          -> kNN on val -> Tune result + Tune checkpoint] ...

FIFO / ASHA: one chunk (the whole budget); the kNN of every ``report_every_epochs`` reaches Tune while the
fit runs (:class:`ForwardEvaluations`), so ASHA can stop the trial between two evaluations. PBT: a chunk is
``pbt.interval_epochs``; each ends with a Tune checkpoint, and an exploit restarts this function with
another trial's checkpoint and mutated values. The Tune checkpoint is small (``trial.json``): it points at the
chunk's Train checkpoint (online, target, optimizer, step, RNG, history), a path or URI that later chunks of
any trial only read. Every chunk is a fresh Ray Train run name (a re-used name would resume its own snapshot
and ignore the exploited state) and seeds its data order from the step it starts at.
"""

from __future__ import annotations

import json
import math
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline.config import Config, config_from_dict
from pipeline.core.checkpoint import STATE_FILE
from pipeline.core.plan import RunPlan
from pipeline.core.storage import filesystem, join_location
from pipeline.ray_compat import report_to_tune
from pipeline.tune.space import clip_to_space, shown_params, trial_config

TRIAL_FILE = "trial.json"
HISTORY_KEYS = ("loss", "collapse_std", "lr", "tau", "knn_top1", "images_per_s", "data_wait_fraction", "epoch")


@dataclass(frozen=True)
class StudySpec:
    """What every trial needs from the study driver (resolved once, absolute paths)."""

    name: str
    base: dict[str, Any]  # the pretraining config (dict), data and storage paths absolute
    num_train_images: int
    report_every_epochs: float
    chunk_epochs: float | None  # PBT: train this many epochs per chunk; None: the whole budget in one fit
    storage: str  # where the chunks' Ray Train runs go: <run.storage_path>/<study>/trials
    bounds: dict[str, tuple[float, float]]  # the space's ranges: PBT-perturbed values are clipped into them


def epochs_to_steps(epochs: float, plan: RunPlan) -> int:
    return max(1, math.ceil(epochs * plan.steps_per_epoch - 1e-9))


def chunk_stop(step: int, total: int, chunk_steps: int) -> int:
    """The step the chunk that starts at ``step`` ends at (chunk boundaries are fixed, whatever the start)."""
    return min(total, (step // chunk_steps + 1) * chunk_steps)


def window_since(history: list[dict[str, Any]], after_step: int) -> list[dict[str, Any]]:
    """Log-step metrics after ``after_step`` (what the study logs to the trial's MLflow run)."""
    return [log_entry(h) for h in history if h["step"] > after_step]


def log_entry(metrics: dict[str, Any]) -> dict[str, Any]:
    """One log step as a Tune result carries it (what the study logs to MLflow by step)."""
    return {k: metrics[k] for k in ("step", *HISTORY_KEYS) if k in metrics}


def forward_evaluations(stop_step: int, extra: dict[str, Any]):
    """A Ray Train callback (runs in the Train controller) that sends every kNN evaluation before the chunk's
    end to Tune as a result, with the log steps since the previous one; the chunk's last is reported by the
    trial itself, with its checkpoint."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ForwardEvaluations(TuneReportCallback):
        def __init__(self) -> None:
            super().__init__()
            self.window: list[dict[str, Any]] = []

        def after_report(self, run_context, metrics, checkpoint) -> None:
            m = metrics[0]
            if "step" not in m:
                return
            self.window.append(log_entry(m))
            if "knn_top1" in m and m["step"] < stop_step:
                result = {
                    **{k: m[k] for k in HISTORY_KEYS if k in m},
                    "step": m["step"],
                    "log_history": self.window,
                    **extra,  # an exploit is known from the chunk's first result on
                }
                self.window = []
                report_to_tune(self, result)

    return ForwardEvaluations()


def chunk_name(trial_id: str, step: int) -> str:
    """A Ray Train run name never used before: a re-used name resumes that run's own snapshot and would ignore
    the state this chunk starts from (an exploit, a retried trial)."""
    return f"{trial_id}-{step:07d}-{uuid.uuid4().hex[:8]}"


def latest_own_checkpoint(storage: str, trial_id: str) -> tuple[int, str] | None:
    """(step, location) of the newest Train checkpoint any chunk of this trial wrote, or None. A trial restarted
    after a failure (its actor or node lost) goes on from here: its chunks checkpoint at every report, while the
    Tune checkpoint exists only at each chunk's end (FIFO and ASHA: one chunk, the whole budget)."""
    fs, root = filesystem(storage)
    runs = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    found = []
    for run in runs:
        if run.type != pafs.FileType.Directory or not run.base_name.startswith(f"{trial_id}-"):
            continue
        for ckpt in fs.get_file_info(pafs.FileSelector(run.path, allow_not_found=True)):
            complete = fs.get_file_info(f"{ckpt.path}/{STATE_FILE}").type == pafs.FileType.File
            if ckpt.base_name.startswith("step_") and ckpt.base_name[5:].isdigit() and complete:
                found.append((int(ckpt.base_name[5:]), join_location(storage, run.base_name, ckpt.base_name)))
    return max(found) if found else None


def starting_point(
    cfg: Config, spec: StudySpec, trial_id: str, chunk_steps: int, shown: str
) -> tuple[Config, str | None, int, dict[str, Any]]:
    """(the trial's config, the Train checkpoint to resume, its step, the exploit it records) for a trial that
    starts: from scratch, from its Tune checkpoint (its own, or another trial's after a PBT exploit), or from its
    newest own Train checkpoint when it got further than that before it failed."""
    from ray import tune

    resume, step, exploit = None, 0, {}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = json.loads((Path(d) / TRIAL_FILE).read_text())
        resume, step = saved["train_checkpoint"], saved["step"]
        handover = saved.get("handover")  # a restored trial keeps the hand-over its schedule had
        if saved["trial_id"] != trial_id:  # PBT exploit: the source's whole state, this trial's (mutated) values
            exploit = {"exploited_from": saved["trial_id"], "exploited_at_step": step}
            # tau goes on from the source's tau at this step and joins this trial's curve over one interval
            handover = [step, saved["tau"], chunk_steps]
            print(
                f"[byol-tune] trial {trial_id}: continuing from trial {saved['trial_id']}'s state at step {step} "
                f"(tau {saved['tau']:.5f}) with {shown}",
                flush=True,
            )
        if handover is not None:
            cfg = trial_config(cfg, {}, [f"ema.handover={json.dumps(handover)}"])
    # After an exploit the copied state wins (this trial's own older checkpoints may be at later steps).
    own = None if exploit else latest_own_checkpoint(spec.storage, trial_id)
    if own is not None and own[0] > step:  # this trial got further than its last Tune checkpoint before it failed
        step, resume = own
        print(f"[byol-tune] trial {trial_id}: restarted; going on from its checkpoint at step {step}", flush=True)
    return cfg, resume, step, exploit


def run_trial(params: dict[str, Any], spec: StudySpec) -> None:
    """The Tune function trainable (runs in the trial's actor, which drives its own Ray Train runs)."""
    from ray import tune

    from pipeline.train.driver import pretrain

    trial_id = tune.get_context().get_trial_id()
    params = clip_to_space(params, spec.bounds)
    cfg = trial_config(config_from_dict(spec.base), params)
    plan = RunPlan.from_config(cfg, spec.num_train_images)
    report_steps = epochs_to_steps(spec.report_every_epochs, plan)
    # A Train checkpoint at every report: a lost worker (Train restarts the group) or a lost trial (Tune restarts
    # it, see latest_own_checkpoint) goes on from the last report, never from step 0.
    every = min(report_steps, cfg.checkpoint.every_steps)
    cfg = trial_config(cfg, {}, [f"eval.every_steps={report_steps}", f"checkpoint.every_steps={every}"])
    chunk_steps = epochs_to_steps(spec.chunk_epochs, plan) if spec.chunk_epochs else plan.total_steps
    cfg, resume, step, exploit = starting_point(cfg, spec, trial_id, chunk_steps, shown_params(params))
    plan = RunPlan.from_config(cfg, spec.num_train_images)
    while step < plan.total_steps:
        stop = chunk_stop(step, plan.total_steps, chunk_steps)
        chunk_cfg = cfg.model_copy(
            update={
                "run": cfg.run.model_copy(update={"storage_path": spec.storage, "name": chunk_name(trial_id, step)})
            }
        )
        summary = pretrain(
            chunk_cfg, resume=resume, stop_step=stop, callbacks=[forward_evaluations(stop, exploit)], track=False
        )
        history = summary["history"]
        previous_eval = max((h["step"] for h in history if "knn_top1" in h and h["step"] < stop), default=step)
        last = history[-1] if history else {}
        result = {
            **{k: last[k] for k in HISTORY_KEYS if k in last},
            "step": summary["steps"],
            "knn_top1": summary["knn_top1"],
            "log_history": window_since(history, max(previous_eval, step)),
            "chunk_start_step": summary["resumed_from_step"] or 0,
            "start_target_checksum": summary["start_target_checksum"],
            "start_lr": summary["start_lr"],
            "start_tau": summary["start_tau"],
            "target_checksum": summary["target_checksum"],
            "train_checkpoint": summary["checkpoint"],
            "backbone": summary.get("backbone"),
            "budget_done": summary["steps"] >= plan.total_steps,
            **exploit,
        }
        exploit = {}
        resume, step = summary["checkpoint"], summary["steps"]
        with tempfile.TemporaryDirectory(prefix="byol-trial-") as tmp:
            saved = {"trial_id": trial_id, "step": step, "train_checkpoint": resume, "tau": plan.schedule.tau(step)}
            if cfg.ema.handover is not None:
                saved["handover"] = list(cfg.ema.handover)
            (Path(tmp) / TRIAL_FILE).write_text(json.dumps(saved))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(tmp))


def study_storage(storage_path: str, study: str) -> str:
    return join_location(storage_path, study, "trials")
