"""One base for the errors a user can fix; the kind of error every rank stopped on reaches the driver."""

import pickle

import pytest

from pipeline import errors
from pipeline.cli.main import main


def test_every_user_error_travels_as_itself():
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.UserError):
            copy = pickle.loads(pickle.dumps(cls("what and how")))
            assert type(copy) is cls and str(copy) == "what and how"


def test_the_user_error_is_found_along_the_chain_of_causes():
    """Ray Data wraps a map's error (``UserCodeException ... from e``); Ray makes task-error classes on the fly."""

    class UserCodeException(Exception):
        pass

    try:
        try:
            raise errors.BadRecord("bad record (undecodable) in shard train/part-00001.parquet, key k")
        except errors.BadRecord as exc:
            raise UserCodeException("UDF failed") from exc
    except UserCodeException as wrapped:
        assert errors.user_error_class(wrapped) is errors.BadRecord
    dynamic = type("RayTaskError(DataError)", (RuntimeError, errors.DataError), {})
    assert errors.user_error_class(dynamic("x")) is errors.DataError
    assert errors.user_error_class(ZeroDivisionError("a bug")) is errors.TrainingError


def test_the_cli_ends_a_user_error_with_one_line(capsys, tmp_path):
    assert main(["pretrain", "--set", "train.batch_size=1"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("byol pretrain: error: invalid config") or "train.batch_size" in last


def test_the_demo_names_this_cpu_and_its_precision():
    from pipeline.core.step import cpu_bf16_flags, cpu_description

    line = cpu_description()
    assert "cores" in line and (("trains in bf16" in line) == bool(cpu_bf16_flags()))
    assert cpu_description("fp32").endswith("trains in fp32 (train.precision=fp32)")
    assert line.endswith("fp32") != bool(cpu_bf16_flags())


@pytest.mark.parametrize("bad", ["--val-fraction=1.5"])
def test_prepare_arguments_are_config_errors(tmp_path, bad, capsys):
    assert main(["prepare", "--source", "fashion-mnist", "--out", str(tmp_path / "x"), bad]) == 2
    assert "--val-fraction" in capsys.readouterr().err
