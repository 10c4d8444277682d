"""The owner's side of pooled shared memory: segments mapped once, reused.

A new memfd per message costs a page fault per 4 KiB written into it (most
of a large round trip on a small VM). A :class:`Segment` is a memfd of a
size class, mapped read-write once by its owner, every page faulted in at
creation (``MAP_POPULATE``), then sealed against shrinking, growing and any
*future* write (``F_SEAL_FUTURE_WRITE``): the owner's own mapping, made
before the seal, stays writable; nobody the descriptor is passed to can map
it writable, write() to it, or make it smaller. The owner writes a message
or a :class:`~vyra_base_ipc.SharedBuffer` into it and lends it to the
receivers (:mod:`vyra_base_ipc.ttrpc._segment_link`); once every user let go, it
goes back to the process's :class:`SegmentPool`, and is written again.

The pool is one per process (a buffer can go to any connection), bounded in
total bytes: when it is exhausted (receivers that do not give segments
back), :meth:`SegmentPool.acquire` returns ``None`` and the caller falls back
to a new sealed memfd, as without the pool; it never waits and never grows
beyond its bound. Free segments unused for :attr:`SegmentPool.idle_seconds`
are dropped whenever the pool is used, and by a timer while it is not (one
short-lived thread at a time, only while free segments wait), so a process
that stopped sending large messages gives their memory back; the oldest
beyond :attr:`SegmentPool.max_free_bytes` go at once.
Nothing is named or left in ``/dev/shm``: segments die with the processes
holding them. After ``fork()`` the child starts with an empty pool, closes
the parent's free segments, and refuses the buffers it inherited.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import sys
import threading
import time
from typing import Any, Callable
import weakref

from ._payload import (
    MFD_FLAGS,
    POOL_SEALS,
    UNTRACKED,
    SharedMemoryError,
    copy_payload,
    read_only,
    require_memory,
    write_payload,
)
from .exceptions import ForkedProcessError

__all__ = ['DEFAULT_FREE_BYTES', 'DEFAULT_IDLE_SECONDS', 'DEFAULT_MAX_SEGMENTS', 'DEFAULT_POOL_BYTES',
           'MIN_SEGMENT_BYTES', 'Segment', 'SegmentPool', 'own_segment', 'pool_unavailable', 'segment_pool',
           'segments_lock', 'size_class', 'start_timer']

#: The pool's bound on the bytes of all its segments, free and in use.
DEFAULT_POOL_BYTES = 1 << 30
#: Free segments unused for this long are dropped.
DEFAULT_IDLE_SECONDS = 10.0
#: Bytes of free segments kept at most (the oldest go first).
DEFAULT_FREE_BYTES = 256 << 20
#: The pool's bound on the number of its segments, free and in use.
DEFAULT_MAX_SEGMENTS = 1024
#: The smallest segment.
MIN_SEGMENT_BYTES = 64 << 10
#: How late the idle timer may fire after the first free segment expires:
#: segments that expire within it go in the same pass.
_TRIM_SLACK = 0.5

_F_ADD_SEALS = getattr(fcntl, 'F_ADD_SEALS', 1033)
_POPULATE = mmap.MAP_SHARED | getattr(mmap, 'MAP_POPULATE', 0)


def size_class(size: int) -> int:
    """The capacity of the segment that holds ``size`` bytes: at least
    :data:`MIN_SEGMENT_BYTES`, else the next of four steps between two powers
    of two (at most a quarter more than ``size``)."""
    if size <= MIN_SEGMENT_BYTES:
        return MIN_SEGMENT_BYTES
    power = 1 << (size - 1).bit_length()
    step = power >> 3
    return power // 2 + -(-(size - power // 2) // step) * step


class Segment:
    """A pooled memfd mapped read-write by its owner (this process).

    ``users`` counts who may still read it: the holder that acquired it
    (a message being sent, a :class:`~vyra_base_ipc.SharedBuffer`) and every
    lend to a receiver. At zero it goes back to its pool (or is destroyed,
    if it has none); only then is it written again.

    :ivar id: unique in this process, never reused.
    :ivar fd: the memfd (owned by the segment).
    :ivar capacity: its length, a size class.
    :ivar view: a writable view of the whole mapping, for the library only
        (users get theirs from :meth:`user_view`).
    """

    __slots__ = ('id', 'fd', 'capacity', 'view', 'users', 'last_used', 'pool', 'watchers', 'key',
                 'inherited', '_mapping', '_address')

    def __init__(self, segment_id: int, fd: int, capacity: int, mapping: mmap.mmap,
                 pool: 'SegmentPool | None') -> None:
        self.id = segment_id
        self.fd = fd
        self.capacity = capacity
        self._mapping = mapping
        self.view = memoryview(mapping)
        status = os.fstat(fd)
        #: The memfd's device and inode: how a segment lent back to this
        #: process is recognised (:func:`own_segment`).
        self.key = (status.st_dev, status.st_ino)
        anchor = ctypes.c_char.from_buffer(mapping)
        self._address = ctypes.addressof(anchor)
        del anchor  # (it holds an export of the mapping)
        self.users = 1
        self.last_used = time.monotonic()
        self.pool = pool
        #: Weak references to whoever must hear of its end (``forget(id)``):
        #: the connections whose peer may keep it mapped.
        self.watchers: list[weakref.ref[Any]] = []
        #: Made by the parent of this process, before ``fork()``: the
        #: parent writes it again once it let go, so it is not used here.
        self.inherited = False

    def watch(self, watcher: Any) -> None:
        """Call ``watcher.forget(self.id)`` when the segment is destroyed
        (unless ``watcher`` is gone or closed by then)."""
        with _lock:
            watchers = self.watchers
            if len(watchers) >= 8:
                # A long-lived segment (a SharedBuffer kept and sent on every
                # new connection) would keep one per connection ever made.
                watchers[:] = [reference for reference in watchers
                               if (alive := reference()) is not None and not alive.closed]
            watchers.append(weakref.ref(watcher))

    def use(self) -> None:
        """One more user (a lend)."""
        with _lock:
            self.users += 1

    def unuse(self) -> None:
        """A user let go; the last one returns the segment."""
        with _lock:
            self.users -= 1
            if self.users:
                return
            pool = self.pool
        if pool is not None and pool.put(self):
            return
        self.destroy()

    def retire(self) -> None:
        """Never reuse it: a receiver may still map it (the connection it
        was lent on ended before the lend came back, so nobody will hear it
        let go). It leaves its pool's accounts now and is destroyed when its
        last user here lets go; the receiver's mapping keeps the memory."""
        with _lock:
            pool, self.pool = self.pool, None
            if pool is not None:
                pool.disown(self)

    def refuse_inherited(self, what: str) -> None:
        """:raises ForkedProcessError: always, naming ``what`` (of this segment, :attr:`inherited`)."""
        raise ForkedProcessError(
            f'{what} is shared memory of the parent of process {os.getpid()}, made before fork(): the '
            'parent writes it again once it lets go of it, under this process. Make SharedBuffers in the '
            'process that uses them (or copy the bytes out before forking).')

    @property
    def address(self) -> int:
        """Where this process maps it (valid until it is destroyed)."""
        return self._address

    def user_view(self, size: int, writable: bool) -> memoryview:
        """A view of the first ``size`` bytes that counts as a user of the
        segment as long as it, or anything made from it, is referenced: the
        segment is not written by anyone else before it is gone. Read-only,
        it is so down to its ``.obj`` (see :func:`~._payload.read_only`)."""
        self.use()
        held = _held_type(self.capacity).from_address(self._address)
        held._segment = self
        view = memoryview(held).cast('B')[:size]
        return view if writable else read_only(view)

    def destroy(self) -> None:
        """Unmap and close (it is no longer in any pool); tell the watchers."""
        _by_key.pop(self.key, None)
        watchers, self.watchers = self.watchers, []
        for reference in watchers:
            watcher = reference()
            if watcher is not None:
                watcher.forget(self.id)
        try:
            self.view.release()
            self._mapping.close()
        except BufferError:
            pass  # a view of it is still referenced: unmapped with the last one
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.fd = -1

    def __repr__(self) -> str:
        return f'<Segment {self.id} {self.capacity} bytes users={self.users}>'


