"""One client connection of the fast-lane server: decodes its frames, starts
its calls (:mod:`._dispatch` runs them), writes their answers, and holds the
connection to the server's limits (who may connect, how many connections and
calls, metadata, stalled and unfinished frames, unread answers). The server's
lifecycle is :mod:`._server`'s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError
import grpc

from .._limits import CONCURRENT_RPC_LIMIT_EXCEEDED
from .._log_limit import log_limited
from .._payload import SharedMemoryError, TooLargeError
from .._peer import PeerCredentials, socket_peer
from .._shared_buffer import ReceivedBuffers
from . import _hello
from ._connection import FramedConnection
from ._context import AsyncServicerContext, ServicerContext
from ._dispatch import Call
from ._errors import NOT_STARTED, received_too_large
from ._frames import (
    FLAG_DEADLINE_EXCEEDED,
    FLAG_SHARED_MEMORY,
    Frame,
    MessageType,
    OversizedFrame,
    encode_frame,
    oversized_message,
    window_increment,
)
from ._messages import (
    ENVELOPE_ALLOWANCE,
    Request,
    encode_ok_response,
    encode_response,
    has_more_fields,
    metadata_from_wire,
    request_payload_size,
)
from ._shared_memory import MemfdGate, unpack
from ._status import number

if TYPE_CHECKING:
    from ._server import TtrpcServer

__all__ = ['ServerConnection']

_logger = logging.getLogger(__name__)
#: The numbers in a violation's reason (sizes, stream ids): one kind for the log whatever they are.
_NUMBERS = re.compile(r'\d+')
#: What grpc core says of the calls it cancels as a server's grace ends.
_GRACE_ENDED = 'Cancelling all calls'

_REQUEST = int(MessageType.REQUEST)
_RESPONSE = int(MessageType.RESPONSE)
_DATA = int(MessageType.DATA)
_CANCEL = int(MessageType.CANCEL)
_WINDOW_UPDATE = int(MessageType.WINDOW_UPDATE)
_RELEASE = int(MessageType.RELEASE)
#: What a metadata entry counts beyond its key and value (gRPC's and HPACK's 32).
_ENTRY_BYTES = 32
#: The start of HTTP/2's connection preface ("PRI * HTTP/2.0") read as a
#: ttrpc header: the length and stream id of a frame of 1.3 GB.
_HTTP2_PREFACE = (int.from_bytes(b'PRI ', 'big'), int.from_bytes(b'* HT', 'big'))
#: The first bytes of an oversized request frame read from a client that
#: agreed a Hello: its service and method names and its message's length.
_REQUEST_HEAD = 4096


class ServerConnection(FramedConnection):
    """One client connection: decodes frames, starts calls, writes answers."""

    def __init__(self, server: 'TtrpcServer') -> None:
        assert server._loop is not None
        super().__init__(server._loop, server.frame_limit)
        self.server = server
        self.calls: dict[int, Call] = {}
        self.last_stream_id = 0
        #: Bytes of streamed requests one call may leave unread before it
        #: fails (for clients that are not under flow control).
        self.request_backlog_bytes = 2 * server.max_message_bytes
        #: The client process (SO_PEERCRED), known once connected.
        self.peer: PeerCredentials | None = None
        self.queue_limit = server.queue_limit
        #: Explicit shared buffers this connection's calls hold (see _hold_buffers).
        self.held_buffers = 0
        # Messages in new memfds: at most the queue limit of them unread (see MemfdGate).
        self._memfd_gate = MemfdGate(server.queue_limit, self.unread_by_peer)
        # Unfinished frame bytes counted in the server's total, frames seen,
        # and the timer of a frame that started (see data_received).
        self._partial = 0
        self._frames_seen = 0
        self._frame_timer: asyncio.TimerHandle | None = None
        # The timer of descriptors waiting for their frames, and how many
        # frames had taken when it started (see _time_unclaimed_fds).
        self._fds_timer: asyncio.TimerHandle | None = None
        self._fds_taken = 0
        # Frames kept while the client does not read its answers (see _defer).
        self._deferred: list[Frame | OversizedFrame] = []

    def in_flight(self) -> int:
        return len(self.calls)

    # -- the connection ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self.server
        server._connections.add(self)
        self.peer = socket_peer(transport.get_extra_info('socket'), groups=True)  # (the peer rule's)
        refusal = server.peer_rule.refusal(self.peer)
        if refusal is None and len(server._connections) > server.limits.max_connections:
            refusal = f'{server.limits.max_connections} connections are open already (max_connections)'
        if refusal is not None:
            server.refused(refusal)
            self.close()
        elif server._stopping:
            self.close()

    def lost(self, exc: Exception | None) -> None:
        self._deferred = []
        for call in list(self.calls.values()):
            call.cancel()
        if self.agreement.segments is not None:
            self.agreement.segments.close()  # every lend of this end comes back
        self.server.connection_gone(self)
        self.server._partial_bytes -= self._partial
        self._partial = 0
        for timer in (self._frame_timer, self._fds_timer):
            if timer is not None:
                timer.cancel()
        self._frame_timer = self._fds_timer = None
        if self.decoder.mid_frame:
            _logger.debug('ttrpc connection closed inside a frame (%d bytes pending)',
                          self.decoder.buffered)

    # While the client does not read its answers (writing paused), its new
    # calls wait, and reading stops at the first: a peer cannot make the
    # server buffer answers without bound. The frames before it are handled
    # at once: a CANCEL, WINDOW_UPDATE or RELEASE only lessens what the
    # server holds, and a blocking client that left a stream reads nothing
    # until its next call; its CANCEL must not wait behind the answers that
    # filled the socket.

    def _defer(self, item: Frame | OversizedFrame) -> bool:
        """(writing paused) Keep ``item`` for :meth:`resume_writing` if it
        starts a call or follows one kept; True if kept."""
        deferred = self._deferred
        if not deferred and item.type != _REQUEST:
            return False
        if not deferred and self.transport is not None:
            self.transport.pause_reading()
        deferred.append(item)
        return True

    def resume_writing(self) -> None:
        super().resume_writing()
        deferred = self._deferred
        if not deferred or self.closed or self.transport is None:
            return
        self._deferred = []
        self.frames_received(deferred)  # (those after a new pause are kept again)
        if not self._deferred and not self.closed:
            self.transport.resume_reading()
            self._time_unclaimed_fds()  # the descriptors they took, or those still waiting

    def violation(self, reason: str) -> None:
        # One a peer may cause at will, by connecting again: limited, by
        # reason (its numbers aside), so that the first of each is shown.
        log_limited(_logger, logging.WARNING, ('ttrpc violation', _NUMBERS.sub('#', reason)),
                    'ttrpc connection closed: %s', reason)
        super().violation(reason)

    def data_received(self, data: bytes) -> None:
        frames_before = self._frames_seen
        FramedConnection.data_received(self, data)
        if self._fds_timer is not None or self.decoder.queued_fds:
            self._time_unclaimed_fds()
        if not self._partial and self._frame_timer is None and not self.decoder.mid_frame:
            return  # whole frames only, as usual: nothing held, nothing to time
        # Unfinished frames: bounded in bytes over all connections, and in
        # time per frame (a peer that stalls inside one holds its bytes).
        server = self.server
        buffered = 0 if self.closed else self.decoder.buffered
        if buffered != self._partial:
            server._partial_bytes += buffered - self._partial
            self._partial = buffered
            if server._partial_bytes > server.limits.max_partial_bytes:
                self.violation(f'unfinished frames of all connections would exceed '
                               f'{server.limits.max_partial_bytes} bytes (max_partial_bytes)')
                return
        if self.closed or not self.decoder.mid_frame:
            if self._frame_timer is not None:
                self._frame_timer.cancel()
                self._frame_timer = None
        elif self._frame_timer is None or self._frames_seen != frames_before:
            # A new frame began (or the first one): it gets the whole timeout.
            if self._frame_timer is not None:
                self._frame_timer.cancel()
            self._frame_timer = self.loop.call_later(server.limits.frame_timeout, self._frame_overdue)

    def _frame_overdue(self) -> None:
        self._frame_timer = None
        if self.closed or not self.decoder.mid_frame:
            return
        transport = self.transport
        if transport is not None and transport.has_unread_data():
            # The loop was too busy to read what arrived: not the peer's fault.
            self._frame_timer = self.loop.call_later(self.server.limits.frame_timeout, self._frame_overdue)
            return
        self.violation(f'a frame started {self.server.limits.frame_timeout:g} s ago has not arrived '
                       'whole (frame_timeout)')

    def _time_unclaimed_fds(self) -> None:
        # Descriptors arrive with the first byte of their batch, whose frames
        # claim them: a peer that leaves some unclaimed for frame_timeout (no
        # frame took any meanwhile) loses its connection, rather than holding
        # up to MAX_QUEUED_FDS of the server's descriptors for its life.
        decoder = self.decoder
        waiting = not self.closed and decoder.queued_fds
        timer = self._fds_timer
        if timer is not None and (not waiting or decoder.fds_taken != self._fds_taken):
            timer.cancel()  # none wait, or a frame took some: the timeout starts again
            timer = self._fds_timer = None
        if timer is None and waiting:
            self._fds_taken = decoder.fds_taken
            self._fds_timer = self.loop.call_later(self.server.limits.frame_timeout, self._fds_overdue)

    def _fds_overdue(self, again: bool = False) -> None:
        self._fds_timer = None
        transport = self.transport
        if self.closed or not self.decoder.queued_fds or self._deferred:
            return  # (kept frames claim theirs later: timed again then)
        if not again and transport is not None and transport.has_unread_data():
            # The claiming frame may wait in what the loop has not read yet:
            # once more (a peer that keeps sending must not keep its descriptors).
            self._fds_timer = self.loop.call_later(self.server.limits.frame_timeout, self._fds_overdue, True)
            return
        self.violation(f'{self.decoder.queued_fds} file descriptors not claimed by any frame for '
                       f'{self.server.limits.frame_timeout:g} s (frame_timeout)')

    # -- frames -----------------------------------------------------------------------

    def frame_received(self, item: Frame | OversizedFrame) -> None:
        self._frames_seen += 1
        if self.write_paused and self._defer(item):
            return
        if item.type == _REQUEST and item.stream_id & 1 and item.__class__ is Frame and (
                not item.flags & FLAG_SHARED_MEMORY or self.agreement.shared_memory is not None):
            # Where the tests below lead a request (most frames), in one.
            self._request(item)
            return
        if item.type == _RELEASE and item.__class__ is Frame and self.agreement.segments is not None:
            # The next most: the lends of a call with shared memory given back.
            reason = self.agreement.segments.released(item.data)
            if reason is not None:
                self.violation(reason)
            return
        if item.__class__ is OversizedFrame:
            if (item.length, item.stream_id) == _HTTP2_PREFACE and self._frames_seen == 1:
                self.violation('an HTTP/2 (gRPC) client on the fast-lane socket: give it the gRPC socket')
                return
            details = oversized_message(item.length, item.limit)
            shared = item.flags & FLAG_SHARED_MEMORY
            size = request_payload_size(item.head, item.length) if item.head and not shared else None
            if size is not None and size > self.server.max_message_bytes:
                # A request of one of our clients: its message's size is known,
                # and told in grpc's words, as on the gRPC lane.
                details = received_too_large(size, self.server.max_message_bytes, server=True)
            call = self.calls.get(item.stream_id)
            if call is not None:
                if item.type == _DATA and not item.flags & FLAG_SHARED_MEMORY:
                    # A streamed message, the frame's whole data: its size is known unread,
                    # and told in grpc's words (a request's frame holds more than its message).
                    details = received_too_large(item.length, self.server.max_message_bytes, server=True)
                call.fail(grpc.StatusCode.RESOURCE_EXHAUSTED, details)
            else:
                self.reject(item.stream_id, grpc.StatusCode.RESOURCE_EXHAUSTED, details)
            return
        frame: Frame = item  # type: ignore[assignment]
        stream_id = frame.stream_id
        if (frame.flags & FLAG_SHARED_MEMORY and (frame.type == _REQUEST or frame.type == _DATA)
                and (self.agreement.shared_memory is None or not stream_id & 1)):
            # Its descriptors cannot be accounted for: the connection is out of step.
            self.violation(f'shared-memory flag on a frame of stream {stream_id} without agreement')
        elif not stream_id & 1:
            self.reject(stream_id, grpc.StatusCode.INVALID_ARGUMENT,
                        'StreamID must be odd for client initiated streams')
        elif frame.type == _REQUEST:
            self._request(frame)
        elif frame.type == _DATA:
            self._data(frame)
        elif frame.type == _CANCEL and self.agreement.cancel:
            call = self.calls.get(stream_id)
            if call is not None:
                call.cancel(expired=bool(frame.flags & FLAG_DEADLINE_EXCEEDED))
        elif frame.type == _WINDOW_UPDATE and self.agreement.send_window:
            call = self.calls.get(stream_id)
            if call is not None and call.credit is not None:
                call.credit.grant(window_increment(frame))
        # Responses from a client and unknown types are ignored, as the
        # protocol asks for forward compatibility.

    def _data(self, frame: Frame) -> None:
        stream_id = frame.stream_id
        call = self.calls.get(stream_id)
        payload: bytes | memoryview = frame.data
        shared = bool(frame.flags & FLAG_SHARED_MEMORY)
        if shared:
            name = call.handler.path if call is not None else f'stream {stream_id}'
            resolved = self._resolve(stream_id, payload, f'a streamed request of {name}')
            if resolved is None:
                return
            payload = resolved[0]  # explicit buffers travel only with unary requests
            held = 0 if call is None else self._shared_held()
            if call is not None and held >= self._held_share():
                # Each waits for its handler with a mapping, whatever its size.
                call.fail(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"this connection's calls hold {self.held_buffers} shared buffers and "
                          f'{held - self.held_buffers} streamed requests in shared memory '
                          'not read yet: no more (a quarter of max_held_buffers)')
                return
        if call is not None:
            if call.handler.observed:
                self._count_received(len(payload), shared)
            call.data(frame, payload, shared)
        elif stream_id > self.last_stream_id:
            self.reject(stream_id, grpc.StatusCode.INVALID_ARGUMENT,
                        'StreamID is not active: data frame before its request')
        # else: data for a call that already ended (e.g. it answered
        # before reading all requests): nothing is waiting for it.

    def _request(self, frame: Frame) -> None:
        stream_id = frame.stream_id
        previous = self.last_stream_id
        if stream_id <= previous:
            self.reject(stream_id, grpc.StatusCode.INVALID_ARGUMENT,
                        'StreamID cannot be re-used and must increment')
            return
        self.last_stream_id = stream_id
        server = self.server
        limits = server.limits
        if len(self.calls) >= limits.max_concurrent_streams:
            self._refuse(frame, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f'{limits.max_concurrent_streams} calls are in flight on this connection '
                         'already (max_concurrent_streams)')
            server.count_refused(None)  # (unread: counted for the lane only)
            return
        data = frame.data
        if len(data) > ENVELOPE_ALLOWANCE:
            # Metadata entries count 32 bytes each (below): more than this many
            # exceed the limit, refused before protobuf makes an object of each.
            most = limits.max_metadata_bytes // _ENTRY_BYTES + 8
            if has_more_fields(data, most):
                self._refuse(frame, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f'request envelope of more than {most} fields: metadata of that many '
                             f'entries exceeds the limit of {limits.max_metadata_bytes} (max_metadata_bytes)')
                return
        try:
            request = Request.FromString(data)
        except DecodeError as error:
            self._refuse(frame, grpc.StatusCode.INVALID_ARGUMENT, f'unmarshal request error: {error}',
                         'unreadable request with shared memory')
            return
        # Each field read from the message once: every read makes a new object.
        wire_metadata = request.metadata
        metadata: tuple[tuple[str, str | bytes], ...] = ()
        if wire_metadata:
            # Counted as gRPC counts it (HPACK's entry size): 32 bytes per
            # entry beyond its key and value, so that empty entries are not
            # free. Their number alone first: millions would take the loop
            # seconds to add up.
            size = _ENTRY_BYTES * len(wire_metadata)
            if size <= limits.max_metadata_bytes:
                size += sum(len(item.key) + len(item.value) for item in wire_metadata)
            if size > limits.max_metadata_bytes:
                self._refuse(frame, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f'request metadata of {len(wire_metadata)} entries, {size} bytes or more '
                             f'(keys, values and {_ENTRY_BYTES} bytes an entry) exceeds the limit of '
                             f'{limits.max_metadata_bytes} (max_metadata_bytes)')
                return
            try:
                metadata = metadata_from_wire(wire_metadata)
            except ValueError as error:  # a key grpc calls illegal: grpc fails the call INTERNAL
                self._refuse(frame, grpc.StatusCode.INTERNAL, str(error))
                return
        service, name = request.service, request.method
        payload: bytes | memoryview = request.payload
        buffers: ReceivedBuffers | None = None
        shared = frame.flags & FLAG_SHARED_MEMORY
        if shared:
            # First, whatever else is wrong: the frame's descriptors must be claimed in order.
            what = f'the request of /{service}/{name}'
            resolved = self._resolve(stream_id, payload, what)
            if resolved is None:
                return
            payload, buffers = resolved
        if name == _hello.HELLO_METHOD and service == _hello.HELLO_SERVICE and not shared:
            self._hello(stream_id, payload, previous)
            return
        if server._stopping:
            self.reject(stream_id, grpc.StatusCode.UNAVAILABLE, NOT_STARTED)  # (may go elsewhere)
            return
        handler = server._handlers.get((service, name))
        if handler is None:
            if server.observer is not None and server.observer.metrics is not None:
                server.observer.metrics.unknown_method('ttrpc')
            self.reject(stream_id, grpc.StatusCode.UNIMPLEMENTED, 'Method not found!')
            return
        if server.maximum_concurrent_rpcs is not None and server._active >= server.maximum_concurrent_rpcs:
            self.reject(stream_id, grpc.StatusCode.RESOURCE_EXHAUSTED, CONCURRENT_RPC_LIMIT_EXCEEDED)
            server.count_refused(handler.path)
            return
        if len(payload) > server.max_message_bytes:
            self.reject(stream_id, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        received_too_large(len(payload), server.max_message_bytes, server=True))
            return
        timeout_nano = request.timeout_nano
        if timeout_nano < 0:  # containerd's server treats it as expired too
            self.reject(stream_id, grpc.StatusCode.DEADLINE_EXCEEDED, 'Deadline Exceeded')
            return
        timeout = timeout_nano / 1e9 if timeout_nano else None
        deadline = None if timeout is None else time.monotonic() + timeout
        if timeout is None and not handler.response_streaming:
            # A call without deadline from another peer (this package's
            # clients send one but for watch streams): ended all the same
            # after max_call_duration, though its handler sees no deadline.
            timeout = limits.max_call_duration
        context_class = AsyncServicerContext if handler.is_async else ServicerContext
        # (All positional: a class called with keywords makes a dict for its __init__.)
        context = context_class(deadline, metadata, handler.path, 'unix:', self.peer)
        # A def handler's request in shared memory waits for a handler thread
        # with its mapping (and, before Python 3.13, a descriptor): it counts
        # as a held buffer, as a streamed request does, or a peer queueing
        # calls while the threads are busy would make the server hold one
        # for each stream of each connection.
        waits = payload.__class__ is memoryview and not handler.is_async and not handler.request_streaming
        held = waits + (0 if buffers is None else len(buffers))
        if held:
            refusal = self._hold_buffers(held)
            if refusal is not None:
                if buffers is not None:
                    buffers.close()
                self.reject(stream_id, grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
                return
            context._held = held
            context._buffers = buffers
        # Buffers go with a single answer, to a client that agreed; elsewhere inline.
        if self.agreement.shared_memory is not None and not handler.response_streaming:
            context._can_attach = True
        if handler.observed:  # as on the gRPC lane: requests of the module's own services that run
            buffered = 0 if buffers is None else buffers._nbytes
            self._count_received(len(payload) + buffered, bool(shared))
        call = Call(self, stream_id, handler, context)
        self.calls[stream_id] = call
        server._active += 1
        call.start(payload, frame.flags, timeout)

    def _count_received(self, size: int, shared: bool) -> None:
        # Only for calls of observed handlers: health, introspection and
        # methods the server lacks are not the module's traffic (nor are
        # they on the gRPC lane, which counts as it deserializes).
        lane = self.server.lane_metrics
        if lane is not None:
            if shared:
                lane.shared_received += size
            else:
                lane.inline_received += size

    def _resolve(self, stream_id: int, manifest: bytes | memoryview, what: str
                 ) -> tuple[bytes | memoryview, ReceivedBuffers | None] | None:
        """The message and buffers a shared-memory frame refers to; ``None``
        after answering the stream with INVALID_ARGUMENT (a refused buffer)
        or closing the connection (descriptors missing)."""
        options = self.agreement.shared_memory
        assert options is not None
        try:
            return unpack(bytes(manifest), self.decoder.take_fds, self.server.max_message_bytes,
                          options.max_bytes, what, self.agreement.segments, server=True)
        except ValueError as error:  # fewer descriptors than announced
            self.reject(stream_id, grpc.StatusCode.INVALID_ARGUMENT, f'{what}: {error}')
            self.violation(str(error))
        except TooLargeError as error:
            self.reject(stream_id, grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except SharedMemoryError as error:
            self.reject(stream_id, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return None

    def _hello(self, stream_id: int, payload: bytes | memoryview, previous: int) -> None:
        """Agree on the extensions a vyra_base_ipc client offers: once, in
        the connection's first request (``previous``: the stream before it)."""
        if previous:
            # What is agreed holds for the connection's life: a new agreement
            # would drop the pooled segments lent under the old one.
            self.reject(stream_id, grpc.StatusCode.FAILED_PRECONDITION,
                        f'Hello must be the first request of a connection (stream {previous} came first)')
            return
        server = self.server
        # Pooled segments only with a peer of the server's own user or root:
        # a peer keeps the mapping (or descriptor) of a segment lent to it,
        # and the pool writes that segment again for anyone, so a socket
        # group's member would read what the server sends others. Another
        # user's peer gets new memfds, never written again (as does one whose
        # credentials are unknown, which a connected Unix socket always tells).
        peer = self.peer
        pooled = peer is not None and peer.uid in (0, os.geteuid())
        try:
            self.agreement, answer = _hello.accept(payload, server.shared_memory, server.stream_window,
                                                   self._memfd_gate, pooled)
        except DecodeError as error:
            self.reject(stream_id, grpc.StatusCode.INVALID_ARGUMENT, f'malformed Hello: {error}')
            return
        self.accepts_fds = self.agreement.shared_memory is not None
        # A plain ttrpc peer's oversized request is refused at its header, in
        # containerd's words; ours, once the head with the message's size is in, in grpc's.
        self.decoder.request_head = _REQUEST_HEAD
        if self.agreement.segments is not None:  # RELEASE frames leave from the loop
            self.agreement.segments.attach(self.loop, self.send)
        self.send(encode_frame(stream_id, _RESPONSE, 0, encode_ok_response(answer)))

    def reject(self, stream_id: int, code: grpc.StatusCode, details: str) -> None:
        """Answer a stream that never became a call."""
        self.send(encode_frame(stream_id, _RESPONSE, 0, encode_response(number(code), details)))

    def _refuse(self, frame: Frame, code: grpc.StatusCode, details: str,
                violation: str = 'a refused request with shared memory') -> None:
        """Reject a request; one that came with descriptors closes the
        connection too (how many were its own cannot be told)."""
        self.reject(frame.stream_id, code, details)
        if frame.flags & FLAG_SHARED_MEMORY:
            self.violation(violation)

    # -- lifecycle --------------------------------------------------------------------

    def _hold_buffers(self, count: int) -> str | None:
        """Count ``count`` more explicit buffers held by this connection's
        calls; why not, if that would pass ``max_held_buffers``."""
        server = self.server
        limit = server.limits.max_held_buffers
        if self.held_buffers + count > self._held_share() or server.held_buffers + count > limit:
            return (f'the server holds {server.held_buffers} shared buffers of requests, '
                    f'{self.held_buffers} of them for this connection: {count} more would pass its limit '
                    f'({limit}, a quarter for one connection: max_held_buffers)')
        self.held_buffers += count
        server.held_buffers += count
        return None

    def _held_share(self) -> int:
        return max(self.server.limits.max_held_buffers // 4, 1)

    def _shared_held(self) -> int:
        # Shared buffers this connection's calls hold, and their streamed
        # messages in shared memory not read yet (summed over the calls only
        # as such a message comes).
        return self.held_buffers + sum(call.requests.shared_pending() for call in self.calls.values()
                                       if call.requests is not None)

    def call_ended(self, call: Call) -> None:
        if self.calls.pop(call.stream_id, None) is not None:
            self.server._call_ended()
            held = call.context._held
            if held:  # (the buffers' descriptors are closed: see Call._end)
                self.held_buffers -= held
                self.server.held_buffers -= held
        if self.server._stopping and not self.calls:
            self.close()

    def cancel_calls(self) -> list[asyncio.Future[Any]]:
        """The grace ended: end every call with UNAVAILABLE, in the words of
        the gRPC lane, cancelling its handler; return the tasks of async
        handlers still unwinding."""
        tasks = [call.task for call in self.calls.values()
                 if call.task is not None and call.handler.is_async and not call.task.done()]
        for call in list(self.calls.values()):
            call.shut_down(_GRACE_ENDED)
        return tasks
