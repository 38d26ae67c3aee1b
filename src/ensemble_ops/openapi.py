"""The OpenAPI 3.1 document of the whole HTTP surface, served at ``/openapi.json``.

Request bodies come from the pydantic models that validate them, so the two cannot drift;
a test walks the app's routes and fails when a route is missing here (or documented but
gone), and schemathesis fuzzes a live server against this document.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from ._version import __version__
from .schemas import ChatCompletionBody, CompletionBody

__all__ = ["build_openapi"]

_REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Malformed JSON or an invalid field (the error's param names it).",
        401: "The admin token is missing or wrong.",
        403: "Admin routes answer loopback clients only when no token is set.",
        404: "Unknown model.",
        409: "A reload of this member is already running.",
        413: "The request body is over server.max_body_bytes.",
        500: "The inference engine failed.",
        503: "Overloaded, loading, or no member can serve (see Retry-After).",
    }
    return {str(code): _json(_ref("Error"), text[code]) for code in codes}


_STRING_OR_NULL = {"type": ["string", "null"]}
_NUMBER_OR_NULL = {"type": ["number", "null"]}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": _STRING_OR_NULL,
                    "code": _STRING_OR_NULL,
                },
            },
            "status": {"$ref": "#/components/schemas/ReloadStatus"},
        },
    },
    "Usage": {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            k: {"type": "integer", "minimum": 0}
            for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        },
    },
    "Completion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "text_completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "text", "finish_reason"],
                    "properties": {
                        "index": {"type": "integer"},
                        "text": {"type": "string"},
                        "finish_reason": {"enum": ["stop", "length"]},
                    },
                },
            },
            "usage": _ref("Usage"),
        },
    },
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "message", "finish_reason"],
                    "properties": {
                        "index": {"type": "integer"},
                        "message": {
                            "type": "object",
                            "required": ["role", "content"],
                            "properties": {
                                "role": {"const": "assistant"},
                                "content": {"type": "string"},
                            },
                        },
                        "finish_reason": {"enum": ["stop", "length"]},
                    },
                },
            },
            "usage": _ref("Usage"),
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "object", "created", "owned_by"],
                    "properties": {
                        "id": {"type": "string"},
                        "object": {"const": "model"},
                        "created": {"type": "integer"},
                        "owned_by": {"type": "string"},
                        "meta": {"type": "object"},
                    },
                },
            },
        },
    },
    "ModelHealth": {
        "type": "object",
        "required": [
            "model_name",
            "status",
            "loaded",
            "inference_ready",
            "last_inference_ms",
            "memory_mb",
            "gpu_memory_mb",
            "error_message",
            "checked_at",
            "uptime_seconds",
        ],
        "properties": {
            "model_name": {"type": "string"},
            "status": {"enum": ["healthy", "degraded", "unhealthy", "unknown"]},
            "loaded": {"type": "boolean"},
            "inference_ready": {"type": "boolean"},
            "last_inference_ms": _NUMBER_OR_NULL,
            "memory_mb": _NUMBER_OR_NULL,
            "gpu_memory_mb": _NUMBER_OR_NULL,
            "error_message": _STRING_OR_NULL,
            "checked_at": {"type": "string"},
            "uptime_seconds": _NUMBER_OR_NULL,
            "probe": {"type": "object"},
            "reload": {"type": ["object", "null"]},
        },
    },
    "AllHealth": {
        "type": "object",
        "required": [
            "status",
            "healthy_count",
            "degraded_count",
            "unhealthy_count",
            "total_models",
            "models",
            "memory_mb",
            "gpu_available",
            "checked_at",
        ],
        "properties": {
            "status": {"enum": ["healthy", "degraded", "unhealthy"]},
            "healthy_count": {"type": "integer"},
            "degraded_count": {"type": "integer"},
            "unhealthy_count": {"type": "integer"},
            "total_models": {"type": "integer"},
            "models": {"type": "object", "additionalProperties": {"type": "string"}},
            "memory_mb": {"type": "number"},
            "gpu_available": {"type": "boolean"},
            "gpu_memory_mb": _NUMBER_OR_NULL,
            "checked_at": {"type": "string"},
        },
    },
    "Probe": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}, "reason": {"type": "string"}},
    },
    "ReloadStatus": {
        "type": "object",
        "required": [
            "model",
            "state",
            "progress_percent",
            "message",
            "started_at",
            "completed_at",
            "error",
        ],
        "properties": {
            "model": {"type": "string"},
            "state": {"enum": ["idle", "warming_up", "ready", "switching", "completed", "failed"]},
            "progress_percent": {"type": "number", "minimum": 0, "maximum": 100},
            "message": {"type": "string"},
            "started_at": _STRING_OR_NULL,
            "completed_at": _STRING_OR_NULL,
            "error": _STRING_OR_NULL,
        },
    },
    "ReloadRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "path": {
                "type": "string",
                "minLength": 1,
                "description": "A GGUF file inside the model directory.",
            },
            "warmup_iterations": {"type": "integer", "minimum": 1, "maximum": 100},
        },
    },
    "SseEvent": {
        "description": "One server-sent event: a JSON chunk, an error, or [DONE].",
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    },
    "Members": {
        "type": "object",
        "required": ["models"],
        "properties": {"models": {"type": "array", "items": {"type": "object"}}},
    },
}


def _inference(summary: str, body: str, answer: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(body)}},
            },
            "responses": {
                "200": {
                    "description": "The answer; server-sent events with stream: true.",
                    "content": {
                        "application/json": {"schema": _ref(answer)},
                        "text/event-stream": {"schema": _ref("SseEvent")},
                    },
                },
                **_errors(400, 404, 413, 500, 503),
            },
        }
    }


def build_openapi(*, members: list[str] | None = None, metrics: bool = True) -> dict[str, Any]:
    """The document: OpenAPI 3.1, JSON Schema 2020-12 bodies from pydantic. ``members``
    lists the valid model names of this server; ``metrics`` whether the metrics routes
    exist (``metrics.enabled``)."""
    _, defs = models_json_schema(
        [(CompletionBody, "validation"), (ChatCompletionBody, "validation")],
        ref_template=_REF,
    )
    schemas = {**defs.get("$defs", {}), **_SCHEMAS}
    model_name: dict[str, Any] = {"type": "string"}
    if members:
        model_name["enum"] = members
    model_param = {"name": "model", "in": "path", "required": True, "schema": model_name}
    run_inference = {
        "name": "run_inference",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": ["true", "false"]},
    }
    exposition = {
        "200": {
            "description": "Prometheus text exposition.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    }
    paths: dict[str, Any] = {
        "/v1/completions": _inference("OpenAI completions", "CompletionBody", "Completion"),
        "/v1/chat/completions": _inference(
            "OpenAI chat completions", "ChatCompletionBody", "ChatCompletion"
        ),
        "/v1/models": {
            "get": {
                "summary": "The routing entry and the members",
                "responses": {"200": _json(_ref("ModelList"), "Models.")},
            }
        },
        "/health/llm": {
            "get": {
                "summary": "One member's tri-state health",
                "parameters": [
                    {
                        "name": "model",
                        "in": "query",
                        "required": True,
                        "schema": model_name,
                    },
                    run_inference,
                ],
                "responses": {
                    "200": _json(_ref("ModelHealth"), "Healthy or degraded."),
                    "503": _json(_ref("ModelHealth"), "Unhealthy or still loading."),
                    **_errors(400, 404),
                },
            }
        },
        "/health/llm/all": {
            "get": {
                "summary": "Every member's health",
                "parameters": [run_inference],
                "responses": {
                    "200": _json(_ref("AllHealth"), "Some member serves."),
                    "503": _json(_ref("AllHealth"), "No member serves."),
                    **_errors(400),
                },
            }
        },
        "/health/ready": {
            "get": {
                "summary": "Kubernetes readiness",
                "responses": {
                    "200": _json(_ref("Probe"), "A member can serve."),
                    "503": _json(_ref("Probe"), "Loading, or no member can serve."),
                },
            }
        },
        "/health/live": {
            "get": {
                "summary": "Kubernetes liveness",
                "responses": {
                    "200": _json(_ref("Probe"), "Alive."),
                    "503": _json(_ref("Probe"), "Stuck: loop lag, stuck inference or lease."),
                },
            }
        },
        "/health/llm/reload/{model}": {
            "get": {
                "summary": "A member's reload status",
                "parameters": [model_param],
                "responses": {"200": _json(_ref("ReloadStatus"), "The status."), **_errors(404)},
            }
        },
        "/admin/models/{model}/reload": {
            "post": {
                "summary": "Reload a member without downtime",
                "parameters": [model_param],
                "security": [{"bearer": []}, {}],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ref("ReloadRequest")}},
                },
                "responses": {
                    "202": _json(_ref("ReloadStatus"), "Started; poll Location."),
                    **_errors(400, 401, 403, 404, 409, 413),
                },
            }
        },
        "/admin/models": {
            "get": {
                "summary": "Members, files and reload states",
                "security": [{"bearer": []}, {}],
                "responses": {"200": _json(_ref("Members"), "The members."), **_errors(401, 403)},
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
            }
        },
    }
    if metrics:
        paths |= {
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": exposition}},
            "/health/metrics": {"get": {"summary": "Prometheus metrics", "responses": exposition}},
            "/health/metrics/json": {
                "get": {
                    "summary": "The metrics as flat JSON",
                    "responses": {"200": _json({"type": "object"}, "name_labels: value.")},
                }
            },
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ensemble-ops",
            "version": __version__,
            "description": "OpenAI-compatible API over an ensemble of GGUF models, "
            "with health, reload and metrics.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
