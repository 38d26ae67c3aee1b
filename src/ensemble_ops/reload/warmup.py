"""Warm-up: the new copy answers N prompts, each within a timeout, before it takes traffic."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import anyio

from ensemble_ops.serving.engine import (
    BACKGROUND_TARGET_S,
    ChatMessage,
    Completion,
    Engine,
    GenerationParams,
    complete,
)
from ensemble_ops.serving.slot import Loaded
from ensemble_ops.tasks import TaskRunner

__all__ = ["WarmupFailedError", "WarmupFunc", "chat_warmup", "warm_once", "warm_up"]

WarmupFunc = Callable[[Engine], object]
"""One warm-up inference on the new copy (blocking); an empty result fails the reload."""


class WarmupFailedError(Exception):
    """A warm-up iteration failed, timed out or returned nothing; the message says which."""


def chat_warmup(prompt: str, max_tokens: int) -> WarmupFunc:
    """The default warm-up: ``prompt`` as a user message, at temperature 0.

    Through the chat template, as users reach the model: an instruct model given the bare
    text may rightly answer with end-of-sequence only. Temperature 0: a copy either answers or
    it does not, never by chance.
    """
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0)

    def warm(engine: Engine) -> Completion:
        chat = engine.render_chat([ChatMessage("user", prompt)])
        return complete(
            engine,
            chat.tokens,
            dataclasses.replace(params, stop=chat.stop),
            target_s=BACKGROUND_TARGET_S,  # behind the requests the old copy still serves
        )

    return warm


def _returned_nothing(result: object) -> bool:
    if isinstance(result, Completion):
        return result.completion_tokens == 0 and not result.text
    return not result


async def warm_up(
    new: Loaded,
    warmup: WarmupFunc,
    iterations: int,
    timeout_s: float,
    runner: TaskRunner,
    progress: Callable[[float, str], None],
) -> None:
    """Every warm-up iteration in turn; ``progress`` goes from 0 towards 1."""
    for i in range(1, iterations + 1):
        progress((i - 1) / iterations, f"Warmup iteration {i}/{iterations}")
        await warm_once(new, warmup, i, timeout_s, runner)


async def warm_once(
    new: Loaded, warmup: WarmupFunc, i: int, timeout_s: float, runner: TaskRunner
) -> None:
    """Run warm-up iteration ``i`` on ``new``; raise :class:`WarmupFailedError` if it fails.

    The inference runs in a task of its own: one that hangs is given up on after the timeout
    while its thread finishes in the background (the copy closes only after it returns).
    """
    done = anyio.Event()
    outcome: dict[str, Any] = {}

    async def run() -> None:
        try:
            outcome["result"] = await new.run(warmup, new.engine)
        except Exception as err:
            outcome["error"] = err
        finally:
            done.set()

    runner.spawn(run)
    with anyio.move_on_after(timeout_s):
        await done.wait()
    if not done.is_set():
        raise WarmupFailedError(f"warm-up iteration {i} timed out after {timeout_s:g} s")
    if "error" in outcome:
        raise WarmupFailedError(f"warm-up iteration {i} failed: {outcome['error']}")
    if _returned_nothing(outcome["result"]):
        raise WarmupFailedError(f"warm-up iteration {i} returned nothing")
