"""The task runner: tasks that belong to no request, ended together at shutdown."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from ensemble_ops.tasks import TaskRunner


async def test_aclose_lets_shielded_work_finish_then_cancels_the_rest() -> None:
    """A claim sent to Redis or a copy being freed is shielded: the shutdown's cancellation
    waits for it, then stops the task at its next unshielded wait."""
    runner = TaskRunner()
    entered, release = anyio.Event(), anyio.Event()
    done: list[str] = []

    async def work() -> None:
        with anyio.CancelScope(shield=True):
            entered.set()
            await release.wait()
            done.append("shielded")
        await anyio.sleep_forever()
        done.append("after the shield")

    runner.spawn(work)
    with anyio.fail_after(10):
        await entered.wait()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(runner.aclose)
            await (
                anyio.lowlevel.checkpoint()
            )  # aclose has run up to its wait: the task is cancelled
            assert runner.running == 1
            release.set()
    assert done == ["shielded"]
    assert runner.running == 0


async def test_a_failed_task_is_logged_and_forgotten(caplog: pytest.LogCaptureFixture) -> None:
    runner = TaskRunner()
    failed = anyio.Event()

    async def fail() -> None:
        failed.set()
        raise ValueError("broken")

    runner.spawn(fail)
    with anyio.fail_after(10):
        await failed.wait()
        while runner.running:
            await anyio.lowlevel.checkpoint()
    assert "background task failed" in caplog.text
    assert "broken" in caplog.text
    await runner.aclose()


async def test_a_closed_runner_starts_nothing() -> None:
    runner = TaskRunner()
    await runner.aclose()

    async def work() -> None:
        pass

    with pytest.raises(RuntimeError, match="closed"):
        runner.spawn(work)
