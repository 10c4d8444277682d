"""Busy-polling before sleeping: when to do it and for how long.

A process asleep in ``recv()`` or ``epoll_wait()`` on an idle CPU pays for
its wakeup when the peer answers: tens of microseconds on a virtual machine,
more than the whole rest of a local call. A waiter that keeps polling for a
short while instead is still on its CPU when the answer comes. Linux offers
this for network sockets (``SO_BUSY_POLL``), KVM for idle virtual CPUs
(``halt_poll_ns``); both are bounded and both back off when polling does not
pay. :class:`BusyPoll` is that policy, shared by the server's event loop
(:mod:`vyra_base_ipc._event_loop`), the blocking fast-lane client
(:func:`poll_for`) and the asyncio one (:func:`await_polling`: on the
caller's own event loop, which this package does not choose, a waiting task
polls by yielding to the loop rather than by polling a socket).

Cost: a wait polls for at most the window (:data:`DEFAULT_BUSY_POLL`), so a
call costs at most that much extra CPU, and only while calls come that close
together: a poll that finds nothing makes the next waits sleep at once, for
twice as many waits each time it happens again (up to
:data:`MAX_BACKOFF_WAITS`). Between attempts a poller yields the CPU, so a
peer that shares its CPU still runs at once. On a machine with one CPU
nothing polls: the peer can only run when the poller stops. Where CPU time
is scarcer than latency matters (a CPU quota, a battery), set the window to 0.

Measured on a 2-CPU virtual machine (``python -m bench --sections busy-poll``):
with both sides polling a 64 B call takes ~30 us instead of ~100 us, and
*less* CPU per call on each side, because waking a sleeping process costs more
than the polling does.

The window is KVM's default ``halt_poll_ns``, 200 us. A plain call needs far
less; a call with an explicit SharedBuffer keeps each side busy for about
80 us (lends, mappings, the RELEASE), and often longer. With a 100 us window
a third of the client's polls found nothing there, each miss made the next
waits sleep at once, and nine waits in ten slept: a 64 B SharedBuffer
answered with itself took 300-350 us a call (p50), as with no polling at
all. With 200 us, 2,984 polls of 3,000 found the answer, and a call takes
185-210 us, for 10-20 % more CPU time per call on each side (the benchmark's
busy-poll section).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Callable, TypeVar

__all__ = ['DEFAULT_BUSY_POLL', 'MAX_BACKOFF_WAITS', 'BusyPoll', 'await_polling', 'poll_for',
           'validate_busy_poll']

#: How long a wait polls before it sleeps, in seconds. Covers a local
#: round trip through a Python peer, one carrying SharedBuffers included.
DEFAULT_BUSY_POLL = 200e-6
#: Largest number of waits that sleep at once after polls found nothing.
MAX_BACKOFF_WAITS = 64
#: Longest window accepted: beyond this, polling costs more than any wakeup.
_LIMIT = 0.01

_T = TypeVar('_T')


def validate_busy_poll(value: object, name: str = 'busy_poll') -> float:
    """:raises TypeError, ValueError: unless ``value`` is a number of seconds
    from 0 (no polling) to 0.01."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f'{name} must be a number of seconds, not {type(value).__name__}')
    if not 0 <= value <= _LIMIT:
        raise ValueError(f'{name} must be between 0 and {_LIMIT} seconds, not {value}')
    return float(value)


def _machine_cpus() -> int:
    # The machine's, not this process's affinity: a process pinned to a CPU
    # of its own, its peer to another, is where polling pays most.
    return os.cpu_count() or 1


