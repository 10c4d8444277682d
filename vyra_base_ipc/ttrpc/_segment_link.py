"""Pooled shared memory on one connection, both ways: lends and releases.

Agreed in the Hello (``segment_pool``). The sending end lends a pooled
segment (:mod:`vyra_base_ipc._segment_pool`) with each message or
:class:`~vyra_base_ipc.SharedBuffer` it carries, under a lend id of this
connection; the receiving end maps the segment once and reuses the mapping
for every later lend of it, and sends a RELEASE frame naming the lend once
nothing of it is referenced any more. The owner does not write a segment
before every lend of it came back; a connection that ends gives all its
lends back at once, and retires the segments they were of (destroyed once
nothing here uses them: never written again under a peer that kept a view).

The descriptor travels with every lend (a ``dup`` and a few microseconds of
``SCM_RIGHTS`` next to a megabyte's copy): no end has to know what the other
has mapped, frames may be reordered between threads, and the receiver may
drop a mapping whenever it likes. The receiver keeps the mapping of each of
the sender's segments (by the sender's segment id, checked against the
memfd's device and inode, which cannot be reused while mapped) until the
sender names the segment gone (it dropped it from its pool), the mapping
is the least recently used of more than :data:`CACHE_ENTRIES`, or unused
for :data:`CACHE_IDLE_SECONDS`; a segment lent on by a process that does not
own it is mapped for that lend only.

When a lend comes back is decided by reference counting, not by the code
that parses a message: a received message or buffer is a read-only
:class:`memoryview` whose underlying object is the lend itself, so the lend
ends when the last view, slice or NumPy array over it is gone (a message
parsed from it, a view a handler kept). What ends it may run in any thread,
in the middle of anything (the garbage collector): it only queues the id.
The queue leaves in a RELEASE frame from the connection's event loop
(:meth:`SegmentLink.attach`), or from the blocking client once it parsed an
answer or took a streamed message, else with its next request
(:meth:`SegmentLink.release_frame`).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import mmap
import os
import threading
import time
from typing import Any, Callable, Iterable

from .._libc import function
from .._payload import SharedMemoryError, check_sealed, is_allocated
from .._segment_pool import Segment, SegmentPool, own_segment, size_class, start_timer
from ._frames import FORGET_BIT, encode_release, released_ids

__all__ = ['CACHE_ENTRIES', 'CACHE_IDLE_SECONDS', 'LEND_SHARE', 'MAX_LENDS', 'SegmentLink']

#: Segments of the peer a connection keeps mapped (the least recently used
#: mapping goes first); views still referenced keep theirs.
CACHE_ENTRIES = 16
#: A mapping unused for this long is dropped, whether or not more lends come.
CACHE_IDLE_SECONDS = 10.0
#: How late the expiry of idle mappings may run: those that expire within
#: it go in the same pass.
_EXPIRY_SLACK = 0.5
#: Lend ids per RELEASE frame, at most: a frame naming more closes the connection.
_IDS_PER_FRAME = 8192
#: The lends of pooled segments one connection may hold, as a share of the
#: pool's bound (1/LEND_SHARE): a peer that never gives back what it was lent
#: then gets new memfds once it holds its share, and cannot take the pool
#: from every other connection.
LEND_SHARE = 4
#: The lends one connection's peer may hold at once, whatever they are: a
#: peer that never gives back gets copies in one-shot memfds past it (its
#: lends of this end's segments are bounded by LEND_SHARE first).
MAX_LENDS = 4096

_mmap = function('mmap', ctypes.c_void_p,
                 ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_munmap = function('munmap', ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value
_POPULATE = mmap.MAP_SHARED | getattr(mmap, 'MAP_POPULATE', 0)


class _Mapping:
    """A read-only mapping of a peer's segment (mapped with libc's mmap:
    the lends' views need its address), unmapped when nothing refers to it."""

    __slots__ = ('address', 'capacity', 'last_used', 'key', '__weakref__')

    def __init__(self, fd: int, capacity: int, key: tuple[int, int], what: str, populate: bool) -> None:
        address = _mmap(None, capacity, mmap.PROT_READ, _POPULATE if populate else mmap.MAP_SHARED, fd, 0)
        if address is None or address == _MAP_FAILED:
            error = ctypes.get_errno()
            raise SharedMemoryError(f'{what}: cannot map {capacity} bytes: {os.strerror(error)}')
        self.address: int = address
        self.capacity = capacity
        self.last_used = time.monotonic()
        #: The memfd's device and inode.
        self.key = key

    def __del__(self) -> None:
        try:
            _munmap(self.address, self.capacity)
        except Exception:  # interpreter shutdown: the process unmaps everything anyway
            pass


