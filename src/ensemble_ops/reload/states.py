"""The reload machine as data: its states and transitions, the machine every member's job
joins, and its Mermaid diagram (docs/reload.md embeds it; a test keeps them equal)."""

from __future__ import annotations

from typing import Any

from transitions.extensions.asyncio import AsyncMachine

from ensemble_ops.events import RELOAD_STATES, ROLLING_STATES

__all__ = ["STATES", "TRANSITIONS", "mermaid_diagram", "new_machine"]

STATES = list(RELOAD_STATES)
_ROLLING = list(ROLLING_STATES)
TRANSITIONS: list[dict[str, Any]] = [
    {
        "trigger": "start",
        "source": ["idle", "completed", "failed", "rolled_back"],
        "dest": "warming_up",
    },
    {"trigger": "warmed", "source": "warming_up", "dest": "ready"},
    {"trigger": "shadow", "source": "ready", "dest": "shadowing"},
    {"trigger": "canary", "source": ["ready", "shadowing"], "dest": "canary"},
    {"trigger": "await_promotion", "source": "ready", "dest": "awaiting_promotion"},
    {"trigger": "switch", "source": ["ready", *_ROLLING], "dest": "switching"},
    {"trigger": "roll_back", "source": _ROLLING, "dest": "rolled_back"},
    {"trigger": "complete", "source": "switching", "dest": "completed"},
    {
        "trigger": "fail",
        "source": ["warming_up", "ready", *_ROLLING, "switching"],
        "dest": "failed",
    },
]


def new_machine() -> AsyncMachine:
    """The machine every member's job is added to.

    ``queued="model"``: each member's triggers are queued, so a state's callback can fire the
    next trigger, and reloads of different members may overlap (``queued=True`` would make
    one queue for all).
    """
    return AsyncMachine(
        model=None,
        states=STATES,
        transitions=TRANSITIONS,
        initial="idle",
        queued="model",
        auto_transitions=False,
        on_exception="on_exception",
        send_event=True,  # callbacks get the EventData: on_exception reads the error from it
    )


def mermaid_diagram() -> str:
    """The machine drawn by transitions itself, as Mermaid (docs/reload.md embeds it)."""
    from transitions.extensions import GraphMachine

    class _Drawing:
        pass

    drawing = _Drawing()
    GraphMachine(
        model=drawing,
        states=STATES,
        transitions=TRANSITIONS,
        initial="idle",
        graph_engine="mermaid",
        auto_transitions=False,
        title="Reload state machine",
    )
    graph: Any = drawing.get_graph()  # type: ignore[attr-defined]
    return str(graph.draw(None))
