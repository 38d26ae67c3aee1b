"""``GET /events``: the event stream as server-sent events, read-only, on both listeners.

``?model=`` and ``?type=`` (each repeatable) filter it; ``Last-Event-ID`` (or
``?last_event_id=``) resumes after a record still kept. A comment line every
``server.events_heartbeat_s`` (15 s) keeps proxies from closing an idle stream. A client
that falls 1,000 records behind gets a last ``dropped`` event and its stream ends; on
shutdown every stream ends at once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ensemble_ops.errors import InvalidRequestError, ModelNotFoundError
from ensemble_ops.http.auth import require_observer
from ensemble_ops.http.openapi import Answer, ApiRoute, errors
from ensemble_ops.observability.event_feed import (
    EVENT_TYPES,
    RING_SIZE,
    EventFeed,
    FeedEvent,
    Follower,
)

__all__ = ["routes"]

_DROPPED = json.dumps({"reason": f"more than {RING_SIZE} events behind: reconnect"})


def _frame(event: FeedEvent) -> str:
    return f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.as_dict())}\n\n"


def _after(request: Request) -> int | None:
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise InvalidRequestError(
            "Last-Event-ID must be an event id (a whole number).", param="last_event_id"
        )
    return int(raw)


async def events(request: Request) -> Response:
    require_observer(request)
    feed: EventFeed = request.app.state.events
    members = list(request.app.state.ensemble.slots)
    models = request.query_params.getlist("model")
    types = request.query_params.getlist("type")
    for model in models:
        if model not in members:
            raise ModelNotFoundError(model, members, ensemble=False)
    unknown = [kind for kind in types if kind not in EVENT_TYPES]
    if unknown:
        raise InvalidRequestError(
            f"Unknown event type {unknown[0]!r}; known: {', '.join(EVENT_TYPES)}.", param="type"
        )
    follower = feed.follow(models, types, _after(request))
    heartbeat_s = request.app.state.settings.server.events_heartbeat_s
    return StreamingResponse(
        _stream(feed, follower, heartbeat_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _stream(feed: EventFeed, follower: Follower, heartbeat_s: float) -> AsyncIterator[str]:
    try:
        yield "retry: 1000\n\n"  # reconnect after a second; the client sends Last-Event-ID
        while True:
            batch = await follower.next_batch(heartbeat_s)
            if batch:
                yield "".join(_frame(event) for event in batch)
            elif follower.ended is None:
                yield ": keep-alive\n\n"
            if follower.ended == "dropped":
                yield f"event: dropped\ndata: {_DROPPED}\n\n"
            if follower.ended is not None:
                return
    finally:
        feed.leave(follower)


routes = [
    ApiRoute(
        "/events",
        events,
        method="GET",
        summary="The event stream (server-sent events): health, reloads, rollouts, requests",
        responses={
            200: Answer(
                "One event per record: `id`, `event` (its type) and `data` (JSON with `id`, "
                "`type`, `model`, `ts` and the type's fields); a comment every 15 s. "
                "Filters: `?model=` and `?type=`, each repeatable; `Last-Event-ID` resumes.",
                media="text/event-stream",
            ),
            **errors(400, 401, 404),
        },
    ),
]
