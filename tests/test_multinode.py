"""Several Ray nodes on this machine (``tests.cluster_proc``: a 0-CPU head and two 2-CPU worker nodes), as a cluster
runs them: shards prepared to and read from S3 (a moto server on loopback), checkpoints on S3, MLflow on a real
`mlflow server`. ``byol`` runs as a user runs it, a process joined to the cluster through RAY_ADDRESS.

- A node that holds a training worker is lost mid-run and a fresh node added: the run finishes every planned step
  from its last S3 checkpoint (no step counted twice), the MLflow server holds the run (FINISHED, metrics,
  artifacts), ``byol export`` reads the checkpoint from S3. (Ray Train's restart of a lost worker is tested here,
  on several nodes, rather than on one.)
- A study runs its trials on both nodes at once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pyarrow.fs as pafs
import pytest
import torch

from pipeline.core.checkpoint import load_state
from pipeline.core.models import SmallCNN
from tests.conftest import TINY_TRAIN
from tests.netutil import free_port, stop_ray_head
from tests.test_mlflow import assert_run_recorded

pytestmark = [pytest.mark.integration]
BIN = Path(sys.executable).parent
LATEST = Path("/tmp/ray/ray_current_cluster")  # the cluster records itself as the machine's latest Ray
PREFIX = "byol-test/multinode"


class MultiNodeRay:
    """Drives ``tests.cluster_proc`` (its JSON-lines protocol)."""

    def __init__(self, env: dict[str, str]):
        self.gcs_port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.cluster_proc", f"--gcs-port={self.gcs_port}"]
            + [f"--dashboard-port={free_port()}", "--nodes=2", "--cpus=2"],
            env=env,
            cwd=Path(__file__).resolve().parents[1],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        event = self._event()
        self.address = event["address"]

    def _event(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the multi-node Ray exited ({self.proc.wait()})")
        event = json.loads(line)
        self.nodes = event["nodes"]
        return event

    def command(self, text: str) -> dict:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self._event()

    def node_of(self, pid: int) -> int | None:
        """The worker node (its raylet pid) that started process ``pid``."""
        for parent in psutil.Process(pid).parents():
            if parent.pid in self.nodes:
                return parent.pid
        return None

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.command("stop")
                self.proc.wait(timeout=60)
        finally:
            markers = (f":{self.gcs_port}", f"--gcs_server_port={self.gcs_port}")
            left = stop_ray_head(self.proc, lambda line: "ray" in line and any(m in line for m in markers))
            if LATEST.is_file() and f":{self.gcs_port}" in LATEST.read_text():
                LATEST.unlink()
            assert not left, left


@pytest.fixture(scope="module")
def multinode(s3_endpoint, small_fmnist_shards):
    """The cluster, with the small Fashion-MNIST sample prepared to S3 by `byol prepare` joined to it."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # AWS_* of the local S3 (s3_endpoint)
    env["PATH"] = f"{BIN}:{env['PATH']}"
    cluster = MultiNodeRay(env)
    try:
        env["RAY_ADDRESS"] = cluster.address
        source = small_fmnist_shards.parent / "src"
        prepared = byol(["prepare", "--source", f"imagefolder:{source}", "--out", f"s3://{PREFIX}/shards"], env)
        assert prepared.returncode == 0, prepared.stderr[-3000:]
        yield cluster, env
    finally:
        cluster.stop()


