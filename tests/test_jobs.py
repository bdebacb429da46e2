"""Ray Jobs: a real head node on 127.0.0.1 (own ports, own temp dir, token authentication with its own token),
`byol submit` against it, and the KubeRay manifests.

One head (conftest's ``ray_head``) serves the whole module. `byol submit` runs as a subprocess where the test is
about what a user sees (its environment, its working directory, its output); HOME points at an empty folder there,
so a token in this machine's ~/.ray/auth_token is never picked up by accident.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli.main import main as cli
from tests.netutil import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CANARIES = {"AWS_SECRET_ACCESS_KEY": "canary-aws-5e0c1d9b", "MLFLOW_TRACKING_PASSWORD": "canary-mlflow-8a7f22e4"}


def user_env(tmp_path: Path, address: str, **extra: str) -> dict[str, str]:
    """A user's shell: no Ray auth settings, an empty HOME, RAY_ADDRESS set, plus ``extra``."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_") and k not in CANARIES}
    env.update(HOME=str(home), RAY_ADDRESS=address, PATH=f"{BIN}:{os.environ['PATH']}", **extra)
    return env


def byol(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "byol"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def job_client(address: str, token: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})


def submitted_id(out: str) -> str:
    match = re.search(r"submitted job (\S+)", out)
    assert match, out
    return match.group(1)


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_submit_a_failing_job(ray_head, tmp_path, capsys, monkeypatch):
    """`byol submit` of a job that fails on the cluster: its status and error reach the user, and the exit code is
    not 0. (A job that trains: tests/test_manifest_jobs.py submits `python jobs/pretrain.py`, the same entrypoint.)"""
    address, token = ray_head
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)  # the head's own token: nothing else would be accepted
    monkeypatch.chdir(ROOT)
    storage = tmp_path / "job-runs"

    # its data path does not exist on the cluster: non-zero exit, error in the output
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


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_secrets_stay_out_of_job_metadata_and_logs_unless_named(ray_head, tmp_path):
    address, token = ray_head
    env = user_env(tmp_path, address, RAY_AUTH_TOKEN=token, MLFLOW_TRACKING_URI="http://127.0.0.1:9/", **CANARIES)
    names = list(CANARIES)

    # 1. by default: the job gets the tracking URI (not secret) and neither secret
    first = byol(["submit", "--", "check", *names], env, ROOT)
    output = first.stdout + first.stderr
    assert first.returncode == 0, output
    assert "[check] env AWS_SECRET_ACCESS_KEY: not set" in output
    assert "[check] env MLFLOW_TRACKING_PASSWORD: not set" in output
    assert "[check] env MLFLOW_TRACKING_URI: set: http://127.0.0.1:9/" in output
    assert "[byol] WARNING" not in first.stderr and "is now ignored by default" not in first.stderr
    assert not [c for c in CANARIES.values() if c in output]
    first_id = submitted_id(first.stdout)

    jobs = job_client(address, token)
    seen = [repr(jobs.get_job_info(first_id)), repr(jobs.list_jobs()), jobs.get_job_logs(first_id)]
    cli_list = subprocess.run(  # what any user of the job API sees with `ray job list`
        [str(BIN / "ray"), "job", "list", "--address", address],
        env=dict(user_env(tmp_path, address), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli_list.returncode == 0 and first_id in cli_list.stdout, cli_list.stderr
    seen.append(cli_list.stdout)
    assert first_id in seen[0] and "127.0.0.1:9" in seen[0]  # the right job, with its runtime_env
    assert not [c for c in CANARIES.values() for text in seen if c in text]

    # 2. named with --env: the job sees that value (same fingerprint), a warning says who else can now read it
    second = byol(["submit", "--env", "MLFLOW_TRACKING_PASSWORD", "--", "check", *names], env, ROOT)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output
    assert "WARNING: --env MLFLOW_TRACKING_PASSWORD" in second.stderr and "ray job list" in second.stderr
    password = CANARIES["MLFLOW_TRACKING_PASSWORD"]
    fingerprint = hashlib.sha256(password.encode()).hexdigest()[:12]
    assert f"[check] env MLFLOW_TRACKING_PASSWORD: set ({len(password)} chars, sha256 {fingerprint})" in output
    assert "[check] env AWS_SECRET_ACCESS_KEY: not set" in output
    assert password not in output  # the job reports a fingerprint, never the value
    second_id = submitted_id(second.stdout)
    assert password not in jobs.get_job_logs(second_id)
    # ...and the warning is true: the value now sits in that job's runtime_env for every job-API user
    assert jobs.get_job_info(second_id).runtime_env["env_vars"]["MLFLOW_TRACKING_PASSWORD"] == password
    assert CANARIES["AWS_SECRET_ACCESS_KEY"] not in repr(jobs.list_jobs())


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_token_needed_and_project_root_uploaded_from_elsewhere(ray_head, tmp_path):
    address, token = ray_head
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "NOT_THE_PROJECT.txt").write_text("a user's unrelated folder\n")

    # no token anywhere (RAY_AUTH_TOKEN unset, empty HOME): refused in seconds, saying how to pass one
    start = time.time()
    refused = byol(["submit", "--", "check"], user_env(tmp_path, address), elsewhere, timeout=60)
    assert refused.returncode == 2 and time.time() - start < 30, refused.stderr
    assert "requires an authentication token" in refused.stderr
    assert "RAY_AUTH_TOKEN=" in refused.stderr and "RAY_AUTH_TOKEN_PATH=" in refused.stderr
    assert "Traceback" not in refused.stderr

    # a wrong token: rejected, also in seconds
    wrong = byol(["jobs", "list"], user_env(tmp_path, address, RAY_AUTH_TOKEN="not-the-token"), elsewhere, timeout=60)
    assert wrong.returncode == 2 and "rejected the token from RAY_AUTH_TOKEN" in wrong.stderr, wrong.stderr

    # the token in a file (RAY_AUTH_TOKEN_PATH) is found too
    (tmp_path / "token").write_text(token + "\n")
    listed = byol(["jobs", "list"], user_env(tmp_path, address, RAY_AUTH_TOKEN_PATH=str(tmp_path / "token")), elsewhere)
    assert listed.returncode == 0, listed.stderr

    # with RAY_AUTH_TOKEN: accepted; run from the unrelated folder, the job gets the project root
    ok = byol(["submit", "--", "check"], user_env(tmp_path, address, RAY_AUTH_TOKEN=token), elsewhere)
    output = ok.stdout + ok.stderr
    assert ok.returncode == 0, output
    assert f"[byol] uploading {ROOT} (" in ok.stderr
    assert "[check] project files: pyproject.toml yes, jobs/ yes, pipeline/ yes, pipeline/data/ yes, configs/ yes" in (
        output
    )
    entries = re.search(r"\[check\] top-level entries: (.*)", output).group(1).split()
    assert {"pyproject.toml", "jobs/", "pipeline/", "configs/"} <= set(entries)
    assert not {"NOT_THE_PROJECT.txt", ".venv/", ".git/", "data/", "runs/"} & set(entries)
    cwd = re.search(r"\[check\] cwd: (.*)", output).group(1)
    assert cwd not in (str(elsewhere), str(ROOT))  # Ray's unpacked copy of the upload


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
            if words[1] == "jobs/prepare.py":  # prepare writes shards to object storage from a mounted folder
                out = words[words.index("--out") + 1]
                assert out.startswith("s3://") and words[words.index("--source") + 1].startswith("imagefolder:/")
                continue
            config = words[words.index("--config") + 1]
            assert (ROOT / config).is_file()
            from pipeline.config import load_config
            from pipeline.tune.space import load_study

            sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
            if words[1] == "jobs/tune.py":  # a study: its trial drivers need the custom resource on the head
                cfg, study = load_study(ROOT / config, sets)
                resources = cluster["headGroupSpec"]["rayStartParams"]["resources"]
                assert json.loads(json.loads(resources))["tune_driver"] >= study.max_concurrent_trials
            else:
                cfg = load_config(ROOT / config, sets)  # the job's config and overrides validate
            # what a job reads and writes is on storage every node reaches
            assert cfg.data.path.startswith("s3://") and cfg.run.storage_path.startswith("s3://"), f
            groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
            gpu = groups["gpu-train"]["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert gpu["nvidia.com/gpu"] == "1" and int(gpu["cpu"]) == 8
            assert "cpu-data" in groups
            env = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["envFrom"]
            assert env[0]["secretRef"]["name"]
    assert kinds == {"RayJob", "RayCluster"}
