"""Handlers start at once (vyra_base_ipc.ttrpc._eager.start_task): the first
step runs in the caller's turn of the event loop; a coroutine that suspends
goes on as a task, with a task's context and cancellation."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from vyra_base_ipc.ttrpc._eager import start_task

variable: contextvars.ContextVar[str] = contextvars.ContextVar('variable', default='caller')


@pytest.mark.asyncio
async def test_coroutine_that_does_not_suspend_is_done_when_start_task_returns() -> None:
    steps: list[str] = []

    async def answer() -> int:
        steps.append('ran')
        return 42
    future = start_task(answer(), asyncio.get_running_loop())
    assert steps == ['ran'] and future.done()
    assert await future == 42


@pytest.mark.asyncio
async def test_coroutine_that_suspends_goes_on_as_a_task_with_its_result() -> None:
    gate = asyncio.get_running_loop().create_future()

    async def wait_then_answer() -> str:
        value = await gate
        await asyncio.sleep(0)
        return f'got {value}'
    future = start_task(wait_then_answer(), asyncio.get_running_loop())
    assert not future.done()
    gate.set_result('it')
    assert await asyncio.wait_for(future, 5) == 'got it'


@pytest.mark.asyncio
async def test_cancelling_the_task_cancels_the_suspended_coroutine() -> None:
    cleaned_up = asyncio.Event()

    async def wait_forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned_up.set()
    future = start_task(wait_forever(), asyncio.get_running_loop())
    future.cancel()
    with pytest.raises(asyncio.CancelledError):
        await future
    assert cleaned_up.is_set()


@pytest.mark.asyncio
async def test_context_changes_stay_with_the_coroutine() -> None:
    seen: list[str] = []

    async def set_and_suspend() -> None:
        variable.set('handler')
        await asyncio.sleep(0)
        seen.append(variable.get())
    future = start_task(set_and_suspend(), asyncio.get_running_loop())
    assert variable.get() == 'caller'
    await asyncio.wait_for(future, 5)
    assert seen == ['handler'] and variable.get() == 'caller'


@pytest.mark.asyncio
async def test_exception_in_the_first_step_is_the_futures_exception() -> None:
    async def fail() -> None:
        raise ValueError('at once')
    future = start_task(fail(), asyncio.get_running_loop())
    with pytest.raises(ValueError, match='at once'):
        await future