def byol(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "byol"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def train_worker_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def checkpoints(run: str) -> list[str]:
    s3 = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"])
    infos = s3.get_file_info(pafs.FileSelector(f"{PREFIX}/runs/{run}", allow_not_found=True))
    return sorted(i.base_name for i in infos if i.base_name.startswith("step_"))


@pytest.mark.timeout(600)
def test_a_lost_node_costs_a_restart_from_the_s3_checkpoint(multinode, mlflow_server, tmp_path):
    cluster, env = multinode
    uri, _ = mlflow_server
    sets = [
        f"data.path=s3://{PREFIX}/shards",
        f"run.storage_path=s3://{PREFIX}/runs",
        "run.name=lost-node",
        f"tracking.uri={uri}",
        *TINY_TRAIN,
        "log.every_steps=5",
        "train.num_workers=2",
        "train.max_steps=60",
        "checkpoint.every_steps=10",
        "run.max_failures=2",
    ]
    args = ["pretrain", "--config", "configs/fashion_mnist_cpu.yaml", "--json"]
    run = subprocess.Popen(
        [str(BIN / "byol"), *args, *[w for s in sets for w in ("--set", s)]],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and run.poll() is None and "step_00000020" not in checkpoints("lost-node"):
            time.sleep(0.5)
        assert run.poll() is None, run.communicate()[1][-3000:]
        lost = {cluster.node_of(pid) for pid in train_worker_pids()} - {None}
        workers = {pid: [q.pid for q in psutil.Process(pid).parents()] for pid in train_worker_pids()}
        assert lost, f"no training worker on a worker node {cluster.nodes}: {workers}"
        cluster.command(f"remove {sorted(lost)[0]}")
        cluster.command("add")
        out, err = run.communicate(timeout=400)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == summary["total_steps"] == 60
    # the last attempt started from a checkpoint (at most 10 steps redone), and no step was counted twice
    assert summary["resumed_from_step"] > 0 and summary["resumed_from_step"] % 10 == 0, summary
    steps = [h["step"] for h in load_state(summary["checkpoint"])["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 60
    # the controller said so, and went on from an S3 checkpoint taken before the loss, not from the start
    assert re.search(r"worker lost at step \d+ .*restarting from checkpoint step [1-9]\d", out + err), err[-3000:]
    # the MLflow server holds the run, FINISHED, with its metrics (each step once) and artifacts (the backbone)
    backbone = torch.load(assert_run_recorded(uri, summary), weights_only=True)
    exported = byol(["export", "--checkpoint", summary["checkpoint"], "--out", str(tmp_path / "backbone.pt")], env)
    assert exported.returncode == 0, exported.stderr[-2000:]
    net = SmallCNN(1, 8)
    net.load_state_dict(torch.load(tmp_path / "backbone.pt", weights_only=True), strict=True)
    for name, tensor in net.state_dict().items():
        torch.testing.assert_close(tensor, backbone[name], rtol=0, atol=0)  # the run's own, read from S3


@pytest.mark.timeout(600)
def test_a_study_runs_its_trials_on_both_nodes(multinode, mlflow_server):
    cluster, env = multinode
    uri, _ = mlflow_server
    sets = [
        f"data.path=s3://{PREFIX}/shards",
        f"run.storage_path=s3://{PREFIX}/study",
        f"tracking.uri={uri}",
        "tracking.experiment=multinode-study",
        "tune.num_samples=2",
        "tune.scheduler=fifo",
        "train.num_workers=2",  # two trials of 2 workers fill both 2-CPU nodes
        "train.max_steps=30",
        *TINY_TRAIN,
    ]
    on_nodes: set[int] = set()
    study = subprocess.Popen(
        [str(BIN / "byol"), "tune", "--config", "configs/tune_fashion_mnist_cpu.yaml", "--json"]
        + [w for s in sets for w in ("--set", s)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while study.poll() is None:  # where each trial's training worker runs
            on_nodes |= {cluster.node_of(pid) for pid in train_worker_pids()} - {None}
            time.sleep(0.5)
        out, err = study.communicate(timeout=60)
    finally:
        if study.poll() is None:
            study.kill()
    assert study.returncode == 0, err[-3000:]
    summary = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith('{"study"')))
    assert [t["status"] for t in summary["trials"]] == ["finished", "finished"], summary["trials"]
    assert on_nodes == set(cluster.nodes), (on_nodes, cluster.nodes)  # both worker nodes trained a trial
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("multinode-study").experiment_id])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)  # the parent and one per trial
