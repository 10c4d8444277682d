"""Fast-lane clients: one ttrpc connection, calling :class:`~vyra_base_ipc.methods.Method`\\ s.

:class:`AsyncConnection` (asyncio) and :class:`SyncConnection` (blocking,
thread-safe) multiplex any number of concurrent calls of every kind over one
Unix socket connection. Each call carries its deadline to the server
(``timeout_nano``) and its metadata, and fails with the same
:mod:`~vyra_base_ipc.exceptions` types as the gRPC lane:

- :class:`~vyra_base_ipc.exceptions.IPCUnavailableError` when the socket is
  missing, nobody listens, or the connection breaks (the connection is then
  closed for good: open a new one);
- :class:`~vyra_base_ipc.exceptions.IPCTimeoutError` when the deadline passes;
- :class:`~vyra_base_ipc.exceptions.IPCRemoteError` with the server's status
  otherwise.

These are building blocks for :class:`~vyra_base_ipc.IPCHandler` and
:class:`~vyra_base_ipc.SyncIPCHandler`, which choose the lane, pool
connections and reconnect; they do neither.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import select
import socket
import struct
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Union
import warnings

import grpc
from google.protobuf.message import DecodeError

from ..address import StrPath, validate_socket_path
from ..exceptions import IPCError, IPCTimeoutError, IPCUnavailableError, error_from_status
from ..methods import Method
from ..options import DEFAULT_MAX_MESSAGE_BYTES, validate_max_message_bytes, validate_timeout
from .framing import (
    FLAG_NO_DATA,
    FLAG_REMOTE_CLOSED,
    FLAG_REMOTE_OPEN,
    Frame,
    FrameDecoder,
    MessageType,
    OversizedFrame,
    encode_frame,
)
from .deadlines import DeadlineQueue
from .messages import ENVELOPE_ALLOWANCE, Metadata, code_of, decode_response, encode_request, metadata_to_wire

__all__ = ['AsyncConnection', 'SyncConnection']

_REQUEST = int(MessageType.REQUEST)
_RESPONSE = int(MessageType.RESPONSE)
_DATA = int(MessageType.DATA)
_CLOSE_SEND = FLAG_REMOTE_CLOSED | FLAG_NO_DATA
_READ_SIZE = 256 * 1024
_MAX_INT64 = 2**63 - 1

_Item = Union[Frame, OversizedFrame, IPCError]


# -- what both connections share ---------------------------------------------------------------

class _Prepared:
    """A call's request envelope, checked and encoded."""

    __slots__ = ('method', 'service', 'name', 'timeout', 'deadline', 'envelope', 'metadata')

    def __init__(self, method: Method, timeout: float | None, metadata: Metadata | None,
                 payload: bytes) -> None:
        if not isinstance(method, Method):
            raise TypeError(f'method must be a vyra_base_ipc.methods.Method, not {type(method).__name__}')
        self.method = method
        self.service, self.name = _split_path(method.path)
        self.timeout = None if timeout is None else validate_timeout(timeout)
        self.deadline = None if self.timeout is None else time.monotonic() + self.timeout
        self.metadata = metadata_to_wire(metadata) if metadata else ()
        timeout_nano = 0 if self.timeout is None else min(max(1, int(self.timeout * 1e9)), _MAX_INT64)
        self.envelope = encode_request(self.service, self.name, payload, timeout_nano, self.metadata)


_SPLIT_PATHS: dict[str, tuple[str, str]] = {}


def _split_path(path: str) -> tuple[str, str]:
    split = _SPLIT_PATHS.get(path)
    if split is None:
        service, _, name = path.lstrip('/').rpartition('/')
        if not service or not name:
            raise ValueError(f'method path {path!r} is not of the form /package.Service/Method')
        split = _SPLIT_PATHS[path] = (service, name)
    return split


def _serialize(method: Method, message: Any, limit: int) -> bytes:
    serialize = method.request_serializer
    payload = serialize(message) if serialize is not None else message
    if len(payload) > limit:
        raise error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f'Sent message larger than max ({len(payload)} vs. {limit})',
                                method=method.path)
    return payload


def _deserialize(method: Method, payload: bytes) -> Any:
    deserialize = method.response_deserializer
    return deserialize(payload) if deserialize is not None else payload


