"""Refuse gRPC in a forked child of a process that used it.

gRPC's fork handlers only run when no other thread is inside gRPC at the
moment of ``fork()``; otherwise the child inherits locks held by threads that
do not exist there, and its first call can hang forever (grpc/grpc#22624).
Whether that happens depends on timing, so the only safe rule is
deterministic: after a fork, a process whose parent had used gRPC through
this package gets a clear error instead of a channel or a server.
"""

from __future__ import annotations

import os
from typing import Any
import weakref

from .exceptions import ForkedProcessError

# ForkedProcessError is defined in .exceptions, importable from here too.
__all__ = ['ForkedProcessError', 'ensure_usable_after_fork', 'locks_anew_after_fork', 'note_grpc_used',
           'this_process']

_used = False
_inherited = False


def note_grpc_used() -> None:
    """Record that this process created a gRPC channel or server."""
    global _used
    _used = True


def ensure_usable_after_fork() -> None:
    """:raises ForkedProcessError: in a forked child of a process that used gRPC."""
    if _inherited:
        raise ForkedProcessError(
            f'process {os.getpid()} was forked from a process that had used gRPC: gRPC cannot be '
            'used safely after fork() (its state may hold locks of threads that do not exist here; '
            "grpc/grpc#22624). Start this process with multiprocessing's 'spawn' or 'forkserver' "
            'method, or create IPC clients and servers only in processes that have not forked since '
            'using gRPC.')


class _ThisProcess:
    """This process's id, kept up to date across ``fork()``: reading it is
    an attribute read, where ``os.getpid()`` is a system call (several per
    call of a client that must notice being in a forked child)."""

    __slots__ = ('pid',)

    def __init__(self) -> None:
        self.pid = os.getpid()


#: ``this_process.pid`` is ``os.getpid()``, cheaply.
this_process = _ThisProcess()


#: What a forked child gives new locks (see locks_anew_after_fork()), by id:
#: a handler class may be unhashable (``__eq__`` without ``__hash__``).
_lock_holders: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def locks_anew_after_fork(holder: Any) -> None:
    """Have a forked child call ``holder._locks_anew()``, while no other
    thread runs there yet: a lock that a thread of the parent held at
    ``fork()`` time stays held in the child, where that thread does not
    exist, and the child's first use of it would hang for ever. For the
    locks a child takes when it uses what it inherited (the client
    handlers' and the connection pools'), never the parent's connections."""
    _lock_holders[id(holder)] = holder


def _after_fork_in_child() -> None:
    global _inherited
    _inherited = _inherited or _used
    this_process.pid = os.getpid()
    for holder in list(_lock_holders.values()):
        holder._locks_anew()


os.register_at_fork(after_in_child=_after_fork_in_child)
