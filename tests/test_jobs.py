"""Ray Jobs: a real head node on 127.0.0.1 (own ports, own temp dir), `byol submit`, and KubeRay manifests."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline.cli.main import main as cli
from tests.netutil import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ray_head():
    """`ray start --head --block` in its own process group; stopped by that group and its temp dir only."""
    temp_dir = tempfile.mkdtemp(prefix="byolray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dash = free_port(), free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    ray_bin = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=4",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            "--include-dashboard=true",
            # own ports for everything, so a Ray already running on this machine (other tests) does not collide
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    if not wait_for_port(dash, 120):
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("ray head did not start")
    time.sleep(3)
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    # anything of this cluster still alive (daemonised by Ray) is found by its temp dir and killed
    deadline = time.time() + 30
    while time.time() < deadline:
        left = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
        if not left:
            break
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        time.sleep(1)
    assert not [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_submit_pretrain_and_failing_job(ray_head, small_fmnist_shards, tmp_path, capsys, monkeypatch):
    import mlflow

    address, env = ray_head
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.chdir(ROOT)
    storage = tmp_path / "job-runs"
    args = [
        "--config",
        "configs/fashion_mnist_cpu.yaml",
        "--set",
        f"data.path={small_fmnist_shards}",
        "--set",
        f"run.storage_path={storage}",
        "--set",
        "run.name=submitted",
        "--set",
        "train.max_steps=3",
        "--set",
        "model.cnn_width=8",
        "--set",
        "train.batch_size=64",
        "--set",
        "eval.max_train_images=300",
        "--set",
        "train.num_workers=2",
        "--json",
    ]
    assert cli(["submit", "--address", address, "--", "pretrain", *args]) == 0
    out = capsys.readouterr().out
    assert "submitted job byol-pretrain-" in out and "SUCCEEDED" in out
    checkpoints = list((storage / "submitted").glob("step_*"))
    assert checkpoints and (checkpoints[-1] / "state.pt").is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("byol-fashion-mnist").experiment_id])
    assert runs and runs[0].info.status == "FINISHED"

    # a job that fails on the cluster (its data path does not exist there): non-zero exit, error in the output
    bad = [
        "--config",
        "configs/fashion_mnist_cpu.yaml",
        "--set",
        f"data.path={tmp_path / 'no-such-shards'}",
        "--set",
        f"run.storage_path={storage}",
    ]
    assert cli(["submit", "--address", address, "--", "pretrain", *bad]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.err and "no-such-shards" in (captured.out + captured.err)

    assert cli(["jobs", "list", "--address", address]) == 0
    assert "byol-pretrain-" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_submit_fails_fast_when_nothing_listens(capsys):
    start = time.time()
    code = cli(
        [
            "submit",
            "--address",
            f"http://127.0.0.1:{free_port()}",
            "--",
            "pretrain",
            "--config",
            "configs/fashion_mnist_cpu.yaml",
            "--set",
            "run.storage_path=/tmp/x",
        ]
    )
    assert code == 2 and time.time() - start < 30
    assert "no Ray job server at http://127.0.0.1:" in capsys.readouterr().err


def test_submit_rejects_bad_config_before_uploading(capsys):
    code = cli(
        [
            "submit",
            "--address",
            "http://127.0.0.1:1",
            "--",
            "pretrain",
            "--config",
            "configs/fashion_mnist_cpu.yaml",
            "--set",
            "optim.base_lr=-1",
        ]
    )
    assert code == 2 and "optim.base_lr" in capsys.readouterr().err


def test_kuberay_manifests_are_valid_and_point_at_real_files():
    files = sorted((ROOT / "jobs" / "k8s").glob("*.yaml"))
    assert {f.name for f in files} >= {"rayjob-imagenet-resnet50.yaml", "raycluster-interactive.yaml"}
    kinds = set()
    for f in files:
        doc = yaml.safe_load(f.read_text())
        assert doc["apiVersion"] == "ray.io/v1", f
        kinds.add(doc["kind"])
        spec = doc["spec"]
        cluster = spec.get("rayClusterSpec", spec)
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        if doc["kind"] == "RayJob":
            words = spec["entrypoint"].split()
            assert words[0] == "python" and (ROOT / words[1]).is_file()
            config = words[words.index("--config") + 1]
            assert (ROOT / config).is_file()
            from pipeline.config import load_config

            sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
            load_config(ROOT / config, sets)  # the job's config and overrides validate
            groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
            gpu = groups["gpu-train"]["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert gpu["nvidia.com/gpu"] == "1" and int(gpu["cpu"]) == 8
            assert "cpu-data" in groups
            env = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["envFrom"]
            assert env[0]["secretRef"]["name"]
    assert kinds == {"RayJob", "RayCluster"}
