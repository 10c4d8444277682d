"""The event loop an IPC server runs best on: asyncio's own selector loop
whose selector busy-polls briefly before it sleeps (see
:mod:`vyra_base_ipc._busy_poll` for when and at what cost).

The ``ipc_server`` node, :class:`~vyra_base_ipc._loop_thread.EventLoopThread`
and the demo run on it. Use it for a server of your own the way uvloop is
used::

    vyra_base_ipc.run(server.serve())                        # like asyncio.run()
    asyncio.Runner(loop_factory=vyra_base_ipc.new_event_loop)  # or any loop_factory

A server on a loop created elsewhere (``asyncio.run()``, uvicorn, ...)
serves exactly the same, only without polling. The clients poll by
themselves, on any loop: :class:`~vyra_base_ipc.SyncIPCHandler` in the
calling thread, :class:`~vyra_base_ipc.IPCHandler` on the caller's loop
(:func:`vyra_base_ipc._busy_poll.await_polling`).
"""

from __future__ import annotations

import asyncio
import functools
import select
import selectors
from typing import Any, Coroutine, TypeVar

from ._busy_poll import DEFAULT_BUSY_POLL, BusyPoll, validate_busy_poll

__all__ = ['BusyPollSelector', 'new_event_loop', 'run']

_T = TypeVar('_T')


class BusyPollSelector(selectors.DefaultSelector):
    """The platform's default selector (epoll on Linux), polling for up to
    the :class:`~vyra_base_ipc._busy_poll.BusyPoll` window before a
    :meth:`select` that may block sleeps.

    A ``select()`` never returns later than its timeout; when a timer of the
    loop is due within the window, it polls until then only.
    """

    def __init__(self, busy_poll: BusyPoll) -> None:
        super().__init__()
        self.busy_poll = busy_poll
        # The epoll object itself: a poll mostly finds nothing, and finding
        # nothing should cost the system call only.
        epoll, epoll_type = getattr(self, '_selector', None), getattr(select, 'epoll', None)
        self._poll_now = epoll.poll if epoll_type is not None and isinstance(epoll, epoll_type) else None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """The ready keys and events, as :meth:`selectors.BaseSelector.select`;
        polls first, as the class docstring says, unless ``timeout`` <= 0."""
        if timeout is not None and timeout <= 0:
            return super().select(timeout)
        return self.busy_poll.wait(self._ready_now, super().select, timeout)

    def _ready_now(self) -> list[tuple[selectors.SelectorKey, int]] | None:
        poll_now = self._poll_now
        if poll_now is None:
            return super().select(0) or None
        keys = self.get_map()
        found = poll_now(0, max(len(keys), 1))
        if not found:
            return None
        # What EpollSelector.select() makes of them, without asking again.
        ready = []
        for fd, event in found:
            key = keys.get(fd)
            if key is not None:
                events = ((selectors.EVENT_WRITE if event & ~select.EPOLLIN else 0)
                          | (selectors.EVENT_READ if event & ~select.EPOLLOUT else 0))
                ready.append((key, events & key.events))
        return ready or None


def new_event_loop(busy_poll: float = DEFAULT_BUSY_POLL) -> asyncio.AbstractEventLoop:
    """A new event loop whose waits poll for up to ``busy_poll`` seconds.

    With ``busy_poll=0``, or on a machine with one CPU, it is
    simply :func:`asyncio.new_event_loop` (so an installed loop policy, such
    as uvloop's, still applies).

    :raises TypeError, ValueError: ``busy_poll`` is not a number of seconds
        from 0 to 0.01.
    """
    policy = BusyPoll(busy_poll)
    if not policy.enabled:
        return asyncio.new_event_loop()
    return asyncio.SelectorEventLoop(BusyPollSelector(policy))


def run(main: Coroutine[Any, Any, _T], *, busy_poll: float = DEFAULT_BUSY_POLL,
        debug: bool | None = None) -> _T:
    """:func:`asyncio.run` on a loop from :func:`new_event_loop`: run
    ``main`` to completion, then cancel what remains and close the loop.
    Like :func:`asyncio.run`, it cannot be called while a loop runs in the
    same thread.

    :raises TypeError, ValueError: ``busy_poll`` is unusable (``main`` is
        closed unstarted).
    """
    try:
        validate_busy_poll(busy_poll)
    except (TypeError, ValueError):
        main.close()  # never started: no "never awaited" warning
        raise
    loop_factory = functools.partial(new_event_loop, busy_poll)
    with asyncio.Runner(debug=debug, loop_factory=loop_factory) as runner:
        return runner.run(main)
