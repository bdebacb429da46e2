import os

import pytest
import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

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
    import signal
    import subprocess
    import sys

    import pyarrow.fs as pafs

    from tests.netutil import free_port, wait_for_port

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
