"""What a fast-lane client does with a frame it received in shared memory.

Both clients route frames through :class:`~vyra_base_ipc.ttrpc._call.ClientCore`;
a frame flagged :data:`~vyra_base_ipc.ttrpc._frames.FLAG_SHARED_MEMORY` is
resolved here as it arrives: its message fetched from shared memory
(:func:`~vyra_base_ipc.ttrpc._shared_memory.unpack`), or the error its call
gets instead; a small streamed message copied out of its mapping. What
response streams hold unread in shared memory is bounded, per connection
and per process (:class:`HeldMappings`).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable

from google.protobuf.message import DecodeError
import grpc

from .._fork_safety import locks_anew_after_fork
from .._payload import SharedMemoryError, TooLargeError
from ..exceptions import IPCError, error_from_status
from ._frames import FLAG_SHARED_MEMORY, Frame, MessageType
from ._messages import decode_response
from ._segment_link import SegmentLink
from ._shared_memory import unpack

if TYPE_CHECKING:  # (_call.py routes frames through this module)
    from ._call import ClientStream, Item

__all__ = ['COPIED_PAST_THE_BOUND_BELOW', 'MAX_HELD_MAPPINGS', 'MAX_PROCESS_HELD_MAPPINGS',
           'STREAMED_COPY_BELOW', 'HeldMappings', 'held_in_process', 'mappings_of', 'resolve_shared']

#: A streamed message in shared memory smaller than this is copied out as it
#: arrives, its mapping and lend let go at once: a stream's window counts a
#: message at its size, not at the page and the mapping it takes, and a server
#: sending one-byte messages each in a memfd of its own made one stream hold
#: 20,000 mappings, a third of ``vm.max_map_count`` (65,530), past which no
#: memory can be mapped in the process. Above it a stream holds at most its
#: window and one message over this many bytes of mappings (272 by default);
#: below it a copy costs less than a mapping.
STREAMED_COPY_BELOW = 64 * 1024
#: The mappings that messages in shared memory (each one, and one a buffer)
#: may hold on one connection while their response streams' callers have
#: not read them. A stream's window bounds its own (272 by default, see
#: above), but a server filling some 240 streams nobody reads would take
#: the process to ``vm.max_map_count`` (65,530); this is a thirty-second of it.
MAX_HELD_MAPPINGS = 2048
#: The mappings such messages may hold in this process, on all its
#: connections together. One process may hold connections to many servers
#: (or many to one), and some 32 at their bound above would reach
#: ``vm.max_map_count``. A quarter of its default (65,530), eight
#: connections at their bound: the other three quarters stay for what else
#: maps memory (malloc's large blocks, thread stacks, extension modules,
#: this package's own segments). Fixed rather than a quarter of
#: ``/proc/sys/vm/max_map_count``: nothing to read at import or where
#: ``/proc`` is not mounted, and a host that raised the limit (as databases
#: ask) gives messages nobody reads no more room.
MAX_PROCESS_HELD_MAPPINGS = 16384
#: Past :data:`MAX_HELD_MAPPINGS` or :data:`MAX_PROCESS_HELD_MAPPINGS`, a
#: message (without buffers) under this many bytes is copied out of its
#: mapping: it then costs memory as a message received inline does, within
#: its stream's window; a larger one fails its stream (copying a gigabyte a
#: server sent as a hole would allocate it here).
COPIED_PAST_THE_BOUND_BELOW = 1 << 20


def resolve_shared(frame: Frame, take_fds: Callable[[int], list[int]], message_limit: int,
                   buffer_limit: int, segments: SegmentLink | None) -> Frame | IPCError:
    """A frame a client received flagged :data:`._frames.FLAG_SHARED_MEMORY`
    with its message fetched from shared memory (as a read-only view; a
    streamed one of less than :data:`STREAMED_COPY_BELOW` bytes copied out,
    its mapping let go), or the error to give its call.
    Must run as frames arrive, in order: it takes the frame's descriptors.

    :raises ValueError: the descriptors the frame came with cannot be
        counted (an error or another frame type flagged as shared memory, a
        malformed envelope or manifest), or fewer arrived than it announced:
        left queued, they would go to the next frame's call, so the
        connection is out of step and must close.
    """
    if frame.type == MessageType.RESPONSE:
        try:
            code, message, manifest, _ = decode_response(frame.data)
        except DecodeError as error:
            raise ValueError(f'malformed response in shared memory from server: {error}') from None
        if code:
            raise ValueError(f'shared memory on an error response (status {code}: {message})')
    elif frame.type == MessageType.DATA:
        manifest = frame.data
    else:
        raise ValueError(f'shared memory on a frame of type {frame.type}')
    streamed = frame.type == MessageType.DATA
    try:
        payload, buffers = unpack(manifest, take_fds, message_limit, buffer_limit, 'the response', segments,
                                  server=False, streamed=streamed)
    except TooLargeError as error:
        return error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
    except SharedMemoryError as error:
        return error_from_status(grpc.StatusCode.INTERNAL, str(error))
    if streamed and len(payload) < STREAMED_COPY_BELOW and payload.__class__ is memoryview:
        payload = bytes(payload)  # (the view gone: unmapped, its lend given back)
    return Frame(frame.stream_id, frame.type, frame.flags, payload, buffers)  # type: ignore[arg-type]


def mappings_of(item: Any) -> int:
    """The mappings a received item holds: its message's if that is a view of
    shared memory, and one a buffer that came with it."""
    if item.__class__ is not Frame or not item.flags & FLAG_SHARED_MEMORY:
        return 0
    return (item.data.__class__ is not bytes) + (0 if item.buffers is None else len(item.buffers))


class _ProcessHeld:
    """The mappings every connection's :class:`HeldMappings` counts, in
    sum: :data:`held_in_process`. Under a lock of its own: blocking
    connections count from whichever thread reads for them, asyncio ones
    from their own loops' threads."""

    __slots__ = ('count', '_lock', '__weakref__')

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()
        locks_anew_after_fork(self)  # (the count goes on: a child keeps the parent's mappings)

    def _locks_anew(self) -> None:
        self._lock = threading.Lock()

    def take(self, count: int) -> bool:
        """Count ``count`` more if that stays within :data:`MAX_PROCESS_HELD_MAPPINGS`."""
        with self._lock:
            if self.count + count > MAX_PROCESS_HELD_MAPPINGS:
                return False
            self.count += count
            return True

    def let_go(self, count: int) -> None:
        with self._lock:
            self.count -= count


