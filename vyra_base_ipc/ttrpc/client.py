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
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Sequence, Union
import warnings

import grpc
from google.protobuf.message import DecodeError

from ..address import StrPath, validate_socket_path
from ..busy_poll import DEFAULT_BUSY_POLL, BusyPoll, validate_busy_poll
from ..exceptions import IPCError, IPCRemoteError, IPCTimeoutError, IPCUnavailableError, error_from_status
from ..methods import Method, MethodKind
from ..options import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TIMEOUT, validate_max_message_bytes, validate_timeout
from ..payload import SharedMemoryError, SharedMemoryOptions, TooLargeError, close_fds, usable_options
from ..shared_buffer import ReceivedBuffers, SharedBuffer, check_buffers, inline_request
from .framing import (
    FLAG_NO_DATA,
    FLAG_REMOTE_CLOSED,
    FLAG_REMOTE_OPEN,
    FLAG_SHARED_MEMORY,
    MAX_BATCH_FDS,
    MAX_QUEUED_FDS,
    Frame,
    FrameDecoder,
    MessageType,
    OversizedFrame,
    encode_frame,
)
from .deadlines import DeadlineQueue
from .messages import (
    ENVELOPE_ALLOWANCE,
    HELLO_METHOD,
    HELLO_SERVICE,
    Metadata,
    code_of,
    decode_response,
    encode_hello,
    encode_request,
    metadata_to_wire,
)
from .shared_memory import pack, unpack
from .transport import MAX_FDS_PER_READ, UnixTransport, received_fds, rights

__all__ = ['AsyncConnection', 'SyncConnection']

_REQUEST = int(MessageType.REQUEST)
_RESPONSE = int(MessageType.RESPONSE)
_DATA = int(MessageType.DATA)
_CLOSE_SEND = FLAG_REMOTE_CLOSED | FLAG_NO_DATA
_READ_SIZE = 256 * 1024
_MAX_INT64 = 2**63 - 1

_Item = Union[Frame, OversizedFrame, IPCError]

#: The call that agrees on shared memory for a connection.
_HELLO = Method(name=HELLO_METHOD, path=f'/{HELLO_SERVICE}/{HELLO_METHOD}',
                kind=MethodKind.UNARY_UNARY, request_serializer=None, response_deserializer=None)
_ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_READ * 4)
#: What socket.recvmsg() returns: data, ancillary data, flags, address.
_Received = tuple[bytes, list[tuple[int, int, bytes]], int, Any]
_MSG_CMSG_CLOEXEC = getattr(socket, 'MSG_CMSG_CLOEXEC', 0x40000000)


# -- what both connections share ---------------------------------------------------------------

class _Prepared:
    """A call's request envelope, checked and encoded, with the descriptors
    to pass with it (owned until sent: :meth:`discard` on failure)."""

    __slots__ = ('method', 'service', 'name', 'timeout', 'deadline', 'envelope', 'metadata',
                 'flags', 'fds')

    def __init__(self, method: Method, timeout: float | None, metadata: Metadata | None,
                 payload: bytes, shared: SharedMemoryOptions | None = None,
                 buffers: Sequence[SharedBuffer] = ()) -> None:
        if not isinstance(method, Method):
            raise TypeError(f'method must be a vyra_base_ipc.methods.Method, not {type(method).__name__}')
        self.method = method
        self.service, self.name = _split_path(method.path)
        self.timeout = None if timeout is None else validate_timeout(timeout)
        self.deadline = None if self.timeout is None else time.monotonic() + self.timeout
        self.metadata = metadata_to_wire(metadata) if metadata else ()
        timeout_nano = 0 if self.timeout is None else min(max(1, int(self.timeout * 1e9)), _MAX_INT64)
        self.flags = 0
        self.fds: list[int] = []
        if shared is not None:
            packed = _pack(method, payload, shared, buffers)
            if packed is not None:
                payload, self.fds = packed  # type: ignore[assignment]
                self.flags = FLAG_SHARED_MEMORY
        self.envelope = encode_request(self.service, self.name, payload, timeout_nano, self.metadata)

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def discard(self) -> None:
        close_fds(self.take_fds())


