"""Start a coroutine at once, in the caller's turn of the event loop.

A handler that answers without waiting for anything then answers inside the
``data_received`` that brought its request: no trip through the event loop
(which costs a ``epoll_wait`` and a callback per call). Python 3.12 does this
with ``asyncio.Task(..., eager_start=True)``; for older versions the first
step is taken here and, if the coroutine suspends, a task continues it from
where it stopped. Either way the coroutine runs in a copy of the current
context, as a task's would, and can be cancelled like a task.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
import sys
from typing import Any, Coroutine, Generator

__all__ = ['run_eagerly', 'start_task']

_NATIVE = sys.version_info >= (3, 12)


def start_task(coroutine: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
    """Run ``coroutine`` until it first suspends, now; return a future of
    its result (a task if it suspended, else a future that is done)."""
    future = _start(coroutine, loop, True)
    assert future is not None
    return future


def run_eagerly(coroutine: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop
                ) -> asyncio.Future[Any] | None:
    """:func:`start_task` for a coroutine run for its effect: one that
    returns without suspending gives ``None`` (its result dropped, no future
    made for it: most handlers answer in their first step); one that raised
    or suspended gives a future as :func:`start_task` does."""
    return _start(coroutine, loop, False)


def _start(coroutine: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop, keep_result: bool
           ) -> asyncio.Future[Any] | None:
    if _NATIVE:
        return asyncio.Task(coroutine, loop=loop, eager_start=True)  # type: ignore[call-arg]
    context = contextvars.copy_context()
    try:
        yielded = context.run(coroutine.send, None)
    except StopIteration as stop:
        return _done(loop, result=stop.value) if keep_result else None
    except asyncio.CancelledError:
        future = loop.create_future()
        future.cancel()
        return future
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:
        return _done(loop, error=error)
    return loop.create_task(_Continued(coroutine, yielded), context=context)


def _done(loop: asyncio.AbstractEventLoop, result: Any = None,
          error: BaseException | None = None) -> asyncio.Future[Any]:
    future = loop.create_future()
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
    return future


class _Continued(collections.abc.Coroutine):
    """A started coroutine, for a task to drive on: its first step returns
    what the coroutine yielded when it suspended (the future it waits for).
    A task cancelled before that step throws into the coroutine all the same."""

    __slots__ = ('_coroutine', '_first')

    def __init__(self, coroutine: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self._coroutine = coroutine
        self._first: list[Any] = [yielded]

    def send(self, value: Any) -> Any:
        if self._first:
            return self._first.pop()
        return self._coroutine.send(value)

    def throw(self, *error: Any) -> Any:
        self._first.clear()
        try:
            return self._coroutine.throw(*error)
        finally:
            # The exception propagating from here has this frame in its
            # traceback: holding it too would be a cycle, keeping the
            # handler's frames (and what they hold) until garbage collection.
            del error

    def close(self) -> None:
        self._coroutine.close()

    def __await__(self) -> Generator[Any, Any, Any]:
        raise TypeError('a started handler coroutine is driven by its task only')