def _check_kind(method: Method, response_streaming: bool) -> None:
    if not isinstance(method, Method):
        raise TypeError(f'method must be a vyra_base_ipc.methods.Method, not {type(method).__name__}')
    if method.kind.response_streaming != response_streaming:
        use = 'stream' if method.kind.response_streaming else 'call'
        raise TypeError(f'{method.path} is a {method.kind.value} method: call it with {use}()')


def _timeout_error(method: Method) -> IPCTimeoutError:
    return IPCTimeoutError(grpc.StatusCode.DEADLINE_EXCEEDED, 'Deadline Exceeded', method=method.path)


def _connect_error(path: str, error: OSError) -> IPCUnavailableError:
    if isinstance(error, FileNotFoundError):
        details = f'socket {path!r} does not exist (is the IPC server running?)'
    elif isinstance(error, ConnectionRefusedError):
        details = f'no server answers on {path!r} (stale socket file?)'
    elif isinstance(error, PermissionError):
        details = f'not allowed to connect to {path!r}: {error.strerror}'
    else:
        details = f'cannot connect to {path!r}: {error}'
    return IPCUnavailableError(grpc.StatusCode.UNAVAILABLE, details)


def _lost(path: str, reason: object) -> IPCUnavailableError:
    return IPCUnavailableError(grpc.StatusCode.UNAVAILABLE,
                               f'connection to {path!r} lost: {reason}')


class _Outcome:
    """Interprets the frames of one call, for both connection kinds."""

    __slots__ = ('method', 'limit')

    def __init__(self, method: Method, limit: int) -> None:
        self.method = method
        self.limit = limit

    def unary(self, item: _Item) -> Any:
        """The response of a unary-response call from its first item."""
        if isinstance(item, IPCError):
            raise item.error if isinstance(item, _SenderFailed) else item
        if item.__class__ is OversizedFrame:
            raise self._oversized(item)  # type: ignore[arg-type]
        if item.type != _RESPONSE:
            raise error_from_status(grpc.StatusCode.INTERNAL,
                                    f'protocol error: got a frame of type {item.type} instead of the '
                                    'response', method=self.method.path)
        code, payload = self._response(item)  # type: ignore[arg-type]
        return _deserialize(self.method, payload)

    def streamed(self, item: _Item) -> tuple[bool, bytes | None]:
        """(stream ended, payload or None) for one item of a response stream."""
        if isinstance(item, IPCError):
            raise item.error if isinstance(item, _SenderFailed) else item
        if item.__class__ is OversizedFrame:
            raise self._oversized(item)  # type: ignore[arg-type]
        frame: Frame = item  # type: ignore[assignment]
        if frame.type == _DATA:
            ended = bool(frame.flags & FLAG_REMOTE_CLOSED)
            return ended, None if frame.flags & FLAG_NO_DATA else frame.data
        if frame.type == _RESPONSE:
            _, payload = self._response(frame)
            # A stream may end with an OK response; only a non-empty payload
            # in it is a last message (an empty one is the bare end).
            return True, payload or None
        raise error_from_status(grpc.StatusCode.INTERNAL,
                                f'protocol error: got a frame of type {frame.type} on a response stream',
                                method=self.method.path)

    def _response(self, frame: Frame) -> tuple[int, bytes]:
        try:
            code, message, payload = decode_response(frame.data)
        except DecodeError as error:
            raise error_from_status(grpc.StatusCode.INTERNAL, f'malformed response from server: {error}',
                                    method=self.method.path) from None
        if code:
            raise error_from_status(code_of(code), message, method=self.method.path)
        if len(payload) > self.limit:
            raise self._too_large(len(payload))
        return code, payload

    def _oversized(self, item: OversizedFrame) -> IPCError:
        return self._too_large(item.length)

    def _too_large(self, size: int) -> IPCError:
        return error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f'Received message larger than max ({size} vs. {self.limit})',
                                 method=self.method.path)


# -- asyncio -----------------------------------------------------------------------------------

