"""Routing: the members a request may go to, in the order to try them.

A request names a member (only that one), a split (the member its session's bucket gives,
then the others by weight) or ``ensemble`` (the mode's preference, then the rest). Among
several, members that cannot do what the request needs are left out (a chat never goes to a
member without a chat template, unless no member can chat at all), and unhealthy ones go
last: when all are unhealthy one must still be tried, and a success is how a member
recovers. A prompt too long for a member's context is found on the member itself (its own
tokenizer counts it), and the walk then moves on to the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ensemble_ops.config import Settings
from ensemble_ops.errors import ModelNotFoundError
from ensemble_ops.serving.engine import Capability
from ensemble_ops.serving.inference import ENSEMBLE, InferenceRequest
from ensemble_ops.serving.slot import ModelSlot
from ensemble_ops.serving.sticky import bucket

__all__ = ["Router", "split_order"]


class Router:
    """Picks and orders the candidate members of each request."""

    def __init__(
        self,
        settings: Settings,
        slots: Mapping[str, ModelSlot],
        can_serve: Callable[[str], bool] = lambda name: True,
    ) -> None:
        """``can_serve`` is the health view's verdict: False puts a member last."""
        self._settings = settings
        self._slots = slots
        self._can_serve = can_serve

    def route(self, request: InferenceRequest) -> list[ModelSlot]:
        """The members to try for ``request``, in order; raises ``ModelNotFoundError``."""
        split = self._settings.splits.get(request.model)
        if split is not None:
            order = split_order(split.weights, bucket(request.session))
        elif request.model != ENSEMBLE:
            slot = self._slots.get(request.model)
            if slot is None:
                raise ModelNotFoundError(request.model, [*self._slots, *self._settings.splits])
            return [slot]  # named: it answers as it can (a plain transcript without template)
        else:
            preferred = self._settings.modes[request.mode].prefer
            order = [*preferred, *(name for name in self._slots if name not in preferred)]
        order = self._able(order, request.needs)
        order.sort(key=lambda name: not self._can_serve(name))
        return [self._slots[name] for name in order]

    def _able(self, order: list[str], needs: Capability) -> list[str]:
        """``order`` without the members known unable to do ``needs``; all of them when none
        is able (an ensemble of base models still answers chats in the plain transcript).
        A member not loaded is not known unable: it is tried, and says why it cannot serve."""
        able = [name for name in order if self._slots[name].capable(needs) is not False]
        return able or order


def split_order(weights: dict[str, float], point: float) -> list[str]:
    """A split's members in the order to try them: the one whose slice of [0, 100) holds
    ``point`` (slices in config order, each as wide as its share of the weights), then the
    others, heaviest first (config order among equals)."""
    total = sum(weights.values())
    edge = 0.0
    chosen = list(weights)[-1]  # a point that rounding puts past the last edge
    for name, weight in weights.items():
        edge += weight / total * 100
        if point < edge:
            chosen = name
            break
    others = sorted((name for name in weights if name != chosen), key=lambda n: -weights[n])
    return [chosen, *others]
