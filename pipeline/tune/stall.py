"""A study that can make no progress says so and ends, instead of waiting forever.

The case seen: placement groups left behind by another run held every CPU of a local Ray, and each new trial's
Ray Train worker group timed out, was retried and timed out again, a traceback a minute, for as long as anyone
watched. Here a study counts as stalled when no trial has reported for ``tune.stall_minutes`` and placement groups
of its own job (a trial's workers, or Tune's own) have waited for resources at least as long: one group or its
retries (Train removes a group whose workers timed out and asks for a new one, so the waiting counts until two checks
in a row see none). It then prints one line (what the cluster has free, what a trial needs, what to do) and Tune
stops every trial (as TERMINATED: the study is over, not paused; run it again once the resources are there). The line
is also written to ``<study>/byol/stalled.json``: a resumed study's stopper is Tune's restored copy, not the
driver's, and the driver reads the file to end with the same error.
"""

from __future__ import annotations

import json
from time import monotonic
from time import time as wall_clock

from pipeline.core.storage import is_file, join_location, read_bytes, write_bytes

CHECK_EVERY_S = 10.0
STALL_FILE = "byol/stalled.json"  # in <run.storage_path>/<study>


def pending_placement_groups() -> set[str]:
    """This job's placement groups waiting for resources: another job's waiting on a shared cluster is not this
    study's stall (a resumed study is a new job, and its dead driver's groups are gone with it)."""
    import ray
    from ray.util import placement_group_table

    from pipeline.ray_compat import placement_group_job

    job = ray.get_runtime_context().get_job_id()
    return {
        pg
        for pg, info in placement_group_table().items()
        if info.get("state") == "PENDING" and placement_group_job(pg) in (job, None)
    }


def free_and_total() -> tuple[dict[str, float], dict[str, float]]:
    import ray

    return ray.available_resources(), ray.cluster_resources()


class StallWatch:
    """Kept by the study's stopper: ``progress()`` at every result, ``stalled()`` at every Tune loop (a Ray query at
    most every CHECK_EVERY_S). Its clocks do not survive pickling (a resumed study starts them afresh)."""

    def __init__(self, minutes: float, need: str, study_path: str) -> None:
        self.limit_s, self.need, self.study_path = minutes * 60, need, study_path
        self._start_clocks()

    def _start_clocks(self) -> None:
        self.last_progress = monotonic()
        self.checked_at = 0.0
        self.waiting_since: float | None = None  # since when placement groups wait (with at most one check's gap)
        self.misses = 0
        self.pending = 0
        self.reason: str | None = None

    def __getstate__(self) -> dict:
        return {"limit_s": self.limit_s, "need": self.need, "study_path": self.study_path}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._start_clocks()

    def progress(self) -> None:
        self.last_progress = monotonic()

    def stalled(self) -> bool:
        if self.reason is not None:
            return True
        now = monotonic()
        if self.limit_s <= 0 or now - self.checked_at < CHECK_EVERY_S:
            return False
        self.checked_at = now
        self.pending = len(pending_placement_groups())
        if self.pending:
            self.misses, self.waiting_since = 0, self.waiting_since or now
        else:
            self.misses += 1
            self.waiting_since = None if self.misses >= 2 else self.waiting_since
        waited = now - self.waiting_since if self.waiting_since is not None else 0.0
        if not self.pending or now - self.last_progress < self.limit_s or waited < self.limit_s:
            return False
        free, total = free_and_total()
        have = ", ".join(f"{free.get(k, 0):g} of {total[k]:g} {k}" for k in ("CPU", "GPU") if total.get(k))
        self.reason = (
            f"stalled: no trial has reported for {self.limit_s / 60:g} min and placement groups have waited as long "
            f"for resources ({self.pending} now; {have or 'no CPUs'} free; a trial's workers need "
            f"{self.need}); free what holds them (`ray status`: another run, a killed job's placement groups) or "
            f"lower train.num_workers, then run the study again (its trials so far: {self.study_path})"
        )
        print(f"[byol-tune] {self.reason}", flush=True)
        try:
            write_bytes(
                join_location(self.study_path, STALL_FILE),
                json.dumps({"time": wall_clock(), "reason": self.reason}).encode(),
            )
        except OSError as exc:  # storage unreachable: the driver's own stopper still ends with the line
            print(f"[byol-tune] the stall line not written to {self.study_path} ({exc})", flush=True)
        return True


def stalled_since(study_path: str, started_at: float) -> str | None:
    """The stall line a stopper (the driver's or Tune's restored copy) wrote since ``started_at`` (wall clock)."""
    location = join_location(study_path, STALL_FILE)
    if not is_file(location):
        return None
    record = json.loads(read_bytes(location))
    return record["reason"] if record["time"] >= started_at else None