class _AsyncStream:
    """Frames received for one call, with a waiter for the next."""

    __slots__ = ('items', 'waiter', 'loop')

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: collections.deque[_Item] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None

    def push(self, item: _Item) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> _Item:
        while not self.items:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.items.popleft()


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, path: str, frame_limit: int) -> None:
        self.path = path
        self.loop = asyncio.get_running_loop()
        self.decoder = FrameDecoder(frame_limit)
        self.transport: asyncio.Transport | None = None
        # A unary call waits on a future (the fast path), a stream on a queue.
        self.streams: dict[int, asyncio.Future[_Item] | _AsyncStream] = {}
        self.next_id = 1
        self.error: IPCUnavailableError | None = None
        self.write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._pending: list[bytes] = []
        self._flush_scheduled = False
        self.deadlines: DeadlineQueue[asyncio.Future[_Item]] = DeadlineQueue(
            self.loop, asyncio.Future.done, _expire)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            self.error = _lost(self.path, exc or 'closed by the server')
        for target in self.streams.values():
            self._deliver(target, self.error)
        self.streams.clear()
        self.deadlines.close()
        self.write_paused = False
        self._wake_drainers()

    def data_received(self, data: bytes) -> None:
        streams = self.streams
        for item in self.decoder.feed(data):
            target = streams.get(item.stream_id)
            if target is not None:  # else: a call that gave up (deadline) or a stray frame
                self._deliver(target, item)

    def eof_received(self) -> bool:
        return False

    @staticmethod
    def _deliver(target: asyncio.Future[_Item] | _AsyncStream, item: _Item) -> None:
        if target.__class__ is _AsyncStream:
            target.push(item)  # type: ignore[union-attr]
        elif not target.done():  # type: ignore[union-attr]
            target.set_result(item)  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drainers()

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        if self.write_paused and self.error is None:
            waiter = self.loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter
        if self.error is not None:
            raise self.error

    def open(self, target: asyncio.Future[_Item] | _AsyncStream, flags: int, envelope: bytes) -> int:
        """Register a call and send its request; ids increase on the wire
        because nothing else runs between allocation and write."""
        if self.error is not None:
            raise self.error
        stream_id = self.next_id
        self.next_id += 2
        self.streams[stream_id] = target
        self.send(encode_frame(stream_id, _REQUEST, flags, envelope))
        return stream_id

    def send(self, frame: bytes) -> None:
        """Write a frame: at once for a lone call; while other calls are in
        flight, at the end of this turn of the event loop, together with the
        frames of the other tasks (one send instead of one per call)."""
        if self.error is not None:
            raise self.error
        if len(self.streams) > 1:
            self._pending.append(frame)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.loop.call_soon(self._flush)
        elif self._pending:
            self._pending.append(frame)
            self._flush()
        else:
            assert self.transport is not None
            self.transport.write(frame)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._pending and self.error is None:
            assert self.transport is not None
            self.transport.write(b''.join(self._pending))
        self._pending.clear()


