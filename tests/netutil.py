"""Loopback helpers for tests that start servers (MLflow, a Ray head)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float) -> bool:
    """True once something accepts connections on 127.0.0.1:port, False after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.5)
    return False


def stop_ray_head(proc: subprocess.Popen, belongs: Callable[[str], bool]) -> list[psutil.Process]:
    """Stop a `ray start --head --block` started with ``start_new_session=True``: its process group (a short grace:
    a graceful stop takes ~30 s and the cluster is disposable), then whatever Ray daemonised of it, found by
    ``belongs(command line)``. Never `ray stop`, which would stop every Ray on the machine. Returns what is left."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue

    def left() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"]) if belongs(" ".join(p.info["cmdline"] or []))]

    deadline = time.time() + 30
    while (remaining := left()) and time.time() < deadline:
        for p in remaining:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        time.sleep(1)
    return left()