def _pack(method: Method, payload: bytes, shared: SharedMemoryOptions,
          buffers: Sequence[SharedBuffer] = ()) -> tuple[bytes, list[int]] | None:
    try:
        return pack(payload, shared.threshold, buffers)
    except SharedMemoryError as error:
        raise error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error),
                                method=method.path) from None


def _request_payload(method: Method, message: Any, limit: int, shared: SharedMemoryOptions | None,
                     buffers: Sequence[SharedBuffer]) -> bytes:
    """The serialized request of a unary-request call. Explicit buffers go
    inline into the message (a copy) when the connection cannot pass them."""
    if shared is None:
        message = inline_request(method.path, method.kind.request_streaming, message, buffers)
    else:
        _check_buffers(method, buffers)
    return _serialize(method, message, limit)


def _check_buffers(method: Method, buffers: Sequence[SharedBuffer]) -> None:
    if buffers:
        check_buffers(method.path, method.kind.request_streaming, buffers)


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


def _resolve_shared(frame: Frame, take_fds: Callable[[int], list[int]], message_limit: int,
                    buffer_limit: int) -> _Item:
    """A frame flagged :data:`FLAG_SHARED_MEMORY` with its message fetched
    from shared memory (as a read-only view), or the error to give its call.
    Must run as frames arrive, in order: it takes the frame's descriptors.

    :raises ValueError: fewer descriptors arrived than the frame announced
        (the connection is out of step and must close).
    """
    try:
        if frame.type == _RESPONSE:
            code, message, manifest = decode_response(frame.data)
            if code:
                return error_from_status(code_of(code), message)
        elif frame.type == _DATA:
            manifest = frame.data
        else:
            return error_from_status(grpc.StatusCode.INTERNAL,
                                     f'protocol error: shared memory on a frame of type {frame.type}')
        payload, buffers = unpack(manifest, take_fds, message_limit, buffer_limit, 'the response')
    except DecodeError as error:
        return error_from_status(grpc.StatusCode.INTERNAL, f'malformed response from server: {error}')
    except TooLargeError as error:
        return error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
    except SharedMemoryError as error:
        return error_from_status(grpc.StatusCode.INTERNAL, str(error))
    return Frame(frame.stream_id, frame.type, frame.flags, payload, buffers)  # type: ignore[arg-type]


def _connect_arguments(socket_path: StrPath, max_message_bytes: int, timeout: float | None,
                       shared_memory: SharedMemoryOptions | None
                       ) -> tuple[str, int, float, SharedMemoryOptions | None]:
    """The checked arguments of a connect(): path, message limit, timeout,
    shared-memory options usable here.

    :raises TypeError, ValueError: invalid arguments.
    """
    return (os.fspath(validate_socket_path(socket_path)), validate_max_message_bytes(max_message_bytes),
            DEFAULT_TIMEOUT if timeout is None else validate_timeout(timeout),
            usable_options(shared_memory))


def _not_accepted(path: str, timeout: float) -> IPCUnavailableError:
    return IPCUnavailableError(grpc.StatusCode.UNAVAILABLE,
                               f'no server accepted a connection on {path!r} within {timeout:g} s')


def _lost(path: str, reason: object) -> IPCUnavailableError:
    return IPCUnavailableError(grpc.StatusCode.UNAVAILABLE,
                               f'connection to {path!r} lost: {reason}')


