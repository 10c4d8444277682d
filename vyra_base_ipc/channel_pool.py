"""Shared client connections: one gRPC channel or fast-lane connection per
socket and event loop (aio), one per socket and process (sync).

grpc.aio channels are bound to the event loop they were created in
(grpc/grpc#32480), so the async pool is keyed by the running loop and creates
channels lazily inside it. A forked child of a process that used gRPC gets
:class:`~vyra_base_ipc.fork_safety.ForkedProcessError` instead of a channel
(see :mod:`vyra_base_ipc.fork_safety`); entries are keyed by process id too,
so that a child never closes its parent's channels.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
import os
import threading
import time
from typing import Any, Awaitable, Callable, Generic, Iterator, NamedTuple, TypeVar
import weakref

import grpc

from .busy_poll import DEFAULT_BUSY_POLL
from .exceptions import IPCUnavailableError
from .fork_safety import ensure_usable_after_fork, note_grpc_used
from .payload import SharedMemoryOptions
from .ttrpc import AsyncConnection, SyncConnection

__all__ = [
    'AioChannelPool',
    'AioTtrpcPool',
    'SyncChannelPool',
    'SyncTtrpcPool',
    'aio_pool',
    'aio_ttrpc_pool',
    'sync_pool',
    'sync_ttrpc_pool',
]

_Options = tuple[tuple[str, int], ...]
_ChannelT = TypeVar('_ChannelT')
_T = TypeVar('_T')


@dataclass
class _Entry(Generic[_ChannelT]):
    channel: _ChannelT
    users: int = field(default=0)


class AioChannelPool:
    """grpc.aio channels shared by handlers of the same socket in the same loop.

    Loop-affine: :meth:`acquire` and :meth:`release` run on the loop that owns
    the channel. Channels of a loop that was closed without releasing them are
    dropped with the loop.
    """

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[tuple[int, str, _Options], _Entry[grpc.aio.Channel]]
        ] = weakref.WeakKeyDictionary()

    def acquire(self, target: str, options: _Options) -> grpc.aio.Channel:
        """Return the shared channel for ``target`` in the running loop, counting one more user.

        :raises ForkedProcessError: in a forked child of a process that used gRPC.
        """
        ensure_usable_after_fork()
        entries = self._by_loop.setdefault(asyncio.get_running_loop(), {})
        key = (os.getpid(), target, options)
        entry = entries.get(key)
        if entry is None:
            note_grpc_used()
            entry = entries[key] = _Entry(grpc.aio.insecure_channel(target, options=options))
        entry.users += 1
        return entry.channel

    async def release(self, channel: grpc.aio.Channel) -> None:
        """Count one user less; close the channel when it was the last one."""
        entries = self._by_loop.get(asyncio.get_running_loop(), {})
        for key, entry in list(entries.items()):
            if entry.channel is channel:
                entry.users -= 1
                if entry.users <= 0:
                    del entries[key]
                    await channel.close()
                return

    def open_channels(self) -> int:
        """How many channels the running loop's pool holds (for leak checks)."""
        return len(self._by_loop.get(asyncio.get_running_loop(), {}))


class SyncChannelPool:
    """Blocking grpc channels shared by every thread of a process. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, str, _Options], _Entry[grpc.Channel]] = {}

    def acquire(self, target: str, options: _Options) -> grpc.Channel:
        """Return the shared channel for ``target``, counting one more user.

        :raises ForkedProcessError: in a forked child of a process that used gRPC.
        """
        ensure_usable_after_fork()
        key = (os.getpid(), target, options)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                note_grpc_used()
                entry = self._entries[key] = _Entry(grpc.insecure_channel(target, options=options))
            entry.users += 1
            return entry.channel

    def release(self, channel: grpc.Channel) -> None:
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.channel is channel:
                    entry.users -= 1
                    if entry.users <= 0:
                        del self._entries[key]
                        if key[0] == os.getpid():
                            channel.close()
                    return

    def open_channels(self) -> int:
        with self._lock:
            return sum(1 for key in self._entries if key[0] == os.getpid())


aio_pool = AioChannelPool()
sync_pool = SyncChannelPool()


class AioTtrpcPool:
    """Fast-lane connections shared by handlers of the same socket in the same
    loop, like :class:`AioChannelPool`; a broken connection is replaced on the
    next :meth:`connection`. Loop-affine.

    ttrpc is plain Python on a socket, so unlike gRPC it is safe in a forked
    child: entries are keyed by process id and a child connects anew.
    """

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[_FastKey, _FastEntry[Any]]] = weakref.WeakKeyDictionary()

    def acquire(self, path: str, max_message_bytes: int,
                shared_memory: SharedMemoryOptions | None = None) -> _FastKey:
        """Count one more user of the connection to ``path`` (with these
        options) in the running loop."""
        key = _FastKey(os.getpid(), path, max_message_bytes, shared_memory)
        entries = self._by_loop.setdefault(asyncio.get_running_loop(), {})
        entry = entries.get(key)
        if entry is None:
            entry = entries[key] = _FastEntry(asyncio.Lock())
        entry.users += 1
        return key

    async def connection(self, key: _FastKey, wait_until: float | None = None) -> Any:
        """The open connection for ``key``, connecting (again) if needed.

        :param wait_until: ``time.monotonic()`` until which to keep trying a
            server that is not there; ``None`` to fail at once.
        :raises IPCUnavailableError: nobody serves the socket (in time).
        """
        entry = self._by_loop[asyncio.get_running_loop()][key]
        connection = entry.connection
        if connection is not None and not connection.is_closed:
            return connection
        async with entry.lock:  # one connect for all the handlers waiting
            if entry.connection is None or entry.connection.is_closed:
                if entry.connection is not None:
                    await entry.connection.close()
                entry.connection = await _retrying(
                    lambda: AsyncConnection.connect(key.path, max_message_bytes=key.max_message_bytes,
                                                    shared_memory=key.shared_memory),
                    wait_until,
                    asyncio.sleep)
            return entry.connection

    async def release(self, key: _FastKey) -> None:
        """Count one user less; close the connection when it was the last one."""
        entries = self._by_loop.get(asyncio.get_running_loop(), {})
        entry = entries.get(key)
        if entry is not None:
            entry.users -= 1
            if entry.users <= 0:
                del entries[key]
                if entry.connection is not None:
                    await entry.connection.close()

    def open_connections(self) -> int:
        """How many connections the running loop's pool holds (for leak checks)."""
        return sum(1 for entry in self._by_loop.get(asyncio.get_running_loop(), {}).values()
                   if entry.connection is not None and not entry.connection.is_closed)


