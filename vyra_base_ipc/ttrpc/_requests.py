"""The request iterators of client-streaming calls on the fast-lane server:
fed by the event loop as DATA frames arrive, read by the handler, granting
the client more as the handler reads (flow control, when agreed)."""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from typing import Any, Callable, Iterator

from .._handler_threads import CallEnded
from ._flow import ReceiveWindow

__all__ = ['AFTER_END', 'AsyncRequests', 'Requests', 'SyncRequests']

#: Why a call ends INVALID_ARGUMENT when a message of its request stream comes
#: after the client ended that stream (REMOTE_CLOSED, or a request without
#: REMOTE_OPEN). A repeated bare close is harmless and ignored.
AFTER_END = 'data frame after the end of its request stream'


class Requests:
    """The request iterator of a client-streaming call: fed by the event
    loop, read by the handler; grants the client more as the handler reads
    (flow control, when agreed)."""

    __slots__ = ('_deserialize', 'window', '_grant', 'pending_bytes', 'shared_fed', 'shared_taken', 'ended')

    def __init__(self, deserialize: Callable[[bytes | memoryview], Any], window: ReceiveWindow | None,
                 grant: Callable[[int], None]) -> None:
        self._deserialize = deserialize
        #: The window granted to the client (flow control), if agreed.
        self.window = window
        self._grant = grant
        self.pending_bytes = 0
        # Messages in shared memory fed (by the loop) and taken (by the
        # handler): each holds a mapping while it waits (see shared_pending()).
        self.shared_fed = 0
        self.shared_taken = 0
        #: Set by :meth:`close`: the client ended the stream (nothing may be fed after).
        self.ended = False

    def shared_pending(self) -> int:
        """Messages in shared memory the handler has not taken yet."""
        return self.shared_fed - self.shared_taken

    def _item(self, payload: bytes | memoryview, shared: bool) -> Any:
        # (The loop's side of feed(): what to queue.)
        self.pending_bytes += len(payload)
        if not shared:
            return payload
        self.shared_fed += 1
        return _Shared(payload)

    def overrun(self, size: int, backlog: int) -> str | None:
        """After :meth:`feed` of a message of ``size`` bytes: why the client
        sent more than the handler may be left to read, else ``None``. Under
        flow control that is the window and one message (a client that
        waits for credit never sends more); without, ``backlog`` bytes."""
        window = self.window
        if window is not None:
            if window.received(size):
                return (f'{window.unconsumed()} bytes of streamed requests not read by the handler: more '
                        f'than the window and one message the client may send ({window.limit})')
        elif self.pending_bytes > backlog:
            return (f'{self.pending_bytes} bytes of streamed requests not read by the handler '
                    f'(limit {backlog})')
        return None

    def _taken(self, item: Any) -> Any:
        if item.__class__ is _Shared:
            self.shared_taken += 1
            item = item.view
        payload: bytes | memoryview = item
        if self.window is not None:
            increment = self.window.taken(len(payload))
            if increment:
                self._grant(increment)
        return self._deserialize(payload)


class _Shared:
    """A queued message in shared memory (counted by Requests.shared_pending())."""

    __slots__ = ('view',)

    def __init__(self, view: bytes | memoryview) -> None:
        self.view = view

    def __len__(self) -> int:
        return len(self.view)


class AsyncRequests(Requests):
    """For an ``async def`` handler (on the event loop)."""

    __slots__ = ('_loop', '_items', '_closed', '_waiter')

    def __init__(self, loop: asyncio.AbstractEventLoop, *args: Any) -> None:
        super().__init__(*args)
        self._loop = loop
        self._items: collections.deque[Any] = collections.deque()
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None

    def feed(self, payload: bytes | memoryview, shared: bool = False) -> None:
        """Queue a message (``shared``: it is a view of shared memory)."""
        self._items.append(self._item(payload, shared))
        self._wake()

    def close(self) -> None:
        """The client sent its last message: the handler reads what is queued, then stops."""
        self.ended = True
        self._closed = True
        self._wake()

    def cancel(self) -> None:
        """The call ended: drop what the handler did not read (it may hold
        shared memory), and stop."""
        self._items.clear()
        self.pending_bytes = 0
        self.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> 'AsyncRequests':
        return self

    async def __anext__(self) -> Any:
        while not self._items:
            if self._closed:
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        payload = self._items.popleft()
        self.pending_bytes -= len(payload)
        return self._taken(payload)


_END = object()
#: What a def handler reads once its call ended: CallEnded, not the end of the stream.
_ENDED = object()


class SyncRequests(Requests):
    """For a ``def`` handler (read in its worker thread)."""

    __slots__ = ('_queue', '_lock')

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()

    def feed(self, payload: bytes | memoryview, shared: bool = False) -> None:
        """Queue a message (``shared``: it is a view of shared memory)."""
        with self._lock:
            item = self._item(payload, shared)
        self._queue.put(item)

    def close(self) -> None:
        """The client sent its last message: the handler reads what is queued, then stops."""
        self.ended = True
        self._queue.put(_END)

    def cancel(self) -> None:
        """The call ended: drop what the handler did not read (it may hold
        shared memory); its next read raises
        :class:`~vyra_base_ipc._handler_threads.CallEnded`, as on the gRPC
        lane. Not the end of the stream: a client that left mid-stream did
        not send all it meant to (a handler that commits at the end would
        commit part of an upload)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _END and item is not _ENDED:
                with self._lock:
                    self.pending_bytes -= len(item)
        self._queue.put(_ENDED)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is _END or item is _ENDED:
            self._queue.put(item)  # later next() calls end too
            if item is _ENDED:
                raise CallEnded()
            raise StopIteration
        with self._lock:
            self.pending_bytes -= len(item)
        return self._taken(item)
