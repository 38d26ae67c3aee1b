"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Handlers validate, hand a core request to the ensemble and shape the answer; errors are
raised and rendered in ``errors_http``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .config import Settings
from .engine import Completion
from .ensemble import ENSEMBLE, Ensemble, InferenceRequest, InferenceResult
from .errors import InvalidRequestError
from .middleware import log_fields
from .schemas import ChatCompletionBody, CompletionBody, parse_body

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


def _usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def _note(request: Request, inference: InferenceRequest, **fields: Any) -> None:
    log_fields(request.scope).update(model=inference.model, mode=inference.mode, **fields)


def _note_result(request: Request, result: InferenceResult) -> None:
    log_fields(request.scope).update(
        member=result.member,
        cached=result.cached,
        prompt_tokens=result.completion.prompt_tokens,
        completion_tokens=result.completion.completion_tokens,
    )


async def completions(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    body = parse_body(CompletionBody, await read_json(request))
    inference = body.to_request(settings)
    _note(request, inference, stream=body.stream)
    if body.stream:
        return await _stream(request, inference, "text_completion", body.include_usage)
    result = await _ensemble(request).complete(inference)
    _note_result(request, result)
    completion = result.completion
    return JSONResponse(
        {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": result.member,
            "choices": [
                {
                    "index": 0,
                    "text": completion.text,
                    "logprobs": None,
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": _usage(completion),
            "system_fingerprint": None,
        },
        headers={"X-Ensemble-Member": result.member, "X-Cache": _cache_header(result)},
    )


async def chat_completions(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    body = parse_body(ChatCompletionBody, await read_json(request))
    inference = body.to_request(settings)
    _note(request, inference, stream=body.stream)
    if body.stream:
        return await _stream(request, inference, "chat.completion.chunk", body.include_usage)
    result = await _ensemble(request).complete(inference)
    _note_result(request, result)
    completion = result.completion
    return JSONResponse(
        {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": result.member,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "logprobs": None,
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": _usage(completion),
            "system_fingerprint": None,
        },
        headers={"X-Ensemble-Member": result.member, "X-Cache": _cache_header(result)},
    )


def _cache_header(result: InferenceResult) -> str:
    return "HIT" if result.cached else "MISS"


async def _stream(
    request: Request, inference: InferenceRequest, obj: str, include_usage: bool
) -> Response:
    stream = _ensemble(request).start_stream(inference)
    try:
        # Wait for the first piece: an error found before any text is still a real 4xx/5xx.
        await stream.first()
    except BaseException:
        stream.close()
        raise
    fields = log_fields(request.scope)
    fields["member"] = stream.member
    created = int(time.time())

    chat = obj.startswith("chat")
    chunk_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"

    def chunk(
        text: str | None,
        finish: str | None,
        usage: dict[str, int] | None = None,
        delta: dict[str, str] | None = None,
    ) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["delta"] = delta or ({} if text is None else {"content": text})
        else:
            choice["text"] = text or ""
        payload: dict[str, Any] = {
            "id": chunk_id,
            "object": obj,
            "created": created,
            "model": stream.member,
            "choices": [choice] if usage is None else [],
        }
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def events() -> AsyncIterator[str]:
        try:
            if chat:
                yield chunk(None, None, delta={"role": "assistant"})
            async for piece in stream.pieces():
                yield chunk(piece, None)
        except Exception as err:  # the engine failed mid-stream: say so in the stream
            fields["error"] = str(err)
            error = {"error": {"message": str(err), "type": "server_error", "code": None}}
            yield f"data: {json.dumps(error)}\n\n"
            return
        finally:
            stream.close()
        result = stream.result
        if result is not None:
            fields.update(
                prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens
            )
            yield chunk(None, result.finish_reason)
            if include_usage:
                yield chunk(None, None, _usage(result))
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Ensemble-Member": stream.member},
        # Runs after the response ends, also when the client went away before the body
        # started: the generation must be told to stop either way.
        background=BackgroundTask(stream.close),
    )


def _model_entry(request: Request, name: str) -> dict[str, Any]:
    ensemble = _ensemble(request)
    slot = ensemble.slots[name]
    active = slot.active
    meta: dict[str, Any] = {
        "state": slot.state,
        "description": slot.spec.description,
        "n_ctx": slot.spec.n_ctx,
        "n_gpu_layers": slot.spec.n_gpu_layers,
    }
    if active is not None:
        info = active.engine.info
        meta |= {
            "generation": active.generation,
            "architecture": info.architecture,
            "weights_bytes": info.weights_bytes,
            "gpu_offload": info.gpu_offload,
        }
    return {
        "id": name,
        "object": "model",
        "created": int(active.loaded_at) if active is not None else 0,
        "owned_by": "ensemble-ops",
        "meta": meta,
    }


async def list_models(request: Request) -> Response:
    ensemble = _ensemble(request)
    entries = [_model_entry(request, name) for name in ensemble.slots]
    routing = {
        "id": ENSEMBLE,
        "object": "model",
        "created": 0,
        "owned_by": "ensemble-ops",
        "meta": {
            "description": "Routes each request to a member by the request's mode, "
            "falling back to the next member when one is busy or failing.",
            "members": list(ensemble.slots),
        },
    }
    return JSONResponse({"object": "list", "data": [routing, *entries]})


routes = [
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
]
