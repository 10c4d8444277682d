"""The ttrpc fast-lane server: the servicers registered for gRPC, served over
containerd's ttrpc framing on a second Unix socket.

Design: one asyncio protocol per connection on the server's event loop.
``async def`` handlers run as tasks on that loop, exactly where they run for
the gRPC lane, so user code sharing loop-bound state behaves the same on both
lanes; ``def`` handlers run in a thread pool. A thread per connection with
blocking sockets was the alternative: it is faster only when client and
server share a CPU (a raw socket ping-pong here: ~6 us on one CPU, ~55 us
across CPUs, where this design measures 45-55 us for a 64-byte Echo), and
it would have to hop to the event loop for every ``async def`` handler
anyway. Every call is independent: a slow handler delays neither other calls
on its connection nor other connections, and answers go out by stream id in
the order calls finish.

Protocol rules follow containerd's Go implementation, so its clients get the
same answers: an oversized frame is skipped and answered with
RESOURCE_EXHAUSTED on its stream (the connection stays usable), a request that
does not parse or a bad stream id is answered with INVALID_ARGUMENT, frames of
unknown type are ignored. A connection that stops inside a frame is simply
closed; nothing a peer sends affects other connections. This module holds
the connections and the server's lifecycle; calls are :mod:`._dispatch`'s.
"""

from __future__ import annotations

import asyncio
from concurrent import futures
import enum
import logging
import math
import os
import socket
import time
from typing import Any, Callable, Iterable

from google.protobuf.message import DecodeError
import grpc

from .._handler_threads import HandlerThreads
from .._limits import ServerLimits
from .._methods import ServiceRegistration
from .._options import DEFAULT_GRACE_PERIOD, DEFAULT_MAX_MESSAGE_BYTES, validate_max_message_bytes
from .._payload import SharedMemoryError, SharedMemoryOptions, TooLargeError, usable_options
from .._peer import PeerCredentials, PeerRule, socket_peer
from .._shared_buffer import ReceivedBuffers
from .._socket_file import SocketFile
from ..address import StrPath, validate_socket_path
from . import _hello
from ._connection import FramedConnection
from ._context import AsyncServicerContext, ServicerContext
from ._deadlines import DeadlineQueue
from ._dispatch import Call, Handler, call_finished, expire_call, number
from ._flow import DEFAULT_STREAM_WINDOW, validate_stream_window
from ._frames import (
    FLAG_SHARED_MEMORY,
    Frame,
    MessageType,
    OversizedFrame,
    encode_frame,
    oversized_message,
    window_increment,
)
from ._messages import ENVELOPE_ALLOWANCE, Request, encode_ok_response, encode_response, metadata_from_wire
from ._shared_memory import unpack
from ._transport import accept_connections

__all__ = ['TtrpcServer']

_logger = logging.getLogger(__name__)

