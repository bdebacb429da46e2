"""What the study driver does with trial results: stop collapsed trials, and log every trial to MLflow.

Both run in the Tune driver process, from the results trials report; trials themselves write no MLflow
(parallel trials writing one SQLite store lose metrics to "database is locked"). One nested run per trial
(``mlflow.parentRunId`` = the study's run), created at its first start and kept across PBT chunks and
restarts; its metrics by step come from the log steps each result carries (``log_history``).

The monitor's record (each trial's values, reports, status and MLflow run) is written to ``STATE_FILE`` in the
study's folder after every change and read back when Tune sets the monitor up, so a study continued with
``byol tune --resume`` keeps its trials' runs and is summarised whole. (Tune's own per-trial ``result.json`` is
not that record: in Ray 2.60 a trial paused and restored by PBT comes back with its remote copy, which may miss
the reports since Tune last synced it.)
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from pipeline.config import Config, dump_config
from pipeline.core.storage import is_file, is_uri, read_bytes, write_bytes
from pipeline.tracking import Tracker
from pipeline.tune.space import (
    METRIC,
    TuneSection,
    clip_to_space,
    config_values,
    search_bounds,
    shown_params,
    trial_config,
)
from pipeline.tune.stall import StallWatch

STATE_FILE = "byol/state.json"  # in <run.storage_path>/<study>, beside study.py's STUDY_FILE


class CollapseRule:
    """A trial has collapsed when its collapse monitor stays under ``log.collapse_warn`` for ``patience`` reports
    in a row, or its kNN top-1 falls to chance (1 / classes + margin). Pure bookkeeping over results."""

    def __init__(self, collapse_warn: float, patience: int, chance: float, margin: float) -> None:
        self.collapse_warn, self.patience, self.chance, self.margin = collapse_warn, patience, chance, margin
        self.streak: dict[str, int] = {}
        self.seen: dict[str, tuple] = {}
        self.collapsed: dict[str, str] = {}  # trial id -> why

    def observe(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Record one result (idempotent: the stopper and the monitor both see it); True when collapsed."""
        key = (result.get("training_iteration", 0), result.get("step"))
        if self.seen.get(trial_id) != key:
            self.seen[trial_id] = key
            if "exploited_from" in result:  # another trial's state: its own history starts again
                self.streak[trial_id] = 0
            # "Stays under": every log step since the last report (a single dip does not count).
            window = [h["collapse_std"] for h in result.get("log_history", []) if "collapse_std" in h]
            std = max(window) if window else result.get("collapse_std", math.inf)
            self.streak[trial_id] = self.streak.get(trial_id, 0) + 1 if std < self.collapse_warn else 0
            knn = result.get(METRIC)
            if self.streak[trial_id] >= self.patience:
                self.collapsed[trial_id] = (
                    f"collapse monitor {std:.3f} < {self.collapse_warn} for {self.streak[trial_id]} report(s)"
                )
            elif knn is not None and knn <= self.chance + self.margin:
                self.collapsed[trial_id] = f"kNN top-1 {knn:.3f} at chance ({self.chance:.3f})"
        return trial_id in self.collapsed


class TrialStopper(tune.Stopper):
    """Stops a trial that collapsed, and one whose budget is done (so PBT never exploits into a finished trial:
    Tune asks the stopper before the scheduler); stops the whole study when it has stalled (``StallWatch``)."""

    def __init__(self, rule: CollapseRule, stall: StallWatch) -> None:
        self.rule, self.stall = rule, stall

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        self.stall.progress()
        return self.rule.observe(trial_id, result) or bool(result.get("budget_done"))

    def stop_all(self) -> bool:
        return self.stall.stalled()


