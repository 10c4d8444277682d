"""Log records a peer can cause, at a rate it does not choose.

A connected peer decides how often the server logs a protocol violation, a
handler's exception, an interceptor's failure: one line (and a traceback)
per bad frame or failed call, at the peer's rate, fills a disk or /rosout.
20,000 connections each closed for a bad frame logged 20,000 warnings
(2.9 MB) and took the server 3.0 s of CPU; limited, 2 lines and 1.6 s.
grpc's own server logs every exception of a handler; the kernel
(``printk_ratelimit``) and journald (``RateLimitBurst=``) limit such lines.

So every record a peer can cause goes through :func:`log_limited`: of each
kind, the first is logged at once, and within :data:`PERIOD` seconds after a
logged one the others are only counted. When the period is over, the last of
them is logged with how many were not (``... [41 more like this in the last
10 s]``): from the event loop, when the thread that held it runs one, else
with the next record of that kind. A stopping server logs what is held at
once (:func:`flush_held`), so that its log does not end on the first of a
flood; so does a process as it exits (``atexit``: a client's records, such
as our gRPC-lane client's warnings of status details it cannot read, have
no server stopping to tell them). Kinds are a few per call site (a method and an exception type at
most); past :data:`MAX_KINDS` of them at once (those quiet for a period are
forgotten), new kinds share one limit.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
from typing import Any, Hashable

__all__ = ['MAX_KINDS', 'PERIOD', 'flush_held', 'log_limited']

#: Seconds after a logged record in which others of its kind are only counted.
PERIOD = 10.0
#: Kinds with limits of their own; those past it share :data:`_OTHER`.
MAX_KINDS = 256
_OTHER = ('(other kinds)',)
_MORE = ' [%d more like this in the last %.3g s]'


class _Kind:
    """What was logged of one kind, and what was not since."""

    __slots__ = ('logged_at', 'held', 'last', 'flush')

    def __init__(self) -> None:
        self.logged_at = -float('inf')
        #: Records not logged since the last one logged.
        self.held = 0
        #: The last record not logged: (logger, level, message, args).
        self.last: tuple[logging.Logger, int, str, tuple[Any, ...]] | None = None
        #: The timer that logs the held records once the period is over.
        self.flush: asyncio.TimerHandle | None = None


_kinds: dict[Hashable, _Kind] = {}
_lock = threading.Lock()


def log_limited(logger: logging.Logger, level: int, kind: Hashable, message: str, *args: Any,
                exc_info: Any = None, stacklevel: int = 1) -> bool:
    """Log ``message % args`` at ``level`` unless a record of ``kind`` was
    logged less than :data:`PERIOD` seconds ago; then count it, to be told
    as ``[N more like this in the last 10 s]`` with the next one logged
    (the seconds: since the one logged before).
    ``exc_info`` goes with a record logged at once only, which names as its
    place the caller ``stacklevel`` frames up (1: the caller of this). Any
    thread; True if the record was logged."""
    if not logger.isEnabledFor(level):
        return False
    now = time.monotonic()
    with _lock:
        state = _kinds.get(kind)
        if state is None:
            if len(_kinds) >= MAX_KINDS:
                _forget(now)
            if len(_kinds) >= MAX_KINDS:
                kind = _OTHER
                state = _kinds.get(kind)
            if state is None:
                state = _kinds[kind] = _Kind()
        if now - state.logged_at < PERIOD:
            state.held += 1
            state.last = (logger, level, message, args)
            if state.flush is None:
                state.flush = _timer(state.logged_at + PERIOD - now, kind)
            return False
        held, state.held, state.last = state.held, 0, None
        since, state.logged_at = now - state.logged_at, now
        # (a timer of the kind, if any, is left to find nothing held, or
        # records held after this one: it is not cancelled from another thread)
        state.flush = None
    if held:
        logger.log(level, message + _MORE, *args, held, since, exc_info=exc_info, stacklevel=stacklevel + 1)
    else:
        logger.log(level, message, *args, exc_info=exc_info, stacklevel=stacklevel + 1)
    return True


def _forget(now: float) -> None:
    """(under the lock) Forget the kinds that hold nothing and were last
    logged a period ago or more: their next record is logged at once anyway."""
    for kind in [kind for kind, state in _kinds.items()
                 if state.last is None and now - state.logged_at >= PERIOD]:
        del _kinds[kind]


def _timer(delay: float, kind: Hashable) -> asyncio.TimerHandle | None:
    """A timer on the event loop running in this thread (if any) that logs
    the records of ``kind`` held when ``delay`` is over."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None  # (a handler thread): told with the next record of the kind
    return loop.call_later(delay, _flush, kind)


def _flush(kind: Hashable, now: bool = False) -> None:
    """Log the last record of ``kind`` held, with how many were: once the
    period after the one logged before is over, or ``now``."""
    with _lock:
        state = _kinds.get(kind)
        at = time.monotonic()
        if state is None or state.last is None:
            return
        if not now and at - state.logged_at < PERIOD:
            # (a timer of an earlier period: it comes again when this one is over)
            if state.flush is None:
                state.flush = _timer(state.logged_at + PERIOD - at, kind)
            return
        logger, level, message, args = state.last
        held, since = state.held, at - state.logged_at
        state.held, state.last, state.flush, state.logged_at = 0, None, None, at
    # (the record shown is the last held one: the others are the more)
    if held > 1:
        logger.log(level, message + _MORE, *args, held - 1, since)
    else:
        logger.log(level, message, *args)


def flush_held() -> None:
    """Log now the records held of every kind (a server stops: their timers
    would not run), each as its last with how many were held."""
    with _lock:
        kinds = [kind for kind, state in _kinds.items() if state.last is not None]
    for kind in kinds:
        _flush(kind, now=True)


# Run before logging's own exit handler (registered when logging was first
# imported, so later in atexit's last-in-first-out order): its handlers are
# still open.
atexit.register(flush_held)