class _Lent:
    """Base of the per-capacity ctypes arrays a lend's views are made of."""

    _mapping: object  # what keeps the memory mapped
    _release: Callable[[int], None]
    _lend: int

    def __del__(self) -> None:
        # The last view is gone: the peer may write the segment again.
        try:
            self._release(self._lend)
            if isinstance(self._mapping, Segment):
                self._mapping.unuse()
        except Exception:  # interpreter shutdown: nobody to give it back to
            pass


_VIEW_TYPES: dict[int, Any] = {}

#: What a lend of the peer's own segment back to it holds (see SegmentLink.lend()).
_NOT_HELD = object()


def _view_type(capacity: int) -> Any:
    # One type per size class (a bounded set: capacities are checked to be one).
    view_type = _VIEW_TYPES.get(capacity)
    if view_type is None:
        view_type = _VIEW_TYPES[capacity] = type('LentSegment', (_Lent, ctypes.c_char * capacity),
                                                 {'__slots__': ('_mapping', '_release', '_lend')})
    return view_type


def _give_back(backing: object) -> None:
    if isinstance(backing, Segment):
        backing.unuse()
    # Anything else was held only to keep it alive (a buffer lent to this
    # end and sent on): dropping it is giving it back.


class SegmentLink:
    """One connection's pooled shared memory. Thread-safe.

    :ivar stats: counters of this end: ``lent``, ``released`` (lends the
        peer gave back), ``mapped`` (peer segments mapped), ``reused``
        (lends that found their mapping), ``returned`` (lends of the peer
        this end gave back).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lent: dict[int, object] = {}
        # Lends outstanding per segment of this end's, by segment id.
        self._lent_segments: dict[int, int] = {}
        # Bytes of this end's pooled segments the peer holds (each lend counted).
        self._lent_bytes = 0
        self._next_lend = 1
        self._closed = False
        # The peer's segments mapped, by the peer's segment id.
        self._mappings: collections.OrderedDict[int, _Mapping] = collections.OrderedDict()
        # This end's segments the peer may keep mapped, by id.
        self._watched: set[int] = set()
        self._releases: collections.deque[int] = collections.deque()
        # Views of the peer's lends that this end lent on to another peer,
        # whose connection ended before it gave them back (see close()).
        self._parked: list[memoryview] = []
        self._wake: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The pending expiry of idle mappings, if any (see _expire_later()).
        self._expiry: asyncio.TimerHandle | threading.Timer | None = None
        self._scheduled = False
        #: Set by the connection while it holds its answers on the loop (a
        #: read being handled, see FramedConnection.hold()): lends given back
        #: meanwhile do not wake the loop, the connection sends
        #: :meth:`release_frame` with those answers.
        self.held = False
        # The counters of stats (plain attributes: counted on every lend).
        self._released = self._mapped = self._reused = self._returned = 0

    @property
    def stats(self) -> dict[str, int]:
        """The counters (see the class), now."""
        return {'lent': self._next_lend - 1, 'released': self._released, 'mapped': self._mapped,
                'reused': self._reused, 'returned': self._returned}

    # -- this end's segments, lent --------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the connection ended (:meth:`close`)."""
        return self._closed

    @property
    def outstanding(self) -> int:
        """Lends of this end the peer has not given back."""
        return len(self._lent)

    def may_lend(self, size: int = 0, pool: SegmentPool | None = None) -> bool:
        """Whether one more lend may go to the peer: it holds fewer than
        :data:`MAX_LENDS`, and, for a pooled segment of ``size`` bytes of
        ``pool``, its lends of this end's segments stay within
        1/:data:`LEND_SHARE` of the pool's bounds, in bytes and in segments.
        Else the caller sends a copy in a one-shot memfd."""
        if len(self._lent) >= MAX_LENDS:
            return False
        return pool is None or (self._lent_bytes + size <= pool.max_bytes // LEND_SHARE
                                and len(self._lent_segments) < pool.max_segments // LEND_SHARE)

    def lend(self, backing: object) -> int:
        """Lend ``backing`` to the peer: a :class:`Segment` (whose use the
        lend takes over: given back with ``unuse()``; the peer hears when it
        is destroyed), a view of a lend from the peer (its buffer going back
        to it: not held, see below), or an object to keep alive until the
        peer gives the lend back. Returns the lend id; 0 if the connection
        is closed (the backing is given back at once, and the frame will not
        leave).

        A buffer lent back to the peer that owns its segment is read there
        through the owner's own mapping, which that view keeps from being
        written (:meth:`receive`): this end need not hold it, and its own
        lend of it ends with its views, as any other. Held until the peer
        gave the new lend back, it would keep the peer's lend, and segment,
        one call longer (an answer with the request's buffer: the owner's
        next call would take another segment while this one waits for its
        RELEASE). The caller holds a view until the frame is written, so the
        peer reads this lend before the RELEASE of its own.
        """
        if backing.__class__ is memoryview and self._is_from_peer(backing):
            backing = _NOT_HELD
        with self._lock:
            if not self._closed:
                lend_id = self._next_lend
                self._next_lend = lend_id + 1
                self._lent[lend_id] = backing
                if backing.__class__ is Segment:
                    segment = backing
                    segment_id = segment.id
                    self._lent_bytes += segment.capacity
                    lent_segments = self._lent_segments
                    lent_segments[segment_id] = lent_segments.get(segment_id, 0) + 1
                    if segment_id not in self._watched:
                        self._watched.add(segment_id)
                        segment.watch(self)
                return lend_id
        _give_back(backing)
        return 0

    def _is_from_peer(self, view: memoryview) -> bool:
        # A view made by receive() on this link: its lend's release is ours.
        # (Compared by the bound method's instance: no bound method is made.)
        release = getattr(view.obj, '_release', None)
        return getattr(release, '__self__', None) is self

    def forget(self, segment_id: int) -> None:
        """One of this end's segments is gone: the peer may unmap it (sent
        with the next RELEASE frame). Any thread, even inside the garbage
        collector: no lock."""
        self._watched.discard(segment_id)
        self._queue(segment_id | FORGET_BIT)

    def cancel(self, lend_ids: Iterable[int]) -> None:
        """Take back lends whose frame was never sent."""
        self._give_back(lend_ids)

    def released(self, data: bytes) -> str | None:
        """A RELEASE frame's data: lends the peer gave back, and segments of
        the peer that are gone (ids with :data:`FORGET_BIT`: their mappings
        are dropped). Lends of the peer's segments that this end held only
        for the lends given back go back at once (when attached to a loop:
        this runs inside the read that brought the frame, and they leave
        at its end). Returns
        why the connection must close (malformed, more ids than one frame
        carries, or naming lends it does not hold), else ``None``."""
        if len(data) > 8 * _IDS_PER_FRAME:  # (not parsed: 16 MiB of ids would take the loop 0.4 s)
            return f'RELEASE frame of {len(data) // 8} ids (at most {_IDS_PER_FRAME} in one)'
        ids = released_ids(data)
        if ids is None:
            return f'malformed RELEASE frame ({len(data)} bytes)'
        lend_ids = ids
        # (FORGET_BIT is an id's top bit: the largest id tells if any has it.)
        if ids and max(ids) >= FORGET_BIT:
            lend_ids = tuple(lend_id for lend_id in ids if not lend_id & FORGET_BIT)
            with self._lock:
                for segment_id in ids:
                    if segment_id & FORGET_BIT:
                        # Unmapped now unless a view still refers to it.
                        self._mappings.pop(segment_id & ~FORGET_BIT, None)
        unknown = self._give_back(lend_ids)
        if unknown:
            return f'RELEASE of segments not lent to the peer (lend ids {", ".join(map(str, unknown[:5]))})'
        return None

    def _give_back(self, lend_ids: Iterable[int]) -> list[int]:
        backings: list[object] = []
        unknown: list[int] = []
        with self._lock:
            lent, lent_segments = self._lent, self._lent_segments
            for lend_id in lend_ids:
                backing = lent.pop(lend_id, None)
                if backing is None:
                    unknown.append(lend_id)
                    continue
                backings.append(backing)
                if backing.__class__ is Segment:
                    segment = backing
                    self._lent_bytes -= segment.capacity
                    count = lent_segments.pop(segment.id) - 1
                    if count:
                        lent_segments[segment.id] = count
            self._released += len(backings)
        # Outside the lock: a segment back in its pool may be destroyed, and
        # a view of another link's lend let go of gives that lend back.
        for backing in backings:
            _give_back(backing)
        return unknown

    # -- the peer's segments, lent to this end --------------------------------------------

    def receive(self, fd: int, length: int, lend_id: int, segment_id: int, what: str,
                populate: bool = False) -> memoryview:
        """A read-only view of the first ``length`` bytes of a segment the
        peer lent under ``lend_id`` (``fd`` is not closed here). The lend is
        given back when the view and everything made from it are gone.

        :param segment_id: the peer's id of its segment, to keep it mapped
            for later lends; 0 to map it for this lend only.
        :param populate: map every page of a new mapping now (a message,
            about to be parsed whole), unless the segment has holes; a
            buffer's pages are mapped as they are first read: populating a
            GiB takes a tenth of a second of the receiver's time, which a
            peer lending the same memory again and again under new segment
            ids would cost it for nothing.
        :raises SharedMemoryError: the descriptor is not a sealed segment of
            the size class of ``length`` bytes, or cannot be mapped.
        """
        if not lend_id:
            raise SharedMemoryError(f'{what}: a pooled segment without a lend id')
        status = os.fstat(fd)
        key = (status.st_dev, status.st_ino)
        now = time.monotonic()
        mapping = None
        if segment_id:
            with self._lock:
                mappings = self._mappings
                mapping = mappings.get(segment_id)
                if mapping is not None and mapping.key == key:
                    mappings.move_to_end(segment_id)
                    self._reused += 1
                else:
                    mapping = None
        own = None if mapping is not None else self._lent_back(key, length, what)
        holder: object
        if own is not None:
            # One of this process's own segments, lent back (an answer with
            # the request's buffer): read it through the owner's mapping,
            # which lives as long as the lend that holds it.
            address, capacity, holder = own.address, own.capacity, own
            self._reused += 1
        elif mapping is None:
            checked = check_sealed(fd, what, lent=True)
            capacity = checked.st_size
            # Exactly the size class of what it holds (the pool reuses a
            # segment only for its own class): mapping it costs the receiver
            # no more than the announced length, which the caller checked.
            if capacity != size_class(length):
                raise SharedMemoryError(f'{what}: a pooled segment of {capacity} bytes for {length} '
                                        f'announced (its size class is {size_class(length)})')
            # Populated if asked (a pool's segments are faulted in whole), unless
            # it has holes: their pages would be allocated here (see is_allocated).
            mapping = _Mapping(fd, capacity, key, what, populate and is_allocated(checked))
            dropped: list[_Mapping] = []
            with self._lock:
                self._mapped += 1
                if segment_id and not self._closed:
                    self._mappings[segment_id] = mapping
                    self._evict(now, dropped)
                    if self._expiry is None:
                        self._expire_later()
            del dropped  # unmapped here, outside the lock, unless a view holds one
        if mapping is not None:
            mapping.last_used = now
            address, capacity, holder = mapping.address, mapping.capacity, mapping
        if length > capacity:
            raise SharedMemoryError(f'{what}: {length} bytes announced in a segment of {capacity}')
        lent = (_VIEW_TYPES.get(capacity) or _view_type(capacity)).from_address(address)
        lent._mapping = holder
        lent._lend = lend_id
        lent._release = self._return
        return memoryview(lent).cast('B')[:length].toreadonly()

    def decline(self, lend_ids: Iterable[int]) -> None:
        """Give back lends of the peer that this end refused without mapping
        them (a message or buffer over a limit, or failing the checks): they
        leave with the next RELEASE frame, as a view's last reference would."""
        for lend_id in lend_ids:
            self._return(lend_id)

    def _lent_back(self, key: tuple[int, int], length: int, what: str) -> Segment | None:
        """This end's segment of that inode if the peer holds a lend of it
        (a buffer coming back: read it through this end's own mapping), with
        one more use for the view (a peer that gives back its own lend early
        cannot have it unmapped under the view); else ``None``. A segment the
        peer does not hold now (it kept a descriptor) is mapped as any other."""
        own = own_segment(key)
        if own is None:
            return None
        with self._lock:
            if not self._lent_segments.get(own.id):
                return None
            if length > own.capacity:
                raise SharedMemoryError(f'{what}: {length} bytes announced in a segment of '
                                        f'{own.capacity}')
            own.use()  # held by the lend counted here: not yet back in the pool
        return own

    def _evict(self, now: float, dropped: list[_Mapping]) -> None:
        # (lock held) The least recently used first, then the idle ones.
        mappings = self._mappings
        while len(mappings) > CACHE_ENTRIES:
            dropped.append(mappings.popitem(last=False)[1])
        horizon = now - CACHE_IDLE_SECONDS
        while mappings:
            key, oldest = next(iter(mappings.items()))
            if oldest.last_used >= horizon:
                break
            dropped.append(mappings.pop(key))

    def _expire_later(self) -> None:
        # (lock held, a mapping cached, no expiry pending) Drop the mappings
        # left unused even if no lend comes to check them: a blocking client
        # reads nothing while it does not call (a FORGET of the owner's
        # included), and the pages of a segment its owner dropped would stay.
        oldest = next(iter(self._mappings.values())).last_used
        delay = max(0.0, oldest + CACHE_IDLE_SECONDS - time.monotonic()) + _EXPIRY_SLACK
        loop = self._loop
        if loop is not None and asyncio._get_running_loop() is loop:
            self._expiry = loop.call_later(delay, self._expire)
        else:  # no loop (the blocking client), or not on its thread
            self._expiry = start_timer(delay, self._expire, 'vyra-ipc-mapping-expiry')

    def _expire(self) -> None:
        dropped: list[_Mapping] = []
        with self._lock:
            self._expiry = None
            if self._closed:
                return
            self._evict(time.monotonic(), dropped)
            if self._mappings:
                self._expire_later()
        del dropped  # unmapped here, outside the lock, unless a view holds one

    def _return(self, lend_id: int) -> None:
        # From a view's last reference, in any thread, maybe inside the
        # garbage collector: no lock, only a queue and a wakeup.
        self._returned += 1
        self._queue(lend_id)

    def _queue(self, entry: int) -> None:
        if self._closed:
            return  # the peer is gone: nobody to tell
        self._releases.append(entry)
        if self._wake is not None and not self._scheduled and not self.held:
            self._scheduled = True
            self._wake()

    def release_frame(self) -> bytes:
        """The RELEASE frames of the lends given back and the segments
        gone since the last call (``b''`` if none), for the caller to send."""
        releases = self._releases
        if not releases:  # the common case: checked without an exception
            return b''
        lend_ids: list[int] = []
        try:
            # As many as are queued now (those queued meanwhile woke the
            # loop, or wait for the next frame): no IndexError to end the loop.
            take = releases.popleft
            for _ in range(len(releases)):
                lend_ids.append(take())
        except IndexError:  # cleared meanwhile: the connection closed
            pass
        if not lend_ids or self._closed:
            return b''
        if len(lend_ids) <= _IDS_PER_FRAME:  # one frame, the usual case
            return encode_release(lend_ids)
        return b''.join(encode_release(lend_ids[start:start + _IDS_PER_FRAME])
                        for start in range(0, len(lend_ids), _IDS_PER_FRAME))

    def attach(self, loop: asyncio.AbstractEventLoop, send: Callable[[bytes], None]) -> None:
        """Send RELEASE frames from ``loop`` with ``send`` (on the loop's
        thread), soon after lends are given back (those given back while the
        connection handles a read leave at its end, with its answers)."""

        def flush() -> None:
            self._scheduled = False
            frame = self.release_frame()
            if frame:
                try:
                    send(frame)
                except Exception:  # the connection is gone: so are the lends
                    pass

        def wake() -> None:
            # On the loop's own thread (a lend given back as a call ends) a
            # plain call_soon() does: call_soon_threadsafe() would also write
            # to the loop's self-pipe, a system call and one more turn of the
            # loop to read it back. From any other thread (a handler's
            # worker, the garbage collector there) it must wake the loop.
            try:
                if asyncio._get_running_loop() is loop:
                    loop.call_soon(flush)
                else:
                    loop.call_soon_threadsafe(flush)
            except RuntimeError:  # the loop is closed
                pass

        self._wake = wake
        self._loop = loop

    # -- the end ------------------------------------------------------------------------

    def close(self) -> None:
        """The connection ended: give back every lend of this end (the peer
        is gone or will never release them), forget the peer's mappings
        (views still referenced keep theirs), send nothing more. Idempotent.

        A segment of this end's pool still lent is retired, not reused: the
        peer may be alive and keep views of it (a client that disconnected
        holding an answer, a handler that kept a request's buffer), which
        must never change under it. A buffer of a third process that this
        end lent on (a relay) stays held on the connection it came from
        until that one ends too: its owner then retires it likewise."""
        with self._lock:
            self._closed = True
            lent, self._lent = self._lent, {}
            self._lent_segments.clear()
            self._lent_bytes = 0
            mappings = list(self._mappings.values())
            self._mappings.clear()
            parked, self._parked = self._parked, []
            expiry, self._expiry = self._expiry, None
        if expiry is not None:
            expiry.cancel()
        self._wake = None
        self._releases.clear()
        for backing in lent.values():
            if isinstance(backing, Segment):
                backing.retire()
            elif isinstance(backing, memoryview):
                origin = getattr(getattr(backing.obj, '_release', None), '__self__', None)
                if isinstance(origin, SegmentLink) and origin is not self:
                    origin._park(backing)
                    continue
            _give_back(backing)
        del mappings, parked  # (their lends go back to nobody: this connection is gone)

    def _park(self, view: memoryview) -> None:
        # Hold a view of the peer's lend until this connection ends.
        with self._lock:
            if not self._closed:
                self._parked.append(view)

    def __repr__(self) -> str:
        return f'<SegmentLink lent={len(self._lent)} mapped={len(self._mappings)}>'
