"""What a client handler holds of the connection pools, apart from the
handler, so that a handler that becomes garbage without ``disconnect()``
gives it back: :class:`Held`, whose :meth:`Held.dropped` is the handler's
finalizer (``weakref.finalize``).

A frontend that makes a handler per request and forgets ``disconnect()``
would otherwise keep its connection (per server) open for ever after the
last handler is gone, the server counting it as a peer. With the last user
of a pooled connection collected, the connection is closed: for an
:class:`~vyra_base_ipc.IPCHandler` on its event loop (or at once if that
loop no longer runs, or closes before it ran the close), for a :class:`~vyra_base_ipc.SyncIPCHandler` in the
thread that collected it (see :meth:`~vyra_base_ipc._pool.Pool.release_dropped`).
Connections that live handlers share stay open. As asyncio and sockets do,
a connected handler collected so warns: a :class:`ResourceWarning`, which
Python shows only when asked (``-W default``, ``-X dev``).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any
import warnings
import weakref

from ._pool import Pool

__all__ = ['Held']


class Held:
    """A handler's pool keys (``(key, entry)`` as :meth:`Pool.acquire`
    returns them, ``None`` while it holds none) and, for an asyncio handler,
    the event loop they belong to. Only the handler changes them; its
    finalizer reads them once the handler is gone.

    :param handler: the handler (not referenced: only its finalizer is made).
    :param fast_pool: the pool of its fast-lane connections.
    :param grpc_pool: the pool of its gRPC channels.
    """

    __slots__ = ('fast_key', 'grpc_key', 'loop', '_pools', '_what')

    def __init__(self, handler: object, fast_pool: Pool[Any], grpc_pool: Pool[Any], socket_path: str) -> None:
        self.fast_key: Any = None
        self.grpc_key: Any = None
        #: The event loop of an asyncio handler's keys (``None``: a blocking handler's, or none).
        self.loop: asyncio.AbstractEventLoop | None = None
        self._pools = (fast_pool, grpc_pool)
        self._what = f'{type(handler).__name__} of {socket_path!r}'
        # Not at exit: the interpreter closes every socket then, and what
        # closes connections (grpc, event loops) may be half torn down.
        weakref.finalize(handler, self.dropped).atexit = False

    def dropped(self) -> None:
        """The handler was collected: give back the keys it still held
        (their connections are closed if it was their last user), without
        waiting for anything; warn that it was not disconnected."""
        keys = (self.fast_key, self.grpc_key)
        self.fast_key = self.grpc_key = None
        held = False
        for pool, key in zip(self._pools, keys, strict=True):
            if key is not None and key[0][0] == os.getpid():  # (a forked child leaves its parent's alone)
                pool.release_dropped(key[0], key[0][0] if self.loop is None else self.loop)
                held = True
        if held:
            # (stacklevel 1: no caller's line would say more; the collector ran this)
            warnings.warn(f'unclosed {self._what}: it was collected without disconnect()', ResourceWarning,
                          stacklevel=1)
