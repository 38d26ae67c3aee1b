"""``ensemble-ops reload MODEL``: ask a running server to reload a member, and follow it.

Uses only the standard library (urllib), so it works wherever the server is installed.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any, TextIO

__all__ = ["run_reload"]

_BAR = 30


def _call(method: str, url: str, token: str | None, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(err.read())
        return f"{err.code}: {body['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{err.code}: {err.reason}"


def _draw(status: dict[str, Any], out: TextIO) -> None:
    filled = round(_BAR * status["progress_percent"] / 100)
    line = f"\r[{'#' * filled}{' ' * (_BAR - filled)}] {status['progress_percent']:5.1f}% "
    out.write(f"{line}{status['state']:<10} {status['message'][:60]:<60}")
    out.flush()


def run_reload(
    model: str,
    *,
    url: str,
    path: str | None,
    token: str | None,
    wait: bool,
    poll_s: float = 0.25,
    out: TextIO = sys.stderr,
) -> int:
    """Start the reload; with ``wait`` show progress until it ends. Returns the exit status."""
    token = token or os.environ.get("ENSEMBLE_OPS_SERVER__ADMIN_TOKEN")
    base = url.rstrip("/")
    body = {"path": path} if path else {}
    try:
        status = _call("POST", f"{base}/admin/models/{model}/reload", token, body)
    except urllib.error.HTTPError as err:
        print(f"ensemble-ops: reload refused: {_error_message(err)}", file=out)
        return 1
    except urllib.error.URLError as err:
        print(f"ensemble-ops: cannot reach {base}: {err.reason}", file=out)
        return 1
    if not wait:
        print(json.dumps(status), file=sys.stdout)
        return 0
    while True:
        _draw(status, out)
        if status["state"] in ("completed", "failed"):
            break
        time.sleep(poll_s)
        try:
            status = _call("GET", f"{base}/health/llm/reload/{model}", token)
        except (urllib.error.URLError, OSError) as err:
            print(f"\nensemble-ops: lost the server while waiting: {err}", file=out)
            return 1
    out.write("\n")
    if status["state"] == "failed":
        print(f"ensemble-ops: reload of {model} failed: {status['error']}", file=out)
        return 1
    print(f"ensemble-ops: reload of {model} completed: {status['message']}", file=out)
    return 0