class BusyPoll:
    """The polling policy of one waiter (one event loop, one connection).

    Not thread-safe: one waiter at a time calls :meth:`wait` (or asks
    :meth:`window` and reports with :meth:`found`, :meth:`missed` or
    :meth:`slept`, which is what :meth:`wait` does).

    :param seconds: the longest poll; 0 turns polling off. Also off on a
        machine with one CPU.
    :raises TypeError, ValueError: as :func:`validate_busy_poll`.
    """

    __slots__ = ('seconds', '_backoff', '_skip')

    def __init__(self, seconds: float = DEFAULT_BUSY_POLL) -> None:
        seconds = validate_busy_poll(seconds)
        #: The window; 0.0 when polling is off.
        self.seconds = seconds if _machine_cpus() > 1 else 0.0
        self._backoff = 0  # waits to sleep after the next fruitless poll
        self._skip = 0  # waits left that sleep at once

    @property
    def enabled(self) -> bool:
        """Whether waits poll at all (a window above 0)."""
        return self.seconds > 0.0

    def window(self) -> float:
        """Seconds to poll before the coming wait sleeps; 0.0 to sleep at once."""
        if self._skip:
            self._skip -= 1
            return 0.0
        return self.seconds

    def found(self) -> None:
        """Polling found the event: keep polling."""
        self._backoff = 0

    def missed(self) -> None:
        """Polling found nothing in its window: back off."""
        self._backoff = min(2 * self._backoff or 1, MAX_BACKOFF_WAITS)
        self._skip = self._backoff

    def slept(self, waited: float) -> None:
        """A wait that did not poll ended after ``waited`` seconds with an
        event: had it come within the window, polling would have paid."""
        if waited <= self.seconds:
            self._backoff = self._skip = 0

    def wait(self, attempt: Callable[[], _T | None], sleep: Callable[[float | None], _T],
             timeout: float | None) -> _T:
        """Wait for an event as this policy says, and learn from how it went.

        Calls ``attempt`` (which must not block) until it returns something
        other than ``None``, for up to the window, or ``timeout`` seconds if
        that ends sooner; if nothing came, returns ``sleep(seconds)``, which
        must block until the event or until those seconds (what is left of
        ``timeout``; ``None``: no limit) have passed, and return something
        false if nothing came. Never takes much longer than ``timeout``. A
        poll that found nothing backs off (:meth:`missed`), also one that
        ``timeout`` cut short (not one that ``timeout`` left no time at all).
        """
        if not self.seconds:
            # Polling off: nothing to learn (a disabled policy never backs
            # off), so no clock readings (a blocking call: -2,000 instructions).
            return sleep(timeout)
        started = time.perf_counter()
        window = self.window()
        if not window:
            result = sleep(timeout)
            if result:
                self.slept(time.perf_counter() - started)
            return result
        seconds = window if timeout is None else min(timeout, window)
        polled = poll_for(attempt, seconds)
        if polled is not None:
            self.found()
            return polled
        # A miss also when the timeout cut the poll short: an event loop whose
        # timers come less than a window apart (a task sleeping 100 us at a
        # time) would otherwise poll through every one of them, at 100 % CPU
        # with no event ever coming. (Not a wait whose timeout had passed: it
        # did not poll.)
        if seconds > 0:
            self.missed()
        if timeout is not None:
            timeout = max(0.0, timeout - (time.perf_counter() - started))
        return sleep(timeout)


def poll_for(attempt: Callable[[], _T | None], seconds: float) -> _T | None:
    """Call ``attempt`` (which must not block) until it returns something
    other than ``None`` or ``seconds`` have passed; return that, or ``None``.

    Between attempts the CPU and the GIL go to any other thread that is ready
    to run: polling must not delay the work it waits for (gRPC's own threads
    answer the gRPC lane: without yielding, a polling loop made that lane
    ~20 % slower on two CPUs).
    """
    deadline = time.perf_counter() + seconds
    while True:
        result = attempt()
        if result is not None or time.perf_counter() >= deadline:
            return result
        os.sched_yield()


#: The event loops a waiter of :func:`await_polling` polls now (each for as
#: long as that waiter polls: no loop is kept).
_polled: set[asyncio.AbstractEventLoop] = set()


async def await_polling(policy: BusyPoll, future: asyncio.Future[_T]) -> _T:
    """Await ``future`` as ``policy`` says, keeping the event loop awake
    while polling pays.

    Polling here is yielding to the loop (``asyncio.sleep(0)``) until
    ``future`` is done: each pass of the loop runs every other ready task
    and callback, then checks the sockets without sleeping, so nothing else
    waits for the poller, and an answer that comes within the window is
    read on the next pass instead of after a wakeup. Each pass yields the
    CPU first (``sched_yield``), as :func:`poll_for` does between attempts,
    so a peer sharing this CPU answers at once. Then, or when the policy
    says sleep at once, it simply awaits ``future``.

    One waiter polls an event loop at a time, whatever its connection; the
    others simply await: the poller's passes read their answers too, and
    each more poller would only add a ``sched_yield`` and a task step to
    every pass (with 8 calls in flight on one connection, about a fifth
    fewer calls a second).
    """
    if not future.done():
        if not policy.seconds:  # off: as in BusyPoll.wait, no clock readings
            return await future
        loop = future.get_loop()
        if loop in _polled:
            return await future
        window = policy.window()
        if not window:
            started = time.perf_counter()
            try:
                return await future
            finally:
                policy.slept(time.perf_counter() - started)
        deadline = time.perf_counter() + window
        _polled.add(loop)
        try:
            while not future.done():
                if time.perf_counter() >= deadline:
                    policy.missed()
                    break
                # The CPU first, as poll_for() yields it: a peer on this CPU
                # (the server, often) answers only when it gets to run.
                os.sched_yield()
                await asyncio.sleep(0)
            else:
                policy.found()
        finally:
            _polled.discard(loop)
    return await future
