"""``ensemble-ops eval``: a golden set against a running service or a GGUF file.

Against a service each case is one request to the public API at temperature 0 (chats to
``/v1/chat/completions``, prompts to ``/v1/completions``), so it checks what callers get;
a 503 is retried after its ``Retry-After``. Against a file the cases run on an engine of
this process, each alone, as the reload's quality gate runs them. Standard library only for
HTTP, like the other commands.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TextIO

from ensemble_ops.config import (
    GoldenCase,
    GoldenSet,
    ModelSpec,
    load_golden_set,
    shipped_golden_set,
)
from ensemble_ops.quality.run import CaseResult, QualityRun, run_cases

__all__ = ["ServiceCallError", "evaluate_file", "evaluate_url", "report"]

_TIMEOUT_S = 300.0
_BUSY_RETRIES = 10


def evaluate_file(path: Path, golden: GoldenSet | None) -> tuple[QualityRun, GoldenSet]:
    """Load ``path`` into an engine of this process and run the set (the shipped one that
    fits the model when ``golden`` is None)."""
    from ensemble_ops.serving.llama_engine import LlamaEngine

    spec = ModelSpec(name="eval", path=path, parallel=1)
    engine = LlamaEngine.load(spec)
    try:
        golden = golden or load_golden_set(
            shipped_golden_set("chat" if engine.info.can_chat else "completion")
        )
        return run_cases(engine, golden.cases), golden
    finally:
        engine.close()


def evaluate_url(
    url: str, model: str, golden: GoldenSet | None, api_key: str | None
) -> tuple[QualityRun, GoldenSet]:
    """Run the set through a service's public API (the shipped set that fits the member's
    abilities, as ``/v1/models`` lists them, when ``golden`` is None)."""
    base = url.rstrip("/")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if golden is None:
        golden = load_golden_set(
            shipped_golden_set("chat" if _can_chat(base, model, headers) else "completion")
        )
    results = []
    for case in golden.cases:
        started = time.perf_counter()
        try:
            answer = _ask(base, model, case, headers)
        except ServiceCallError as err:
            results.append(CaseResult(case, "", f"error: {err}", time.perf_counter() - started))
            continue
        results.append(CaseResult(case, answer, case.judge(answer), time.perf_counter() - started))
    return QualityRun(tuple(results)), golden


class ServiceCallError(Exception):
    """The service answered a case with an error."""


def _can_chat(base: str, model: str, headers: dict[str, str]) -> bool:
    if model == "ensemble":
        return True  # routing sends a chat to a member that can chat
    listed = _call(urllib.request.Request(f"{base}/v1/models", headers=headers))
    for entry in listed.get("data", []):
        if entry.get("id") == model:
            return "chat" in entry.get("meta", {}).get("capabilities", ["chat"])
    raise ServiceCallError(f"no model {model!r} at {base}")


def _ask(base: str, model: str, case: GoldenCase, headers: dict[str, str]) -> str:
    body: dict[str, Any] = {"model": model, "max_tokens": case.max_tokens, "temperature": 0}
    if case.messages is not None:
        body["messages"] = [m.model_dump() for m in case.messages]
        route = "/v1/chat/completions"
    else:
        body["prompt"] = case.prompt
        route = "/v1/completions"
    request = urllib.request.Request(
        base + route, data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    choice = _call(request)["choices"][0]
    text = choice["message"]["content"] if case.messages is not None else choice["text"]
    return str(text or "")


def _call(request: urllib.request.Request) -> dict[str, Any]:
    for _ in range(_BUSY_RETRIES):
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as answer:
                data: dict[str, Any] = json.load(answer)
                return data
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", errors="replace")
            if err.code == 503:  # busy: come back when it says
                time.sleep(min(float(err.headers.get("Retry-After") or 1), 30.0))
                continue
            raise ServiceCallError(f"{err.code} {_message(detail)}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ServiceCallError(f"cannot reach {request.full_url}: {reason}") from None
    raise ServiceCallError(f"still busy (503) after {_BUSY_RETRIES} tries")


def _message(detail: str) -> str:
    try:
        return str(json.loads(detail)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return detail[:200]


def report(
    run: QualityRun,
    golden: GoldenSet,
    target: str,
    min_pass_rate: float,
    as_json: bool,
    out: TextIO,
) -> int:
    """Print the per-case table (or JSON) and the pass rate; 0 at or above the threshold."""
    passed = run.pass_rate >= min_pass_rate - 1e-9
    if as_json:
        summary = {
            "target": target,
            "golden_set": str(golden.path),
            "cases": run.total,
            "passed": run.passed,
            "pass_rate": round(run.pass_rate, 4),
            "min_pass_rate": min_pass_rate,
            "verdict": "pass" if passed else "fail",
            "seconds": round(run.seconds, 3),
            "results": [result.as_dict() for result in run.results],
        }
        out.write(json.dumps(summary, indent=2) + "\n")
        return 0 if passed else 1
    out.write(f"{target} on {golden.path.name}\n")
    out.write(f"{'case':<24} {'result':<6} answer / why\n")
    for result in run.results:
        answer = " ".join(result.answer.split())
        verdict = "pass" if result.passed else "FAIL"
        why = "" if result.passed else f"  [{result.failure}]"
        out.write(f"{_short(result.case.label, 24):<24} {verdict:<6} {_short(answer, 60)}{why}\n")
    out.write(
        f"passed {run.passed}/{run.total} ({run.pass_rate:.0%}); needs {min_pass_rate:.0%}: "
        f"{'pass' if passed else 'FAIL'}\n"
    )
    return 0 if passed else 1


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