class AsyncConnection:
    """One ttrpc connection for asyncio code.

    Open it with ``await AsyncConnection.connect(path)`` (or ``async with``).
    Bound to the event loop it was opened on; any number of tasks of that
    loop may call concurrently (one connection multiplexes them). Not
    thread-safe. A broken connection stays broken: :attr:`is_closed` turns
    true and every call raises :class:`IPCUnavailableError`.

    Deadlines: ``timeout`` (seconds) per call, ``None`` for no deadline. The
    server is told the deadline and stops the handler when it passes; the
    client gives up at the deadline even if the server does not answer.
    """

    def __init__(self, socket_path: str, transport: asyncio.Transport, protocol: _ClientProtocol,
                 max_message_bytes: int) -> None:
        self.socket_path = socket_path
        self.max_message_bytes = max_message_bytes
        self._transport = transport
        self._protocol = protocol

    @classmethod
    async def connect(cls, socket_path: StrPath, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                      timeout: float | None = None) -> 'AsyncConnection':
        """Connect to the ttrpc server on ``socket_path``.

        :param max_message_bytes: largest message sent or accepted.
        :param timeout: seconds to wait for the connection (a Unix socket
            connects at once or fails at once unless the backlog is full).
        :raises IPCUnavailableError: no socket, nobody listening, not allowed.
        :raises TypeError, ValueError: invalid arguments.
        """
        path = os.fspath(validate_socket_path(socket_path))
        limit = validate_max_message_bytes(max_message_bytes)
        if timeout is not None:
            validate_timeout(timeout)
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await asyncio.wait_for(
                loop.create_unix_connection(lambda: _ClientProtocol(path, limit + ENVELOPE_ALLOWANCE),
                                            path),
                timeout)
        except asyncio.TimeoutError:
            raise IPCUnavailableError(
                grpc.StatusCode.UNAVAILABLE,
                f'no server accepted a connection on {path!r} within {timeout:g} s') from None
        except OSError as error:
            raise _connect_error(path, error) from None
        return cls(path, transport, protocol, limit)  # type: ignore[arg-type]

    @property
    def is_closed(self) -> bool:
        """Whether the connection was closed or broke; calls would fail."""
        return self._protocol.error is not None

    async def close(self) -> None:
        """Close the connection; calls in flight fail with
        :class:`IPCUnavailableError`. Idempotent."""
        protocol = self._protocol
        if protocol.error is None:
            protocol.error = IPCUnavailableError(grpc.StatusCode.UNAVAILABLE,
                                                 f'connection to {self.socket_path!r} was closed')
        if not self._transport.is_closing():
            self._transport.close()
            await asyncio.sleep(0)  # let connection_lost run on this loop

    async def __aenter__(self) -> 'AsyncConnection':
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        transport = getattr(self, '_transport', None)
        if transport is not None and not transport.is_closing():
            _warn(f'unclosed ttrpc AsyncConnection to {self.socket_path!r}', ResourceWarning,
                  source=self)
            try:
                transport.close()
            except RuntimeError:  # its event loop is closed already
                pass

    async def call(self, method: Method, request: Any, *, timeout: float | None = None,
                   metadata: Metadata | None = None) -> Any:
        """Call a unary-response method (``unary_unary`` or ``stream_unary``)
        and return its response.

        :param request: the request message; for ``stream_unary`` an iterable
            or async iterable of them.
        :raises TypeError: the method streams responses (use :meth:`stream`).
        :raises IPCUnavailableError, IPCTimeoutError, IPCRemoteError: the call failed.
        """
        try:
            _check_kind(method, False)
            protocol = self._protocol
            self._check_loop(protocol)
            outcome = _Outcome(method, self.max_message_bytes)
            if method.kind.request_streaming:
                stream = _AsyncStream(protocol.loop)
                prepared = _Prepared(method, timeout, metadata, b'')
                stream_id = protocol.open(stream, FLAG_REMOTE_OPEN, prepared.envelope)
                sender = protocol.loop.create_task(self._send_requests(stream_id, method, request, stream))
                try:
                    item = await self._within(stream.next(), prepared)
                finally:
                    protocol.streams.pop(stream_id, None)
                    sender.cancel()
                return outcome.unary(item)
            prepared = _Prepared(method, timeout, metadata,
                                 _serialize(method, request, self.max_message_bytes))
            future: asyncio.Future[_Item] = protocol.loop.create_future()
            stream_id = protocol.open(future, 0, prepared.envelope)
            if prepared.timeout is not None:
                protocol.deadlines.add(protocol.loop.time() + prepared.timeout, future, method)
            try:
                item = await future
            finally:
                protocol.streams.pop(stream_id, None)
            return outcome.unary(item)
        except IPCError as error:
            # One error object fails every call of a broken connection: name this call.
            raise error.for_method(method.path) from None

    async def stream(self, method: Method, request: Any, *, timeout: float | None = None,
                     metadata: Metadata | None = None) -> AsyncIterator[Any]:
        """Call a response-streaming method (``unary_stream`` or
        ``stream_stream``); iterate over its responses.

        The deadline covers the whole stream. Leaving the iteration early
        abandons the call (ttrpc has no cancel message: the server's handler
        runs on until it ends or its deadline passes; its answers are dropped).

        :param request: the request message; for ``stream_stream`` an
            iterable or async iterable of them, sent concurrently with
            receiving.
        :raises TypeError: the method does not stream responses (use :meth:`call`).
        :raises IPCUnavailableError, IPCTimeoutError, IPCRemoteError: the call failed.
        """
        try:
            _check_kind(method, True)
            protocol = self._protocol
            self._check_loop(protocol)
            outcome = _Outcome(method, self.max_message_bytes)
            stream = _AsyncStream(protocol.loop)
            sender = None
            if method.kind.request_streaming:
                prepared = _Prepared(method, timeout, metadata, b'')
                stream_id = protocol.open(stream, FLAG_REMOTE_OPEN, prepared.envelope)
                sender = protocol.loop.create_task(self._send_requests(stream_id, method, request, stream))
            else:
                prepared = _Prepared(method, timeout, metadata,
                                     _serialize(method, request, self.max_message_bytes))
                stream_id = protocol.open(stream, FLAG_REMOTE_CLOSED, prepared.envelope)
            try:
                while True:
                    ended, payload = outcome.streamed(await self._within(stream.next(), prepared))
                    if payload is not None:
                        yield _deserialize(method, payload)
                    if ended:
                        return
            finally:
                protocol.streams.pop(stream_id, None)
                if sender is not None:
                    sender.cancel()
        except IPCError as error:
            # One error object fails every call of a broken connection: name this call.
            raise error.for_method(method.path) from None

    @staticmethod
    def _check_loop(protocol: _ClientProtocol) -> None:
        if asyncio.get_running_loop() is not protocol.loop:
            raise RuntimeError('this AsyncConnection belongs to another event loop; '
                               'open one per loop')

    async def _within(self, waiting: Any, prepared: _Prepared) -> _Item:
        if prepared.deadline is None:
            return await waiting
        remaining = prepared.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(waiting, max(remaining, 0))
        except asyncio.TimeoutError:
            raise _timeout_error(prepared.method) from None

    async def _send_requests(self, stream_id: int, method: Method, requests: Any,
                             stream: _AsyncStream) -> None:
        """Send a request stream as data frames, then close it. A failure
        (the iterator raised, a message too large) ends the call with it."""
        protocol = self._protocol
        try:
            if hasattr(requests, '__aiter__'):
                async for message in requests:
                    await self._send_data(stream_id, _serialize(method, message, self.max_message_bytes))
            else:
                for message in requests:
                    await self._send_data(stream_id, _serialize(method, message, self.max_message_bytes))
            protocol.send(encode_frame(stream_id, _DATA, _CLOSE_SEND))
        except asyncio.CancelledError:
            raise
        except IPCError as error:
            stream.push(error)
        except Exception as error:
            # The caller's own iterator failed: give the caller its exception.
            stream.push(_SenderFailed(error))  # type: ignore[arg-type]
            if protocol.error is None:
                protocol.send(encode_frame(stream_id, _DATA, _CLOSE_SEND))

    async def _send_data(self, stream_id: int, payload: bytes) -> None:
        protocol = self._protocol
        protocol.send(encode_frame(stream_id, _DATA, 0, payload))
        if protocol.write_paused:
            await protocol.drain()