class SyncTtrpcPool:
    """Blocking fast-lane connections shared by every thread of a process.

    Thread-safe; a connection multiplexes the calls of all threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[_FastKey, _FastEntry[Any]] = {}

    def acquire(self, path: str, max_message_bytes: int,
                shared_memory: SharedMemoryOptions | None = None,
                busy_poll: float = DEFAULT_BUSY_POLL) -> _FastKey:
        key = _FastKey(os.getpid(), path, max_message_bytes, shared_memory, busy_poll)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _FastEntry(threading.Lock())
            entry.users += 1
        return key

    def connection(self, key: _FastKey, wait_until: float | None = None) -> Any:
        """As :meth:`AioTtrpcPool.connection`, blocking."""
        with self._lock:
            entry = self._entries[key]
        connection = entry.connection
        if connection is not None and not connection.is_closed:
            return connection
        with entry.lock:
            if entry.connection is None or entry.connection.is_closed:
                if entry.connection is not None:
                    entry.connection.close()
                entry.connection = _retrying_sync(
                    lambda: SyncConnection.connect(key.path, max_message_bytes=key.max_message_bytes,
                                                   shared_memory=key.shared_memory,
                                                   busy_poll=key.busy_poll),
                    wait_until)
            return entry.connection

    def release(self, key: _FastKey) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            entry.users -= 1
            if entry.users > 0:
                return
            del self._entries[key]
        if entry.connection is not None and key.pid == os.getpid():
            entry.connection.close()

    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for key, entry in self._entries.items() if key.pid == os.getpid()
                       and entry.connection is not None and not entry.connection.is_closed)


class _FastKey(NamedTuple):
    """What makes fast-lane connections interchangeable."""

    pid: int
    path: str
    max_message_bytes: int
    shared_memory: SharedMemoryOptions | None
    #: Only the synchronous client polls (see vyra_base_ipc.busy_poll).
    busy_poll: float = 0.0

_LockT = TypeVar('_LockT')


@dataclass
class _FastEntry(Generic[_LockT]):
    lock: _LockT
    connection: Any = None
    users: int = 0


# A server that is not there yet is retried quickly at first, then every 0.5 s
# at most: the same cap as the gRPC lane's reconnect backoff.
def _pauses() -> Iterator[float]:
    pause = 0.025
    while True:
        yield pause
        pause = min(pause * 2, 0.5)


async def _retrying(connect: Callable[[], Awaitable[_T]], wait_until: float | None,
                    sleep: Callable[[float], Awaitable[None]]) -> _T:
    pauses = _pauses()
    while True:
        try:
            return await connect()
        except IPCUnavailableError:
            pause = next(pauses)
            if wait_until is None or time.monotonic() + pause >= wait_until:
                raise
        await sleep(pause)


def _retrying_sync(connect: Callable[[], _T], wait_until: float | None) -> _T:
    pauses = _pauses()
    while True:
        try:
            return connect()
        except IPCUnavailableError:
            pause = next(pauses)
            if wait_until is None or time.monotonic() + pause >= wait_until:
                raise
        time.sleep(pause)


aio_ttrpc_pool = AioTtrpcPool()
sync_ttrpc_pool = SyncTtrpcPool()
