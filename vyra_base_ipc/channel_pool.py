"""Shared client channels: one per socket and event loop (aio), one per socket
and process (sync).

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
from typing import Generic, TypeVar
import weakref

import grpc

from .fork_safety import ensure_usable_after_fork, note_grpc_used

__all__ = ['AioChannelPool', 'SyncChannelPool', 'aio_pool', 'sync_pool']

_Options = tuple[tuple[str, int], ...]
_ChannelT = TypeVar('_ChannelT')


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
