"""A steady load through the load balancer, recording the fate of every request.

A few client threads send requests one after another with a short pause: deterministic
completions from a small set of prompts (so the shared cache hits), sampled completions, and
streamed chats (a stream counts only when it ends with ``[DONE]``). A request is lost unless
it gets a 200 and, for a stream, its end; transport errors are lost requests too.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

__all__ = ["Outcome", "SteadyLoad", "describe"]

MODELS = ("demo-tiny", "demo-tiny", "demo-small")
PROMPTS = ("The queue", "A cache of", "Health and", "Reload the model", "Ready for")


@dataclass(frozen=True)
class Outcome:
    """What happened to one request (times from ``time.monotonic``)."""

    kind: str
    started: float
    ended: float
    status: int | None
    """None when no answer came back (a transport error)."""
    detail: str
    """The error or the start of the body when the request was lost; "" otherwise."""
    served_by: str
    """The replica, from HAProxy's X-Served-By header ("" when HAProxy answered itself)."""
    cache: str

    @property
    def lost(self) -> bool:
        return self.status != 200 or bool(self.detail)


def _request(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    """A kind, a path and a body, drawn from the mix."""
    model = rng.choice(MODELS)
    draw = rng.random()
    if draw < 0.5:
        body = {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": 8, "temperature": 0}
        return "deterministic", "/v1/completions", body
    if draw < 0.8:
        prompt = f"{rng.choice(PROMPTS)} {rng.randrange(10**6)}"
        body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0.9}
        return "sampled", "/v1/completions", body
    messages = [{"role": "user", "content": rng.choice(PROMPTS)}]
    body = {"model": model, "messages": messages, "max_tokens": 12, "stream": True}
    return "stream", "/v1/chat/completions", body


class SteadyLoad:
    """``clients`` threads sending requests to ``url`` until the context exits."""

    def __init__(
        self,
        url: str,
        *,
        clients: int = 3,
        pause_s: float = 0.05,
        timeout_s: float = 30.0,
        seed: int = 0,
        headers: dict[str, str] | None = None,
    ) -> None:
        """``headers``: sent with every request (an API key)."""
        self._url = url
        self._headers = headers or {}
        self._pause_s = pause_s
        self._timeout_s = timeout_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._outcomes: list[Outcome] = []
        self._threads = [
            threading.Thread(target=self._client, args=(seed + i,), name=f"load-{i}", daemon=True)
            for i in range(clients)
        ]

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self._timeout_s + 5)

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(
            base_url=self._url, timeout=self._timeout_s, headers=self._headers
        ) as client:
            while not self._stop.is_set():
                kind, path, body = _request(rng)
                outcome = self._send(client, kind, path, body)
                with self._lock:
                    self._outcomes.append(outcome)
                self._stop.wait(self._pause_s)

    @staticmethod
    def _send(client: httpx.Client, kind: str, path: str, body: dict[str, Any]) -> Outcome:
        started = time.monotonic()
        status: int | None = None
        served_by = cache = detail = ""
        try:
            with client.stream("POST", path, json=body) as answer:
                status = answer.status_code
                served_by = answer.headers.get("x-served-by", "")
                cache = answer.headers.get("x-cache", "")
                text = "".join(answer.iter_text())
            if status != 200:
                detail = text[:300]
            elif kind == "stream" and not text.rstrip().endswith("data: [DONE]"):
                detail = f"stream ended without [DONE]: {text[-300:]!r}"
        except httpx.HTTPError as err:
            detail = f"{type(err).__name__}: {err}"
        return Outcome(kind, started, time.monotonic(), status, detail, served_by, cache)

    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return list(self._outcomes)

    def lost(self) -> list[Outcome]:
        return [o for o in self.outcomes() if o.lost]

    def served_between(self, start: float, end: float) -> list[Outcome]:
        """The requests answered (not lost) that ended in [start, end]."""
        return [o for o in self.outcomes() if not o.lost and start <= o.ended <= end]

    def wait_for(
        self, condition: Callable[[list[Outcome]], bool], what: str, timeout_s: float = 30.0
    ) -> None:
        """Wait until the outcomes so far satisfy ``condition``."""
        deadline = time.monotonic() + timeout_s
        while not condition(self.outcomes()):
            if time.monotonic() > deadline:
                raise AssertionError(f"the load did not reach: {what} in {timeout_s} s")
            time.sleep(0.05)

    def wait_served(self, count: int, timeout_s: float = 30.0) -> None:
        """Wait until ``count`` more requests than now have been answered."""
        start = time.monotonic()
        self.wait_for(
            lambda outcomes: sum(not o.lost and o.ended >= start for o in outcomes) >= count,
            f"{count} more answered requests",
            timeout_s,
        )


def describe(lost: list[Outcome], limit: int = 5) -> str:
    """The first lost requests, for an assertion message."""
    return f"{len(lost)} lost, first: " + "; ".join(
        f"{o.kind} status={o.status} via={o.served_by or '-'} {o.detail}" for o in lost[:limit]
    )
