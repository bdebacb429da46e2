"""``byol submit`` and ``byol jobs``: run the entry points in ``jobs/`` on a Ray cluster via the Job API.

The working directory is uploaded as the job's ``working_dir`` (``.gitignore``/``.rayignore`` apply,
and data, runs, virtualenvs and caches are excluded explicitly). Secrets travel as environment
variables named with ``--env NAME`` (their values are read here, never put on the command line).
Token authentication (on by default in Ray 2.60) is used: the client sends ``~/.ray/auth_token``
or ``RAY_AUTH_TOKEN`` because ``RAY_AUTH_MODE=token`` is set unless you set it otherwise.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import socket
import sys
import time
from urllib.parse import urlparse

ENTRY_POINTS = {"pretrain": "jobs/pretrain.py", "eval": "jobs/evaluate.py", "prepare": "jobs/prepare.py"}
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "data",
    "runs",
    "mlruns",
    "*.db",
    "bench/work",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
]
FORWARDED_ENV = [
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "GOOGLE_APPLICATION_CREDENTIALS",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 90


class SubmitError(RuntimeError):
    """The cluster cannot be reached or the request is malformed; the message says which."""


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    return address


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at the job server's address."""
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https"):
        return  # ray:// or a provider-specific scheme: leave it to the client
    port = parsed.port or (443 if parsed.scheme == "https" else 8265)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        raise SubmitError(
            f"no Ray job server at {address} ({exc.__class__.__name__}: {exc}); is the head running, and is its "
            f"dashboard port reachable (e.g. `kubectl port-forward svc/<cluster>-head-svc 8265:8265`)?"
        ) from None


def client(address: str | None):
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    check_reachable(address)
    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        raise SubmitError(f"cannot use the Ray job server at {address}: {exc}") from None


def build_entrypoint(command: str, args: list[str]) -> str:
    if command not in ENTRY_POINTS:
        raise SubmitError(f"unknown job command {command!r} (allowed: {', '.join(ENTRY_POINTS)})")
    return shlex.join(["python", ENTRY_POINTS[command], *args])


def runtime_env(env_names: list[str], pip: list[str] | None, working_dir: str = ".") -> dict:
    env_vars = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}
    for name in [*FORWARDED_ENV, *env_names]:
        if name in os.environ:
            env_vars[name] = os.environ[name]
        elif name in env_names:
            raise SubmitError(f"--env {name}: not set in this environment")
    env: dict = {"working_dir": working_dir, "excludes": EXCLUDES, "env_vars": env_vars}
    if pip:
        env["pip"] = pip
    return env


def validate_locally(command: str, args: list[str]) -> None:
    """Parse the job's own arguments (and its config) here, so a typo fails before anything is uploaded."""
    from pipeline.cli.parser import build_parser
    from pipeline.config import load_config

    parsed = build_parser().parse_args([command, *args])
    if getattr(parsed, "config", None) is not None or command == "pretrain":
        cfg = load_config(parsed.config, parsed.overrides)
        if command == "pretrain" and "://" not in cfg.run.storage_path and not os.path.isabs(cfg.run.storage_path):
            print(
                f"[byol] WARNING: run.storage_path={cfg.run.storage_path!r} is relative: on the cluster it resolves "
                "inside the job's temporary working dir. Use a shared path or s3://... to keep checkpoints.",
                file=sys.stderr,
            )


def submit(
    address: str | None,
    command: str,
    args: list[str],
    wait: bool = True,
    env_names: list[str] = (),
    pip: list[str] | None = None,
    working_dir: str = ".",
    job_id: str | None = None,
) -> int:
    validate_locally(command, args)
    jobs = client(address)
    request = dict(
        entrypoint=build_entrypoint(command, args),
        runtime_env=runtime_env(list(env_names), pip, working_dir),
        submission_id=job_id or f"byol-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
        entrypoint_num_cpus=0,  # the driver only coordinates; leave CPUs to Train and Data
        metadata={"byol.command": command},
    )
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            job_id = jobs.submit_job(**request)
            break
        except RuntimeError as exc:
            # A head that just started answers before its job agent is up: wait for it, briefly.
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise SubmitError(f"job submission to {resolve_address(address)} failed: {exc}") from None
            time.sleep(2)
    print(f"submitted job {job_id}", flush=True)
    if not wait:
        return 0
    return follow(jobs, job_id)


def follow(jobs, job_id: str) -> int:
    """Stream the job's logs until it ends; exit code 0 only when it SUCCEEDED."""

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception as exc:  # log streaming is best effort; the status below is what counts
        print(f"[byol] log streaming stopped ({exc}); polling status", file=sys.stderr)
    status = str(jobs.get_job_status(job_id))
    while status.split(".")[-1] not in TERMINAL:
        time.sleep(1)
        status = str(jobs.get_job_status(job_id))
    info = jobs.get_job_info(job_id)
    status = status.split(".")[-1]
    print(f"job {job_id}: {status}", flush=True)
    if status != "SUCCEEDED":
        print(f"job {job_id} {status}: {info.message or ''}", file=sys.stderr)
        return 1
    return 0


def jobs_command(address: str | None, action: str, job_id: str | None) -> int:
    jobs = client(address)
    if action == "list":
        for job in jobs.list_jobs():
            print(f"{job.submission_id}\t{str(job.status).split('.')[-1]}\t{job.entrypoint}")
        return 0
    if not job_id:
        raise SubmitError(f"byol jobs {action} needs a JOB_ID")
    if action == "status":
        info = jobs.get_job_info(job_id)
        print(f"{job_id}\t{str(info.status).split('.')[-1]}\t{info.message or ''}")
        return 0
    if action == "logs":
        print(jobs.get_job_logs(job_id), end="")
        return 0
    if action == "stop":
        print(f"stop requested: {jobs.stop_job(job_id)}")
        return 0
    raise SubmitError(f"unknown action {action!r}")