#: The mappings messages of response streams hold unread in this process.
held_in_process = _ProcessHeld()


class HeldMappings:
    """The mappings a connection's response streams hold in messages their
    callers have not read (:func:`mappings_of` each), also counted in
    :data:`held_in_process`. The owner serializes access, as for
    :class:`~vyra_base_ipc.ttrpc._call.ClientCore`: it counts a message in
    with :meth:`hold` as it arrives, out with :meth:`taken` as its caller
    takes it (the owner, which took it off the stream, tells), or with
    :meth:`let_go` as its caller leaves its stream (a connection closed or
    lost gives its calls an error after what they had received: they take
    it, or leave). A caller leaving a response stream looks under the
    owner's serialization whether it holds any: a reader forgets the stream
    and counts its last message in one step, and a blocking caller that
    looked without the lock between the two saw neither, its count kept by
    the connection for good (test_hostile_server.py)."""

    __slots__ = ('count', 'gone')

    def __init__(self) -> None:
        self.count = 0
        #: Collected (:meth:`__del__`): what it counts is no longer in the process's count.
        self.gone = False

    def __del__(self) -> None:
        # Collected with its connection: the messages it still counts went
        # with their streams, which nobody took nor left (an async generator
        # whose loop closed without closing it runs no finally); the
        # process's count lets go of them too. A stream's finally run in the
        # same collection, later, lets go of nothing more (gone).
        self.gone = True
        if self.count:
            held_in_process.let_go(self.count)

    def hold(self, stream: ClientStream, frame: Frame) -> Frame | IPCError:
        """``frame``, received in shared memory for ``stream``, as its caller
        is to get it. A response stream's message is counted (in
        ``stream.held`` and :data:`held_in_process` too) if it stays within
        :data:`MAX_HELD_MAPPINGS` and :data:`MAX_PROCESS_HELD_MAPPINGS`; past
        either, a message without buffers under
        :data:`COPIED_PAST_THE_BOUND_BELOW` bytes is copied out (not
        counted), else the stream fails with the RESOURCE_EXHAUSTED error
        returned (the frame let go, what follows dropped as for an overrun
        window). A unary-response call's answer (its stream has no window)
        is not counted: its caller takes it at once (the asyncio client's
        unary call has no stream, and its answer does not come here)."""
        window = stream.window
        if window is None:
            return frame
        count = mappings_of(frame)
        if not count:
            return frame
        within = self.count + count <= MAX_HELD_MAPPINGS
        if within and held_in_process.take(count):
            self.count += count
            stream.held += count
            return frame
        data, buffers = frame.data, frame.buffers
        if buffers is None and len(data) < COPIED_PAST_THE_BOUND_BELOW:
            return Frame(frame.stream_id, frame.type, frame.flags, bytes(data))
        if buffers is not None:
            buffers.close()
        window.overrun = True
        if stream.credit is not None:
            stream.credit.close()
        what = f'{len(data)} bytes' + (f' and {len(buffers)} shared buffers' if buffers is not None else '')
        where, limit, held = (('on this connection', MAX_HELD_MAPPINGS, self.count) if not within
                              else ('in this process', MAX_PROCESS_HELD_MAPPINGS, held_in_process.count))
        return error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f'CLIENT: the response ({what} in shared memory) would take the mappings '
                                 f'held by messages not yet read {where} past its limit of {limit} mappings '
                                 f'({held} held; messages under {COPIED_PAST_THE_BOUND_BELOW} bytes are '
                                 'copied out past it)')

    def taken(self, stream: ClientStream, item: Item) -> None:
        """The caller of ``stream``, which holds mappings (``stream.held``),
        took ``item`` from it: the mappings ``item`` holds no longer count."""
        count = mappings_of(item)
        if count:
            stream.held -= count
            self.let_go(count)

    def let_go(self, count: int) -> None:
        """Messages holding ``count`` mappings were taken, or left unread with their stream."""
        self.count -= count
        if not self.gone:
            held_in_process.let_go(count)
