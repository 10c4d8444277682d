"""Client connections shared per owner: one gRPC channel or fast-lane
connection per target and event loop (asyncio) or per target and process
(blocking), counted by their users and closed by the last one.

grpc.aio channels are bound to the event loop they were created in
(grpc/grpc#32480), and the fast lane's asyncio connections are too, so the
asyncio pools are keyed by the running loop. A loop that closed (the end of
``asyncio.run()``) can close nothing any more: its entries are discarded
when the next loop comes. Keys include the process id, so that a forked
child never uses or closes its parent's connections (see
:mod:`vyra_base_ipc._fork_safety`).

A handler that the garbage collector finds without ``disconnect()`` lets go
through :meth:`Pool.release_dropped` (see :mod:`vyra_base_ipc._lifetime`):
from a finalizer, which may run in any thread at any moment, also in one
holding the pool's lock, so it never waits for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import operator
import os
import threading
from typing import Any, Callable, Generic, Hashable, Iterator, TypeVar

import grpc

from ._fork_safety import locks_anew_after_fork
from ._pinned_channel import PinnedChannel
from .exceptions import IPCUnavailableError

__all__ = ['Disconnected', 'Entry', 'Pool', 'aio_pool', 'aio_ttrpc_pool', 'release_aio', 'release_elsewhere',
           'sync_pool', 'sync_ttrpc_pool']

_T = TypeVar('_T')

_logger = logging.getLogger(__name__)


class Disconnected(IPCUnavailableError):
    """A call that was connecting when its handler disconnected: the
    connection it made is closed at once, not left to nobody. Not tried again."""


@dataclasses.dataclass
class Entry(Generic[_T]):
    """One shared connection. ``lock`` (of the owner's kind) serializes
    (re)connecting; ``connection`` is ``None`` until the first connect;
    ``released`` once its last user let go (the pool forgot it)."""

    lock: Any
    connection: _T | None = None
    users: int = 0
    released: bool = False


class Pool(Generic[_T]):
    """Reference-counted connections, per owner (an event loop or a process).

    Thread-safe. Whoever acquires an entry opens its connection (and opens
    it again when it broke) under the entry's lock; :meth:`release` hands
    the connection back to close when its last user let go.

    :param owner: the current owner: ``asyncio.get_running_loop`` or ``os.getpid``.
    :param make_lock: the lock of an entry (``asyncio.Lock`` or ``threading.Lock``).
    :param discard: closes a connection of a loop that closed, without it
        (``None``: left to the garbage collector).
    :param close_unused: closes a connection whose last user was collected
        (:meth:`release_dropped`), given its owner; from any thread, without waiting.
    """

    def __init__(self, owner: Callable[[], Hashable], make_lock: Callable[[], Any],
                 discard: Callable[[_T], None] | None = None, *,
                 close_unused: Callable[[_T, Any], None]) -> None:
        self._owner = owner
        self._make_lock = make_lock
        self._discard = discard
        self._close_unused = close_unused
        self._lock = threading.Lock()
        locks_anew_after_fork(self)
        # What release_dropped() could not release at once (the lock was
        # held): (key, owner), released by whoever lets go of the lock next.
        self._dropped: collections.deque[tuple[tuple[int, Hashable], object]] = collections.deque()
        self._entries: dict[Hashable, dict[tuple[int, Hashable], Entry[_T]]] = {}
        # The event loops entries are filed under (by id: a loop is not
        # hashable by value), held until their entries go.
        self._loops: dict[Hashable, asyncio.AbstractEventLoop] = {}

    def _locks_anew(self) -> None:
        """(in a forked child) A thread of the parent may have held the lock."""
        self._lock = threading.Lock()

    @staticmethod
    def _filed(owner: object) -> Hashable:
        """What ``owner``'s entries are filed under."""
        return owner if isinstance(owner, int) else ('loop', id(owner))

    def acquire(self, key: Hashable) -> tuple[tuple[int, Hashable], Entry[_T]]:
        """Count one more user of the connection for ``key`` of the current
        owner; return the key to release it with, and its entry."""
        owner = self._owner()
        filed = self._filed(owner)
        mine = (os.getpid(), key)
        with self._locked():
            entries = self._entries.get(filed)
            if entries is None:
                entries = self._entries[filed] = {}
                if isinstance(owner, asyncio.AbstractEventLoop):
                    self._discard_closed_loops()
                    self._loops[filed] = owner
            entry = entries.get(mine)
            if entry is None:
                entry = entries[mine] = Entry(self._make_lock())
            entry.users += 1
        return mine, entry

    def made_once(self, entry: Entry[_T], make: Callable[[], _T], target: str) -> _T:
        """The entry's connection, made by ``make`` if it has none yet (for
        gRPC channels, which are made without waiting and heal themselves).

        :raises Disconnected: the entry was released (its handler disconnected).
        """
        with self._locked():
            if entry.released:
                raise _disconnected(target)
            if entry.connection is None:
                entry.connection = make()
            return entry.connection

    def kept(self, entry: Entry[_T], connection: _T) -> _T:
        """``connection``, made for ``entry``, now its connection; unless the
        entry was released meanwhile (its handler disconnected while the
        call connected): the connection is then closed (``discard``) at once.

        :raises Disconnected: the entry was released.
        """
        with self._locked():
            if not entry.released:
                entry.connection = connection
                return connection
        if self._discard is not None:
            self._discard(connection)
        raise _disconnected(getattr(connection, 'socket_path', ''))

    def release(self, key: tuple[int, Hashable], owner: object = None) -> _T | None:
        """Count one user less (of ``owner``, by default the current one);
        return the connection to close if that was the last user (never one
        of a parent process)."""
        if key[0] != os.getpid():
            return None  # a parent's: not even dropped here (freeing grpc's objects can hang a child)
        owner = self._owner() if owner is None else owner
        with self._locked():
            return self._released(key, owner)

    def release_dropped(self, key: tuple[int, Hashable], owner: object) -> None:
        """As :meth:`release`, for a handler the garbage collector found
        without ``disconnect()``: from its finalizer, in any thread, at any
        moment, never waiting. If the pool's lock is held (maybe by the very
        thread the collector interrupted) whoever holds it releases the key
        as it lets go. A connection that so lost its last user is closed by
        ``close_unused``, without waiting for anything either."""
        if key[0] == os.getpid():  # (a parent's: as release())
            self._dropped.append((key, owner))
            self._release_dropped()

    def _released(self, key: tuple[int, Hashable], owner: object) -> _T | None:
        """(lock held) :meth:`release`'s work."""
        filed = self._filed(owner)
        entries = self._entries.get(filed, {})
        entry = entries.get(key)
        if entry is None:
            return None
        entry.users -= 1
        if entry.users > 0:
            return None
        entry.released = True
        del entries[key]
        if not entries:
            self._entries.pop(filed, None)
            self._loops.pop(filed, None)
        return entry.connection

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The pool's lock, held for the block; then the releases of dropped
        handlers that found it held are done (their finalizers did not wait)."""
        try:
            with self._lock:
                yield
        finally:
            if self._dropped:
                self._release_dropped()

    def _release_dropped(self) -> None:
        """Release the keys of dropped handlers if the lock is free; close
        the connections that lost their last user (outside the lock). The
        lock is let go before the queue is looked at again: a key queued
        while it was held is released here, or by whoever took it since."""
        while self._dropped and self._lock.acquire(blocking=False):
            unused = []
            try:
                while self._dropped:
                    key, owner = self._dropped.popleft()
                    if key[0] != os.getpid():
                        continue  # (queued by the parent before a fork: as release())
                    connection = self._released(key, owner)
                    if connection is not None:
                        unused.append((connection, owner))
            finally:
                self._lock.release()
            for connection, owner in unused:
                try:
                    self._close_unused(connection, owner)
                except Exception:  # (a finalizer's work: nobody to tell but the log)
                    _logger.debug('closing the connection of a collected handler failed', exc_info=True)

    def _discard_closed_loops(self) -> None:
        """(lock held) Forget the entries of event loops that closed, closing
        their connections without them (asyncio.run() closes its loop for good)."""
        for filed, loop in list(self._loops.items()):
            if loop.is_closed():
                del self._loops[filed]
                for (pid, _), entry in self._entries.pop(filed, {}).items():
                    entry.released = True
                    if entry.connection is not None and self._discard is not None and pid == os.getpid():
                        self._discard(entry.connection)

    def open_connections(self) -> int:
        """How many connections the current owner holds open (for leak checks)."""
        mine = os.getpid()
        with self._locked():
            entries = self._entries.get(self._filed(self._owner()), {})
            return sum(1 for (pid, _), entry in entries.items() if pid == mine
                       and entry.connection is not None and not getattr(entry.connection, 'is_closed', False))


def _disconnected(target: str) -> Disconnected:
    return Disconnected(grpc.StatusCode.UNAVAILABLE, f'connection to {target!r} was closed: its handler '
                        'disconnected while the call connected')


def _close_now(connection: Any, owner: object) -> None:
    """``close_unused`` of the blocking pools: in the thread at hand."""
    connection.close()


def _close_on(connection: Any, loop: asyncio.AbstractEventLoop) -> None:
    """Close ``connection`` of ``loop``, which nobody uses any more, from
    any thread, without waiting (``close_unused`` of the asyncio pools): by
    ``loop`` if it runs (in whichever thread), else at once (a fast-lane
    socket; a gRPC channel is left to the garbage collector: closing it
    needs its loop). A close queued on a loop that closes before it runs it
    is done as the loop lets go of it (see :class:`_QueuedClose`)."""
    if loop.is_running():
        queued = _QueuedClose(connection)
        try:
            loop.call_soon_threadsafe(queued)
            return
        except RuntimeError:  # it closed meanwhile
            queued.connection = None
    _close_stopped(connection)


def _close_stopped(connection: Any) -> None:
    """Close an asyncio connection nobody uses, whose loop does not run
    (also once it closed): a fast-lane connection at once; a grpc.aio channel
    is left to the garbage collector (closing it needs its loop)."""
    if not isinstance(connection, PinnedChannel):
        connection.abort()


class _QueuedClose:
    """The close of ``connection`` queued on its loop by :func:`_close_on`.
    A loop that closes first drops it unrun (``close()`` clears what is
    queued), and a loop left stopped does so once collected: the connection
    is then closed as it lets go (:func:`_close_stopped`), not when the
    garbage collector finds the connection, whose socket stayed open till then."""

    __slots__ = ('connection',)

    def __init__(self, connection: Any) -> None:
        self.connection: Any = connection

    def __call__(self) -> None:
        connection, self.connection = self.connection, None
        _close_here(connection)

    def __del__(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            try:
                _close_stopped(connection)
            except Exception:  # (a finalizer's work: nobody to tell but the log)
                _logger.debug('closing the connection of a collected handler failed', exc_info=True)


def _close_here(connection: Any) -> None:
    """(a callback of the connection's loop) Close an asyncio connection
    nobody uses: a fast-lane connection at once; a grpc.aio channel as far as
    its ``close()`` goes without waiting, which is to its end when no call is
    in flight (none is: its last user is gone). Not in a task: a loop that
    stops for good right after (the end of ``run_until_complete()``, then
    ``close()``) would destroy the task pending, and asyncio log it."""
    if not isinstance(connection, PinnedChannel):
        connection.abort()
        return
    closing = connection.aclose()
    try:
        closing.send(None)
    except StopIteration:
        return
    closing.close()  # (it waits for something: the channel is left to the garbage collector)


#: grpc.aio channels, per event loop.
aio_pool: Pool[PinnedChannel] = Pool(asyncio.get_running_loop, asyncio.Lock, close_unused=_close_on)
#: Blocking grpc channels, per process.
sync_pool: Pool[PinnedChannel] = Pool(os.getpid, threading.Lock, close_unused=_close_now)
#: Fast-lane AsyncConnections, per event loop.
aio_ttrpc_pool: Pool[Any] = Pool(asyncio.get_running_loop, asyncio.Lock, operator.methodcaller('abort'),
                                 close_unused=_close_on)
#: Fast-lane SyncConnections, per process.
sync_ttrpc_pool: Pool[Any] = Pool(os.getpid, threading.Lock, operator.methodcaller('close'),
                                  close_unused=_close_now)


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
            await channel.aclose()


def release_elsewhere(fast_key: Any, grpc_key: Any, loop: asyncio.AbstractEventLoop) -> None:
    """Let go of an asyncio handler's keys on ``loop``, which is not the
    running one, without waiting for it: the connections it was the last
    user of are closed as :func:`_close_on` says."""
    for pool, key in ((aio_ttrpc_pool, fast_key), (aio_pool, grpc_key)):
        connection = pool.release(key[0], loop) if key is not None else None
        if connection is not None:
            _close_on(connection, loop)
