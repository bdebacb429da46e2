"""A study that can make no progress says so in one line and ends (``pipeline.tune.stall``): the rule, on a clock
and a cluster the test controls."""

import pickle
import re

import pytest

import pipeline.tune.stall as stall_module
from pipeline.tune.stall import StallWatch


class FakeCluster:
    def __init__(self, monkeypatch):
        self.now, self.pending = 1000.0, set()
        monkeypatch.setattr(stall_module, "monotonic", lambda: self.now)  # this module's clocks only
        monkeypatch.setattr(stall_module, "pending_placement_groups", lambda: set(self.pending))
        self.written = {}  # the stall records, by location (the watches here name paths that are not written)
        monkeypatch.setattr(stall_module, "write_bytes", lambda location, data: self.written.update({location: data}))
        monkeypatch.setattr(
            stall_module, "free_and_total", lambda: ({"CPU": 0.0, "tune_driver": 1.0}, {"CPU": 4.0, "tune_driver": 2.0})
        )

    def after(self, seconds: float, watch: StallWatch, step: float = 10.0) -> bool:
        """Tune's loop asking the stopper every ``step`` seconds for ``seconds``: True once it said stalled."""
        end = self.now + seconds
        while self.now < end:
            self.now += step
            if watch.stalled():
                return True
        return False


@pytest.fixture
def cluster(monkeypatch):
    return FakeCluster(monkeypatch)


def test_no_report_while_resources_are_waited_for_ends_the_study_with_one_line(cluster, capsys):
    watch = StallWatch(minutes=10, need="2 CPU", study_path="s3://b/runs/study-1")
    cluster.pending = {"pg-of-trial-1"}
    assert not cluster.after(9 * 60, watch)
    assert cluster.after(2 * 60, watch) and watch.stalled()  # and it stays so for Tune's next ask
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[byol-tune] stalled: no trial has reported for 10 min")
    assert "(1 now; 0 of 4 CPU free; a trial's workers need 2 CPU)" in lines[0]
    assert lines[0].endswith("run the study again (its trials so far: s3://b/runs/study-1)")


def test_reports_or_no_waiting_placement_group_are_progress(cluster):
    watch = StallWatch(minutes=10, need="2 CPU", study_path="p")
    cluster.pending = {"pg-of-a-queued-trial"}  # one trial waits while another trains and reports
    for _ in range(5):
        assert not cluster.after(5 * 60, watch)
        watch.progress()
    cluster.pending = set()  # one long chunk: no report for an hour, but nothing waits for resources
    assert not cluster.after(60 * 60, watch)
    cluster.pending = {"pg-new"}  # a group that has waited for less than the limit is not a stall yet
    assert not cluster.after(9 * 60, watch)
    assert cluster.after(2 * 60, watch)


def test_worker_groups_retried_under_new_placement_groups_are_one_wait(cluster):
    """Ray Train removes a worker group's placement group when its workers time out and asks for a new one."""
    watch = StallWatch(minutes=10, need="1 CPU", study_path="p")
    for attempt in range(11):
        cluster.pending = {f"pg-attempt-{attempt}"}
        stalled = cluster.after(50, watch)
        cluster.pending = set()  # the gap between one attempt and the next: seen by at most one check
        stalled = stalled or cluster.after(10, watch)
    assert stalled


def test_zero_minutes_never_stops_and_a_restored_watch_starts_its_clocks_afresh(cluster):
    never = StallWatch(minutes=0, need="1 CPU", study_path="p")
    cluster.pending = {"pg"}
    assert not cluster.after(24 * 3600, never, step=600)
    watch = StallWatch(minutes=10, need="1 CPU", study_path="p")
    assert cluster.after(11 * 60, watch)
    restored = pickle.loads(pickle.dumps(watch))  # Tune's copy in a resumed study
    assert restored.reason is None and not restored.stalled()


