"""``byol submit`` and ``byol jobs``: run the entry points in ``jobs/`` on a Ray cluster via the Job API.

What is uploaded: the project root (the checkout holding ``pyproject.toml`` and ``jobs/``), wherever the command
is run from, minus ``EXCLUDES`` and whatever ``.gitignore``/``.rayignore`` list; more than ``BYOL_SUBMIT_MAX_MB``
(100 MB) is refused with the largest paths named.

What travels in the job's ``runtime_env``: only the non-secret settings in ``FORWARDED_ENV`` (tracking URI,
region, ...). The cluster stores ``runtime_env`` and returns it to anyone who can list jobs, so credentials must
reach the job from the cluster itself (a Kubernetes Secret, workload identity); ``--env NAME`` forwards a value
anyway, with a warning that says who can then read it.

Finding the job server and authenticating to it (a token where the cluster wants one): ``job_server``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.cli.job_server import auth_failure, client, resolve_address, warn
from pipeline.errors import SubmitError
from pipeline.ray_compat import RUNTIME_ENV_PACKAGING_LOGGER, RUNTIME_ENV_WORKING_DIR_LOGGER, working_dir_files

ENTRY_POINTS = {
    "pretrain": "jobs/pretrain.py",
    "tune": "jobs/tune.py",
    "eval": "jobs/evaluate.py",
    "embed": "jobs/embed.py",
    "prepare": "jobs/prepare.py",
    "check": "jobs/check.py",
}
# byol commands whose arguments (and config) are parsed here
VALIDATED_LOCALLY = {"pretrain", "tune", "eval", "embed", "prepare"}
# gitwildmatch patterns, relative to the uploaded root. A leading "/" anchors a pattern at the root: a bare "data"
# would also drop the pipeline/data package.
EXCLUDES = [
    ".git",
    "/.venv",
    "/venv",
    "/data",
    "/runs",
    "/mlruns",
    "/bench/work",
    "*.db",
    ".env",  # dotenv files usually hold credentials
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".ipynb_checkpoints",
    "*.egg-info",
]
# Settings the job needs and that are not secret: copied from this environment into runtime_env when set.
FORWARDED_ENV = [
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 90
MAX_UPLOAD_MB = 100.0  # default limit on the uploaded working dir; BYOL_SUBMIT_MAX_MB overrides it
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ---------------------------------------------------------------------------------------------
# What the job runs, what it is given, and what is uploaded
# ---------------------------------------------------------------------------------------------


def build_entrypoint(command: str, args: list[str]) -> str:
    if command not in ENTRY_POINTS:
        raise SubmitError(f"unknown job command {command!r} (allowed: {', '.join(ENTRY_POINTS)})")
    return shlex.join(["python", ENTRY_POINTS[command], *args])


def redact_url(value: str) -> str | None:
    """``value`` if it carries no password in its URL (user:password@host), else None."""
    try:
        return None if urlparse(value).password else value
    except ValueError:
        return value


def runtime_env(env_names: list[str], pip: list[str] | None, working_dir: str | Path) -> dict[str, Any]:
    """The job's runtime_env: quiet-log settings, the non-secret FORWARDED_ENV that are set, and ``--env`` names.

    Everything here is stored by the cluster and shown to anyone who can list jobs: ``--env`` values are
    forwarded only because the user named them, with a warning.
    """
    env_vars = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}
    for name in FORWARDED_ENV:
        value = os.environ.get(name)
        if value is None or name in env_names:
            continue
        if redact_url(value) is None:
            warn(
                f"{name} contains a password (user:password@host) and is not forwarded; give the job its "
                "credentials from the cluster (e.g. MLFLOW_TRACKING_USERNAME/PASSWORD in a Kubernetes Secret)"
            )
            continue
        env_vars[name] = value
    for name in env_names:
        if not ENV_NAME.match(name):
            raise SubmitError(f"--env {name!r}: not an environment variable name")
        if name.startswith("RAY_AUTH_"):
            raise SubmitError(f"--env {name}: the cluster's token is never sent to the job (its nodes already have it)")
        if name not in os.environ:
            raise SubmitError(f"--env {name}: not set in this environment")
        env_vars[name] = os.environ[name]
        if name not in FORWARDED_ENV:
            warn(
                f"--env {name}: its value is stored in this job's runtime_env, which the cluster shows to everyone "
                "with access to its job API (`ray job list`, the dashboard, get_job_info) for as long as the job "
                "record exists. Prefer giving the job secrets from the cluster (a Kubernetes Secret)."
            )
    env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env_vars}
    if pip:
        env["pip"] = pip
    return env


PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def is_project_root(path: Path) -> bool:
    return (path / "pyproject.toml").is_file() and all((path / entry).is_file() for entry in ENTRY_POINTS.values())


def project_root(start: str | Path | None = None, prefer: Path | None = PACKAGE_ROOT) -> Path:
    """The checkout to upload: the one this code runs from (``prefer``), else the nearest one above ``start``.

    Never the current directory as such: run from a home folder, it would upload that folder.
    """
    start = Path(start or os.getcwd()).resolve()
    for candidate in [*([prefer] if prefer else []), start, *start.parents]:
        if is_project_root(candidate):
            return candidate
    raise SubmitError(
        f"cannot find the byol-ray project (pyproject.toml and {', '.join(ENTRY_POINTS.values())}) in the "
        f"installed package or above {start}: run byol submit from inside the checkout"
    )


def upload_listing(root: Path) -> list[tuple[Path, int]]:
    """The files Ray packs for ``working_dir=root`` with EXCLUDES, .gitignore and .rayignore, with their sizes."""
    files: list[tuple[Path, int]] = []

    def handler(path: Path) -> None:
        if path.is_file():
            files.append((path.relative_to(root), path.stat().st_size))

    # Ray's own walk and Ray's default excludes (the ones that build the zip), so the count matches the upload.
    working_dir_files(root, EXCLUDES, handler)
    return files


def check_upload_size(root: Path, limit_mb: float | None = None) -> tuple[int, int]:
    """(files, bytes) that would be uploaded from ``root``; SubmitError naming the largest paths over the limit."""
    limit_mb = float(os.environ.get("BYOL_SUBMIT_MAX_MB", MAX_UPLOAD_MB)) if limit_mb is None else limit_mb
    files = upload_listing(root)
    total = sum(size for _, size in files)
    if total > limit_mb * 1e6:
        by_top: dict[str, int] = {}
        for path, size in files:
            top = path.parts[0] + ("/" if len(path.parts) > 1 else "")
            by_top[top] = by_top.get(top, 0) + size
        largest = sorted(by_top.items(), key=lambda kv: -kv[1])[:5]
        biggest_files = sorted(files, key=lambda f: -f[1])[:5]
        raise SubmitError(
            f"the working dir {root} would upload {total / 1e6:.1f} MB in {len(files)} files (limit {limit_mb:g} MB). "
            f"Largest: {', '.join(f'{p} ({s / 1e6:.1f} MB)' for p, s in largest)}; largest files: "
            f"{', '.join(f'{p} ({s / 1e6:.1f} MB)' for p, s in biggest_files)}. Keep data and outputs out of the "
            "checkout or list them in .rayignore/.gitignore (or raise BYOL_SUBMIT_MAX_MB)"
        )
    return len(files), total


def validate_locally(command: str, args: list[str]) -> None:
    """Parse the job's own arguments (and its config) here, so a typo fails before anything is uploaded."""
    if command not in VALIDATED_LOCALLY:
        bad = [a for a in args if not ENV_NAME.match(a)] if command == "check" else []
        if bad:
            raise SubmitError(f"byol submit -- check NAME...: {bad[0]!r} is not an environment variable name")
        return
    from pipeline.cli.parser import build_parser
    from pipeline.config import load_config

    parsed = build_parser().parse_args([command, *args])
    if command == "tune":
        from pipeline.tune.space import load_study

        if not parsed.config:
            raise SubmitError("byol submit -- tune needs --config (a pretraining config with a tune: section)")
        cfg, _ = load_study(parsed.config, parsed.overrides)
    elif getattr(parsed, "config", None) is not None or command == "pretrain":
        cfg = load_config(parsed.config, parsed.overrides)
    if command in ("pretrain", "tune"):
        if "://" not in cfg.run.storage_path and not os.path.isabs(cfg.run.storage_path):
            warn(
                f"run.storage_path={cfg.run.storage_path!r} is relative: on the cluster it resolves "
                "inside the job's temporary working dir. Use a shared path or s3://... to keep checkpoints."
            )
    if command == "embed" and "://" not in parsed.out and not os.path.isabs(parsed.out):
        warn(
            f"--out {parsed.out!r} is relative: on the cluster it resolves inside the job's temporary working dir. "
            "Use a shared path or s3://... to keep the embeddings."
        )
    if command in ("embed", "eval"):
        for flag in ("checkpoint", "data"):
            value = getattr(parsed, flag, None)
            if value and "://" not in value and not os.path.isabs(value):
                warn(
                    f"--{flag} {value!r} is relative: on the cluster it is read from the uploaded project, which "
                    "leaves out data/ and runs/ (EXCLUDES). Use a shared path or s3://..."
                )


