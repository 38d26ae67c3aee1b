"""The process-wide bus and members for users who embed models without the server.

``get_health_checker()`` and ``get_reload_manager()`` share them, so a model registered with
one is seen by the other. The server builds its own in ``app`` and never touches these.
"""

from __future__ import annotations

from .events import EventBus
from .slot import ModelSlot

__all__ = ["default_bus", "default_slots"]

_bus = EventBus()
_slots: dict[str, ModelSlot] = {}


def default_bus() -> EventBus:
    return _bus


def default_slots() -> dict[str, ModelSlot]:
    return _slots