class _Held:
    """Base of the ctypes arrays user views are made of."""

    _segment: Segment

    def __del__(self) -> None:
        try:
            self._segment.unuse()
        except Exception:  # interpreter shutdown
            pass


_HELD_TYPES: dict[int, Any] = {}


def _held_type(capacity: int) -> Any:
    # One per size class: ctypes caches array types forever.
    held_type = _HELD_TYPES.get(capacity)
    if held_type is None:
        held_type = _HELD_TYPES[capacity] = type('HeldSegment', (_Held, ctypes.c_char * capacity), {})
    return held_type


def new_segment(size: int, pool: 'SegmentPool | None' = None, fill: Any = None) -> Segment:
    """A segment of ``size_class(size)`` bytes, every page faulted in,
    sealed; not in any pool's accounts. With ``fill`` (``size`` bytes: a
    buffer, or ``Pieces``) it starts with those bytes.

    :raises SharedMemoryError: it cannot be made (not that much memory
        available: :func:`require_memory`; no descriptors, a kernel before 5.1).
    """
    capacity = size_class(size)
    require_memory(capacity)  # (else the OOM killer comes, for any process)
    try:
        fd = os.memfd_create('vyra-ipc-segment', MFD_FLAGS)
    except OSError as error:
        raise SharedMemoryError(f'cannot create shared memory: {error.strerror}') from None
    try:
        if fill is not None:
            # write() lets the kernel allocate pages it fills whole without zeroing
            # them first: a quarter faster than faulting in zeroed pages and copying.
            write_payload(fd, fill)
        os.ftruncate(fd, capacity)
        # Writable and shared, populated: every page is allocated now, not
        # faulted in while a message is written.
        mapping = mmap.mmap(fd, capacity, flags=_POPULATE, **UNTRACKED)
        try:
            fcntl.fcntl(fd, _F_ADD_SEALS, POOL_SEALS)
        except BaseException:
            mapping.close()
            raise
    except (OSError, OverflowError) as error:  # (OverflowError: past what ftruncate() takes)
        os.close(fd)
        why = error.strerror if isinstance(error, OSError) else 'larger than a file can be'
        raise SharedMemoryError(f'cannot make a shared-memory segment of {capacity} bytes: {why}') from None
    except BaseException:
        os.close(fd)
        raise
    with _lock:
        segment_id = _ids.pop()
        _ids.append(segment_id + 1)
    segment = Segment(segment_id, fd, capacity, mapping, pool)
    _by_key[segment.key] = segment
    return segment


