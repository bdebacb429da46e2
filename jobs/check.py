"""Ray job entry point: `byol submit -- check [NAME ...]` shows what a job gets on the cluster, never a secret.

Prints the job's working directory and whether the project is in it (pyproject.toml, jobs/, pipeline/...), the
top-level entries uploaded, the Python/Ray/torch versions, and for each setting byol forwards (plus every NAME
given) whether it is set: forwarded settings with their value, any other NAME only as its length and a short
sha256 fingerprint (compare: `printf %s "$NAME" | sha256sum | cut -c1-12`). Takes a second; starts no Ray work.
"""

import hashlib
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli.submit import FORWARDED_ENV, redact_url  # noqa: E402

PROJECT_FILES = ["pyproject.toml", "jobs/", "pipeline/", "pipeline/data/", "configs/"]


def describe(name: str) -> str:
    value = os.environ.get(name)
    if value is None:
        return "not set"
    if name in FORWARDED_ENV and redact_url(value) is not None:
        return f"set: {value}"
    return f"set ({len(value)} chars, sha256 {hashlib.sha256(value.encode()).hexdigest()[:12]})"


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def main(names: list[str]) -> int:
    cwd = Path.cwd()
    print(f"[check] cwd: {cwd}")
    present = ", ".join(f"{p} {'yes' if (cwd / p).exists() else 'NO'}" for p in PROJECT_FILES)
    print(f"[check] project files: {present}")
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in cwd.iterdir())
    print(f"[check] top-level entries: {' '.join(entries)}")
    print(f"[check] python {platform.python_version()}, ray {version('ray')}, torch {version('torch')}")
    for name in dict.fromkeys([*FORWARDED_ENV, *names]):
        print(f"[check] env {name}: {describe(name)}")
    return 0 if (cwd / "pyproject.toml").is_file() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
