"""Keeping freed memory for the next large message: glibc's malloc set as
ROS 2's real-time guide sets it (``M_MMAP_MAX`` 0, a trim threshold), with
one arena for every thread.

Protobuf's Python runtime serializes into, and parses out of, memory of its
own only, so every large message a process sends or receives is a few fresh
blocks of the message's size (README, "Large payloads"). glibc's malloc
serves a block above its mmap threshold (128 KiB, growing to at most
32 MiB) with a new mapping that it unmaps when the block is freed, and gives
freed memory at the top of its heap back to the kernel beyond its trim
threshold. Each of those blocks is then faulted in page by page when it is
written: ~2,600 page faults for 10 MiB, ~25,600 for 100 MiB, which cost
more than copying the bytes. :func:`keep_freed_memory` makes malloc serve
every block from its heap and keep up to ``limit`` bytes of freed memory
there, so that the next message of a size reuses pages that are already
mapped.

That holds for the main thread's heap. glibc gives every other thread that
allocates an arena of its own (up to eight per CPU, then shared), heaps of
at most 64 MiB each, and a block larger than that made in such a thread
gets a new mapping whatever ``M_MMAP_MAX`` says, unmapped when it is freed. So a
100 MiB message parsed or read in a ``def`` handler's thread, or in an rclpy
executor's, would fault in its pages on every call. ``M_ARENA_MAX`` 1 makes
the threads started after :func:`keep_freed_memory` share the main arena
(its lock costs little where most allocations hold the GIL anyway). A
thread that had an arena of its own before keeps it, and later threads may
be given one of those: a process with threads already running (rclpy's,
DDS's) gets the same from its start with ``MALLOC_ARENA_MAX=1`` in its
environment.

It is process-wide and stays in force: the process's resident memory stays
near its peak (at most ``limit`` above what it uses). The ``ipc_server``
node does it for its own process (``keep_freed_memory_mb``); any other
process opts in by calling it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from typing import Any

from ._libc import function

__all__ = ['DEFAULT_KEEP_FREED_MEMORY', 'keep_freed_memory', 'keeps_freed_memory', 'one_malloc_arena']

#: Bytes of freed memory kept by default: a few 100 MiB messages' worth.
DEFAULT_KEEP_FREED_MEMORY = 1 << 30
#: mallopt() takes a C int.
_LIMIT = 2**31 - 1
# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
#: Whether :func:`keep_freed_memory` was applied in this process.
_kept = False


@functools.cache
def _mallopt() -> Any:
    """The C library's ``mallopt`` (looked up once, on the first call; only glibc has it)."""
    return function('mallopt', ctypes.c_int, ctypes.c_int, ctypes.c_int)


def keep_freed_memory(limit: int = DEFAULT_KEEP_FREED_MEMORY) -> bool:
    """Make this process's malloc keep up to ``limit`` bytes of freed memory
    for reuse, and serve large blocks from its heap instead of new mappings,
    for the threads started after it too (see the module docstring).

    Returns ``True`` when applied; ``False`` where the C library is not glibc
    (nothing is changed there). Calling it again sets the new ``limit``.

    :raises TypeError, ValueError: ``limit`` is not a number of bytes from 1
        to 2147483647.
    :raises OSError: glibc refused a setting.
    """
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f'keep_freed_memory limit must be a number of bytes, not {type(limit).__name__}')
    if not 1 <= limit <= _LIMIT:
        raise ValueError(f'keep_freed_memory limit must be from 1 to {_LIMIT} bytes, not {limit}')
    if platform.libc_ver()[0] != 'glibc':
        return False
    mallopt = _mallopt()
    # Trim threshold first: with mappings off and the default threshold,
    # a freed large block would go straight back to the kernel.
    settings = (('M_TRIM_THRESHOLD', _M_TRIM_THRESHOLD, limit), ('M_MMAP_MAX', _M_MMAP_MAX, 0),
                ('M_ARENA_MAX', _M_ARENA_MAX, 1))
    for name, option, value in settings:
        if mallopt(option, value) != 1:
            raise OSError(f'glibc refused mallopt({name}, {value})')
    global _kept
    _kept = True
    return True


def keeps_freed_memory() -> bool:
    """Whether this process's malloc keeps freed memory for large blocks:
    :func:`keep_freed_memory` was applied in it, or its environment set glibc
    so from the start (``MALLOC_MMAP_MAX_=0`` and ``MALLOC_TRIM_THRESHOLD_``
    of 32 MiB or more)."""
    return _kept or _kept_by_environment()


@functools.cache
def _kept_by_environment() -> bool:
    # (glibc read them once, as the process started: so is this.)
    try:
        trim = int(os.environ.get('MALLOC_TRIM_THRESHOLD_', '0'))
    except ValueError:
        return False
    return os.environ.get('MALLOC_MMAP_MAX_') == '0' and trim >= 32 << 20


def one_malloc_arena() -> bool:
    """Make the threads started from now on allocate from glibc's main arena
    (``M_ARENA_MAX`` 1, as :func:`keep_freed_memory` sets it, see the module
    docstring); ``False`` where the C library is not glibc (nothing is
    changed there).

    For a process that applies :func:`keep_freed_memory` only once threads
    run: ``ipc_server`` calls it first thing, before importing rclpy, which
    starts threads.
    """
    if platform.libc_ver()[0] != 'glibc':
        return False
    return bool(_mallopt()(_M_ARENA_MAX, 1) == 1)