def test_a_stall_seen_by_tunes_restored_copy_reaches_the_driver(cluster, monkeypatch, tmp_path):
    """A resumed study's stopper is Tune's unpickled copy: its line reaches the driver through the study folder."""
    from pipeline.core.storage import write_bytes
    from pipeline.tune.stall import stalled_since

    monkeypatch.setattr(stall_module, "write_bytes", write_bytes)
    study = str(tmp_path / "study-1")
    earlier_attempt = StallWatch(minutes=10, need="1 CPU", study_path=study)
    cluster.pending = {"pg"}
    assert stalled_since(study, started_at=0) is None
    assert cluster.after(11 * 60, earlier_attempt)
    resumed_at = stall_module.wall_clock() + 1
    assert stalled_since(study, started_at=0) == earlier_attempt.reason
    assert stalled_since(study, started_at=resumed_at) is None  # an earlier attempt's stall is not this one's
    restored = pickle.loads(pickle.dumps(earlier_attempt))
    monkeypatch.setattr(stall_module, "wall_clock", lambda: resumed_at + 5)
    assert cluster.after(11 * 60, restored)
    assert stalled_since(study, started_at=resumed_at) == restored.reason


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_study_whose_workers_can_never_start_says_so_and_leaves_no_placement_group(
    ray_local, small_fmnist_shards, tmp_path
):
    """What another run left behind holds every CPU (the case seen: placement groups of a dead run), so the trial's
    workers can never start. `byol tune`, joined to that Ray, ends with its one line in seconds, and nothing it
    asked for is left once it has exited."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import ray
    from ray.util import placement_group, placement_group_table, remove_placement_group

    holder = placement_group([{"CPU": ray.available_resources()["CPU"]}])
    ray.get(holder.ready(), timeout=60)
    before = set(placement_group_table())
    sets = [
        f"data.path={small_fmnist_shards}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tune.num_samples=1",
        "tune.stall_minutes=0.25",
        "train.max_steps=20",
    ]
    command = [str(Path(sys.executable).parent / "byol"), "tune", "--config", "configs/tune_fashion_mnist_cpu.yaml"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    start = time.time()
    try:
        done = subprocess.run(
            command + [w for s in sets for w in ("--set", s)], env=env, capture_output=True, text=True, timeout=240
        )
        took = time.time() - start
    finally:
        remove_placement_group(holder)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and last.startswith("byol tune: error: stalled: no trial has reported for 0.25 min")
    assert re.search(r"0 of \d+ CPU free; a trial's workers need 1 CPU", last) and "run the study again" in last
    assert done.stdout.count("[byol-tune] stalled") == 1
    assert took < 150, took  # the limit, a check or two and the study's start: not Train's retries forever
    deadline = time.time() + 60
    while time.time() < deadline:
        left = {pg for pg, info in placement_group_table().items() if pg not in before and info["state"] != "REMOVED"}
        if not left:
            break
        time.sleep(1)
    assert not left, {pg: placement_group_table()[pg]["state"] for pg in left}


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_only_this_jobs_waiting_placement_groups_count(ray_local):
    """On a shared cluster another job's placement group may wait for hours; that is not this study's stall. The
    job is read from the group's ID (``ray_compat.placement_group_job``): if a Ray upgrade changed the layout,
    this fails."""
    import os
    import subprocess
    import sys
    import time

    from ray.util import placement_group, placement_group_table, remove_placement_group

    from pipeline.ray_compat import placement_group_job

    other_job = (
        "import ray, sys, time; from ray.util import placement_group\n"
        "ray.init(); pg = placement_group([{'CPU': 1000}]); print(pg.id.hex(), flush=True); sys.stdin.read()"
    )
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    other = subprocess.Popen([sys.executable, "-c", other_job], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
    ours = placement_group([{"CPU": 1000}])  # can never be placed: waits
    try:
        theirs = other.stdout.readline().strip()
        deadline = time.time() + 30
        while time.time() < deadline and placement_group_table().get(theirs, {}).get("state") != "PENDING":
            time.sleep(0.2)
        assert placement_group_table()[theirs]["state"] == "PENDING"
        assert placement_group_job(ours.id.hex()) == ray_local.get_runtime_context().get_job_id()
        assert placement_group_job(theirs) not in (None, ray_local.get_runtime_context().get_job_id())
        pending = stall_module.pending_placement_groups()
        assert ours.id.hex() in pending and theirs not in pending
    finally:
        remove_placement_group(ours)
        other.communicate(timeout=60)  # stdin closed: the other driver exits and its group goes with its job