class _SenderFailed(IPCError):
    """Carries an exception raised by the caller's request iterator; re-raised as is."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        super().__init__(grpc.StatusCode.CANCELLED, f'request iterator raised {error!r}')


def _expire(future: asyncio.Future[_Item], method: Method) -> None:
    if not future.done():
        future.set_result(_timeout_error(method))


# -- blocking ----------------------------------------------------------------------------------

class _Timeout(Exception):
    pass


class _SyncStream:
    """Frames received for one call; its waiter sleeps on ``condition``
    (made the first time it has to wait: a lone caller never does)."""

    __slots__ = ('items', 'condition', 'waiting', 'abandoned')

    def __init__(self) -> None:
        self.items: collections.deque[_Item] = collections.deque()
        self.condition: threading.Condition | None = None
        self.waiting = False
        self.abandoned = False


class SyncConnection:
    """One ttrpc connection for blocking code; thread-safe.

    Open it with :meth:`connect`. Any number of threads may call at once
    over the one connection. No background thread reads: a calling thread
    waiting for its answer reads the socket for everyone and hands answers to
    the other waiting threads, so a lone call is one write and one read
    (the fast path of a request/response protocol). Request streams are
    sent from a short-lived helper thread per call.

    Every call blocks for at most its ``timeout`` (seconds; ``None`` for no
    deadline). A broken connection stays broken: :attr:`is_closed` turns true
    and calls raise :class:`IPCUnavailableError`. After ``fork()`` the child
    must open its own connection (:attr:`is_closed` is true there).
    """

    def __init__(self, socket_path: str, sock: socket.socket, max_message_bytes: int) -> None:
        self.socket_path = socket_path
        self.max_message_bytes = max_message_bytes
        self._sock = sock
        self._pid = os.getpid()
        self._decoder = FrameDecoder(max_message_bytes + ENVELOPE_ALLOWANCE)
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._streams: dict[int, _SyncStream] = {}
        self._next_id = 1
        self._reading = False
        self._error: IPCUnavailableError | None = None
        # The receive timeout set on the socket (SO_RCVTIMEO), 0 for none.
        self._receive_timeout: float | None = None
        self._poll_out = select.poll()
        self._poll_out.register(sock.fileno(), select.POLLOUT)

    @classmethod
    def connect(cls, socket_path: StrPath, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                timeout: float | None = None) -> 'SyncConnection':
        """Connect to the ttrpc server on ``socket_path``.

        :param timeout: seconds to wait for the connection to be accepted.
        :raises IPCUnavailableError: no socket, nobody listening, not allowed.
        :raises TypeError, ValueError: invalid arguments.
        """
        path = os.fspath(validate_socket_path(socket_path))
        limit = validate_max_message_bytes(max_message_bytes)
        if timeout is not None:
            validate_timeout(timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            # Blocking mode, deadlines by SO_RCVTIMEO and MSG_DONTWAIT: a
            # thread asleep in recv() is woken as the sender's 'sync' wakeup
            # (often on the sender's CPU), one asleep in poll() is not; on the
            # test machine poll()+recv() cost ~35 us more per round trip.
            sock.settimeout(None)
        except socket.timeout:
            sock.close()
            raise IPCUnavailableError(
                grpc.StatusCode.UNAVAILABLE,
                f'no server accepted a connection on {path!r} within {timeout:g} s') from None
        except OSError as error:
            sock.close()
            raise _connect_error(path, error) from None
        return cls(path, sock, limit)

    @property
    def is_closed(self) -> bool:
        """Whether the connection was closed, broke, or belongs to the parent
        of this (forked) process."""
        return self._error is not None or self._pid != os.getpid()

    def close(self) -> None:
        """Close the connection; calls in flight fail with
        :class:`IPCUnavailableError`. Idempotent."""
        self._broken(IPCUnavailableError(grpc.StatusCode.UNAVAILABLE,
                                         f'connection to {self.socket_path!r} was closed'))

    def __enter__(self) -> 'SyncConnection':
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        sock = getattr(self, '_sock', None)
        if sock is not None and sock.fileno() >= 0 and getattr(self, '_pid', None) == os.getpid():
            _warn(f'unclosed ttrpc SyncConnection to {self.socket_path!r}', ResourceWarning,
                  source=self)
            sock.close()

    # -- calls ------------------------------------------------------------------------

    def call(self, method: Method, request: Any, *, timeout: float | None = None,
             metadata: Metadata | None = None) -> Any:
        """Call a unary-response method (``unary_unary`` or ``stream_unary``);
        block for at most the deadline.

        :param request: the request message; for ``stream_unary`` an iterable
            of them (consumed in a helper thread).
        :raises TypeError: the method streams responses (use :meth:`stream`).
        :raises IPCUnavailableError, IPCTimeoutError, IPCRemoteError: the call failed.
        """
        try:
            _check_kind(method, False)
            outcome = _Outcome(method, self.max_message_bytes)
            prepared, stream, stream_id = self._start(method, request, timeout, metadata)
            try:
                return outcome.unary(self._next(stream, prepared))
            finally:
                self._forget(stream_id, stream)
        except IPCError as error:
            # One error object fails every call of a broken connection: name this call.
            raise error.for_method(method.path) from None

    def stream(self, method: Method, request: Any, *, timeout: float | None = None,
               metadata: Metadata | None = None) -> Iterator[Any]:
        """Call a response-streaming method; iterate over its responses.

        The deadline covers the whole stream; leaving the iteration early
        abandons the call (its later answers are dropped).

        :param request: the request message; for ``stream_stream`` an iterable
            of them (consumed in a helper thread, concurrently with receiving).
        :raises TypeError: the method does not stream responses (use :meth:`call`).
        :raises IPCUnavailableError, IPCTimeoutError, IPCRemoteError: the call failed.
        """
        try:
            _check_kind(method, True)
            outcome = _Outcome(method, self.max_message_bytes)
            prepared, stream, stream_id = self._start(method, request, timeout, metadata)
            try:
                while True:
                    ended, payload = outcome.streamed(self._next(stream, prepared))
                    if payload is not None:
                        yield _deserialize(method, payload)
                    if ended:
                        return
            finally:
                self._forget(stream_id, stream)

        # -- sending ----------------------------------------------------------------------
        except IPCError as error:
            # One error object fails every call of a broken connection: name this call.
            raise error.for_method(method.path) from None

    def _start(self, method: Method, request: Any, timeout: float | None,
               metadata: Metadata | None) -> tuple[_Prepared, _SyncStream, int]:
        """Send the request (or open the request stream) of a new call."""
        if method.kind.request_streaming:
            prepared = _Prepared(method, timeout, metadata, b'')
        else:
            prepared = _Prepared(method, timeout, metadata,
                                 _serialize(method, request, self.max_message_bytes))
        stream = _SyncStream()
        return prepared, stream, self._open(stream, prepared, request)

    def _open(self, stream: _SyncStream, prepared: _Prepared, request: Any) -> int:
        method = prepared.method
        if method.kind.request_streaming:
            flags = FLAG_REMOTE_OPEN
        else:
            flags = FLAG_REMOTE_CLOSED if method.kind.response_streaming else 0
        if self._pid != os.getpid():
            # Checked before taking any lock: a lock held at fork() time by
            # another thread of the parent is never released in the child.
            raise IPCUnavailableError(grpc.StatusCode.UNAVAILABLE,
                                      'this ttrpc connection belongs to the parent process; '
                                      'open a new one after fork()')
        self._acquire_send(prepared)
        try:
            with self._state_lock:
                if self._error is not None:
                    raise self._error
                stream_id = self._next_id
                self._next_id += 2
                self._streams[stream_id] = stream
            try:
                self._send_locked(encode_frame(stream_id, _REQUEST, flags, prepared.envelope),
                                  prepared)
            except BaseException:
                self._forget(stream_id, stream)
                raise
        finally:
            self._send_lock.release()
        if method.kind.request_streaming:
            threading.Thread(target=self._send_requests, args=(stream_id, stream, prepared, request),
                             name=f'ttrpc-send-{stream_id}', daemon=True).start()
        return stream_id

    def _acquire_send(self, prepared: _Prepared) -> None:
        if prepared.deadline is None:
            self._send_lock.acquire()
        elif not self._send_lock.acquire(timeout=max(prepared.deadline - time.monotonic(), 0)):
            raise _timeout_error(prepared.method)

    def _send_locked(self, data: bytes, prepared: _Prepared) -> None:
        """Write all of ``data`` within the call's deadline (send lock held).

        A frame written only in part cannot be taken back: if the deadline
        passes mid-frame the connection is closed, since the stream of frames
        is no longer in sync.
        """
        view = memoryview(data)
        sent_any = False
        sock = self._sock
        while view:
            try:
                sent = sock.send(view, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not self._wait_writable(prepared.deadline):
                    if sent_any:
                        self._broken(_lost(self.socket_path, 'a frame could not be sent in time'))
                    raise _timeout_error(prepared.method) from None
                continue
            except OSError as error:
                lost = _lost(self.socket_path, error.strerror or error)
                self._broken(lost)
                raise lost from None
            sent_any = True
            view = view[sent:]

    def _wait_writable(self, deadline: float | None) -> bool:
        return bool(self._poll_out.poll(_poll_ms(deadline)) or deadline is None)

    def _send_requests(self, stream_id: int, stream: _SyncStream, prepared: _Prepared,
                       requests: Iterable[Any]) -> None:
        method = prepared.method
        try:
            for message in requests:
                if stream.abandoned:
                    return
                self._send_frame(encode_frame(stream_id, _DATA, 0,
                                              _serialize(method, message, self.max_message_bytes)),
                                 prepared)
            if not stream.abandoned:
                self._send_frame(encode_frame(stream_id, _DATA, _CLOSE_SEND), prepared)
        except IPCError as error:
            self._deliver(stream, error)
        except Exception as error:
            self._deliver(stream, _SenderFailed(error))
            try:
                self._send_frame(encode_frame(stream_id, _DATA, _CLOSE_SEND), prepared)
            except IPCError:
                pass

    def _send_frame(self, frame: bytes, prepared: _Prepared) -> None:
        self._acquire_send(prepared)
        try:
            if self._error is not None:
                raise self._error
            self._send_locked(frame, prepared)
        finally:
            self._send_lock.release()

    # -- receiving --------------------------------------------------------------------

    def _next(self, stream: _SyncStream, prepared: _Prepared) -> _Item:
        """The next item of ``stream``: wait for another thread to read it,
        or read the socket ourselves while nobody else does."""
        deadline = prepared.deadline
        with self._state_lock:
            while True:
                if stream.items:
                    item = stream.items.popleft()
                    if not self._reading:
                        self._wake_a_waiter()
                    return item
                if self._error is not None:
                    raise self._error
                if not self._reading:
                    self._reading = True
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise _timeout_error(prepared.method)
                if stream.condition is None:
                    stream.condition = threading.Condition(self._state_lock)
                stream.waiting = True
                try:
                    stream.condition.wait(remaining)
                finally:
                    stream.waiting = False
        try:
            while True:
                self._read(deadline)
                with self._state_lock:
                    if stream.items:
                        return stream.items.popleft()
                    if self._error is not None:
                        raise self._error
        except _Timeout:
            raise _timeout_error(prepared.method) from None
        finally:
            with self._state_lock:
                self._reading = False
                self._wake_a_waiter()
                if self._error is not None:
                    self._sock.close()  # deferred by _broken() while we were reading

    def _wake_a_waiter(self) -> None:
        # (state lock held) Someone must read for the threads still waiting.
        for other in self._streams.values():
            if other.waiting:
                other.condition.notify()  # type: ignore[union-attr]
                return

    def _read(self, deadline: float | None) -> None:
        """Read once (as the reading thread) and hand out what arrived.

        :raises _Timeout: the deadline passed.
        """
        if self._error is not None:
            return
        self._limit_receive(deadline)
        try:
            data = self._sock.recv(_READ_SIZE)
        except (BlockingIOError, TimeoutError):  # SO_RCVTIMEO expired
            if deadline is not None and time.monotonic() >= deadline:
                raise _Timeout() from None
            return
        except OSError as error:
            self._broken(_lost(self.socket_path, error.strerror or error))
            return
        if not data:
            self._broken(_lost(self.socket_path, 'closed by the server'))
            return
        items = self._decoder.feed(data)
        with self._state_lock:
            streams = self._streams
            for item in items:
                target = streams.get(item.stream_id)
                if target is not None:
                    target.items.append(item)
                    if target.waiting:
                        target.condition.notify()  # type: ignore[union-attr]

    def _limit_receive(self, deadline: float | None) -> None:
        """Make the next recv() return by ``deadline`` (SO_RCVTIMEO).

        The option is set only when it must change: a value set for an
        earlier call is kept while it ends no later than 1 ms after this
        deadline and no sooner than 50 ms before it (then the read just
        wakes early and is repeated), so calls with one usual timeout cost
        no extra system call.
        """
        if deadline is None:
            wanted = 0.0
        else:
            wanted = deadline - time.monotonic()
            if wanted <= 0:
                raise _Timeout()
        current = self._receive_timeout
        if current is not None:
            if wanted == 0.0 and current == 0.0:
                return
            if current and wanted and wanted - 0.05 <= current <= wanted + 0.001:
                return
        seconds = int(wanted)
        microseconds = int((wanted - seconds) * 1e6)
        if wanted and not seconds and not microseconds:
            microseconds = 1  # 0 would mean no timeout at all
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                              struct.pack('@ll', seconds, microseconds))
        self._receive_timeout = wanted

    def _deliver(self, stream: _SyncStream, item: _Item) -> None:
        with self._state_lock:
            stream.items.append(item)
            if stream.waiting:
                stream.condition.notify()  # type: ignore[union-attr]

    def _forget(self, stream_id: int, stream: _SyncStream) -> None:
        stream.abandoned = True
        with self._state_lock:
            self._streams.pop(stream_id, None)

    def _broken(self, error: IPCUnavailableError) -> None:
        with self._state_lock:
            if self._error is not None:
                return
            self._error = error
            for stream in self._streams.values():
                if stream.condition is not None:
                    stream.condition.notify_all()
            if self._pid == os.getpid():
                try:
                    # Wakes a thread blocked in poll() on this socket.
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if not self._reading:
                # (Otherwise the reading thread closes it when it stops: its
                # poll() must not see the descriptor number reused.)
                self._sock.close()


def _poll_ms(deadline: float | None) -> int:
    if deadline is None:
        return -1
    return max(0, math.ceil((deadline - time.monotonic()) * 1000))

