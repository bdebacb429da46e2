import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.netutil import free_port, stop_ray_head, wait_for_port

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
BIN = Path(sys.executable).parent

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture
def fashion_mnist_dir():
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.fail(f"{FASHION_MNIST_DIR} missing: apt-get install -y dataset-fashion-mnist")
    return FASHION_MNIST_DIR


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3 (moto server on 127.0.0.1) with bucket ``byol-test``; AWS_* set in this process's environment
    before Ray starts, so Ray Train's workers reach it too. Stopped at the end of the session."""
    import pyarrow.fs as pafs

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    if not wait_for_port(port, 60):
        proc.kill()
        pytest.fail("moto server did not start")
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1"
    )
    pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir("byol-test")
    yield endpoint
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """One local Ray for the session (sized for 2 train workers), shut down at the end."""
    import ray

    from pipeline.train.cluster import connect

    started = connect(train_workers=2, cpus_per_worker=1.0, resources={"tune_driver": 2})  # Tune trial drivers
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def small_fmnist_shards(tmp_path_factory):
    """1,200 real Fashion-MNIST images (10 classes) as prepared shards with a 10% val split."""
    from PIL import Image

    from pipeline.data.prepare import prepare
    from pipeline.data.sources import load_fashion_mnist

    root = tmp_path_factory.mktemp("small-fmnist")
    images, labels = load_fashion_mnist(FASHION_MNIST_DIR, "train")
    for i in range(1200):
        folder = root / "src" / f"{labels[i]:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
    prepare(f"imagefolder:{root / 'src'}", str(root / "shards"), val_fraction=0.1, min_shards=4, log=lambda *a: None)
    return root / "shards"


TINY_TRAIN = [
    "model.cnn_width=8",
    "model.proj_hidden=64",
    "model.pred_hidden=64",
    "model.proj_dim=32",
    "train.batch_size=64",
    "optim.warmup_epochs=0.5",
    "eval.max_train_images=500",
    "log.every_steps=1",
]


@pytest.fixture
def tiny_cfg(small_fmnist_shards, tmp_path):
    """A seconds-long pretraining config on the small shards, storing runs under tmp_path."""
    from pipeline.config import load_config

    def make(*overrides):
        return load_config(
            "configs/fashion_mnist_cpu.yaml",
            [f"data.path={small_fmnist_shards}", f"run.storage_path={tmp_path / 'runs'}", *TINY_TRAIN, *overrides],
        )

    return make


@pytest.fixture(scope="session")
def fmnist_full_shards(tmp_path_factory):
    """The whole Fashion-MNIST (54k train / 6k val / 10k test) as prepared shards (about 12 s)."""
    from pipeline.data.prepare import prepare

    out = tmp_path_factory.mktemp("fmnist-full") / "shards"
    prepare(f"fashion-mnist:{FASHION_MNIST_DIR}", str(out), log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head for one test module on 127.0.0.1, as a cluster runs it: `ray start --head --block` with
    RAY_AUTH_MODE=token and its own token, in its own process group, 8 logical CPUs and 2 ``tune_driver``
    resources (what the study manifests declare on their head). Stopped by that group and its temp dir only
    (never `ray stop`, which would stop every Ray on the machine). Yields (job API address, token)."""
    temp_dir = tempfile.mkdtemp(prefix="byolray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    token = secrets.token_hex(24)
    port, dash = free_port(), free_port()
    # The head holds no credentials of its own (other tests' local S3 keys included): what a job sees of them
    # can only have come through the job API.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}:{os.environ['PATH']}")
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=8",
            '--resources={"tune_driver": 2}',
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
    try:
        if not wait_for_port(dash, 120):
            pytest.fail("ray head did not start")
        time.sleep(3)
        yield address, token
    finally:
        stop_head(proc, temp_dir)


def stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    left = stop_ray_head(proc, lambda line: temp_dir in line)  # what Ray daemonised is found by its temp dir
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, left


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite store, artifacts served by it) for one test module."""
    tmp_path = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    if not wait_for_port(port, 90):
        proc.kill()
        pytest.fail("mlflow server did not start")
    yield uri, proc
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
