"""The study config and the study driver's pure parts (no Ray cluster)."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.core.plan import RunPlan
from pipeline.errors import ConfigError
from pipeline.tune.monitor import CollapseRule
from pipeline.tune.space import config_values, load_study, trial_config, tune_space
from pipeline.tune.study import choose_concurrency
from pipeline.tune.summary import format_table
from pipeline.tune.trial import chunk_stop, epochs_to_steps, window_since

ROOT = Path(__file__).resolve().parents[1]


def write_study(tmp_path, tune: dict, **sections) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**sections, "tune": tune}))
    return path


SPACE = {
    "ema.tau_base": {"type": "one_minus_loguniform", "low": 0.001, "high": 0.1},
    "optim.base_lr": {"type": "loguniform", "low": 0.1, "high": 3.0},
    "ema.schedule": {"type": "choice", "values": ["cosine", "constant"]},
}


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("tune_*.yaml")))
def test_shipped_study_configs_validate(name):
    cfg, study = load_study(ROOT / "configs" / name)
    assert {"ema.tau_base", "optim.base_lr", "optim.warmup_epochs"} <= set(study.space)
    assert study.space["ema.tau_base"].type == "one_minus_loguniform"
    # the paper's cosine in every trial: the schedule is not searched, and the base config's is cosine
    assert "ema.schedule" not in study.space and cfg.ema.schedule == "cosine"
    assert cfg.train.epochs >= 1


def test_the_demo_settings_study_trains_the_demos_network_on_the_demos_data():
    """configs/tune_fashion_mnist_demo.yaml chooses the demo's schedules at a shorter budget: everything else as
    the demo (configs/fashion_mnist_cpu.yaml) trains it."""
    from pipeline.config import load_config

    cfg, study = load_study(ROOT / "configs" / "tune_fashion_mnist_demo.yaml")
    demo = load_config(ROOT / "configs" / "fashion_mnist_cpu.yaml")
    assert cfg.model == demo.model and cfg.augment.model_copy(update={"device": demo.augment.device}) == demo.augment
    assert (cfg.train.batch_size, cfg.data.path, cfg.optim.name) == (demo.train.batch_size, demo.data.path, "lars")
    assert cfg.train.epochs < demo.train.epochs and study.scheduler == "asha"


def test_tau_is_searched_on_one_minus_tau(tmp_path):
    _, study = load_study(write_study(tmp_path, {"space": SPACE}))
    space = tune_space(study)
    assert "ema.tau_base@one_minus" in space and "ema.tau_base" not in space
    assert config_values({"ema.tau_base@one_minus": 0.01, "optim.base_lr": 0.5}) == {
        "ema.tau_base": pytest.approx(0.99),
        "optim.base_lr": 0.5,
    }
    cfg = trial_config(load_config(None), {"ema.tau_base@one_minus": 0.02, "ema.schedule": "constant"})
    assert cfg.ema.tau_base == pytest.approx(0.98) and cfg.ema.schedule == "constant"


@pytest.mark.parametrize(
    "space, message",
    [
        ({"optim.base_rate": {"type": "loguniform", "low": 0.1, "high": 1}}, "tune.space.optim.base_rate"),
        ({"ema.tau_base": {"type": "one_minus_loguniform", "low": 0.5, "high": 2}}, "tune.space.ema.tau_base"),
        ({"optim.lr_schedule": {"type": "choice", "values": ["cosine", "cosin"]}}, "tune.space.optim.lr_schedule"),
        ({"optim.base_lr": {"type": "loguniform", "low": 0, "high": 1}}, "low > 0"),
        ({"optim.base_lr": {"type": "choice"}}, "values"),
    ],
)
def test_bad_space_fails_before_ray_naming_the_key(tmp_path, space, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_study(write_study(tmp_path, {"space": space}))


def test_searcher_and_scheduler_combinations_checked(tmp_path):
    grid = {"optim.base_lr": {"type": "grid", "values": [0.5, 1.0]}}
    with pytest.raises(ConfigError, match="optuna"):
        load_study(write_study(tmp_path, {"space": grid, "searcher": "optuna"}))
    with pytest.raises(ConfigError, match="pbt.mutate"):
        load_study(write_study(tmp_path, {"space": {"optim.base_lr": SPACE["optim.base_lr"]}, "scheduler": "pbt"}))
    with pytest.raises(ConfigError, match="grid or choice"):
        load_study(write_study(tmp_path, {"space": SPACE, "searcher": "grid"}))
    with pytest.raises(ConfigError, match="tune.num_samples"):
        load_study(write_study(tmp_path, {"space": SPACE, "num_samples": 0}))
    weight_decay = {**SPACE, "optim.weight_decay": {"type": "loguniform", "low": 1e-6, "high": 1e-4}}
    with pytest.raises(ConfigError, match="cannot change in a running trial"):
        load_study(
            write_study(
                tmp_path,
                {"space": weight_decay, "scheduler": "pbt", "pbt": {"mutate": ["optim.base_lr", "optim.weight_decay"]}},
            )
        )
    with pytest.raises(ConfigError, match="no tune: section"):
        (tmp_path / "plain.yaml").write_text("train: {epochs: 1}\n")
        load_study(tmp_path / "plain.yaml")


def test_overrides_reach_the_study_and_the_pretraining(tmp_path):
    cfg, study = load_study(
        write_study(tmp_path, {"space": SPACE}), ["tune.num_samples=7", "train.epochs=3", "tune.scheduler=pbt"]
    )
    assert study.num_samples == 7 and study.scheduler == "pbt" and cfg.train.epochs == 3


def test_concurrency_fits_the_cluster():
    from pipeline.tune.space import TuneSection

    cfg = load_config(None, ["train.num_workers=1", "data.deterministic=true"])
    study = TuneSection.model_validate({"space": SPACE})
    assert choose_concurrency(cfg, study, cpus=2, gpus=0)[0] == 2
    ray_data = load_config(None, ["train.num_workers=2"])  # 2 workers + 1 CPU for its Ray Data pipeline
    assert choose_concurrency(ray_data, study, cpus=8, gpus=0)[0] == 2
    assert choose_concurrency(ray_data, study, cpus=2, gpus=0)[0] == 1  # never 0
    gpu = load_config(None, ["train.num_workers=1", "train.use_gpu=true", "train.cpus_per_worker=4"])
    assert choose_concurrency(gpu, study, cpus=64, gpus=4)[0] == 4
    # Trial drivers without the tune_driver resource take 0.01 CPU each: 2 CPUs fit one 1-CPU trial, not two.
    assert choose_concurrency(cfg, study, cpus=2, gpus=0, driver_cpu=0.01)[0] == 1
    capped = TuneSection.model_validate({"space": SPACE, "max_concurrent_trials": 1})
    n, why = choose_concurrency(cfg, capped, cpus=16, gpus=0)
    assert n == 1 and "max_concurrent_trials" in why


def test_collapse_rule_needs_patience_or_chance():
    rule = CollapseRule(collapse_warn=0.1, patience=2, chance=0.1, margin=0.02)
    low = {"collapse_std": 0.01, "knn_top1": 0.5}
    assert not rule.observe("a", {**low, "training_iteration": 1})
    assert not rule.observe("a", {**low, "training_iteration": 1})  # the same result seen twice counts once
    assert rule.observe("a", {**low, "training_iteration": 2}) and "collapse monitor" in rule.collapsed["a"]
    assert not rule.observe("b", {"collapse_std": 0.01, "knn_top1": 0.5, "training_iteration": 1})
    assert not rule.observe("b", {"collapse_std": 0.5, "knn_top1": 0.5, "training_iteration": 2})  # streak reset
    assert rule.observe("c", {"collapse_std": 0.9, "knn_top1": 0.11, "training_iteration": 1})
    assert "chance" in rule.collapsed["c"]
    # The lowest monitor value of the log steps since the last report counts (a collapse between reports).
    # "Stays under": every log step since the last report; one dip is not a collapse.
    dip = [{"step": 3, "collapse_std": 0.02}, {"step": 6, "collapse_std": 0.6}]
    rule1 = CollapseRule(collapse_warn=0.1, patience=1, chance=0.1, margin=0.02)
    assert not rule1.observe("d", {"collapse_std": 0.02, "knn_top1": 0.5, "log_history": dip, "training_iteration": 1})
    under = [{"step": 9, "collapse_std": 0.05}, {"step": 12, "collapse_std": 0.02}]
    assert rule1.observe("d", {"collapse_std": 0.5, "knn_top1": 0.5, "log_history": under, "training_iteration": 2})
    # An exploit starts the streak again (another trial's state).
    rule2 = CollapseRule(collapse_warn=0.1, patience=2, chance=0.1, margin=0.02)
    assert not rule2.observe("e", {**low, "training_iteration": 1, "step": 15})
    assert not rule2.observe("e", {**low, "training_iteration": 2, "step": 30, "exploited_from": "x"})


def test_perturbed_values_are_clipped_into_the_space(tmp_path):
    from pipeline.tune.space import clip_to_space, search_bounds

    _, study = load_study(write_study(tmp_path, {"space": SPACE}))
    bounds = search_bounds(study)
    clipped = clip_to_space({"ema.tau_base@one_minus": 0.5, "optim.base_lr": 0.01, "ema.schedule": "cosine"}, bounds)
    assert clipped == {"ema.tau_base@one_minus": 0.1, "optim.base_lr": 0.1, "ema.schedule": "cosine"}


def test_chunk_names_are_never_reused():
    from pipeline.tune.trial import chunk_name

    assert chunk_name("t1", 15) != chunk_name("t1", 15) and chunk_name("t1", 15).startswith("t1-0000015-")


def test_chunks_and_report_windows():
    plan = RunPlan.from_config(load_config(None, ["train.batch_size=100", "train.epochs=3"]), 1000)
    assert epochs_to_steps(1, plan) == 10 and epochs_to_steps(0.25, plan) == 3
    assert [chunk_stop(s, 30, 10) for s in (0, 10, 15, 20, 29)] == [10, 20, 20, 30, 30]
    history = [{"step": s, "loss": 1.0, "bad_records": 0} for s in (5, 10, 15)]
    assert window_since(history, 5) == [{"step": 10, "loss": 1.0}, {"step": 15, "loss": 1.0}]


def test_table_lists_the_columns_people_compare():
    row = {"trial": "t1", "tau_base": 0.99, "tau_schedule": "cosine", "base_lr": 0.5, "warmup_epochs": 1.0}
    text = format_table([{**row, "lr_schedule": "cosine", "knn_top1": 0.81234, "status": "collapsed"}])
    header = text.splitlines()[0].split()
    assert header == [
        "trial",
        "tau_base",
        "tau_schedule",
        "base_lr",
        "warmup_epochs",
        "lr_schedule",
        "knn_top1",
        "status",
    ]
    assert "0.8123" in text and "collapsed" in text


def test_a_restarted_trial_finds_its_newest_complete_checkpoint(tmp_path):
    from pipeline.tune.trial import latest_own_checkpoint

    def checkpoint(run: str, step: int, complete: bool = True) -> None:
        folder = tmp_path / run / f"step_{step:08d}"
        folder.mkdir(parents=True)
        if complete:
            (folder / "state.pt").write_bytes(b"x")

    assert latest_own_checkpoint(str(tmp_path / "none-yet"), "t1") is None
    checkpoint("t1-0000000-aaaa", 5)
    checkpoint("t1-0000000-aaaa", 10)
    checkpoint("t1-0000010-bbbb", 15, complete=False)  # being written when the node was lost
    checkpoint("t10-0000000-cccc", 99)  # another trial whose id starts the same way
    checkpoint("t2-0000000-dddd", 50)
    assert latest_own_checkpoint(str(tmp_path), "t1") == (10, str(tmp_path / "t1-0000000-aaaa" / "step_00000010"))