def own_segment(key: tuple[int, int]) -> Segment | None:
    """This process's live segment of that device and inode, if any (a
    segment of its own that a peer lent back to it, e.g. an answer carrying
    the buffer of the request)."""
    return _by_key.get(key)


class SegmentPool:
    """Free segments by size class, bounded in total bytes. Thread-safe.

    :ivar max_bytes: bound on the bytes of its segments, free and in use
        (default :data:`DEFAULT_POOL_BYTES`; may be changed at any time).
    :ivar idle_seconds: free segments unused for longer are dropped.
    :ivar max_free_bytes: free segments beyond these bytes are dropped, the
        oldest first (0: none is kept, every segment dies when returned).
    :ivar max_segments: bound on the number of its segments, free and in
        use (default :data:`DEFAULT_MAX_SEGMENTS`): each holds two
        descriptors (the memfd, and the mapping's copy of it before Python
        3.13), so many small ones would reach the open-file limit first.
    :ivar stats: counters: ``created``, ``reused``, ``exhausted`` (acquire
        found no room), ``dropped``, ``written`` (bytes the library copied
        into segments), ``retired`` (in use when the connection they were
        lent on ended: destroyed once let go here, never reused).
    """

    def __init__(self, max_bytes: int = DEFAULT_POOL_BYTES, idle_seconds: float = DEFAULT_IDLE_SECONDS,
                 max_free_bytes: int = DEFAULT_FREE_BYTES, clock: Callable[[], float] = time.monotonic,
                 max_segments: int = DEFAULT_MAX_SEGMENTS) -> None:
        self.max_bytes = max_bytes
        self.max_segments = max_segments
        self.idle_seconds = idle_seconds
        self.max_free_bytes = max_free_bytes
        self.stats = {'created': 0, 'reused': 0, 'exhausted': 0, 'dropped': 0, 'written': 0, 'retired': 0}
        self._clock = clock
        self._free: dict[int, list[Segment]] = {}
        #: Bytes and number of all its segments (free, in use, being made).
        self._bytes = 0
        self._segments = 0
        self._free_bytes = 0
        self._closed = False
        #: The idle timer, while one is pending (see _schedule_trim()).
        self._timer: threading.Timer | None = None

    @property
    def total_bytes(self) -> int:
        """Bytes of its segments, free and in use."""
        return self._bytes

    @property
    def free_bytes(self) -> int:
        """Bytes of its free segments."""
        return self._free_bytes

    @property
    def segments(self) -> int:
        """Its segments, free and in use."""
        return self._segments

    def count_written(self, size: int) -> None:
        """Count ``size`` bytes the library copied into a segment."""
        with _lock:
            self.stats['written'] += size

    def snapshot(self) -> dict[str, int]:
        """The counters, with ``bytes`` and ``free_bytes`` now."""
        with _lock:
            return {**self.stats, 'bytes': self._bytes, 'free_bytes': self._free_bytes}

    def acquire(self, size: int, fill: Any = None) -> Segment | None:
        """A segment of at least ``size`` bytes with one user (the caller),
        free or new; ``None`` if the pool has no room for one (the caller
        falls back to a new memfd). With ``fill`` (``size`` bytes: a buffer,
        or ``Pieces``), the segment holds those bytes (counted as written).

        :raises SharedMemoryError: a new segment cannot be made.
        """
        capacity = size_class(size)
        dropped: list[Segment] = []
        with _lock:
            # (No idle trim here: the pool's timer does it; a segment idle
            # but not yet dropped is as good as any.)
            free = self._free.get(capacity)
            if free:
                segment = free.pop()  # the last returned: its pages are likely in cache
                if not free:  # (an empty list would be taken for a free segment's age)
                    del self._free[capacity]
                self._free_bytes -= capacity
                segment.users = 1
                self.stats['reused'] += 1
            else:
                segment = None
                # Free segments make room only if enough can: one that never
                # fits beside those in use must not empty the pool for nothing.
                in_use = self._segments - sum(map(len, self._free.values()))
                if self._bytes - self._free_bytes + capacity <= self.max_bytes and in_use < self.max_segments:
                    while self._bytes + capacity > self.max_bytes or self._segments >= self.max_segments:
                        dropped.append(self._take_oldest())
                if self._closed or self._bytes + capacity > self.max_bytes or \
                        self._segments >= self.max_segments:
                    self.stats['exhausted'] += 1
                    capacity = 0
                else:
                    self._bytes += capacity  # reserved while it is made
                    self._segments += 1
        self._destroy(dropped)
        if segment is not None:
            if fill is not None:
                try:
                    copy_payload(segment.view, fill)
                except BaseException:
                    segment.unuse()
                    raise
                self.count_written(size)
            return segment
        if not capacity:
            return None
        try:
            segment = new_segment(size, self, fill)
        except BaseException:
            with _lock:
                self._bytes -= capacity
                self._segments -= 1
            raise
        with _lock:
            self.stats['created'] += 1
            if fill is not None:
                self.stats['written'] += size
        return segment

    def put(self, segment: Segment) -> bool:
        """Take back a segment nobody uses; ``False`` if it must be destroyed
        (the pool was closed)."""
        dropped: list[Segment] = []
        with _lock:
            if self._closed:
                self._bytes -= segment.capacity
                self._segments -= 1
                return False
            segment.last_used = self._clock()
            self._free.setdefault(segment.capacity, []).append(segment)
            self._free_bytes += segment.capacity
            self._trim(dropped)
            while self._free_bytes > self.max_free_bytes:
                dropped.append(self._take_oldest())
            if self._timer is None:
                self._schedule_trim()
        self._destroy(dropped)
        return True

    def disown(self, segment: Segment) -> None:
        """(lock held) Take a segment in use out of the accounts: it never
        comes back (see :meth:`Segment.retire`)."""
        self._bytes -= segment.capacity
        self._segments -= 1
        self.stats['retired'] += 1

    def configure(self, max_bytes: int, max_free_bytes: int, idle_seconds: float, max_segments: int) -> None:
        """Set the limits (checked by the caller) and apply them to the free
        segments now: the idle and those beyond ``max_free_bytes`` go;
        segments in use stay until they are returned."""
        dropped: list[Segment] = []
        with _lock:
            self.max_bytes, self.max_free_bytes, self.idle_seconds = max_bytes, max_free_bytes, idle_seconds
            self.max_segments = max_segments
            self._trim(dropped)
            while self._free_bytes > self.max_free_bytes:
                dropped.append(self._take_oldest())
            if self._timer is not None:  # it waits for the old idle time
                self._timer.cancel()
                self._timer = None
            self._schedule_trim()
        self._destroy(dropped)

    def trim(self) -> None:
        """Drop the free segments unused for :attr:`idle_seconds`."""
        dropped: list[Segment] = []
        with _lock:
            self._trim(dropped)
        self._destroy(dropped)

    def close(self) -> None:
        """Drop every free segment; those in use are destroyed when returned."""
        with _lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            dropped = [segment for free in self._free.values() for segment in free]
            self._free.clear()
            self._bytes -= self._free_bytes
            self._segments -= len(dropped)
            self._free_bytes = 0
        self._destroy(dropped)

    def _trim(self, dropped: list[Segment]) -> None:
        # (lock held)
        if not self._free_bytes:
            return
        horizon = self._clock() - self.idle_seconds
        for capacity, free in list(self._free.items()):
            # Each list is in the order the segments came back: oldest first.
            while free and free[0].last_used < horizon:
                dropped.append(free.pop(0))
                self._bytes -= capacity
                self._segments -= 1
                self._free_bytes -= capacity
            if not free:
                del self._free[capacity]

    def _schedule_trim(self) -> None:
        # (lock held, no timer pending) Wake when the oldest free segment has
        # been idle long enough; nothing to wait for, no thread.
        if self._closed or not self._free:
            return
        oldest = min(free[0].last_used for free in self._free.values())
        delay = max(0.0, oldest + self.idle_seconds - self._clock()) + _TRIM_SLACK
        self._timer = start_timer(delay, self._trim_when_idle, 'vyra-ipc-segment-trim')

    def _trim_when_idle(self) -> None:
        dropped: list[Segment] = []
        with _lock:
            if self._timer is not threading.current_thread():
                return  # cancelled, or this pool was forgotten in a forked child
            self._timer = None
            self._trim(dropped)
            self._schedule_trim()
        self._destroy(dropped)

    def _take_oldest(self) -> Segment:
        # (lock held, some segment free)
        capacity = min(self._free, key=lambda size: self._free[size][0].last_used)
        free = self._free[capacity]
        segment = free.pop(0)
        if not free:
            del self._free[capacity]
        self._bytes -= capacity
        self._segments -= 1
        self._free_bytes -= capacity
        return segment

    def _destroy(self, dropped: list[Segment]) -> None:
        if dropped:
            with _lock:
                self.stats['dropped'] += len(dropped)
            for segment in dropped:
                segment.pool = None
                segment.destroy()


