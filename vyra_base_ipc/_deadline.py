"""A call's deadline as one value, from the caller down to the socket.

The public API takes timeouts in seconds; they are checked once, turned into
a :class:`Deadline` (a ``time.monotonic()`` instant), and that instant is
what every layer below works with: the time left for the gRPC lane, the
``timeout_nano`` a fast-lane request carries, the receive timeout of a
blocking socket, the event loop's clock for a timer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, TypeVar, Union

from ._options import validate_timeout

__all__ = ['Deadline', 'Timeout', 'deadline_of', 'wait_deadline', 'within']

_T = TypeVar('_T')

_MAX_INT64 = 2**63 - 1
# A timer may fire this much before the instant it was set for (asyncio
# rounds to its clock's resolution): a timeout then is still this deadline's.
_EARLY = 0.001


class Deadline:
    """The ``time.monotonic()`` instant by which a call must end."""

    __slots__ = ('at', 'timeout', 'capped')

    def __init__(self, at: float, timeout: float | None = None, capped: bool = False) -> None:
        self.at = at
        #: The seconds the call was given, where known (for error messages).
        self.timeout = timeout
        #: Whether the calling handler's own deadline set it (``parent=``).
        self.capped = capped

    def explain(self, error: Any, streaming: bool = False, server: str | None = None) -> Any:
        """``error`` (an IPCTimeoutError of a call with this deadline) with
        details that say which timeout expired and how long it was, when it
        is this deadline that passed (whatever the lane's words for it); an
        idle timeout, or a server's own DEADLINE_EXCEEDED before it, keeps
        its words.

        :param streaming: the call streams its responses.
        :param server: the socket the call went to, named when given.
        """
        if (self.timeout is None or self.remaining() > _EARLY
                or error.details.startswith('no message within')):
            return error
        which = ("the calling handler's remaining deadline" if self.capped
                 else "the call's timeout")
        where = '' if server is None else f' from {server!r}'
        what, hint = ((f'the stream{where} did not end',
                       '; stream_method(..., timeout=None): a stream without one')
                      if streaming else (f'no answer{where}', ''))
        details = f'{what} within {which} of {self.timeout:g} s (Deadline Exceeded{hint})'
        return type(error)(error.code, details, method=error.method)

    @classmethod
    def after(cls, timeout: float) -> 'Deadline':
        """The deadline ``timeout`` seconds from now.

        :raises TypeError, ValueError: ``timeout`` is not a finite number > 0.
        """
        return cls(time.monotonic() + validate_timeout(timeout))

    def remaining(self) -> float:
        """Seconds left; 0 or less once it passed."""
        return self.at - time.monotonic()

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def timeout_nano(self) -> int:
        """The time left as a ttrpc request's ``timeout_nano`` (at least 1: 0 means none)."""
        return min(max(1, int((self.at - time.monotonic()) * 1e9)), _MAX_INT64)

    def earlier(self, seconds: float | None) -> 'Deadline':
        """This deadline, or the one ``seconds`` from now if that comes first
        (``None``: this one)."""
        if seconds is None:
            return self
        other = time.monotonic() + seconds
        return self if self.at <= other else Deadline(other)

    def __repr__(self) -> str:
        return f'Deadline(in {self.remaining():.6f} s)'


def wait_deadline(deadline: Deadline | None, idle_timeout: float | None) -> Deadline | None:
    """When a stream's wait for its next message (or for what comes before
    its first) ends: at ``deadline``, or ``idle_timeout`` seconds from now if
    that comes first; ``None``: never."""
    if idle_timeout is None:
        return deadline
    return Deadline(time.monotonic() + idle_timeout) if deadline is None else deadline.earlier(idle_timeout)


#: What the connections accept as a call's deadline: seconds from now, a
#: :class:`Deadline`, or ``None`` for none.
Timeout = Union[float, Deadline, None]


def deadline_of(timeout: Timeout) -> Deadline | None:
    """The deadline of a ``timeout`` argument.

    :raises TypeError, ValueError: a number that is not finite and > 0.
    """
    if timeout is None or isinstance(timeout, Deadline):
        return timeout
    return Deadline.after(timeout)


async def within(awaitable: Awaitable[_T], seconds: float | None) -> _T:
    """What ``awaitable`` gives, awaited for at most ``seconds`` (0 or less:
    what it gives without waiting; ``None``: no limit).

    Every wait with a timeout in this package uses it, not
    :func:`asyncio.wait_for`: in Python 3.11 that lost a cancel of the
    waiting task that came in the pass of the loop ``awaitable`` completed
    in, or in the pass or two after. It returned the result, and the task
    went on as if never cancelled (a handler ran for a call its client had
    cancelled; a ROS request went out for a caller cancelled). Here a task
    cancelled before it resumes is cancelled. Inside a task no task is made
    for ``awaitable`` (none per message of a stream); outside one it gets
    a task of its own.

    :raises TimeoutError: ``seconds`` passed first; ``awaitable`` was cancelled.
    """
    if seconds is None:
        return await awaitable
    if asyncio.current_task() is not None:
        async with asyncio.timeout(seconds):
            return await awaitable
    # Outside a task (the first step of a handler the fast lane runs eagerly,
    # in Python 3.11), where asyncio.timeout() cannot work: ``awaitable`` in
    # a task of its own, cancelled at the timeout. The task that resumes this
    # coroutine cancels it when cancelled itself, and awaiting it directly
    # (not through wait_for) that cancel is never lost.
    waited = asyncio.ensure_future(awaitable)
    expired: list[bool] = []

    def expire() -> None:
        if not waited.done():
            expired.append(waited.cancel())

    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        return await waited
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if expired and (task is None or not task.cancelling()):
            raise TimeoutError from None
        raise
    finally:
        timer.cancel()
