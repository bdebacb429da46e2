"""The one writer of bench/ results: a standard header (what ran, where, with what code) around a script's figures.

    from results_io import write_result       # in a script run as `python bench/x.py` (bench/ is on sys.path)
    path = write_result("cpu_precision", {"images_per_s": {...}}, out=args.out)

Every result file is JSON with, in this order:
  script     the bench script's name (bench/<script>.py); results live in bench/results/<script>/
  command    the command line as run (`python bench/x.py ARGS`)
  machine    {cpu, cores, memory_gib, cpu_flags, precision_kind, gpu}: cpu is /proc/cpuinfo's model name, cores the
             CPUs this process may use (os.sched_getaffinity), cpu_flags the subset of FLAGS the CPU has,
             precision_kind "bf16" with amx_bf16 or avx512_bf16 (what train.precision: auto picks on a CPU) else "fp32",
             gpu the name of CUDA device 0 when torch sees one (else null)
  versions   {python, torch, torchvision, ray, mlflow}: those installed
  git_sha    HEAD of this checkout (null outside git); git_dirty: tracked files modified
  date       ISO 8601, UTC
  provenance only in results not written by a script run (converted from earlier records): where they came from
  results    the script's own figures
Default path: bench/results/<script>/<YYYYMMDD-HHMMSS>-<precision_kind>.json (UTC).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")
PACKAGES = ("torch", "torchvision", "ray", "mlflow")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        block = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())}


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _gpu() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine() -> dict[str, Any]:
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    present = [f for f in FLAGS if f in flags]
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "cpu_flags": present,
        "precision_kind": "bf16" if {"amx_bf16", "avx512_bf16"} & flags else "fp32",
        "gpu": _gpu(),
    }


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def header(script: str) -> dict[str, Any]:
    sha = _git("rev-parse", "HEAD")
    return {
        "script": script,
        "command": "python " + shlex.join(sys.argv),
        "machine": machine(),
        "versions": versions(),
        "git_sha": sha,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if sha else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_result(script: str, results: dict[str, Any], out: str | Path | None = None) -> Path:
    """Writes ``results`` under the standard header; returns the path (default: see the module docstring)."""
    record = header(script)
    if out is None:
        stamp = record["date"].replace("-", "").replace(":", "").replace("T", "-").rstrip("Z")
        out = RESULTS / script / f"{stamp}-{record['machine']['precision_kind']}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**record, "results": results}, indent=2) + "\n")
    return out