class StudyMonitor(tune.Callback):
    """MLflow nested runs, trial statuses and the final table's rows, from the results trials report."""

    def __init__(
        self,
        base: Config,
        study: TuneSection,
        rule: CollapseRule,
        tracking_uri: str,
        parent_run_id: str | None,
        state_file: str,
    ) -> None:
        self.base, self.study, self.rule = base, study, rule
        self.tracking_uri, self.parent_run_id, self.state_file = tracking_uri, parent_run_id, state_file
        self.runs: dict[str, Tracker] = {}
        self.rows: dict[str, dict[str, Any]] = {}
        self.params: dict[str, dict[str, Any]] = {}  # trial id -> its values as the searcher set them (PBT: latest)

    # -- the record, in the study's folder -----------------------------------------------------------

    def setup(self, **info) -> None:
        """Tune sets its callbacks up at the start of a study and of a resumed one: the latter reads the record."""
        if is_file(self.state_file):
            self.load(json.loads(read_bytes(self.state_file)))

    def load(self, state: dict[str, Any]) -> None:
        self.rows, self.params = state["rows"], state["params"]
        self.runs = {trial_id: Tracker(self.tracking_uri, run_id) for trial_id, run_id in state["runs"].items()}
        self.rule.streak, self.rule.collapsed = state["rule"]["streak"], state["rule"]["collapsed"]
        self.rule.seen = {trial_id: tuple(key) for trial_id, key in state["rule"]["seen"].items()}

    def save(self) -> None:
        rule = {"streak": self.rule.streak, "seen": self.rule.seen, "collapsed": self.rule.collapsed}
        runs = {trial_id: tracker.run_id for trial_id, tracker in self.runs.items()}
        state = {"rows": self.rows, "params": self.params, "runs": runs, "rule": rule}
        write_bytes(self.state_file, json.dumps(state).encode())

    def values(self, trial_id: str) -> dict[str, Any]:
        return shown_params(self.params.get(trial_id, {}))

    def _set_params(self, trial) -> dict[str, Any]:
        self.params[trial.trial_id] = clip_to_space(dict(trial.config), search_bounds(self.study))
        return self.params[trial.trial_id]

    # -- Tune hooks (driver process) -----------------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        params = self._set_params(trial)
        if trial.trial_id in self.runs:  # a PBT restart or a resumed trial keeps its run
            return
        cfg = trial_config(self.base, params)
        run_id, existing = None, None
        if self.parent_run_id:
            tags = {"mlflow.parentRunId": self.parent_run_id, "tune.trial_id": trial.trial_id}
            try:  # a resumed study whose record missed this trial's start: its run from before
                existing = Tracker.find_run(self.tracking_uri, self.base.tracking.experiment, tags)
                run_id = existing or Tracker.create_run(
                    self.tracking_uri, self.base.tracking.experiment, f"trial-{trial.trial_id}", tags=tags
                )
            except Exception as exc:  # tracking never stops a study
                print(f"[byol-tune] WARNING: MLflow run for trial {trial.trial_id} not created ({exc})", flush=True)
        tracker = self.runs[trial.trial_id] = Tracker(self.tracking_uri, run_id)
        if existing is None:
            tracker.log_params(cfg.flat())
        self.rows[trial.trial_id] = {"trial": trial.trial_id, METRIC: None, "status": "running"}
        self.save()

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict[str, Any], **info) -> None:
        tracker, row = self.runs.get(trial.trial_id), self.rows.get(trial.trial_id)
        if tracker is None:
            return
        params = self._set_params(trial)
        record = report_record(result, params)  # a step reported again (a trial restarted after it) counts once
        row["reports"] = [r for r in row.get("reports", []) if r.get("step") != record.get("step")] + [record]
        for entry in result.get("log_history", []):
            tracker.log_metrics({k: v for k, v in entry.items() if k != "step"}, int(entry["step"]))
        step = int(result.get("step", 0))
        current = config_values(params)  # PBT mutates values: they are metrics over steps, not params
        tracker.log_metrics({f"value.{k}": v for k, v in current.items() if isinstance(v, int | float)}, step)
        if result.get(METRIC) is not None:
            tracker.log_metrics({METRIC: result[METRIC]}, step)
            row[METRIC] = result[METRIC]
        row.update(step=step, epoch=result.get("epoch"))  # the values: self.params (derived when shown)
        exploit = f"{result.get('exploited_from')}@{result.get('exploited_at_step')}"
        if "exploited_from" in result and exploit not in row.setdefault("exploits", []):
            row["exploits"].append(exploit)
            tracker.set_tag("tune.exploited_from", ", ".join(row["exploits"]))
        if result.get("budget_done"):
            row["budget_done"] = True
        for key in ("backbone", "train_checkpoint"):
            if result.get(key):
                row[key] = result[key]
        if self.rule.observe(trial.trial_id, result):
            row["status"] = "collapsed"
        self.save()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        row = self.rows.get(trial.trial_id)
        if row is None:
            return
        if trial.trial_id in self.rule.collapsed:
            row.update(status="collapsed", why=self.rule.collapsed[trial.trial_id])
        elif not row.get("budget_done"):
            row["status"] = f"stopped by {self.study.scheduler}"
        else:
            row["status"] = "exploited" if row.get("exploits") else "finished"
        self._finish(trial, "FINISHED" if row["status"] in ("finished", "exploited") else "KILLED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.params.setdefault(trial.trial_id, clip_to_space(dict(trial.config), search_bounds(self.study)))
        row = self.rows.setdefault(trial.trial_id, {"trial": trial.trial_id, METRIC: None})
        row.update(status="failed", why=last_error_line(trial))
        self._finish(trial, "FAILED")

    # -- helpers -------------------------------------------------------------------------------------

    def _finish(self, trial, status: str) -> None:
        self.save()
        tracker, row = self.runs.get(trial.trial_id), self.rows[trial.trial_id]
        if tracker is None:
            return
        tracker.set_tag("tune.status", row["status"])
        if row.get("why"):
            tracker.set_tag("tune.why", row["why"][:500])
        with tempfile.TemporaryDirectory() as tmp:
            config_file = Path(tmp) / "config.yaml"
            config_file.write_text(dump_config(trial_config(self.base, self.params[trial.trial_id])))
            tracker.log_artifact(config_file)
            backbone = row.get("backbone")
            if backbone:
                tracker.log_artifact(fetch_file(backbone, Path(tmp)))
        tracker.finish(status)


REPORT_KEYS = (
    "step",
    "epoch",
    METRIC,
    "collapse_std",
    "chunk_start_step",
    "start_target_checksum",
    "start_lr",
    "start_tau",
    "target_checksum",
    "exploited_from",
    "exploited_at_step",
)


def report_record(result: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """One Tune result as the study's summary keeps it: where the trial was, what it measured, its values then,
    and its first log step (what the schedules gave right after a restore)."""
    record = {k: result[k] for k in REPORT_KEYS if result.get(k) is not None}
    record["values"] = shown_params(params)
    record["search_values"] = dict(params)
    if result.get("log_history"):
        record["first_log"] = result["log_history"][0]
    return record


def fetch_file(location: str, folder: Path) -> Path:
    """A local copy of a file at a path or URI."""
    if not is_uri(location):
        return Path(location)
    local = folder / Path(location.partition("?")[0]).name
    local.write_bytes(read_bytes(location))
    return local


def last_error_line(trial) -> str:
    """The last line of a failed trial's error (the one that names the cause)."""
    try:
        text = str(trial.get_error() or "")
    except Exception:  # the error file may be gone; the status still says "failed"
        text = ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "error"