# Re-entrant: a SharedBuffer collected while this thread holds it returns
# its segment (the pool's methods do not allocate much inside it).
_lock = threading.RLock()
_ids = [1]
_pool: list[SegmentPool] = []
_by_key: dict[tuple[int, int], Segment] = {}
_availability: list[str | None] = []


def segments_lock() -> Any:
    """The lock of every segment and pool of this process (re-entrant; made
    anew in a forked child): held by a :class:`~vyra_base_ipc.SharedBuffer`
    to check that it is open and take a use of its memory in one step."""
    return _lock


def start_timer(delay: float, function: Callable[[], None], name: str) -> threading.Timer:
    """A started :class:`threading.Timer` that calls ``function`` after
    ``delay`` seconds in a daemon thread named ``name`` (it never keeps the
    process alive); not started while the interpreter shuts down (a segment
    given back by a buffer or view collected then): a thread started then
    never runs, and ``start()`` would wait for it for ever (or raise, from
    Python 3.12)."""
    timer = threading.Timer(delay, function)
    timer.name = name
    timer.daemon = True
    if not sys.is_finalizing():
        timer.start()
    return timer


def segment_pool() -> SegmentPool:
    """This process's pool (made on first use)."""
    if _pool:  # made: no lock (asked for every SharedBuffer and large message)
        return _pool[0]
    with _lock:
        if not _pool:
            _pool.append(SegmentPool())
        return _pool[0]


def pool_unavailable() -> str | None:
    """Why pooled segments cannot be made in this process (no
    ``F_SEAL_FUTURE_WRITE`` before Linux 5.1, no ``memfd_create``), or
    ``None``. Checked once."""
    if _availability:  # checked: no lock (asked for every SharedBuffer)
        return _availability[0]
    with _lock:
        if not _availability:
            try:
                new_segment(0).destroy()
                _availability.append(None)
            except (SharedMemoryError, AttributeError) as error:
                _availability.append(str(error))
        return _availability[0]


def _forget_after_fork() -> None:
    # The child's copies of the parent's segments are shared with the
    # parent: never used here (SharedBuffer.fileno() refuses them). The
    # parent's pool is closed here: its free segments' descriptors and
    # mappings go now, those in use (held by inherited buffers) when let go.
    global _lock
    _lock = threading.RLock()
    for segment in _by_key.values():
        segment.inherited = True
        segment.watchers = []  # the parent's connections: nobody here to tell
    _by_key.clear()
    for pool in _pool:
        pool.close()
    _pool.clear()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_forget_after_fork)
