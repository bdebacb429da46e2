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
def ray_local():
    """One local Ray for the session (sized for 2 train workers), shut down at the end."""
    import ray

    from pipeline.cluster import connect

    started = connect(train_workers=2, cpus_per_worker=1.0, include_dashboard=False)
    yield ray
    if started:
        ray.shutdown()
