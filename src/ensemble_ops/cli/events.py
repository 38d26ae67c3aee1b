"""``ensemble-ops events``: follow a service's event stream in a terminal.

One human line per event (or the JSON records with ``--json``), filtered by member and type
on the server. A stream that ends or a connection that drops is resumed after the last
event seen (``Last-Event-ID``), so nothing kept is missed; Ctrl-C ends it cleanly. This is
log tailing without ``jq``. Standard library only, like the other commands.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, TextIO

__all__ = ["follow", "human_line"]

_SILENCE_S = 45.0
"""Three missed heartbeats: the connection is gone even if no error said so."""
_BACKOFF_S = (1.0, 2.0, 5.0)


class FollowError(Exception):
    """The service refused the stream (a bad filter, a missing key): retrying cannot help."""


def human_line(event: dict[str, Any]) -> str:
    """``12:00:01.250 reload.state_changed demo-tiny warming_up -> ready 80% Warm-up passed``"""
    when = datetime.fromtimestamp(event["ts"]).strftime("%H:%M:%S.%f")[:-3]
    kind, model = event["type"], event.get("model") or "-"
    if kind == "reload.state_changed":
        detail = f"{event['from']} -> {event['to']} {event['progress']:.0f}% {event['message']}"
    elif kind == "reload.progress":
        detail = f"{event['progress']:.0f}% {event['message']}"
    elif kind == "health.changed":
        detail = f"{event['old']} -> {event['new']}" + (
            f" ({event['reason']})" if event.get("reason") else ""
        )
    elif kind == "request":
        detail = (
            f"{event['mode']} {event['copy']} {event['status']} {event['latency_ms']} ms "
            f"{event['prompt_tokens']}+{event['completion_tokens']} tokens"
            + (" cache hit" if event.get("cached") else "")
        )
    else:
        skip = {"id", "type", "model", "ts"}
        detail = " ".join(f"{k}={v}" for k, v in event.items() if k not in skip and v is not None)
    return f"{when} {kind} {model} {detail}"


def _records(answer: Any) -> Iterator[tuple[str | None, dict[str, Any] | None]]:
    """(id, record) per event frame of an open stream; (None, None) for a comment."""
    event_id: str | None = None
    data: list[str] = []
    for raw in answer:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line.startswith(":"):
            yield None, None
        elif not line and data:
            yield event_id, json.loads("\n".join(data))
            event_id, data = None, []


def follow(
    url: str,
    models: list[str],
    types: list[str],
    *,
    as_json: bool,
    api_key: str | None,
    out: TextIO,
    err: TextIO = sys.stderr,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print events until Ctrl-C or SIGTERM (0), or until the service refuses the stream
    (2)."""
    # Both end it cleanly, whatever the parent left them as (a background job ignores
    # SIGINT): following a stream is meant to be stopped.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    query = urllib.parse.urlencode([("model", m) for m in models] + [("type", t) for t in types])
    target = f"{url.rstrip('/')}/events" + (f"?{query}" if query else "")
    last: str | None = None
    failures = 0
    try:
        while True:
            headers = {"Accept": "text/event-stream"}
            if api_key:
                headers["Authorization"] = f"Bearer {api_key}"
            if last is not None:
                headers["Last-Event-ID"] = last
            try:
                with urllib.request.urlopen(
                    urllib.request.Request(target, headers=headers), timeout=_SILENCE_S
                ) as answer:
                    if failures:
                        err.write("ensemble-ops events: connected again\n")
                    failures = 0
                    for event_id, record in _records(answer):
                        if record is None:
                            continue
                        last = event_id or last
                        out.write(json.dumps(record) if as_json else human_line(record))
                        out.write("\n")
                        out.flush()
            except urllib.error.HTTPError as refused:
                if refused.code in (400, 401, 403, 404):
                    raise FollowError(_message(refused)) from None
                failures += 1
            except (urllib.error.URLError, OSError, ValueError) as lost:
                if failures == 0:
                    err.write(f"ensemble-ops events: {getattr(lost, 'reason', lost)}; retrying\n")
                failures += 1
            sleep(_BACKOFF_S[min(failures, len(_BACKOFF_S)) - 1] if failures else 0.0)
    except KeyboardInterrupt:
        return 0
    except FollowError as refused:
        err.write(f"ensemble-ops events: {refused}\n")
        return 2


def _message(refused: urllib.error.HTTPError) -> str:
    detail = refused.read().decode("utf-8", errors="replace")
    try:
        return f"{refused.code}: {json.loads(detail)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{refused.code}: {detail[:200]}"