class _Outcome:
    """Interprets the frames of one call, for both connection kinds."""

    __slots__ = ('method', 'limit')

    def __init__(self, method: Method, limit: int) -> None:
        self.method = method
        self.limit = limit

    def unary(self, item: _Item, return_buffers: bool = False) -> Any:
        """The response of a unary-response call from its first item; with
        ``return_buffers``, ``(response, ReceivedBuffers)``."""
        if isinstance(item, IPCError):
            raise item.error if isinstance(item, _SenderFailed) else item
        if item.__class__ is OversizedFrame:
            raise self._oversized(item)  # type: ignore[arg-type]
        if item.type != _RESPONSE:
            raise error_from_status(grpc.StatusCode.INTERNAL,
                                    f'protocol error: got a frame of type {item.type} instead of the '
                                    'response', method=self.method.path)
        code, payload = self._response(item)  # type: ignore[arg-type]
        response = _deserialize(self.method, payload)
        buffers: ReceivedBuffers | None = item.buffers  # type: ignore[union-attr]
        if return_buffers:
            return response, buffers if buffers is not None else ReceivedBuffers()
        if buffers is not None:
            buffers.close()  # nobody asked for them
        return response

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
        if frame.flags & FLAG_SHARED_MEMORY:
            return 0, frame.data  # resolved on arrival: the message itself
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
    def __init__(self, path: str, message_limit: int) -> None:
        self.path = path
        self.message_limit = message_limit
        self.loop = asyncio.get_running_loop()
        self.decoder = FrameDecoder(message_limit + ENVELOPE_ALLOWANCE)
        self.transport: asyncio.Transport | None = None
        # A unary call waits on a future (the fast path), a stream on a queue.
        self.streams: dict[int, asyncio.Future[_Item] | _AsyncStream] = {}
        self.next_id = 1
        self.error: IPCUnavailableError | None = None
        self.write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._pending: list[bytes] = []
        self._pending_fds: list[int] = []
        self._flush_scheduled = False
        #: Shared-memory options agreed with the server (Hello), else None.
        self.shared_memory: SharedMemoryOptions | None = None
        #: What this end offered in its Hello; descriptors are accepted from then on.
        self.offered: SharedMemoryOptions | None = None
        #: The Hello's answer while nobody has looked at it yet.
        self.hello: asyncio.Future[_Item] | None = None
        self.deadlines: DeadlineQueue[_Pending] = DeadlineQueue(
            self.loop, _ended, _expire)

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
        close_fds(self.decoder.take_fds())
        close_fds(self._pending_fds)
        self._pending_fds = []

    def fds_received(self, fds: list[int]) -> None:
        self.decoder.feed(b'', fds)
        if self.offered is None or self.decoder.queued_fds > MAX_QUEUED_FDS:
            self._break('the server passed file descriptors that no frame claims')

    def _break(self, reason: str) -> None:
        if self.error is None:
            self.error = _lost(self.path, reason)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        streams = self.streams
        for item in self.decoder.feed(data):
            stream_id = item.stream_id
            if item.__class__ is Frame and item.flags & FLAG_SHARED_MEMORY:  # type: ignore[union-attr]
                if self.offered is None:
                    self._break('shared memory from a server that was not offered it')
                    return
                try:
                    item = _resolve_shared(item, self.decoder.take_fds,  # type: ignore[arg-type]
                                           self.message_limit, self.offered.max_bytes)
                except ValueError as error:
                    self._break(str(error))
                    return
            target = streams.get(stream_id)
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

    def open(self, target: asyncio.Future[_Item] | _AsyncStream, flags: int,
             prepared: _Prepared) -> int:
        """Register a call and send its request (passing its descriptors);
        ids increase on the wire because nothing else runs between
        allocation and write."""
        if self.error is not None:
            prepared.discard()
            raise self.error
        stream_id = self.next_id
        self.next_id += 2
        self.streams[stream_id] = target
        self.send(encode_frame(stream_id, _REQUEST, flags | prepared.flags, prepared.envelope),
                  prepared.take_fds())
        return stream_id

    def send(self, frame: bytes, fds: list[int] = []) -> None:  # noqa: B006 (never changed)
        """Write a frame: at once for a lone call; while other calls are in
        flight, at the end of this turn of the event loop, together with the
        frames of the other tasks (one send instead of one per call)."""
        if self.error is not None:
            close_fds(fds)
            raise self.error
        if len(self.streams) > 1:
            self._pending.append(frame)
            self._pending_fds.extend(fds)  # they may leave before their frame, never after
            if len(self._pending_fds) >= MAX_BATCH_FDS:
                self._flush()  # the server queues at most so many ahead of their frames
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                self.loop.call_soon(self._flush)
        elif self._pending:
            self._pending.append(frame)
            self._pending_fds.extend(fds)
            self._flush()
        else:
            assert self.transport is not None
            self.transport.write(frame, fds)  # type: ignore[call-arg]

    def _flush(self) -> None:
        self._flush_scheduled = False
        fds, self._pending_fds = self._pending_fds, []
        if self._pending and self.error is None:
            assert self.transport is not None
            self.transport.write(b''.join(self._pending), fds)  # type: ignore[call-arg]
        else:
            close_fds(fds)
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
                      timeout: float | None = None,
                      shared_memory: SharedMemoryOptions | None = SharedMemoryOptions()
                      ) -> 'AsyncConnection':
        """Connect to the ttrpc server on ``socket_path``.

        With ``shared_memory``, a Hello call sent right away asks the server
        whether large messages may travel as shared memory on this
        connection; the first call waits for its answer (within that call's
        deadline), so connecting costs no round trip. :attr:`shared_memory`
        tells the outcome; servers other than vyra_base_ipc's say no, and
        everything stays inline.

        :param max_message_bytes: largest message sent or accepted.
        :param timeout: seconds to wait for the connection to be accepted
            (default :data:`~vyra_base_ipc.options.DEFAULT_TIMEOUT`).
        :param shared_memory: options to offer, ``None`` to keep every message inline.
        :raises IPCUnavailableError: no socket, nobody listening, not allowed.
        :raises TypeError, ValueError: invalid arguments.
        """
        path, limit, timeout, shared = _connect_arguments(socket_path, max_message_bytes, timeout,
                                                          shared_memory)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, path), timeout)
        except asyncio.TimeoutError:
            sock.close()
            raise _not_accepted(path, timeout) from None
        except OSError as error:
            sock.close()
            raise _connect_error(path, error) from None
        except BaseException:
            sock.close()
            raise
        protocol = _ClientProtocol(path, limit)
        transport = UnixTransport(loop, sock, protocol)
        protocol.transport = transport  # usable at once; connection_made follows
        if shared is not None:
            # Sent now, answered while the caller gets ready: the first call
            # settles it (see _settle_hello), so connecting costs no round trip.
            protocol.offered = shared
            protocol.hello = loop.create_future()
            protocol.open(protocol.hello, 0, _Prepared(_HELLO, None, None, encode_hello()))
        return cls(path, transport, protocol, limit)

    @property
    def shared_memory(self) -> SharedMemoryOptions | None:
        """The shared-memory options agreed on this connection; ``None`` if
        every message travels inline (or before the first call has settled
        the agreement)."""
        return self._protocol.shared_memory

    async def _begin(self, method: Method, response_streaming: bool,
                     timeout: float | None) -> tuple[_ClientProtocol, _Outcome]:
        """Checks every call starts with; the first call of the connection
        also waits for the answer to its Hello (within ``timeout``)."""
        _check_kind(method, response_streaming)
        protocol = self._protocol
        self._check_loop(protocol)
        if protocol.hello is not None:
            await self._settle_hello(protocol, method, timeout)
        return protocol, _Outcome(method, self.max_message_bytes)

    async def _settle_hello(self, protocol: _ClientProtocol, method: Method, timeout: float | None) -> None:
        hello = protocol.hello
        assert hello is not None
        if timeout is None:
            item = await asyncio.shield(hello)
        else:
            try:
                item = await asyncio.wait_for(asyncio.shield(hello), validate_timeout(timeout))
            except asyncio.TimeoutError:
                raise _timeout_error(method) from None
        if protocol.hello is not hello:
            return  # another call settled it meanwhile
        protocol.hello = None
        protocol.streams.pop(1, None)
        try:
            _Outcome(_HELLO, self.max_message_bytes).unary(item)
        except IPCRemoteError:
            return  # not a vyra_base_ipc server, or shared memory off there: all inline
        protocol.shared_memory = protocol.offered

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
                   metadata: Metadata | None = None, buffers: Sequence[SharedBuffer] = (),
                   return_buffers: bool = False) -> Any:
        """Call a unary-response method (``unary_unary`` or ``stream_unary``)
        and return its response.

        :param request: the request message; for ``stream_unary`` an iterable
            or async iterable of them.
        :param buffers: :class:`~vyra_base_ipc.SharedBuffer` objects the
            request refers to (unary requests only): passed as shared
            memory, or copied into the request's references where this
            connection has no shared memory.
        :param return_buffers: return ``(response, ReceivedBuffers)``: the
            buffers the handler answered with
            (:func:`~vyra_base_ipc.attach_buffers`), for
            :func:`~vyra_base_ipc.shared_buffer`.
        :raises TypeError: the method streams responses (use :meth:`stream`).
        :raises IPCUnavailableError, IPCTimeoutError, IPCRemoteError: the call failed.
        """
        try:
            protocol, outcome = await self._begin(method, False, timeout)
            if method.kind.request_streaming:
                _check_buffers(method, buffers)
                stream = _AsyncStream(protocol.loop)
                prepared = _Prepared(method, timeout, metadata, b'')
                stream_id = protocol.open(stream, FLAG_REMOTE_OPEN, prepared)
                sender = protocol.loop.create_task(self._send_requests(stream_id, method, request, stream))
                try:
                    item = await self._within(stream.next(), prepared)
                finally:
                    protocol.streams.pop(stream_id, None)
                    sender.cancel()
                return outcome.unary(item, return_buffers)
            shared = protocol.shared_memory
            prepared = _Prepared(method, timeout, metadata,
                                 _request_payload(method, request, self.max_message_bytes, shared, buffers),
                                 shared, buffers)
            future: asyncio.Future[_Item] = protocol.loop.create_future()
            stream_id = protocol.open(future, 0, prepared)
            pending = None
            if prepared.timeout is not None:
                pending = _Pending(future)
                protocol.deadlines.add(protocol.loop.time() + prepared.timeout, pending, method)
            try:
                item = await future
            finally:
                protocol.streams.pop(stream_id, None)
                if pending is not None:
                    # The queue drops it lazily: it must not keep the answer
                    # (which may map shared memory) until the deadline.
                    pending.future = None
            return outcome.unary(item, return_buffers)
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
            protocol, outcome = await self._begin(method, True, timeout)
            stream = _AsyncStream(protocol.loop)
            sender = None
            if method.kind.request_streaming:
                prepared = _Prepared(method, timeout, metadata, b'')
                stream_id = protocol.open(stream, FLAG_REMOTE_OPEN, prepared)
                sender = protocol.loop.create_task(self._send_requests(stream_id, method, request, stream))
            else:
                shared = protocol.shared_memory
                prepared = _Prepared(method, timeout, metadata,
                                     _serialize(method, request, self.max_message_bytes), shared)
                stream_id = protocol.open(stream, FLAG_REMOTE_CLOSED, prepared)
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
            limit = self.max_message_bytes
            if hasattr(requests, '__aiter__'):
                async for message in requests:
                    await self._send_data(stream_id, method, _serialize(method, message, limit))
            else:
                for message in requests:
                    await self._send_data(stream_id, method, _serialize(method, message, limit))
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

    async def _send_data(self, stream_id: int, method: Method, payload: bytes) -> None:
        protocol = self._protocol
        protocol.send(*_data_frame(stream_id, method, payload, protocol.shared_memory))
        if protocol.write_paused:
            await protocol.drain()