def submit(
    address: str | None,
    command: str,
    args: list[str],
    wait: bool = True,
    env_names: list[str] = (),
    pip: list[str] | None = None,
    working_dir: str | Path | None = None,
    job_id: str | None = None,
) -> int:
    """Submit ``command args`` as a job (uploading the project root unless ``working_dir`` is given)."""
    if command not in ENTRY_POINTS:
        raise SubmitError(f"unknown job command {command!r} (allowed: {', '.join(ENTRY_POINTS)})")
    validate_locally(command, args)
    root = Path(working_dir).resolve() if working_dir is not None else project_root()
    count, size = check_upload_size(root)
    env = runtime_env(list(env_names), pip, root)
    jobs = client(address)
    address = resolve_address(address)
    # Ray's packaging chatter ("'.git' is now ignored by default", "Ignoring upload ... .gitignore") says nothing
    # the line below does not; its large-file warnings stay.
    logging.getLogger(RUNTIME_ENV_WORKING_DIR_LOGGER).setLevel(logging.ERROR)
    logging.getLogger(RUNTIME_ENV_PACKAGING_LOGGER).setLevel(logging.WARNING)
    print(f"[byol] uploading {root} ({count} files, {size / 1e6:.1f} MB) as the job's working_dir", file=sys.stderr)
    request = dict(
        entrypoint=build_entrypoint(command, args),
        runtime_env=env,
        submission_id=job_id or f"byol-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
        entrypoint_num_cpus=0,  # the driver only coordinates; leave CPUs to Train and Data
        metadata={"byol.command": command},
    )
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            job_id = jobs.submit_job(**request)
            break
        except Exception as exc:
            auth = auth_failure(address, exc)
            if auth is not None:
                raise auth from None
            # A head that just started answers before its job agent is up: wait for it, briefly.
            if not isinstance(exc, RuntimeError) or "No available agent" not in str(exc) or time.time() > deadline:
                raise SubmitError(f"job submission to {address} failed: {exc}") from None
            time.sleep(2)
    print(f"submitted job {job_id}", flush=True)
    if not wait:
        return 0
    return follow(jobs, job_id)


def follow(jobs: Any, job_id: str) -> int:
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
