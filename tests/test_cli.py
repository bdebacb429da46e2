import subprocess
import sys

import pytest

from pipeline.cli.main import build_parser, main

COMMANDS = {"config", "prepare", "pretrain", "tune", "eval", "export", "embed", "submit", "jobs", "demo"}


def test_help_lists_exactly_the_working_commands():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    listed = set(build_parser()._subparsers._group_actions[0].choices)
    assert listed == COMMANDS
    for name in COMMANDS:
        assert name in out.stdout


def test_config_command_validates_before_anything_starts(capsys):
    assert main(["config", "--config", "configs/fashion_mnist_cpu.yaml", "--set", "optim.base_lr=0.5", "--json"]) == 0
    assert '"base_lr": 0.5' in capsys.readouterr().out
    assert main(["pretrain", "--config", "configs/fashion_mnist_cpu.yaml", "--set", "ema.tau_base=2"]) == 2
    assert "ema.tau_base" in capsys.readouterr().err


def test_missing_data_path_is_a_clear_error(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["eval"])  # argparse: --data and a checkpoint source are required
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "b.pt")]) == 2
    assert "not a byol checkpoint" in capsys.readouterr().err


def test_verbose_goes_before_or_after_the_command(monkeypatch):
    import os

    parser = build_parser()
    assert parser.parse_args(["pretrain", "--verbose"]).verbose and parser.parse_args(["--verbose", "pretrain"]).verbose
    assert not parser.parse_args(["pretrain"]).verbose
    monkeypatch.delenv("BYOL_VERBOSE", raising=False)
    assert main(["config", "--verbose", "--config", "configs/fashion_mnist_cpu.yaml"]) == 0
    assert os.environ["BYOL_VERBOSE"] == "1"  # what Ray's loggers are set from (pipeline.train.cluster)
    monkeypatch.delenv("BYOL_VERBOSE")