class _SenderFailed(IPCError):
    """Carries an exception raised by the caller's request iterator; re-raised as is."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        super().__init__(grpc.StatusCode.CANCELLED, f'request iterator raised {error!r}')


def _data_frame(stream_id: int, method: Method, payload: bytes,
                shared: SharedMemoryOptions | None) -> tuple[bytes, list[int]]:
    """A data frame of a request stream, and the descriptors to pass with it."""
    packed = _pack(method, payload, shared) if shared is not None else None
    if packed is None:
        return encode_frame(stream_id, _DATA, 0, payload), []
    return encode_frame(stream_id, _DATA, FLAG_SHARED_MEMORY, packed[0]), packed[1]


class _Pending:
    """A unary call's entry in the deadline queue, let go of when it ends."""

    __slots__ = ('future',)

    def __init__(self, future: asyncio.Future[_Item]) -> None:
        self.future: asyncio.Future[_Item] | None = future


def _ended(pending: _Pending) -> bool:
    return pending.future is None or pending.future.done()


def _expire(pending: _Pending, method: Method) -> None:
    future = pending.future
    if future is not None and not future.done():
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
    (the fast path of a request/response protocol). The reading thread polls
    the socket for up to ``busy_poll`` seconds before it sleeps, so that a
    quick answer costs no wakeup; it backs off while answers take longer.
    Request streams are sent from a short-lived helper thread per call.

    Every call blocks for at most its ``timeout`` (seconds; ``None`` for no
    deadline). A broken connection stays broken: :attr:`is_closed` turns true
    and calls raise :class:`IPCUnavailableError`. After ``fork()`` the child
    must open its own connection (:attr:`is_closed` is true there).
    """

    def __init__(self, socket_path: str, sock: socket.socket, max_message_bytes: int,
                 busy_poll: float = DEFAULT_BUSY_POLL) -> None:
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
        #: Shared-memory options agreed with the server; None while every
        #: message travels inline (or before the first call settled the Hello).
        self.shared_memory: SharedMemoryOptions | None = None
        self._offered: SharedMemoryOptions | None = None
        self._hello: _SyncStream | None = None
        self._hello_lock = threading.Lock()
        self._poll_out = select.poll()
        self._poll_out.register(sock.fileno(), select.POLLOUT)
        self._busy_poll = BusyPoll(busy_poll)

    @classmethod
    def connect(cls, socket_path: StrPath, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                timeout: float | None = None,
                shared_memory: SharedMemoryOptions | None = SharedMemoryOptions(),
                busy_poll: float = DEFAULT_BUSY_POLL) -> 'SyncConnection':
        """Connect to the ttrpc server on ``socket_path``; with
        ``shared_memory``, agree on it as :meth:`AsyncConnection.connect` does.

        :param timeout: seconds to wait for the connection to be accepted
            (default :data:`~vyra_base_ipc.options.DEFAULT_TIMEOUT`).
        :param busy_poll: seconds the thread waiting for an answer polls the
            socket before it sleeps (:mod:`vyra_base_ipc.busy_poll`); 0 never.
        :raises IPCUnavailableError: no socket, nobody listening, not allowed.
        :raises TypeError, ValueError: invalid arguments.
        """
        path, limit, timeout, shared = _connect_arguments(socket_path, max_message_bytes, timeout,
                                                          shared_memory)
        validate_busy_poll(busy_poll)
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
            raise _not_accepted(path, timeout) from None
        except OSError as error:
            sock.close()
            raise _connect_error(path, error) from None
        connection = cls(path, sock, limit, busy_poll)
        if shared is not None:
            # Sent now, settled by the first call (see AsyncConnection.connect).
            connection._offered = shared
            connection._hello = _SyncStream()
            try:
                connection._open(connection._hello, _Prepared(_HELLO, timeout, None, encode_hello()), None)
            except BaseException:
                connection.close()
                raise
        return connection

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
             metadata: Metadata | None = None, buffers: Sequence[SharedBuffer] = (),
             return_buffers: bool = False) -> Any:
        """Call a unary-response method (``unary_unary`` or ``stream_unary``);
        block for at most the deadline.

        :param request: the request message; for ``stream_unary`` an iterable
            of them (consumed in a helper thread).
        :param buffers, return_buffers: as for :meth:`AsyncConnection.call`.
        :raises TypeError: the method streams responses (use :meth:`stream`).
        :raises IPCUnavailableError, IPCTimeoutError, IPCRemoteError: the call failed.
        """
        try:
            _check_kind(method, False)
            if self._hello is not None:
                self._settle_hello(method, timeout)
            outcome = _Outcome(method, self.max_message_bytes)
            prepared, stream, stream_id = self._start(method, request, timeout, metadata, buffers)
            try:
                return outcome.unary(self._next(stream, prepared), return_buffers)
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
            if self._hello is not None:
                self._settle_hello(method, timeout)
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

    def _settle_hello(self, method: Method, timeout: float | None) -> None:
        """Wait (within the call's deadline) for the answer to the Hello sent
        at connect time; the first call of any thread does this once."""
        prepared = _Prepared(method, timeout, None, b'')
        if not self._hello_lock.acquire(timeout=-1 if prepared.deadline is None
                                        else max(prepared.deadline - time.monotonic(), 0)):
            raise _timeout_error(method)
        try:
            hello = self._hello
            if hello is None:
                return
            item = self._next(hello, prepared)
            self._hello = None
            self._forget(1, hello)
            try:
                _Outcome(_HELLO, self.max_message_bytes).unary(item)
            except IPCRemoteError:
                return  # not a vyra_base_ipc server, or shared memory off there: all inline
            self.shared_memory = self._offered
        finally:
            self._hello_lock.release()

    def _start(self, method: Method, request: Any, timeout: float | None,
               metadata: Metadata | None, buffers: Sequence[SharedBuffer] = ()
               ) -> tuple[_Prepared, _SyncStream, int]:
        """Send the request (or open the request stream) of a new call."""
        if method.kind.request_streaming:
            _check_buffers(method, buffers)
            prepared = _Prepared(method, timeout, metadata, b'')
        else:
            shared = self.shared_memory
            prepared = _Prepared(method, timeout, metadata,
                                 _request_payload(method, request, self.max_message_bytes, shared, buffers),
                                 shared, buffers)
        stream = _SyncStream()
        return prepared, stream, self._open(stream, prepared, request)

    def _open(self, stream: _SyncStream, prepared: _Prepared, request: Any) -> int:
        method = prepared.method
        if method.kind.request_streaming:
            flags = FLAG_REMOTE_OPEN
        else:
            flags = FLAG_REMOTE_CLOSED if method.kind.response_streaming else 0
        try:
            if self._pid != os.getpid():
                # Checked before taking any lock: a lock held at fork() time by
                # another thread of the parent is never released in the child.
                raise IPCUnavailableError(grpc.StatusCode.UNAVAILABLE,
                                          'this ttrpc connection belongs to the parent process; '
                                          'open a new one after fork()')
            self._acquire_send(prepared)
        except BaseException:
            prepared.discard()
            raise
        try:
            with self._state_lock:
                if self._error is not None:
                    prepared.discard()
                    raise self._error
                stream_id = self._next_id
                self._next_id += 2
                self._streams[stream_id] = stream
            try:
                self._send_locked(encode_frame(stream_id, _REQUEST, flags | prepared.flags,
                                               prepared.envelope),
                                  prepared, prepared.take_fds())
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

    def _send_locked(self, data: bytes, prepared: _Prepared, fds: list[int] = []) -> None:  # noqa: B006
        """Write all of ``data`` within the call's deadline (send lock held),
        passing ``fds`` (closed here, whatever happens) with its first byte.

        A frame written only in part cannot be taken back: if the deadline
        passes mid-frame the connection is closed, since the stream of frames
        is no longer in sync.
        """
        try:
            self._send_all(data, prepared, fds)
        finally:
            close_fds(fds)

    def _send_all(self, data: bytes, prepared: _Prepared, fds: list[int]) -> None:
        view = memoryview(data)
        sent_any = False
        sock = self._sock
        while view:
            try:
                if fds and not sent_any:
                    sent = sock.sendmsg([view], rights(fds), socket.MSG_DONTWAIT)
                else:
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
                shared = self.shared_memory
                self._send_frame(*_data_frame(stream_id, method,
                                              _serialize(method, message, self.max_message_bytes),
                                              shared),
                                 prepared=prepared)
            if not stream.abandoned:
                self._send_frame(encode_frame(stream_id, _DATA, _CLOSE_SEND), prepared=prepared)
        except IPCError as error:
            self._deliver(stream, error)
        except Exception as error:
            self._deliver(stream, _SenderFailed(error))
            try:
                self._send_frame(encode_frame(stream_id, _DATA, _CLOSE_SEND), prepared=prepared)
            except IPCError:
                pass

    def _send_frame(self, frame: bytes, fds: list[int] = [], *,  # noqa: B006 (never changed)
                    prepared: _Prepared) -> None:
        try:
            self._acquire_send(prepared)
        except BaseException:
            close_fds(fds)
            raise
        try:
            if self._error is not None:
                close_fds(fds)
                raise self._error
            self._send_locked(frame, prepared, fds)
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
                    self._close_socket()  # deferred by _broken() while we were reading

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
        decoder = self._decoder
        try:
            data, ancillary, flags, _ = self._receive(deadline)
        except (BlockingIOError, TimeoutError):  # SO_RCVTIMEO expired
            if deadline is not None and time.monotonic() >= deadline:
                raise _Timeout() from None
            return
        except OSError as error:
            self._broken(_lost(self.socket_path, error.strerror or error))
            return
        if ancillary:
            decoder.feed(b'', received_fds(ancillary))
            if flags & socket.MSG_CTRUNC or self._offered is None or decoder.queued_fds > MAX_QUEUED_FDS:
                self._broken(_lost(self.socket_path, 'the server passed file descriptors that no '
                                   'frame claims'))
                return
        if not data:
            self._broken(_lost(self.socket_path, 'closed by the server'))
            return
        items = decoder.feed(data)
        if self._offered is not None:
            try:
                items = [(item.stream_id, _resolve_shared(item, decoder.take_fds,  # type: ignore[misc]
                                                          self.max_message_bytes,
                                                          self._offered.max_bytes))
                         if item.__class__ is Frame and item.flags & FLAG_SHARED_MEMORY  # type: ignore[union-attr]
                         else item for item in items]
            except ValueError as error:
                self._broken(_lost(self.socket_path, error))
                return
        with self._state_lock:
            streams = self._streams
            for item in items:
                if item.__class__ is tuple:  # (stream id, resolved frame or error)
                    stream_id, item = item  # type: ignore[misc]
                else:
                    stream_id = item.stream_id
                target = streams.get(stream_id)
                if target is not None:
                    target.items.append(item)
                    if target.waiting:
                        target.condition.notify()  # type: ignore[union-attr]

    def _receive(self, deadline: float | None) -> _Received:
        # Polls first (see busy_poll), then sleeps in recvmsg() until the deadline.
        timeout = None if deadline is None else deadline - time.monotonic()
        return self._busy_poll.wait(self._receive_now, lambda _: self._receive_blocking(deadline), timeout)

    def _receive_blocking(self, deadline: float | None) -> _Received:
        self._limit_receive(deadline)
        return self._sock.recvmsg(_READ_SIZE, _ANCILLARY_SIZE, _MSG_CMSG_CLOEXEC)

    def _receive_now(self) -> _Received | None:
        try:
            return self._sock.recvmsg(_READ_SIZE, _ANCILLARY_SIZE, _MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None

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
                self._close_socket()

    def _close_socket(self) -> None:
        # (state lock held, nobody reading) With it go descriptors received
        # for frames that never came.
        self._sock.close()
        close_fds(self._decoder.take_fds())


def _poll_ms(deadline: float | None) -> int:
    if deadline is None:
        return -1
    return max(0, math.ceil((deadline - time.monotonic()) * 1000))

