"""The sockets each event loop of this process serves (an
:class:`~vyra_base_ipc.IPCServer` from start to stop), so that a blocking
client called on the loop of the very server it calls fails at once.

Such a call (a :class:`~vyra_base_ipc.SyncIPCHandler` in an ``async def``
handler, to its own module) waits for that loop, which waits for the call:
nothing answers until the call's deadline, and then its error says only
that. A blocking call on a loop that serves something else still works; it
holds the loop for its whole length, which the README warns of.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
import threading
import weakref

__all__ = ['not_serving', 'refuse_own_loop', 'serving']

_lock = threading.Lock()
#: The (resolved) socket paths each loop serves, each with its real path (symbolic links followed), held
#: weakly: a loop that is gone serves nothing.
_served: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Path, str]] = weakref.WeakKeyDictionary()


def serving(loop: asyncio.AbstractEventLoop, path: Path) -> None:
    """``loop`` serves the socket ``path`` from now on."""
    real = os.path.realpath(path)
    with _lock:
        _served.setdefault(loop, {})[path] = real


def not_serving(loop: asyncio.AbstractEventLoop, path: Path) -> None:
    """``loop`` no longer serves ``path``."""
    with _lock:
        paths = _served.get(loop)
        if paths is not None:
            paths.pop(path, None)
            if not paths:
                del _served[loop]


def refuse_own_loop(path: Path, client: str) -> None:
    """Raise if this thread runs the event loop that serves ``path``.

    :raises RuntimeError: it does: the blocking ``client``'s call could
        never be answered (saying so, and what to use instead).
    """
    loop = asyncio._get_running_loop()  # (None, at C speed, on every thread without a loop)
    if loop is None:
        return
    with _lock:
        paths = dict(_served.get(loop, {}))
    # (The real path only on a loop that serves another: a client may name the socket through a symlink.)
    if path in paths or paths and os.path.realpath(path) in paths.values():
        raise RuntimeError(f'{client} called on the event loop of the IPC server it calls ({path}): the '
                           'call would wait for that loop, which waits for the call, until its deadline. '
                           'In an async def handler, await an IPCHandler call instead')
