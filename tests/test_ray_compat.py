"""The private Ray APIs the project relies on (``pipeline/ray_compat.py``): each is where this Ray has it, and no
other module uses one. A Ray upgrade that moves one fails here, naming it, instead of silently taking a fallback."""

import contextlib
import re
import time
from pathlib import Path

import pytest
import ray

from pipeline import ray_compat
from pipeline.data.warm_up import warm_data_workers

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
PRIVATE_RAY = re.compile(
    r"ray[.\w]*\._(internal|private|common|raylet|config)\b|\._training_actor_item_queue|\._output_node"
)


def test_every_private_ray_api_is_where_ray_compat_looks():
    status = ray_compat.private_api_status()
    moved = [name for name, found in status.items() if not found]
    assert not moved, f"ray {ray.__version__} moved these private APIs (update pipeline/ray_compat.py): {moved}"
    assert len(status) >= 10


def test_no_private_ray_api_outside_ray_compat():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "ray_compat.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE_RAY.search(line)
    ]
    assert not offenders, "private Ray APIs belong in pipeline/ray_compat.py:\n" + "\n".join(offenders)


def test_the_package_walk_would_see_a_private_import(tmp_path):
    """The walk above is not vacuous: the pattern catches each form a private use takes."""
    for line in (
        "from ray.data._internal.execution import x",
        "import ray._private.utils",
        "from ray._common.constants import X",
        "self._training_actor_item_queue.put(r)",
        "executor._output_node[1]",
    ):
        assert PRIVATE_RAY.search(line), line
    assert not PRIVATE_RAY.search("from ray.train import RunConfig")


def test_report_to_tune_without_a_queue_falls_back():
    class NoQueue:
        pass

    with pytest.warns(UserWarning, match="no result queue"):
        assert ray_compat.report_to_tune(NoQueue(), {"step": 1}) is False


def test_working_dir_walk_matches_the_fallback_on_a_plain_tree(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.py").write_text("x")
    (tmp_path / "skip").mkdir()
    (tmp_path / "skip" / "y.py").write_text("y")
    seen: list[str] = []
    ray_compat.working_dir_files(tmp_path, ["skip"], lambda p: p.is_file() and seen.append(p.name))
    assert seen == ["x.py"]


class RecordsWaitingConsumers(ray_compat.ExecutionCallback):
    seen: list[bool] = []

    def on_execution_step(self, executor) -> None:  # noqa: ANN001
        RecordsWaitingConsumers.seen.append(ray_compat.stream_consumer_waiting(executor))


@pytest.mark.integration
def test_the_executor_says_when_its_consumer_waits(ray_local):
    """The scheduling-loop pause reads Ray Data's executor internals (``ray_compat.stream_consumer_waiting``); if a
    Ray upgrade moved them the pause would quietly be fixed again: a consumer of a slow map must be seen waiting."""
    ds = ray.data.range(4, override_num_blocks=4).map_batches(lambda b: (time.sleep(0.5), b)[1])
    ds.context.custom_execution_callback_classes = [RecordsWaitingConsumers]
    RecordsWaitingConsumers.seen.clear()
    assert sum(len(b["id"]) for b in ds.iter_batches(batch_size=None)) == 4
    assert any(RecordsWaitingConsumers.seen)


@pytest.mark.integration
def test_warming_starts_ray_datas_autoscaling_coordinator(ray_local):
    """Until Ray Data's AutoscalingCoordinator answers, a stream runs one data task at a time; the warm-up starts it
    (``ray_compat.start_data_autoscaling_coordinator``): if a Ray upgrade renamed or moved it, this
    fails."""
    name = {"name": "AutoscalingCoordinator", "namespace": "AutoscalingCoordinator"}
    with contextlib.suppress(ValueError):  # started by an earlier stream: end it (a later stream starts another)
        ray.kill(ray.get_actor(**name), no_restart=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get_actor(**name)
        except ValueError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the killed AutoscalingCoordinator kept its name")
    ray.get(warm_data_workers(1), timeout=120)
    assert ray.get(ray.get_actor(**name).get_reserved_resources.remote("test"), timeout=60) == {}
