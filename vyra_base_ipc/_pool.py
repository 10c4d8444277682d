"""Client connections shared per owner: one gRPC channel or fast-lane
connection per target and event loop (asyncio) or per target and process
(blocking), counted by their users and closed by the last one.

grpc.aio channels are bound to the event loop they were created in
(grpc/grpc#32480), and the fast lane's asyncio connections are too, so the
asyncio pools are keyed by the running loop; a loop's entries go with the
loop. Keys include the process id, so that a forked child never uses or
closes its parent's connections (see :mod:`vyra_base_ipc._fork_safety`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from typing import Any, Callable, Generic, Hashable, TypeVar
import weakref

__all__ = ['Entry', 'Pool', 'aio_pool', 'aio_ttrpc_pool', 'release_aio', 'sync_pool', 'sync_ttrpc_pool']

_T = TypeVar('_T')


@dataclasses.dataclass
class Entry(Generic[_T]):
    """One shared connection. ``lock`` (of the owner's kind) serializes
    (re)connecting; ``connection`` is ``None`` until the first connect."""

    lock: Any
    connection: _T | None = None
    users: int = 0


class Pool(Generic[_T]):
    """Reference-counted connections, per owner (an event loop or a process).

    Thread-safe. Whoever acquires an entry opens its connection (and opens
    it again when it broke) under the entry's lock; :meth:`release` hands
    the connection back to close when its last user let go.

    :param owner: the current owner: ``asyncio.get_running_loop`` or ``os.getpid``.
    :param make_lock: the lock of an entry (``asyncio.Lock`` or ``threading.Lock``).
    """

    def __init__(self, owner: Callable[[], Hashable], make_lock: Callable[[], Any]) -> None:
        self._owner = owner
        self._make_lock = make_lock
        self._lock = threading.Lock()
        self._entries: dict[Hashable, dict[tuple[int, Hashable], Entry[_T]]] = {}

    def _current(self) -> tuple[object, Hashable]:
        """The current owner and what its entries are filed under."""
        owner = self._owner()
        return owner, (owner if isinstance(owner, int) else ('loop', id(owner)))

    def acquire(self, key: Hashable) -> tuple[tuple[int, Hashable], Entry[_T]]:
        """Count one more user of the connection for ``key`` of the current
        owner; return the key to release it with, and its entry."""
        owner, filed = self._current()
        mine = (os.getpid(), key)
        with self._lock:
            entries = self._entries.get(filed)
            if entries is None:
                entries = self._entries[filed] = {}
                if not isinstance(owner, int):  # an event loop: its entries go with it
                    weakref.finalize(owner, self._entries.pop, filed, None)
            entry = entries.get(mine)
            if entry is None:
                entry = entries[mine] = Entry(self._make_lock())
            entry.users += 1
        return mine, entry

    def made_once(self, entry: Entry[_T], make: Callable[[], _T]) -> _T:
        """The entry's connection, made by ``make`` if it has none yet (for
        gRPC channels, which are made without waiting and heal themselves)."""
        with self._lock:
            if entry.connection is None:
                entry.connection = make()
            return entry.connection

    def release(self, key: tuple[int, Hashable]) -> _T | None:
        """Count one user less (of the current owner); return the connection
        to close if that was the last user (never one of a parent process)."""
        with self._lock:
            entries = self._entries.get(self._current()[1], {})
            entry = entries.get(key)
            if entry is None:
                return None
            entry.users -= 1
            if entry.users > 0:
                return None
            del entries[key]
        return entry.connection if key[0] == os.getpid() else None

    def open_connections(self) -> int:
        """How many connections the current owner holds open (for leak checks)."""
        mine = os.getpid()
        with self._lock:
            entries = self._entries.get(self._current()[1], {})
            return sum(1 for (pid, _), entry in entries.items() if pid == mine
                       and entry.connection is not None and not getattr(entry.connection, 'is_closed', False))


#: grpc.aio channels, per event loop.
aio_pool: Pool[Any] = Pool(asyncio.get_running_loop, asyncio.Lock)
#: Blocking grpc channels, per process.
sync_pool: Pool[Any] = Pool(os.getpid, threading.Lock)
#: Fast-lane AsyncConnections, per event loop.
aio_ttrpc_pool: Pool[Any] = Pool(asyncio.get_running_loop, asyncio.Lock)
#: Fast-lane SyncConnections, per process.
sync_ttrpc_pool: Pool[Any] = Pool(os.getpid, threading.Lock)


async def release_aio(fast_key: Any, grpc_key: Any) -> None:
    """Let go of an asyncio handler's keys (either may be ``None``) on the
    running loop; close the connections it was the last user of."""
    if fast_key is not None:
        connection = aio_ttrpc_pool.release(fast_key[0])
        if connection is not None:
            await connection.close()
    if grpc_key is not None:
        channel = aio_pool.release(grpc_key[0])
        if channel is not None:
            await channel.close()
