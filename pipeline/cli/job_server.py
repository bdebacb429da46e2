"""Where the Ray job server is and how to authenticate to it: ``byol submit`` and ``byol jobs`` get their
JobSubmissionClient here.

The cluster is asked whether it wants a token (``/api/authentication_mode``, a public endpoint); the token is read
where Ray reads it (``RAY_AUTH_TOKEN``, else the file in ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``) and
sent as a header. A token cluster without a token here fails in seconds with a message saying how to pass one.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.errors import SubmitError

TOKEN_HELP = (
    "pass the cluster's token as RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file holding it> (or in "
    '~/.ray/auth_token); on KubeRay: export RAY_AUTH_TOKEN="$(kubectl get secret <raycluster-name> '
    "-o jsonpath='{.data.auth_token}' | base64 -d)\""
)


def warn(message: str) -> None:
    print(f"[byol] WARNING: {message}", file=sys.stderr, flush=True)


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


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


def server_auth_mode(address: str, timeout: float = 5.0) -> str | None:
    """'token' or 'disabled' as the cluster reports it (a public endpoint since Ray 2.52); None if unknown."""
    if urlparse(address).scheme not in ("http", "https"):
        return None
    try:
        with urllib.request.urlopen(f"{address}/api/authentication_mode", timeout=timeout) as response:
            mode = json.load(response).get("authentication_mode")
            return str(mode) if mode else None
    except (OSError, ValueError, urllib.error.URLError):
        return None  # an older Ray or a proxy in front of it: the job client finds out


def local_token() -> tuple[str | None, str]:
    """The token and where it came from, searched in Ray's order; (None, ...) when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token ({exc.strerror})") from None
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: the file is empty")
        return token, f"RAY_AUTH_TOKEN_PATH={path}"
    default = Path.home() / ".ray" / "auth_token"
    token = default.read_text().strip() if default.is_file() else ""
    return (token, str(default)) if token else (None, "")


def auth_headers(address: str) -> dict[str, str]:
    """The Authorization header this cluster needs, or none; refuses early when it needs a token we lack."""
    mode = server_auth_mode(address)
    if mode == "disabled":
        # Do not hand a local token to a server that does not check it; tell the user it is open.
        warn(
            f"the Ray cluster at {address} has token authentication disabled: anyone who can reach its port can "
            "run code on it. Enable it (RAY_AUTH_MODE=token on every node; KubeRay: spec.authOptions.mode: token)."
        )
        return {}
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" and mode != "token":
        return {}
    token, _ = local_token()
    if token is None:
        if mode == "token":
            raise SubmitError(
                f"the Ray cluster at {address} requires an authentication token and none was found: {TOKEN_HELP}"
            )
        return {}
    return {"Authorization": f"Bearer {token}"}


def auth_failure(address: str, exc: Exception) -> SubmitError | None:
    """A SubmitError for an authentication failure (401/403 from the job server), else None."""
    from ray.exceptions import AuthenticationError

    if not isinstance(exc, AuthenticationError):
        return None
    _, source = local_token()
    if "Authentication failed" in str(exc):  # 403: a token was sent and rejected
        return SubmitError(
            f"the Ray cluster at {address} rejected the token from {source or 'this environment'}: {TOKEN_HELP}"
        )
    return SubmitError(f"the Ray cluster at {address} requires an authentication token: {TOKEN_HELP}")


def client(address: str | None) -> Any:
    """A JobSubmissionClient for the cluster at ``address`` (or RAY_ADDRESS), with its token if it needs one."""
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    check_reachable(address)
    headers = auth_headers(address)
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exc:
        raise auth_failure(address, exc) or SubmitError(f"cannot use the Ray job server at {address}: {exc}") from None
