"""Deadlines of many short calls with one event-loop timer.

An asyncio timer per call (``call_later`` and ``cancel``) costs a handle, two
heap operations in the loop and a clean-up pass: a noticeable share of a
fast-lane call. Here adding a deadline is one push on a private heap, and a
call that finishes in time costs nothing: its entry is dropped lazily, when
the single timer fires or when the heap is compacted.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Any, Callable, Generic, TypeVar

__all__ = ['DeadlineQueue']

_T = TypeVar('_T')

#: Below this many entries the heap is never compacted.
_MIN_COMPACT = 1024


class DeadlineQueue(Generic[_T]):
    """Calls ``on_expire(item, extra)`` at each item's deadline unless
    ``is_done(item)`` by then. Event-loop thread only.

    :param loop: the loop whose clock (:meth:`~asyncio.AbstractEventLoop.time`)
        the deadlines use.
    """

    __slots__ = ('_loop', '_is_done', '_on_expire', '_heap', '_counter', '_timer', '_timer_at',
                 '_compact_at')

    def __init__(self, loop: asyncio.AbstractEventLoop, is_done: Callable[[_T], bool],
                 on_expire: Callable[[_T, Any], None]) -> None:
        self._loop = loop
        self._is_done = is_done
        self._on_expire = on_expire
        self._heap: list[tuple[float, int, _T, Any]] = []
        self._counter = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._compact_at = _MIN_COMPACT

    def add(self, deadline: float, item: _T, extra: Any = None) -> None:
        """Expire ``item`` at ``deadline`` (a ``loop.time()`` value)."""
        heap = self._heap
        heapq.heappush(heap, (deadline, next(self._counter), item, extra))
        if self._timer is None or deadline < self._timer_at:
            self._schedule(deadline)
        if len(heap) >= self._compact_at:
            self._compact()

    def close(self) -> None:
        """Forget every deadline and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()

    def _schedule(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._fire)
        self._timer_at = when

    def _fire(self) -> None:
        self._timer = None
        heap = self._heap
        now = self._loop.time()
        while heap and heap[0][0] <= now:
            _, _, item, extra = heapq.heappop(heap)
            if not self._is_done(item):
                self._on_expire(item, extra)
        while heap and self._is_done(heap[0][2]):
            heapq.heappop(heap)
        if heap and self._timer is None:
            self._schedule(heap[0][0])

    def _compact(self) -> None:
        is_done = self._is_done
        self._heap = [entry for entry in self._heap if not is_done(entry[2])]
        heapq.heapify(self._heap)
        self._compact_at = max(_MIN_COMPACT, 2 * len(self._heap))