_REQUEST = int(MessageType.REQUEST)
_RESPONSE = int(MessageType.RESPONSE)
_DATA = int(MessageType.DATA)
_CANCEL = int(MessageType.CANCEL)
_WINDOW_UPDATE = int(MessageType.WINDOW_UPDATE)


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
        # Unfinished frame bytes counted in the server's total, frames seen,
        # and the timer of a frame that started (see data_received).
        self._partial = 0
        self._frames_seen = 0
        self._frame_timer: asyncio.TimerHandle | None = None

    def in_flight(self) -> int:
        return len(self.calls)

    # -- the connection ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self.server
        server._connections.add(self)
        self.peer = socket_peer(transport.get_extra_info('socket'))
        refusal = server.peer_rule.refusal(self.peer)
        if refusal is None and len(server._connections) > server.limits.max_connections:
            refusal = f'{server.limits.max_connections} connections are open already (max_connections)'
        if refusal is not None:
            server.refused(refusal)
            self.close()
        elif server._stopping:
            self.close()

    def lost(self, exc: Exception | None) -> None:
        for call in list(self.calls.values()):
            call.cancel()
        self.server._connections.discard(self)
        self.server._partial_bytes -= self._partial
        self._partial = 0
        if self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None
        if self.decoder.mid_frame:
            _logger.debug('ttrpc connection closed inside a frame (%d bytes pending)',
                          self.decoder.buffered)

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its requests too,
        # so that a peer cannot make the server buffer without bound.
        super().pause_writing()
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def violation(self, reason: str) -> None:
        _logger.warning('ttrpc connection closed: %s', reason)
        super().violation(reason)

    def data_received(self, data: bytes) -> None:
        frames_before = self._frames_seen
        super().data_received(data)
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

    # -- frames -----------------------------------------------------------------------

    def frame_received(self, item: Frame | OversizedFrame) -> None:
        self._frames_seen += 1
        if item.__class__ is OversizedFrame:
            details = oversized_message(item.length, item.limit)
            call = self.calls.get(item.stream_id)
            if call is not None:
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
                call.cancel()
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
        if frame.flags & FLAG_SHARED_MEMORY:
            name = call.handler.path if call is not None else f'stream {stream_id}'
            resolved = self._resolve(stream_id, payload, f'a streamed request of {name}')
            if resolved is None:
                return
            payload = resolved[0]  # explicit buffers travel only with unary requests
        if call is not None:
            call.data(frame, payload)
        elif stream_id > self.last_stream_id:
            self.reject(stream_id, grpc.StatusCode.INVALID_ARGUMENT,
                        'StreamID is not active: data frame before its request')
        # else: data for a call that already ended (e.g. it answered
        # before reading all requests): nothing is waiting for it.

    def _request(self, frame: Frame) -> None:
        stream_id = frame.stream_id
        if stream_id <= self.last_stream_id:
            self.reject(stream_id, grpc.StatusCode.INVALID_ARGUMENT,
                        'StreamID cannot be re-used and must increment')
            return
        self.last_stream_id = stream_id
        limits = self.server.limits
        if len(self.calls) >= limits.max_concurrent_streams:
            self.reject(stream_id, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f'{limits.max_concurrent_streams} calls are in flight on this connection '
                        'already (max_concurrent_streams)')
            if frame.flags & FLAG_SHARED_MEMORY:
                self.violation('a refused request with shared memory')
            return
        try:
            request = Request.FromString(frame.data)
        except DecodeError as error:
            self.reject(stream_id, grpc.StatusCode.INVALID_ARGUMENT, f'unmarshal request error: {error}')
            if frame.flags & FLAG_SHARED_MEMORY:
                self.violation('unreadable request with shared memory')
            return
        if request.metadata:
            size = sum(len(item.key) + len(item.value) for item in request.metadata)
            if size > limits.max_metadata_bytes:
                self.reject(stream_id, grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f'request metadata of {size} bytes exceeds the limit of '
                            f'{limits.max_metadata_bytes} (max_metadata_bytes)')
                if frame.flags & FLAG_SHARED_MEMORY:
                    self.violation('a refused request with shared memory')
                return
        payload: bytes | memoryview = request.payload
        buffers: ReceivedBuffers | None = None
        shared = frame.flags & FLAG_SHARED_MEMORY
        if shared:
            # First, whatever else is wrong: the frame's descriptors must be claimed in order.
            what = f'the request of /{request.service}/{request.method}'
            resolved = self._resolve(stream_id, payload, what)
            if resolved is None:
                return
            payload, buffers = resolved
        server = self.server
        if request.service == _hello.HELLO_SERVICE and request.method == _hello.HELLO_METHOD and not shared:
            self._hello(stream_id, payload)
            return
        if server._stopping:
            self.reject(stream_id, grpc.StatusCode.UNAVAILABLE, 'server is shutting down')
            return
        handler = server._handlers.get((request.service, request.method))
        if handler is None:
            self.reject(stream_id, grpc.StatusCode.UNIMPLEMENTED, 'Method not found!')
            return
        if server.maximum_concurrent_rpcs is not None and server._active >= server.maximum_concurrent_rpcs:
            self.reject(stream_id, grpc.StatusCode.RESOURCE_EXHAUSTED, 'Concurrent RPC limit exceeded!')
            return
        if len(payload) > server.max_message_bytes:
            self.reject(stream_id, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f'Received message larger than max ({len(payload)} vs. {server.max_message_bytes})')
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
        metadata = metadata_from_wire(request.metadata) if request.metadata else ()
        context_class = AsyncServicerContext if handler.is_async else ServicerContext
        context = context_class(deadline, metadata, handler.path, peer_credentials=self.peer)
        context._buffers = buffers
        # Buffers go with a single answer, to a client that agreed; elsewhere inline.
        context._can_attach = self.agreement.shared_memory is not None and not handler.response_streaming
        call = Call(self, stream_id, handler, context)
        self.calls[stream_id] = call
        server._active += 1
        call.start(payload, frame.flags, timeout)

    def _resolve(self, stream_id: int, manifest: bytes | memoryview, what: str
                 ) -> tuple[bytes | memoryview, ReceivedBuffers | None] | None:
        """The message and buffers a shared-memory frame refers to; ``None``
        after answering the stream with INVALID_ARGUMENT (a refused buffer)
        or closing the connection (descriptors missing)."""
        options = self.agreement.shared_memory
        assert options is not None
        try:
            return unpack(bytes(manifest), self.decoder.take_fds, self.server.max_message_bytes,
                          options.max_bytes, what)
        except ValueError as error:  # fewer descriptors than announced
            self.reject(stream_id, grpc.StatusCode.INVALID_ARGUMENT, f'{what}: {error}')
            self.violation(str(error))
        except TooLargeError as error:
            self.reject(stream_id, grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except SharedMemoryError as error:
            self.reject(stream_id, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return None

    def _hello(self, stream_id: int, payload: bytes | memoryview) -> None:
        """Agree on the extensions a vyra_base_ipc client offers."""
        server = self.server
        try:
            self.agreement, answer = _hello.accept(payload, server.shared_memory, server.stream_window)
        except DecodeError as error:
            self.reject(stream_id, grpc.StatusCode.INVALID_ARGUMENT, f'malformed Hello: {error}')
            return
        self.accepts_fds = self.agreement.shared_memory is not None
        if self.agreement.receive_window:
            # A client under flow control leaves at most a window and a message unread.
            self.request_backlog_bytes = server.max_message_bytes + max(server.max_message_bytes,
                                                                         self.agreement.receive_window)
        self.send(encode_frame(stream_id, _RESPONSE, 0, encode_ok_response(answer)))

    def reject(self, stream_id: int, code: grpc.StatusCode, details: str) -> None:
        """Answer a stream that never became a call."""
        self.send(encode_frame(stream_id, _RESPONSE, 0, encode_response(number(code), details)))

    # -- lifecycle --------------------------------------------------------------------

    def call_ended(self, call: Call) -> None:
        if self.calls.pop(call.stream_id, None) is not None:
            self.server._call_ended()
        if self.server._stopping and not self.calls:
            self.close()

    def cancel_calls(self) -> list[asyncio.Future[Any]]:
        """Cancel every call; return the tasks of async handlers still unwinding."""
        tasks = [call.task for call in self.calls.values()
                 if call.task is not None and call.handler.is_async and not call.task.done()]
        for call in list(self.calls.values()):
            call.cancel()
        return tasks


class _State(enum.Enum):
    NEW = 'new'
    SERVING = 'serving'
    STOPPING = 'stopping'
    STOPPED = 'stopped'


class TtrpcServer:
    """Serves registered gRPC servicers over ttrpc on a Unix socket.

    The socket follows the rules of the gRPC socket
    (:class:`~vyra_base_ipc._socket_file.SocketFile`): a live server on the path
    is never replaced, a stale file is, the file gets ``socket_mode`` before
    anyone can connect, and it is removed on stop only if it is still ours.

    All coroutine methods run on one event loop, the one :meth:`start` ran
    on; ``async def`` handlers run on it too. ``def`` handlers run in
    ``executor`` (shared with the gRPC lane when the caller passes its pool),
    else in a pool of ``max_workers`` threads owned by this server.

    :param socket_path: where to listen.
    :param services: registrations from :func:`~vyra_base_ipc._methods.record_servicer`.
    :param max_message_bytes: largest request or response message; frames
        may be :data:`~vyra_base_ipc.ttrpc.ENVELOPE_ALLOWANCE` bytes
        larger to hold the envelope.
    :param grace_period: default grace of :meth:`stop`, in seconds.
    :param socket_mode: permission bits of the socket file.
    :param directory_mode: permission bits of parent directories created for it.
    :param socket_group: group id given to the socket file and created
        directories (see :class:`~vyra_base_ipc._socket_file.SocketFile`).
    :param executor: thread pool for ``def`` handlers (not shut down here).
    :param max_workers: size of the pool created when ``executor`` is None.
    :param maximum_concurrent_rpcs: calls above this many in flight (over
        all connections) are refused at once with RESOURCE_EXHAUSTED, as
        gRPC does; ``None`` for no limit.
    :param shared_memory: how large messages travel to and from clients
        that agree on it (vyra_base_ipc's own); ``None`` to keep every message
        inline. Independent ttrpc clients always get inline answers.
    :param stream_window: bytes of streamed requests a client under flow
        control may send on a stream before the handler has read them.
    :raises TypeError, ValueError: invalid path, limit, or a service
        registered twice.
    """

    def __init__(
        self,
        socket_path: StrPath,
        services: Iterable[ServiceRegistration],
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        grace_period: float = DEFAULT_GRACE_PERIOD,
        socket_mode: int = 0o600,
        directory_mode: int = 0o700,
        socket_group: int | None = None,
        executor: futures.Executor | None = None,
        max_workers: int | None = None,
        maximum_concurrent_rpcs: int | None = None,
        shared_memory: SharedMemoryOptions | None = SharedMemoryOptions(),
        stream_window: int = DEFAULT_STREAM_WINDOW,
        limits: ServerLimits = ServerLimits(),
    ) -> None:
        self.socket_path = validate_socket_path(socket_path)
        #: The shared-memory options offered to clients (None if off or unavailable here).
        self.shared_memory = usable_options(shared_memory)
        self.max_message_bytes = validate_max_message_bytes(max_message_bytes)
        self.frame_limit = self.max_message_bytes + ENVELOPE_ALLOWANCE
        self.stream_window = validate_stream_window(stream_window)
        self.grace_period = grace_period
        if maximum_concurrent_rpcs is not None and (
                isinstance(maximum_concurrent_rpcs, bool) or not isinstance(maximum_concurrent_rpcs, int)
                or maximum_concurrent_rpcs < 1):
            raise ValueError(f'maximum_concurrent_rpcs must be a positive int or None, '
                             f'not {maximum_concurrent_rpcs!r}')
        self.maximum_concurrent_rpcs = maximum_concurrent_rpcs
        self._handlers: dict[tuple[str, str], Handler] = {}
        for registration in services:
            if any(service == registration.name for service, _ in self._handlers):
                raise ValueError(f'service {registration.name} is registered twice')
            for name, handler in registration.handlers.items():
                self._handlers[(registration.name, name)] = Handler(registration.name, name, handler)
        self._socket = SocketFile(self.socket_path, socket_mode=socket_mode,
                                  directory_mode=directory_mode, group=socket_group)
        #: Who may connect (checked per connection, beside the socket file's mode).
        self.peer_rule = PeerRule.default(socket_group)
        if not isinstance(limits, ServerLimits):
            raise TypeError(f'limits must be a ServerLimits, not {type(limits).__name__}')
        self.limits = limits
        #: Unread answer bytes one peer may leave: never less than two whole messages.
        self.queue_limit = max(limits.max_queued_bytes, 2 * self.frame_limit)
        self._partial_bytes = 0
        self._refused = 0
        self._refusal_logged_at = -math.inf
        self._given_executor = executor
        self._max_workers = max_workers
        self._executor: futures.Executor | None = executor
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_accepting: Callable[[], None] | None = None
        self._withdrawn: bool | None = None
        self._connections: set[ServerConnection] = set()
        self._state = _State.NEW
        self._stopping = False
        self._active = 0
        self._idle: asyncio.Event | None = None
        self._stop_task: asyncio.Future[None] | None = None
        self._deadlines: DeadlineQueue[Any]

    def refused(self, reason: str) -> None:
        """Log a refused connection: at once, then at most once a second
        with the number refused meanwhile (a flood must not flood the log)."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= 1.0:
            more = f' ({self._refused - 1} more since the last report)' if self._refused > 1 else ''
            _logger.warning('fast lane %s refused a connection: %s%s', self.socket_path, reason, more)
            self._refused = 0
            self._refusal_logged_at = now

    @property
    def method_paths(self) -> tuple[str, ...]:
        """Full paths of the methods served, e.g. ``/vyra.ipc.ModuleService/ExecuteCommand``."""
        return tuple(handler.path for handler in self._handlers.values())

    @property
    def is_serving(self) -> bool:
        return self._state is _State.SERVING

    async def start(self) -> None:
        """Bind, publish the socket file and start accepting connections.

        :raises SocketInUseError: a live server listens on the path already.
        :raises OSError: the path cannot be used (names the path and why).
        :raises RuntimeError: if called twice.
        """
        if self._state is not _State.NEW:
            raise RuntimeError(f'start() called on a ttrpc server that is {self._state.value}')
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._deadlines = DeadlineQueue(self._loop, call_finished, expire_call)
        self._state = _State.STOPPED  # until serving, stop() has nothing to do
        listener: socket.socket | None = None
        try:
            self._socket.check()
            if self._executor is None:
                self._executor = HandlerThreads(self._max_workers, thread_name_prefix='ttrpc-handler')
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(os.fspath(self._socket.private_bind_path()))
            listener.listen(socket.SOMAXCONN)
            self._stop_accepting = accept_connections(self._loop, listener, lambda: ServerConnection(self))
            self._socket.publish()
        except BaseException:
            if self._stop_accepting is not None:
                self._stop_accepting()
            elif listener is not None:
                listener.close()
            self._socket.discard()
            self._shutdown_executor()
            raise
        self._state = _State.SERVING
        _logger.info('ttrpc server serving %d methods on %s', len(self._handlers), self.socket_path)

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving; idempotent and safe to call concurrently.

        Stops accepting at once and removes the socket file (if still ours);
        new calls on open connections get UNAVAILABLE; response streams end
        at once with UNAVAILABLE ("server is shutting down"), their handlers
        cancelled; other calls in flight get ``grace`` seconds (default
        :attr:`grace_period`), then async handlers are cancelled and every
        connection is closed (their clients see UNAVAILABLE). ``def``
        handlers cannot be interrupted: their answers are dropped. Returns
        when all of that is done.
        """
        if self._stop_task is None:
            if self._state is not _State.SERVING:
                self._state = _State.STOPPED
                return
            self._stop_task = asyncio.ensure_future(
                self._shutdown(self.grace_period if grace is None else grace))
        await asyncio.shield(self._stop_task)

    def withdraw(self) -> bool:
        """Stop accepting connections and remove the socket file (if still
        ours): the first step of :meth:`stop`, for an owner that removes
        several socket files at one moment. Idempotent.

        :returns: whether the socket file was removed now.
        """
        if self._withdrawn is None:
            if self._stop_accepting is not None:
                self._stop_accepting()
            self._withdrawn = self._socket.remove()
        return self._withdrawn

    async def __aenter__(self) -> 'TtrpcServer':
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- internals ------------------------------------------------------------------

    def _call_ended(self) -> None:
        self._active -= 1
        if self._active == 0 and self._idle is not None:
            self._idle.set()

    async def _shutdown(self, grace: float) -> None:
        assert self._stop_accepting is not None and self._idle is not None
        self._state = _State.STOPPING
        self._stopping = True
        removed = self.withdraw()
        try:
            for connection in list(self._connections):
                # Streams (watches) would use up the whole grace: they end now.
                for call in list(connection.calls.values()):
                    if call.response_streaming:
                        call.shut_down()
                if not connection.calls:
                    connection.close()
            if self._active:
                self._idle.clear()
                if self._active:
                    try:
                        await asyncio.wait_for(self._idle.wait(), grace)
                    except asyncio.TimeoutError:
                        _logger.info('ttrpc server on %s: %d calls still running after %g s; '
                                     'cancelling them', self.socket_path, self._active, grace)
            tasks: list[asyncio.Future[Any]] = []
            for connection in list(self._connections):
                tasks.extend(connection.cancel_calls())
                connection.close()
            if tasks:
                await asyncio.wait(tasks, timeout=1.0)
            if self._connections:
                await asyncio.sleep(0)  # let closed transports report connection_lost
            for connection in list(self._connections):
                # Still writing to a client that does not read: drop what is left.
                if connection.transport is not None:
                    connection.transport.abort()
        finally:
            self._deadlines.close()
            self._shutdown_executor()
            self._state = _State.STOPPED
        _logger.info('ttrpc server on %s stopped%s', self.socket_path,
                     '' if removed else ' (socket file was not ours any more)')

    def _shutdown_executor(self) -> None:
        if self._executor is not None and self._given_executor is None:
            # def handlers cannot be interrupted; do not wait for them.
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._given_executor
