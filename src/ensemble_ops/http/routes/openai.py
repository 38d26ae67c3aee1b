"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Handlers validate, hand a core request to the ensemble and shape the answer; errors are
raised and rendered in ``http/errors.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ensemble_ops.access.gate import Gate, Pass
from ensemble_ops.config import Settings
from ensemble_ops.errors import EnsembleOpsError, InvalidRequestError
from ensemble_ops.http.auth import caller_of, is_admin
from ensemble_ops.http.middleware import log_fields, response_headers
from ensemble_ops.http.openapi import Answer, ApiRoute, errors
from ensemble_ops.http.protocol import (
    ChatCompletion,
    ChatCompletionBody,
    ChatCompletionChunk,
    Chunk,
    Completion,
    CompletionBody,
    CompletionChunk,
    EnsembleMeta,
    InferenceBody,
    InferenceHeaders,
    MemberMeta,
    ModelCard,
    ModelList,
    Reply,
    SplitMeta,
    StreamError,
    StreamErrorDetail,
    Usage,
    parse_body,
)
from ensemble_ops.serving.engine import Completion as EngineCompletion
from ensemble_ops.serving.ensemble import ENSEMBLE, Ensemble, InferenceRequest, TextStream

__all__ = ["read_json", "routes"]


def _ensemble(request: Request) -> Ensemble:
    ensemble: Ensemble = request.app.state.ensemble
    return ensemble


async def read_json(request: Request, *, empty: Any = None) -> Any:
    """The request body as JSON (``empty`` when there is none); 400 when it is not JSON."""
    raw = await request.body()
    if empty is not None and not raw.strip():
        return empty
    try:
        return json.loads(raw)
    except ValueError as err:  # JSONDecodeError, and UnicodeDecodeError for non-UTF-8 bytes
        raise InvalidRequestError(f"The request body is not valid JSON: {err}") from err


def _note(request: Request, inference: InferenceRequest, **fields: Any) -> None:
    log_fields(request.scope).update(model=inference.model, mode=inference.mode, **fields)


def _note_result(request: Request, stream: TextStream, completion: EngineCompletion) -> None:
    fields = log_fields(request.scope)
    fields.update(
        member=stream.member,
        cached=stream.cached,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
    )
    if not stream.cached:  # the batch's side: time waiting for a sequence slot
        fields["queue_wait_ms"] = round(completion.queue_wait_s * 1000, 2)


def _inference_route(
    path: str,
    summary: str,
    body: type[InferenceBody],
    reply: type[Reply[Any]],
    chunk: type[Chunk[Any]],
) -> ApiRoute:
    """An inference route: ``body`` in, ``reply`` out, or ``chunk`` events with ``stream``."""

    async def answer(request: Request) -> Response:
        settings: Settings = request.app.state.settings
        caller = caller_of(request)  # 401 before anything else is read
        parsed = parse_body(body, await read_json(request))
        headers = InferenceHeaders.parse(request.headers)
        if headers.copy_asked is not None and not is_admin(request):
            # Choosing a rollout's copy feeds its gates: an operator's tool, not a client's.
            raise HTTPException(
                403, "X-Ensemble-Copy is for operators: send it to the admin listener."
            )
        inference = parsed.to_request(
            settings, response_id=reply.new_id(), headers=headers, caller=caller
        )
        _note(request, inference, stream=parsed.stream, key=caller.name)
        gate: Gate = request.app.state.gate
        admitted = await gate.admit(
            caller, inference.model, parsed.prompt_chars, inference.params.max_tokens
        )
        response_headers(request.scope).update(admitted.headers)
        stream: TextStream | None = None
        try:
            # One path for both: a non-streamed answer is its stream, collected.
            stream = _ensemble(request).answer(inference, incremental=parsed.stream)
            # The first piece (or the end): an error before any text is still a real 4xx/5xx.
            await stream.first()
            if parsed.stream:
                return _events(request, stream, chunk, parsed.include_usage, gate, admitted)
            completion = await stream.wait()
        except BaseException:
            if stream is not None:
                stream.close()  # the client left, or the answer failed: stop generating
            with anyio.CancelScope(shield=True):  # the key's place in flight is given back
                await gate.settle(admitted, _used(stream) if stream is not None else 0)
            raise
        await gate.settle(admitted, _used(stream))
        _note_result(request, stream, completion)
        member = stream.member or inference.model
        whole = reply.of(inference.response_id, member, completion, cached=stream.cached)
        return JSONResponse(whole.model_dump(mode="json"), headers=_answer_headers(stream))

    return ApiRoute(
        path,
        answer,
        method="POST",
        summary=summary,
        body=body,
        headers=InferenceHeaders,
        responses={
            200: Answer("The answer; server-sent events with stream: true.", reply, chunk),
            # 401: an API key is needed and missing or wrong; 403: a model the key may not
            # use, or X-Ensemble-Copy on the public listener; 429: a key's limit.
            **errors(400, 401, 403, 404, 413, 429, 500, 503),
        },
    )


