"""Large payloads in shared memory: sealed memfds, their checks, and the options.

Two ways in, one mechanism (the fast lane passes the descriptors with its
frames, see :mod:`vyra_base_ipc.ttrpc._shared_memory`):

- **Transparent**: a message whose serialized size is above the threshold
  (default 1 MiB) is written into a new memfd, sealed, and its descriptor
  is passed with the frame (``SCM_RIGHTS``); the frame carries a small
  manifest instead of the bytes. The receiver maps it read-only and parses
  the message straight from the mapping.
- **Explicit**: a :class:`~vyra_base_ipc.SharedBuffer` puts a
  buffer into shared memory once; a ``vyra.ipc.SharedBufferRef`` field in a
  message refers to it and the buffer travels with the message; the receiver
  gets a read-only :class:`memoryview` of the very same pages.

Security model: a memfd has no name; only the processes a descriptor is
passed to can map it, and the kernel frees it when the last descriptor and
mapping are gone (nothing is left in ``/dev/shm`` after a crash). The sender
seals it against writes, shrinking and growing before passing it; the
receiver refuses any descriptor that is not a sealed memfd of exactly the
announced size, so what it mapped cannot change or shrink under it (no
``SIGBUS``, no read beyond its end).
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import mmap
import os
import pickle
import stat
import sys
import threading
from typing import Any, Iterable
import warnings

from ._memory_available import memory_headroom, memory_limit
from .exceptions import SharedMemoryError, TooLargeError

# SharedMemoryError and TooLargeError are defined in .exceptions, importable
# from here too.
__all__ = [
    'DEFAULT_MAX_SHARED_MEMORY_BYTES',
    'DEFAULT_SHARED_MEMORY_THRESHOLD',
    'MAX_BUFFERS_PER_MESSAGE',
    'MAX_FDS_PER_MESSAGE',
    'MFD_FLAGS',
    'Pieces',
    'POOL_SEALS',
    'SharedMemoryError',
    'SharedMemoryOptions',
    'TooLargeError',
    'UNTRACKED',
    'check_sealed',
    'is_allocated',
    'close_fds',
    'copy_payload',
    'map_sealed',
    'read_only',
    'require_memory',
    'seal_bytes',
    'shared_memory_unavailable',
    'usable_options',
    'write_payload',
]

#: Messages larger than this many bytes travel in shared memory (fast lane,
#: both ends vyra_base_ipc).
DEFAULT_SHARED_MEMORY_THRESHOLD = 1 << 20
#: Largest SharedBuffer accepted.
DEFAULT_MAX_SHARED_MEMORY_BYTES = 1 << 30
#: Descriptors one message may carry (its own memfd and its buffers); a
#: receiver reads at most this many at once.
MAX_FDS_PER_MESSAGE = 32
#: SharedBuffers one call may pass.
MAX_BUFFERS_PER_MESSAGE = MAX_FDS_PER_MESSAGE - 1

# Not all of these are in the fcntl module of every Python version.
_F_ADD_SEALS = getattr(fcntl, 'F_ADD_SEALS', 1033)
_F_GET_SEALS = getattr(fcntl, 'F_GET_SEALS', 1034)
_F_SEAL_SEAL = 0x0001
_F_SEAL_SHRINK = 0x0002
_F_SEAL_GROW = 0x0004
_F_SEAL_WRITE = 0x0008
# Linux 5.1: no new writable mapping and no write(); the mappings that exist
# stay writable (a pooled segment's owner keeps writing through its own).
_F_SEAL_FUTURE_WRITE = 0x0010
_SEALS = _F_SEAL_SEAL | _F_SEAL_SHRINK | _F_SEAL_GROW | _F_SEAL_WRITE
#: The seals of a pooled segment (see :mod:`vyra_base_ipc._segment_pool`).
POOL_SEALS = _F_SEAL_SEAL | _F_SEAL_SHRINK | _F_SEAL_GROW | _F_SEAL_FUTURE_WRITE
MFD_FLAGS = getattr(os, 'MFD_CLOEXEC', 1) | getattr(os, 'MFD_ALLOW_SEALING', 2)
# Map every page at once: one system call instead of a page fault per 4 KiB.
_MAP_POPULATE = mmap.MAP_SHARED | getattr(mmap, 'MAP_POPULATE', 0)
#: Keyword arguments of ``mmap.mmap`` for a mapping that keeps no copy of
#: its descriptor (Python 3.13's ``trackfd=False``; before 3.13 every mmap
#: keeps one open, so each live mapping costs its process one descriptor).
#: Such a mapping cannot be resized or asked its file's size.
UNTRACKED: dict[str, bool] = {'trackfd': False} if sys.version_info >= (3, 13) else {}


@dataclasses.dataclass(frozen=True)
class SharedMemoryOptions:
    """How large messages travel on the fast lane between two vyra_base_ipc
    ends. Pass ``shared_memory=None`` to a server or client to keep every
    message inline.

    :param threshold: messages of more than this many serialized bytes go
        through shared memory; smaller ones inline.
    :param max_bytes: largest :class:`SharedBuffer` accepted from the other
        end. (Messages are held to ``max_message_bytes`` however they travel,
        as on the gRPC lane; so is a client's request with its buffers
        counted inline.)
    :raises TypeError, ValueError: not non-negative ints, ``max_bytes`` not
        above ``threshold``.
    """

    threshold: int = DEFAULT_SHARED_MEMORY_THRESHOLD
    max_bytes: int = DEFAULT_MAX_SHARED_MEMORY_BYTES

    def __post_init__(self) -> None:
        for name in ('threshold', 'max_bytes'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f'SharedMemoryOptions.{name} must be an int, not {type(value).__name__}')
            if value < 0:
                raise ValueError(f'SharedMemoryOptions.{name} must be >= 0, not {value}')
        if self.max_bytes <= self.threshold:
            raise ValueError(f'SharedMemoryOptions.max_bytes ({self.max_bytes}) must be larger than '
                             f'the threshold ({self.threshold})')


def usable_options(options: SharedMemoryOptions | None) -> SharedMemoryOptions | None:
    """``options`` if shared memory can be used in this process, else
    ``None`` (with a warning, once per process, saying why).

    :raises TypeError: ``options`` is neither :class:`SharedMemoryOptions` nor ``None``.
    """
    if options is None:
        return None
    if not isinstance(options, SharedMemoryOptions):
        raise TypeError(f'shared_memory must be a SharedMemoryOptions or None, '
                        f'not {type(options).__name__}')
    reason = shared_memory_unavailable()
    if reason is None:
        return options
    if not _warned:
        _warned.append(True)
        warnings.warn(f'large messages travel inline: shared memory is unavailable ({reason})',
                      RuntimeWarning, stacklevel=3)
    return None


_warned: list[bool] = []


_availability: list[str | None] = []
_availability_lock = threading.Lock()


def shared_memory_unavailable() -> str | None:
    """Why shared memory cannot be used in this process, or ``None`` if it
    can (Linux with ``memfd_create`` and file sealing). Checked once."""
    with _availability_lock:
        if not _availability:
            _availability.append(_probe())
        return _availability[0]


def _probe() -> str | None:
    if not hasattr(os, 'memfd_create'):
        return 'os.memfd_create is not available on this platform'
    try:
        fd = os.memfd_create('vyra-ipc-probe', MFD_FLAGS)
    except OSError as error:
        return f'memfd_create failed: {error.strerror}'
    try:
        fcntl.fcntl(fd, _F_ADD_SEALS, _SEALS)
    except OSError as error:
        return f'memfd sealing failed: {error.strerror}'
    finally:
        os.close(fd)
    return None


class Pieces:
    """A serialized message as buffers that follow one another (``len()``
    bytes in all), written where it goes without being joined first (see
    :mod:`vyra_base_ipc.ttrpc._pieces`)."""

    __slots__ = ('parts', 'size')

    def __init__(self, parts: list[bytes], size: int) -> None:
        self.parts = parts
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b''.join(self.parts)

    def write_into(self, view: memoryview) -> None:
        """Write the message at the start of ``view`` (``len()`` bytes or more)."""
        offset = 0
        for part in self.parts:
            end = offset + len(part)
            view[offset:end] = part
            offset = end


def copy_payload(view: memoryview, data: Any) -> None:
    """Write ``data`` (any buffer, or :class:`Pieces`) at the start of ``view``."""
    if isinstance(data, Pieces):
        data.write_into(view)
    else:
        source = memoryview(data).cast('B')
        view[:len(source)] = source


def write_payload(fd: int, data: Any) -> None:
    """Write ``data`` (any buffer, or :class:`Pieces`) whole to ``fd``.

    :raises OSError: as ``os.write()``.
    """
    for part in data.parts if isinstance(data, Pieces) else (data,):
        view = memoryview(part).cast('B')
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])


def seal_bytes(data: Any, name: str = 'vyra-ipc') -> int:
    """Return a new memfd holding a copy of ``data`` (any buffer, or
    :class:`Pieces`), sealed against writes, shrinking and growing. The
    caller owns the descriptor.

    :raises SharedMemoryError: the memfd cannot be created or filled.
    """
    try:
        fd = os.memfd_create(name, MFD_FLAGS)
    except OSError as error:
        raise SharedMemoryError(f'cannot create shared memory: {error.strerror}') from None
    try:
        # write() fills the memfd's pages in the kernel: no mapping (which
        # would block the write seal) and no page faults in this process.
        write_payload(fd, data)
        fcntl.fcntl(fd, _F_ADD_SEALS, _SEALS)
    except OSError as error:
        os.close(fd)
        size = len(data) if isinstance(data, Pieces) else memoryview(data).nbytes
        raise SharedMemoryError(f'cannot fill {size} bytes of shared memory: {error.strerror}') from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_sealed(fd: int, what: str, lent: bool = False) -> os.stat_result:
    """The status (``fstat``) of a received memfd, after checking that it cannot shrink,
    grow or be written: sealed with ``F_SEAL_WRITE``, or for a segment ``lent``
    from the owner's pool, ``F_SEAL_FUTURE_WRITE`` (only the owner's mapping,
    made before the seal, can write; it does not before the segment is
    released).

    :raises SharedMemoryError: not such a memfd.
    """
    try:
        seals = fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError as error:
        raise SharedMemoryError(f'{what}: the descriptor is not a sealable memfd '
                                f'({error.strerror})') from None
    if lent and seals & _F_SEAL_FUTURE_WRITE:
        seals |= _F_SEAL_WRITE
    missing = ~seals & (_F_SEAL_SHRINK | _F_SEAL_GROW | _F_SEAL_WRITE)
    if missing:
        names = [name for bit, name in ((_F_SEAL_SHRINK, 'shrink'), (_F_SEAL_GROW, 'grow'),
                                        (_F_SEAL_WRITE, 'write')) if missing & bit]
        raise SharedMemoryError(f'{what}: the memfd is not sealed against {", ".join(names)}')
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):
        raise SharedMemoryError(f'{what}: the descriptor is not a memfd')
    return status


def is_allocated(status: os.stat_result) -> bool:
    """Whether every page of a memfd with this status has memory behind it.
    Only then may a receiver map it populated: populating a memfd with holes
    would allocate its pages in the receiver, on the receiver's time (a sender
    may ``ftruncate`` a memfd to a gigabyte and write nothing)."""
    return status.st_blocks * 512 >= status.st_size


def require_memory(size: int) -> None:
    """Check that a new segment of ``size`` bytes, every page allocated at
    once, can be had now, as far as the kernel tells.

    Called before a segment is made: where its pages are more than the memory
    this process may still have (the machine's ``MemAvailable`` and
    ``SwapFree``, and what is left under its container's memory limit: see
    :mod:`vyra_base_ipc._memory_available`), allocating them does not fail but
    brings in the OOM killer, which may kill any process of the machine or
    the container's largest. Sizes below a 64th of the most memory this
    process could have are not looked at (a few files are read each time).

    :raises SharedMemoryError: it cannot, naming ``size``, the memory left
        and what limits it.
    """
    if size < memory_limit() >> 6:
        return
    left, what = memory_headroom()
    if size > left:
        raise SharedMemoryError(f'cannot make a shared-memory segment of {size} bytes: only {left} '
                                f'bytes of memory are {what}')


def map_sealed(fd: int, size: int, what: str, populate: bool = True) -> memoryview:
    """Map a received memfd read-only after checking that it is what the
    sender announced: a memfd sealed against writes, shrinking and growing
    (:func:`check_sealed`), exactly ``size`` bytes long. Does not close
    ``fd``; the mapping stays valid after it is closed and is unmapped when
    the view is released.

    :param what: names the buffer in errors, e.g. ``'the request'``.
    :param populate: map every page now (for a message about to be parsed
        whole) if the memfd has no holes (:func:`is_allocated`); otherwise
        pages are mapped as they are first read.
    :raises SharedMemoryError: the descriptor is refused; nothing is mapped.
    """
    status = check_sealed(fd, what)
    actual = status.st_size
    if actual != size:
        raise SharedMemoryError(f'{what}: the memfd holds {actual} bytes, {size} were announced')
    if size == 0:
        return memoryview(b'')
    flags = _MAP_POPULATE if populate and is_allocated(status) else mmap.MAP_SHARED
    try:
        mapping = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ, **UNTRACKED)
    except OSError as error:
        raise SharedMemoryError(f'{what}: cannot map {size} bytes: {error.strerror}') from None
    return memoryview(mapping).toreadonly()


def read_only(view: memoryview) -> memoryview:
    """``view`` read-only, and so is its ``.obj``: a read-only view, not the
    object that maps the memory. That object (a ctypes array over a pooled
    segment or a lend) exports a writable buffer: ``numpy.frombuffer(view.obj)``
    would be a writable array over memory already sent, or over a read-only
    mapping, where a write kills the process."""
    # A PickleBuffer passes on the buffer of the view it wraps, whose obj is
    # that view; the PickleBuffer itself is not kept.
    inner = view.toreadonly()
    public = memoryview(pickle.PickleBuffer(inner))
    if _retrack is not None:
        # Before Python 3.13 the garbage collector, clearing a memoryview that
        # holds an export (inner: the buffer of public's), drops its buffer
        # anyway, and freeing it afterwards dereferences NULL: the process
        # dies once a reference cycle (a traceback, a task) that holds public
        # is collected with inner cleared first. The collector clears in the
        # order objects were tracked: tracked again, inner comes after the
        # buffer that holds its export, which lets go of it first.
        _untrack(inner)
        _retrack(inner)
    return public


_untrack: Any = None
_retrack: Any = None
if sys.version_info < (3, 13):  # (3.13 clears a memoryview only once nothing holds an export of it)
    _untrack, _retrack = ctypes.pythonapi.PyObject_GC_UnTrack, ctypes.pythonapi.PyObject_GC_Track
    for _function in (_untrack, _retrack):
        _function.argtypes, _function.restype = [ctypes.py_object], None


def close_fds(fds: Iterable[int]) -> None:
    """Close descriptors, ignoring those already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
