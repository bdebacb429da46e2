"""`byol submit` without a cluster: what goes into runtime_env, which directory is uploaded, how big it may be,
where the token comes from; and checkpoints/exported weights that never unpickle code (weights_only=True)."""

import json
import os
from pathlib import Path

import pytest
import torch

from pipeline.cli import job_server
from pipeline.cli import submit as sub

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {
    "AWS_ACCESS_KEY_ID": "canary-akid-5b1e",
    "AWS_SECRET_ACCESS_KEY": "canary-aws-secret-7f3a",
    "AWS_SESSION_TOKEN": "canary-session-91c2",
    "MLFLOW_TRACKING_USERNAME": "canary-user-0d4e",
    "MLFLOW_TRACKING_PASSWORD": "canary-mlflow-pass-2c8d",
    "MLFLOW_TRACKING_TOKEN": "canary-mlflow-token-6a0f",
    "GOOGLE_APPLICATION_CREDENTIALS": "/home/me/canary-gcp-key.json",
    "RAY_AUTH_TOKEN": "canary-ray-token-3e9b",
}


@pytest.fixture
def secret_env(monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.com")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    return SECRETS


def test_runtime_env_carries_settings_but_no_secret_by_default(secret_env, capsys):
    env = sub.runtime_env([], None, ROOT)
    dumped = json.dumps(env)
    assert not [v for v in secret_env.values() if v in dumped]
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"
    assert env["env_vars"]["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert env["working_dir"] == str(ROOT) and "WARNING" not in capsys.readouterr().err


def test_env_flag_forwards_a_secret_only_by_name_and_warns(secret_env, capsys):
    env = sub.runtime_env(["MLFLOW_TRACKING_PASSWORD"], None, ROOT)
    assert env["env_vars"]["MLFLOW_TRACKING_PASSWORD"] == secret_env["MLFLOW_TRACKING_PASSWORD"]
    assert "AWS_SECRET_ACCESS_KEY" not in env["env_vars"]
    err = capsys.readouterr().err
    assert "WARNING: --env MLFLOW_TRACKING_PASSWORD" in err and "ray job list" in err
    assert secret_env["MLFLOW_TRACKING_PASSWORD"] not in err
    with pytest.raises(sub.SubmitError, match="never sent to the job"):
        sub.runtime_env(["RAY_AUTH_TOKEN"], None, ROOT)
    with pytest.raises(sub.SubmitError, match="not set in this environment"):
        sub.runtime_env(["BYOL_TEST_NOT_SET_ANYWHERE"], None, ROOT)


def test_tracking_uri_with_a_password_is_not_forwarded(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://me:canary-in-url-44@mlflow.example.com")
    env = sub.runtime_env([], None, ROOT)
    assert "MLFLOW_TRACKING_URI" not in env["env_vars"] and "canary-in-url-44" not in json.dumps(env)
    assert "contains a password" in capsys.readouterr().err


def _fake_project(path: Path) -> Path:
    (path / "jobs").mkdir(parents=True)
    (path / "pyproject.toml").write_text('[project]\nname = "byol-ray"\n')
    for entry in sub.ENTRY_POINTS.values():
        (path / entry).write_text("")
    return path


def test_project_root_is_the_package_checkout_or_found_above_cwd(tmp_path):
    assert sub.project_root(tmp_path) == ROOT  # run from elsewhere: the checkout this code runs from
    fake = _fake_project(tmp_path / "proj")
    (fake / "a" / "b").mkdir(parents=True)
    assert sub.project_root(fake / "a" / "b", prefer=None) == fake  # an installed (non-editable) byol: walk up
    with pytest.raises(sub.SubmitError, match="cannot find the byol-ray project"):
        sub.project_root(tmp_path, prefer=None)


def test_upload_keeps_all_code_and_drops_data_venv_and_caches():
    files = {str(p) for p, _ in sub.upload_listing(ROOT)}
    assert {"pyproject.toml", "jobs/check.py", "pipeline/data/__init__.py", "pipeline/cli/submit.py"} <= files
    assert not [f for f in files if f.split("/")[0] in {".git", ".venv", "data", "runs", "mlruns"}]
    assert not [f for f in files if f.endswith(".db") or "__pycache__" in f]


def test_oversized_working_dir_is_refused_naming_the_largest_paths(tmp_path):
    fake = _fake_project(tmp_path / "proj")
    (fake / "pipeline" / "data").mkdir(parents=True)
    (fake / "pipeline" / "data" / "__init__.py").write_text("")
    for rel, mb in [("scratch/blob.bin", 120), ("data/huge.bin", 500), ("notes/small.bin", 1)]:
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(fake / rel, "wb") as f:  # sparse: sizes without writing them
            f.truncate(mb * 1_000_000)
    with pytest.raises(sub.SubmitError) as err:
        sub.check_upload_size(fake, limit_mb=100)
    message = str(err.value)
    assert "limit 100 MB" in message and "scratch/ (120.0 MB)" in message and "scratch/blob.bin" in message
    assert "huge.bin" not in message  # data/ is excluded: it does not count
    (fake / ".rayignore").write_text("scratch/\n")
    count, size = sub.check_upload_size(fake, limit_mb=100)
    assert 1_000_000 <= size < 1_001_000  # the 1 MB file and a few small ones
    assert "pipeline/data/__init__.py" in {str(p) for p, _ in sub.upload_listing(fake)}
    # submit checks the size before it contacts any cluster
    (fake / ".rayignore").unlink()
    with pytest.raises(sub.SubmitError, match="would upload"):
        sub.submit("http://127.0.0.1:1", "check", [], working_dir=fake)


def test_token_is_looked_up_where_ray_looks(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert job_server.local_token() == (None, "")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert job_server.local_token()[0] == "from-home"
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert job_server.local_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert job_server.local_token() == ("from-env", "RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(sub.SubmitError, match="RAY_AUTH_TOKEN_PATH"):
        job_server.local_token()


class _Payload:
    """Unpickling this runs os.makedirs(marker): a stand-in for any code a crafted checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.timeout(120)
def test_checkpoints_and_exported_backbone_load_weights_only(tmp_path):
    from pipeline.config import load_config
    from pipeline.core import checkpoint as ckpt
    from pipeline.core.export import export_backbone
    from pipeline.core.models import build_networks

    cfg = load_config(
        None, ["data.channels=1", "data.image_size=28", "data.mean=[0.5]", "data.std=[0.5]", "model.cnn_width=4"]
    )
    online, _ = build_networks(cfg.model, 1)
    ckpt.save_state(tmp_path / "good", {"step": 1, "online": online.state_dict()}, cfg)
    out = export_backbone(tmp_path / "good", tmp_path / "backbone.pt")["out"]
    weights = torch.load(out, weights_only=True)  # what the README tells users to do with an exported backbone
    assert set(weights) == set(online.encoder.state_dict())

    marker = tmp_path / "payload-ran"
    (tmp_path / "evil").mkdir()
    torch.save({"step": 1, "online": {"encoder.w": _Payload(marker)}}, tmp_path / "evil" / "state.pt")
    for load in (
        lambda: ckpt.load_state(tmp_path / "evil"),
        lambda: export_backbone(tmp_path / "evil", tmp_path / "o"),
    ):
        with pytest.raises(Exception, match="weights_only|Unsupported global"):
            load()
    torch.save({"w": _Payload(marker)}, tmp_path / "evil-backbone.pt")
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        torch.load(tmp_path / "evil-backbone.pt", weights_only=True)
    assert not marker.exists()


def test_a_study_is_validated_locally_before_anything_is_uploaded(capsys):
    from pipeline.errors import ConfigError

    assert sub.ENTRY_POINTS["tune"] == "jobs/tune.py" and (sub.project_root() / "jobs" / "tune.py").is_file()
    sub.validate_locally("tune", ["--config", "configs/tune_cifar10_gpu.yaml", "--set", "run.storage_path=s3://b/x"])
    with pytest.raises(ConfigError, match="tune.space.optim.base_lr"):
        sub.validate_locally(
            "tune", ["--config", "configs/tune_cifar10_gpu.yaml", "--set", "tune.space.optim.base_lr.low=-1"]
        )
    with pytest.raises(sub.SubmitError, match="needs --config"):
        sub.validate_locally("tune", [])


def test_an_embed_job_is_validated_locally_and_warned_of_a_relative_out(capsys):
    assert (sub.project_root() / sub.ENTRY_POINTS["embed"]).is_file()
    sub.validate_locally("embed", ["--checkpoint", "s3://b/ckpt", "--data", "s3://b/shards", "--out", "s3://b/emb"])
    assert "relative" not in capsys.readouterr().err
    sub.validate_locally("embed", ["--checkpoint", "s3://b/ckpt", "--data", "s3://b/shards", "--out", "emb"])
    assert "--out 'emb' is relative" in capsys.readouterr().err
    sub.validate_locally("embed", ["--checkpoint", "runs/r/step_1", "--data", "data/shards", "--out", "s3://b/emb"])
    err = capsys.readouterr().err
    assert "--checkpoint 'runs/r/step_1' is relative" in err and "--data 'data/shards' is relative" in err
    assert "leaves out data/ and runs/" in err
    with pytest.raises(SystemExit):  # argparse: --out is required
        sub.validate_locally("embed", ["--checkpoint", "s3://b/ckpt", "--data", "s3://b/shards"])