def _answer_headers(stream: TextStream) -> dict[str, str]:
    """Who answered, and whether from the cache (or an identical request in flight)."""
    return {"X-Ensemble-Member": stream.member or "", "X-Cache": "HIT" if stream.cached else "MISS"}


def _event(body: BaseModel) -> str:
    return f"data: {json.dumps(body.model_dump(mode='json'), ensure_ascii=False)}\n\n"


def _used(stream: TextStream) -> int:
    """The tokens an answer used (0 when it ended before any: nothing to charge)."""
    result = stream.result
    if result is None:
        return 0
    return result.prompt_tokens + result.completion_tokens


def _events(
    request: Request,
    stream: TextStream,
    chunk: type[Chunk[Any]],
    include_usage: bool,
    gate: Gate,
    admitted: Pass,
) -> Response:
    """The answer as server-sent events: its pieces as chunks, then the finish."""
    fields = log_fields(request.scope)
    fields.update(member=stream.member, cached=stream.cached)
    created = int(time.time())
    member = stream.member or stream.request.model

    def event(choices: list[Any], usage: Usage | None = None) -> str:
        body = chunk(
            id=stream.request.response_id,
            created=created,
            model=member,
            choices=choices,
            usage=usage,
        )
        return _event(body)

    async def events() -> AsyncIterator[str]:
        try:
            for opening in chunk.opening():
                yield event([opening])
            async for piece in stream.pieces():
                yield event([chunk.piece(piece)])
        except Exception as err:  # the engine failed mid-stream: say so in the stream
            fields["error"] = str(err)
            # A bug of the server's own is logged with its details, not sent (as for a 500).
            said = str(err) if isinstance(err, EnsembleOpsError) else "Internal server error."
            yield _event(StreamError(error=StreamErrorDetail(message=said)))
            return
        finally:
            stream.close()
        result = stream.result
        if result is not None:
            fields.update(
                prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens
            )
            yield event([chunk.piece(None, result.finish_reason)])
            if include_usage:
                yield event([], Usage.of(result, cached=stream.cached))
        yield "data: [DONE]\n\n"

    async def finish() -> None:
        stream.close()
        await gate.settle(admitted, _used(stream))

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", **_answer_headers(stream)},
        # Runs after the response ends, also when the client went away before the body
        # started: the generation must be told to stop, and the key's limits settled.
        background=BackgroundTask(finish),
    )


def _model_card(request: Request, name: str) -> ModelCard:
    slot = _ensemble(request).slots[name]
    active = slot.active
    loaded: dict[str, Any] = {}
    if active is not None:
        info = active.engine.info
        loaded = {
            "generation": active.generation,
            "architecture": info.architecture,
            "weights_bytes": info.weights_bytes,
            "gpu_offload": info.gpu_offload,
            "capabilities": sorted(info.capabilities),
            "n_ctx": info.n_ctx,
        }
    meta = MemberMeta(
        state=slot.state,
        description=slot.spec.description,
        n_gpu_layers=slot.spec.n_gpu_layers,
        **{"n_ctx": slot.spec.n_ctx, **loaded},
    )
    created = int(active.loaded_at) if active is not None else 0
    return ModelCard(id=name, created=created, meta=meta)


async def list_models(request: Request) -> Response:
    """The models, those the caller's key may use only."""
    caller = caller_of(request)
    ensemble = _ensemble(request)
    routing = ModelCard(
        id=ENSEMBLE,
        created=0,
        meta=EnsembleMeta(
            description="Routes each request to a member by the request's mode, "
            "falling back to the next member when one is busy or failing.",
            members=list(ensemble.slots),
        ),
    )
    splits = [
        ModelCard(
            id=name,
            created=0,
            meta=SplitMeta(
                description="Sends each session to one member, in proportion to the "
                "weights (sticky by the user field or X-Session-ID), falling back to the "
                "others when that one is busy or failing.",
                weights=split.weights,
            ),
        )
        for name, split in ensemble.settings.splits.items()
    ]
    cards = [routing, *splits, *(_model_card(request, name) for name in ensemble.slots)]
    cards = [card for card in cards if caller.may_use(card.id)]
    return JSONResponse(ModelList(data=cards).model_dump(mode="json"))


routes = [
    _inference_route(
        "/v1/completions", "OpenAI completions", CompletionBody, Completion, CompletionChunk
    ),
    _inference_route(
        "/v1/chat/completions",
        "OpenAI chat completions",
        ChatCompletionBody,
        ChatCompletion,
        ChatCompletionChunk,
    ),
    ApiRoute(
        "/v1/models",
        list_models,
        method="GET",
        summary="The routing entries (ensemble and the splits) and the members",
        responses={200: Answer("Models the caller may use.", ModelList), **errors(401)},
    ),
]
