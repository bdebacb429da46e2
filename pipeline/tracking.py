"""MLflow tracking that never stops training: the first failure is reported once, then tracking is off.

Default store: a SQLite file given by ABSOLUTE path (Ray workers run in other directories, and
MLflow 3.17 refuses the old ``./mlruns`` file store), with the artifacts of its experiments next to it
(``<store dir>/mlartifacts``), not in ``./mlruns`` of whatever directory a command ran in.
``tracking.uri`` or ``MLFLOW_TRACKING_URI`` point to a real server instead (required on multi-node
clusters: the driver refuses a file-backed store there).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# MLflow retries a dead server for minutes by default; a training run should notice in seconds.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def resolve_tracking_uri(configured: str | None, runs_dir: str | Path = "runs") -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = Path(runs_dir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def is_file_store(uri: str) -> bool:
    """A store that is a file on one machine (SQLite, ./mlruns), not a server every node can reach."""
    return uri.startswith(("sqlite:", "file:", "/"))


def artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store's experiments go next to the database; a server decides its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()


class Tracker:
    """A thin, failure-tolerant wrapper over one MLflow run (``enabled=False`` makes every call a no-op)."""

    def __init__(self, uri: str, run_id: str | None, enabled: bool = True) -> None:
        self.uri, self.run_id, self.enabled = uri, run_id, enabled and run_id is not None
        self._client = None
        self.logged_through = -1  # metrics at steps up to this one are already in the run (an earlier attempt's)

    def continue_after(self, metric: str) -> None:
        """A restarted attempt redoes the steps after its checkpoint: those its lost attempt logged stay as they are
        (each step once in the run's history), the ones after are logged."""
        history = self._call("get_metric_history", lambda c: c.get_metric_history(self.run_id, metric)) or []
        self.logged_through = max((m.step for m in history), default=-1)

    @staticmethod
    def prepare_store(uri: str, experiment: str) -> threading.Thread:
        """Import MLflow and open (create, migrate) the store in a thread, while Ray starts: seconds of a
        run's start-up otherwise. Errors are left to :meth:`create_run`, which reports them."""

        def open_store() -> None:
            try:
                import mlflow

                mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
            except Exception:  # noqa: S110  (create_run meets it again and says what it is)
                pass

        thread = threading.Thread(target=open_store, name="mlflow-store", daemon=True)
        thread.start()
        return thread

    @staticmethod
    def create_run(uri: str, experiment: str, run_name: str | None, tags: dict[str, str] | None = None) -> str:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            exp_id = client.create_experiment(experiment, artifact_location=artifact_root(uri))
        else:
            exp_id = exp.experiment_id
        return client.create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id

    @staticmethod
    def find_run(uri: str, experiment: str, tags: dict[str, str]) -> str | None:
        """The id of a run of ``experiment`` with these tags, or None (a resumed study finds its trials' runs)."""
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = client.search_runs([exp.experiment_id], query, max_results=1)
        return runs[0].info.run_id if runs else None

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        if not self.enabled:
            return None
        try:
            if self._client is None:
                import mlflow

                self._client = mlflow.MlflowClient(tracking_uri=self.uri)
            return fn(self._client, *args, **kwargs)
        except Exception as exc:  # tracking must never end a training run
            self.enabled = False
            log.warning(
                "MLflow tracking at %s failed during %s (%s: %s); training continues without tracking",
                self.uri,
                what,
                type(exc).__name__,
                str(exc).splitlines()[0][:200],
            )
            print(
                f"[byol] WARNING: MLflow tracking lost ({what}: {type(exc).__name__}); training continues", flush=True
            )
            return None

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:  # also where MLflow is not installed
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        self._call("log_params", lambda c: c.log_batch(self.run_id, params=items))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or step <= self.logged_through:  # also where MLflow is not installed
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, int | float)]
        self._call("log_metrics", lambda c: c.log_batch(self.run_id, metrics=items))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", lambda c: c.log_artifact(self.run_id, str(path), artifact_path))

    def set_tag(self, key: str, value: str) -> None:
        self._call("set_tag", lambda c: c.set_tag(self.run_id, key, value))

    def finish(self, status: str = "FINISHED") -> None:
        self._call("finish", lambda c: c.set_terminated(self.run_id, status))


@contextlib.contextmanager
def tracked_run(
    uri: str,
    experiment: str,
    name: str,
    *,
    enabled: bool = True,
    tags: dict[str, str] | None = None,
    run_id: str | None = None,
) -> Iterator[Tracker]:
    """One MLflow run for the ``with`` block, ended FINISHED, FAILED or KILLED (Ctrl-C) as the block ends;
    ``run_id``: an existing run continued (a resumed study's parent run) instead of a new one.

    An unreachable store must not stop a run: it is said on the console and the run goes on untracked (a
    disabled ``Tracker``, whose calls do nothing)."""
    if enabled and run_id is None:
        try:
            run_id = Tracker.create_run(uri, experiment, name, tags=tags)
        except Exception as exc:
            print(f"[byol] WARNING: MLflow unavailable at {uri} ({type(exc).__name__}); not tracking", flush=True)
    tracker = Tracker(uri, run_id, enabled)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)
