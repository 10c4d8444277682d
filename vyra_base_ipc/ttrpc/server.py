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
closed; nothing a peer sends affects other connections.
"""

from __future__ import annotations

import asyncio
import collections
from concurrent import futures
import enum
import inspect
import logging
import os
import queue
import socket
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import grpc
from google.protobuf.message import DecodeError

from ..address import StrPath, validate_socket_path
from ..methods import MethodKind, ServiceRegistration
from ..options import DEFAULT_GRACE_PERIOD, DEFAULT_MAX_MESSAGE_BYTES, validate_max_message_bytes
from ..payload import SharedMemoryError, SharedMemoryOptions, TooLargeError, close_fds, usable_options
from ..shared_buffer import ReceivedBuffers, SharedBuffer
from ..socket_file import SocketFile
from .context import AsyncServicerContext, ServicerContext, _End
from .deadlines import DeadlineQueue
from .eager import start_task
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
    oversized_message,
)
from .messages import (
    ENVELOPE_ALLOWANCE,
    HELLO_METHOD,
    HELLO_SERVICE,
    Request,
    encode_hello,
    encode_ok_response,
    encode_response,
    metadata_from_wire,
)
from .shared_memory import pack, unpack
from .transport import accept_connections

__all__ = ['TtrpcServer']

_logger = logging.getLogger(__name__)

_REQUEST = int(MessageType.REQUEST)
_RESPONSE = int(MessageType.RESPONSE)
_DATA = int(MessageType.DATA)
_OK = 0

# Answer of a call: (status code number, details, payload); payload None
# ends a response stream with a bare close instead of a Response frame.
_Answer = tuple[int, str, Union[bytes, None]]

#: Frames held back for one write are written once they reach this many bytes.
_BATCH_BYTES = 64 * 1024


def _number(code: grpc.StatusCode) -> int:
    return int(code.value[0])


class _CallEnded(Exception):
    """Raised inside a ``def`` handler's thread when it writes to a call that
    has already ended (deadline, cancellation); stops the handler's generator."""


class _StatusError(Exception):
    """Ends a call with a chosen status from inside the server."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Handler:
    """One registered method, ready to call."""

    __slots__ = ('path', 'kind', 'function', 'deserialize', 'serialize', 'is_async',
                 'request_streaming', 'response_streaming', 'request_type')

    def __init__(self, service: str, name: str, handler: grpc.RpcMethodHandler) -> None:
        self.path = f'/{service}/{name}'
        self.kind = MethodKind.of(bool(handler.request_streaming), bool(handler.response_streaming))
        function = getattr(handler, self.kind.value)
        if function is None:
            raise TypeError(f'{self.path}: the handler has no {self.kind.value} behaviour')
        self.function: Callable[..., Any] = function
        self.deserialize: Callable[[bytes], Any] = handler.request_deserializer or _identity
        self.serialize: Callable[[Any], bytes] = handler.response_serializer or _identity
        self.is_async = inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function)
        self.request_streaming = self.kind.request_streaming
        self.response_streaming = self.kind.response_streaming
        descriptor = getattr(getattr(self.deserialize, '__self__', None), 'DESCRIPTOR', None)
        self.request_type: str = getattr(descriptor, 'full_name', 'the request message')

    def decode(self, payload: bytes, context: ServicerContext) -> Any:
        """The request message, or the call aborted with INVALID_ARGUMENT (as
        the gRPC lane's request guard answers an undecodable request).

        :raises grpc.aio.AbortError: the bytes do not decode.
        """
        try:
            if self.deserialize is _identity:  # a method without (de)serializers takes bytes
                return bytes(payload)
            return self.deserialize(payload)
        except Exception as error:  # DecodeError, or whatever a custom deserializer raises
            raise context._abort_status(
                grpc.StatusCode.INVALID_ARGUMENT,
                f'{self.path}: the request is not a valid {self.request_type}: {error}', ()) from None


def _identity(value: Any) -> Any:
    return value


def _unexpected(error: BaseException, path: str) -> tuple[int, str]:
    # The same status and wording as grpc.aio for an exception in a handler.
    _logger.error('Unexpected [%s] raised by servicer method [%s]', type(error).__name__, path,
                  exc_info=error)
    return _number(grpc.StatusCode.UNKNOWN), f'Unexpected {type(error)}: {error}'


def _status_after_return(context: ServicerContext) -> tuple[int, str] | None:
    """The non-OK status a handler set (or aborted with), if any."""
    if context._abort is not None:
        code, details = context._abort
        return _number(code), details
    code = context._code
    if code is not None and code is not grpc.StatusCode.OK:
        return _number(code), context._details or ''
    return None


def _error_status(context: ServicerContext, error: BaseException, path: str) -> tuple[int, str]:
    if context._abort is not None:  # the first abort decides, whatever followed
        code, details = context._abort
        return _number(code), details
    if isinstance(error, _StatusError):
        return _number(error.code), error.details
    return _unexpected(error, path)


class _AsyncRequests:
    """The request iterator of a client-streaming call with an ``async def`` handler."""

    __slots__ = ('_loop', '_deserialize', '_items', '_closed', '_waiter', 'pending_bytes')

    def __init__(self, loop: asyncio.AbstractEventLoop, deserialize: Callable[[bytes], Any]) -> None:
        self._loop = loop
        self._deserialize = deserialize
        self._items: collections.deque[bytes] = collections.deque()
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        self.pending_bytes = 0

    def feed(self, payload: bytes) -> None:
        self._items.append(payload)
        self.pending_bytes += len(payload)
        self._wake()

    def close(self) -> None:
        """The client sent its last message: the handler reads what is queued, then stops."""
        self._closed = True
        self._wake()

    def cancel(self) -> None:
        """The call ended: drop what the handler did not read (it may hold
        shared memory), and stop."""
        self._items.clear()
        self.pending_bytes = 0
        self.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> '_AsyncRequests':
        return self

    async def __anext__(self) -> Any:
        while not self._items:
            if self._closed:
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        payload = self._items.popleft()
        self.pending_bytes -= len(payload)
        return self._deserialize(payload)


_END = object()


class _SyncRequests:
    """The request iterator of a client-streaming call with a ``def`` handler;
    fed by the event loop, read in the handler's thread."""

    __slots__ = ('_deserialize', '_queue', '_lock', 'pending_bytes')

    def __init__(self, deserialize: Callable[[bytes], Any]) -> None:
        self._deserialize = deserialize
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.pending_bytes = 0

    def feed(self, payload: bytes) -> None:
        with self._lock:
            self.pending_bytes += len(payload)
        self._queue.put(payload)

    def close(self) -> None:
        """The client sent its last message: the handler reads what is queued, then stops."""
        self._queue.put(_END)

    def cancel(self) -> None:
        """The call ended: drop what the handler did not read (it may hold
        shared memory), and stop."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _END:
                with self._lock:
                    self.pending_bytes -= len(item)
        self.close()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # later next() calls end too
            raise StopIteration
        with self._lock:
            self.pending_bytes -= len(item)
        return self._deserialize(item)


class _Call:
    """One stream on a connection: the handler's run and its answer.

    All methods run on the event loop except those named ``*_thread`` /
    ``_run_sync``, which run in a handler thread.
    """

    __slots__ = ('connection', 'stream_id', 'handler', 'context', 'task', 'finished', 'requests',
                 'response_streaming', 'deadline')

    def __init__(self, connection: '_Connection', stream_id: int, handler: _Handler,
                 context: ServicerContext) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.handler = handler
        self.context = context
        self.task: asyncio.Future[Any] | None = None
        self.finished = False
        self.requests: _AsyncRequests | _SyncRequests | None = None
        self.response_streaming = handler.response_streaming
        self.deadline: _Deadline | None = None

    # -- start ------------------------------------------------------------------------

    def start(self, payload: bytes, flags: int, timeout: float | None) -> None:
        connection = self.connection
        handler = self.handler
        loop = connection.loop
        if timeout is not None:
            self.deadline = _Deadline(self)
            connection.server._deadlines.add(loop.time() + timeout, self.deadline)
        argument: Any
        if handler.request_streaming:
            context = self.context

            def decode(data: bytes) -> Any:
                return handler.decode(data, context)
            requests: _AsyncRequests | _SyncRequests = (
                _AsyncRequests(loop, decode) if handler.is_async else _SyncRequests(decode))
            self.requests = argument = requests
            # containerd's clients may put the first message in the request.
            if payload:
                requests.feed(payload)
            if not flags & FLAG_REMOTE_OPEN:
                requests.close()
        elif handler.is_async:
            try:
                argument = handler.decode(payload, self.context)
            except grpc.aio.AbortError as error:
                self.answer(*_error_status(self.context, error, handler.path))
                return
        else:
            argument = payload  # deserialized in the handler's thread
        if handler.is_async:
            # Started at once: a handler that does not suspend answers inside
            # data_received, without a trip through the event loop.
            self.task = start_task(self._serve_async(argument), loop)
        else:
            try:
                future = loop.run_in_executor(connection.server._executor, self._run_sync, argument)
            except RuntimeError:  # executor shut down: the server is stopping
                self.answer(_number(grpc.StatusCode.UNAVAILABLE), 'server is shutting down')
                return
            self.task = future
            future.add_done_callback(self._sync_done)

    # -- async handlers ---------------------------------------------------------------

    async def _drive_stream(self, argument: Any) -> None:
        self.context._writer = self._write_async
        result = self.handler.function(argument, self.context)
        if hasattr(result, '__aiter__'):
            try:
                async for message in result:
                    await self._write_async(message)
            finally:
                close = getattr(result, 'aclose', None)
                if close is not None:
                    await close()
        elif inspect.isawaitable(result):
            await result  # a handler that sends with context.write()

    async def _write_async(self, message: Any) -> None:
        if self.finished:
            raise asyncio.CancelledError()
        payload = self.handler.serialize(message)
        self._check_size(len(payload))
        connection = self.connection
        connection.send(*connection.payload_frame(self.stream_id, _DATA, payload))
        if connection.write_paused:
            await connection.drain()
        elif connection.receiving:
            # Started eagerly, inside data_received: let the other frames of
            # that read be handled before streaming on (as a task).
            await asyncio.sleep(0)

    async def _serve_async(self, argument: Any) -> None:
        # Answering from inside the task (not from a done callback) saves a
        # trip through the event loop per call. The handler's coroutine is
        # created here, so a task cancelled before it ran leaves none behind.
        try:
            if self.response_streaming:
                await self._drive_stream(argument)
                result = None
            else:
                result = await self.handler.function(argument, self.context)
        except asyncio.CancelledError:
            if not self.finished:  # the handler cancelled itself; we did not
                self.answer(_number(grpc.StatusCode.CANCELLED), 'Cancelled')
            raise
        except Exception as error:
            if not self.finished:
                self.answer(*_error_status(self.context, error, self.handler.path))
            return
        if self.finished:
            return
        if self.response_streaming:
            self._end_stream()
        else:
            self.answer(*self._answer_for(result))

    # -- def handlers (in a worker thread) --------------------------------------------

    def _run_sync(self, argument: Any) -> _Answer | None:
        context = self.context
        if context._end is not None:
            return None  # ended (deadline, client gone) before a thread was free
        handler = self.handler
        try:
            if not handler.request_streaming:
                argument = handler.decode(argument, context)
            if self.response_streaming:
                context._writer = self._write_thread
                result = handler.function(argument, context)
                if result is not None:
                    for message in result:
                        self._write_thread(message)
                status = _status_after_return(context)
                return (status[0], status[1], b'') if status else (_OK, '', None)
            return self._answer_for(handler.function(argument, context))
        except _CallEnded:
            return None
        except Exception as error:
            code, details = _error_status(context, error, handler.path)
            return code, details, b''

    def _write_thread(self, message: Any) -> None:
        if self.context._end is not None:
            raise _CallEnded()
        payload = self.handler.serialize(message)
        self._check_size(len(payload))
        connection = self.connection
        frame, fds = connection.payload_frame(self.stream_id, _DATA, payload)
        try:
            connection.loop.call_soon_threadsafe(self._send_from_thread, frame, fds)
        except RuntimeError:  # the loop is closed
            close_fds(fds)
            raise _CallEnded() from None
        while not connection.writable.wait(0.1):
            if self.context._end is not None:
                raise _CallEnded()

    def _send_from_thread(self, frame: bytes, fds: list[int]) -> None:
        if self.finished:
            close_fds(fds)
        else:
            self.connection.send(frame, fds)

    def _sync_done(self, future: asyncio.Future[Any]) -> None:
        if self.finished:
            return
        if future.cancelled():
            self.answer(_number(grpc.StatusCode.UNAVAILABLE), 'server is shutting down')
            return
        error = future.exception()
        if error is not None:
            self.answer(*_unexpected(error, self.handler.path))
            return
        answer = future.result()
        if answer is None:
            return
        code, details, payload = answer
        if payload is None:
            self._end_stream()
        else:
            self.answer(code, details, payload)

    # -- answers ----------------------------------------------------------------------

    def _answer_for(self, result: Any) -> tuple[int, str, bytes]:
        context = self.context
        status = _status_after_return(context)
        if status is not None:
            return status[0], status[1], b''
        try:
            payload = self.handler.serialize(result)
            self._check_size(len(payload))
        except Exception as error:
            code, details = _error_status(context, error, self.handler.path)
            return code, details, b''
        return _OK, '', payload

    def _check_size(self, size: int) -> None:
        limit = self.connection.server.max_message_bytes
        if size > limit:
            raise _StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f'Sent message larger than max ({size} vs. {limit})')

    def answer(self, code: int, details: str, payload: bytes = b'', end: _End = _End.FINISHED) -> None:
        """End the call with a Response frame (status and, if OK, payload)."""
        if self.finished:
            return
        self.finished = True  # the answer goes out before _end() may close the connection
        connection = self.connection
        if code == _OK:
            try:
                connection.send(*connection.payload_frame(self.stream_id, _RESPONSE, payload,
                                                          self.context._reply_buffers))
            except _StatusError as error:
                code, details, payload = _number(error.code), error.details, b''
        if code != _OK:
            connection.send(encode_frame(self.stream_id, _RESPONSE, 0,
                                         encode_response(code, details, payload)))
        self._end(end)

    def _end_stream(self) -> None:
        if self.finished:
            return
        status = _status_after_return(self.context)
        if status is not None:
            self.answer(*status)
            return
        self.finished = True
        self.connection.send(encode_frame(self.stream_id, _DATA, FLAG_REMOTE_CLOSED | FLAG_NO_DATA))
        self._end(_End.FINISHED)

    def _end(self, how: _End) -> None:
        self.finished = True
        if self.deadline is not None:
            self.deadline.call = None  # the queue drops it lazily: it must not hold the call
        if self.requests is not None:
            self.requests.cancel()
        context = self.context
        if context._buffers is not None:
            # Their descriptors, not their mappings: views the handler took stay valid.
            context._buffers.close()
        for buffer in context._reply_buffers:  # sent (the frame has its own copies) or not
            buffer.close()
        self.connection.call_ended(self)
        self.context._finish(how)

    # -- endings from outside ---------------------------------------------------------

    def expire(self) -> None:
        """The deadline passed: answer DEADLINE_EXCEEDED now, stop the handler."""
        if self.finished:
            return
        self.answer(_number(grpc.StatusCode.DEADLINE_EXCEEDED), 'Deadline Exceeded', end=_End.EXPIRED)
        self._cancel_task()

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        """End the call with ``code`` because of what the client did."""
        if self.finished:
            return
        self.answer(_number(code), details)
        self._cancel_task()

    def cancel(self) -> None:
        """The client is gone or the server stops: end without an answer."""
        if self.finished:
            return
        self._end(_End.CANCELLED)
        self._cancel_task()

    def _cancel_task(self) -> None:
        task = self.task
        if task is not None and self.handler.is_async and not task.done():
            task.cancel()
            # A cancelled task keeps its CancelledError, whose traceback holds
            # the handler's frames and so this call: a cycle that would keep
            # the request (and its shared memory) until the next garbage
            # collection. Forgetting the task when it is done breaks it.
            task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Future[Any]) -> None:
        self.task = None

    # -- data from the client ---------------------------------------------------------

    def data(self, frame: Frame, payload: bytes | memoryview) -> None:
        """A data frame of this call, with its message (resolved from shared
        memory if the frame came that way)."""
        requests = self.requests
        if requests is None:
            self.fail(grpc.StatusCode.INVALID_ARGUMENT,
                      f'{self.handler.path} takes no streamed requests: data frame not allowed')
            return
        if not frame.flags & FLAG_NO_DATA:
            # Each streamed message is held to the limit a single request has
            # (the frame limit leaves room for a request's envelope).
            largest = self.connection.server.max_message_bytes
            if len(payload) > largest:
                self.fail(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f'Received message larger than max ({len(payload)} vs. {largest})')
                return
            requests.feed(payload)
            limit = self.connection.server.request_backlog_bytes
            if requests.pending_bytes > limit:
                self.fail(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f'{requests.pending_bytes} bytes of streamed requests not read by the '
                          f'handler (limit {limit})')
                return
        if frame.flags & FLAG_REMOTE_CLOSED:
            requests.close()


class _Deadline:
    """A call's entry in the deadline queue, let go of when the call ends."""

    __slots__ = ('call',)

    def __init__(self, call: _Call) -> None:
        self.call: _Call | None = call


def _call_finished(deadline: _Deadline) -> bool:
    return deadline.call is None


def _expire_call(deadline: _Deadline, _: Any) -> None:
    if deadline.call is not None:
        deadline.call.expire()


class _Connection(asyncio.Protocol):
    """One client connection: decodes frames, starts calls, writes answers."""

    def __init__(self, server: 'TtrpcServer') -> None:
        self.server = server
        assert server._loop is not None
        self.loop = server._loop
        self.decoder = FrameDecoder(server.frame_limit)
        self.calls: dict[int, _Call] = {}
        self.last_stream_id = 0
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.write_paused = False
        # For def handlers streaming responses: cleared while the client does
        # not read, so their threads wait instead of buffering without bound.
        self.writable = threading.Event()
        self.writable.set()
        self._drain_waiters: list[asyncio.Future[None]] = []
        # Frames held back to leave in one write (see send()), and the
        # descriptors that go with them.
        self._pending: list[bytes] = []
        self._pending_fds: list[int] = []
        self._pending_bytes = 0
        self._flush_scheduled = False
        #: True while data_received handles a read: answers wait to leave in one write.
        self.receiving = False
        #: Shared-memory options agreed with this client (its Hello), else None.
        self.shared_memory: SharedMemoryOptions | None = None

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server._connections.add(self)
        if self.server._stopping:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for call in list(self.calls.values()):
            call.cancel()
        self.writable.set()
        self._wake_drainers()
        close_fds(self.decoder.take_fds())
        close_fds(self._pending_fds)
        self._pending_fds = []
        self.server._connections.discard(self)
        if self.decoder.mid_frame:
            _logger.debug('ttrpc connection closed inside a frame (%d bytes pending)',
                          self.decoder.buffered)

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its requests too,
        # so that a peer cannot make the server buffer without bound.
        self.write_paused = True
        self.writable.clear()
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.writable.set()
        self._wake_drainers()
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def fds_received(self, fds: list[int]) -> None:
        """Descriptors passed with the bytes that follow; queued until their
        frames take them."""
        if self.shared_memory is None:
            close_fds(fds)
            self._protocol_violation('file descriptors from a client that did not agree on '
                                     'shared memory')
            return
        self.decoder.feed(b'', fds)
        if self.decoder.queued_fds > MAX_QUEUED_FDS:
            self._protocol_violation(f'more than {MAX_QUEUED_FDS} file descriptors not claimed '
                                     'by any frame')

    def _protocol_violation(self, what: str) -> None:
        _logger.warning('ttrpc connection closed: %s', what)
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.receiving = True
        try:
            for item in self.decoder.feed(data):
                if self.closed:
                    return
                if item.__class__ is Frame:
                    self._frame(item)  # type: ignore[arg-type]
                else:
                    self._oversized(item)  # type: ignore[arg-type]
        finally:
            self.receiving = False
            if self._pending:
                self._flush()

    def eof_received(self) -> bool:
        return False  # half-closed by the client: close (in-flight calls end)

    # -- frames -----------------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        stream_id = frame.stream_id
        if (frame.flags & FLAG_SHARED_MEMORY and (frame.type == _REQUEST or frame.type == _DATA)
                and (self.shared_memory is None or not stream_id & 1)):
            # Its descriptors cannot be accounted for: the connection is out of step.
            self._protocol_violation(f'shared-memory flag on a frame of stream {stream_id} '
                                     'without agreement')
        elif not stream_id & 1:
            self.reject(stream_id, grpc.StatusCode.INVALID_ARGUMENT,
                        'StreamID must be odd for client initiated streams')
        elif frame.type == _REQUEST:
            self._request(frame)
        elif frame.type == _DATA:
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
        # Responses from a client and unknown types are ignored, as the
        # protocol asks for forward compatibility.

    def _request(self, frame: Frame) -> None:
        stream_id = frame.stream_id
        if stream_id <= self.last_stream_id:
            self.reject(stream_id, grpc.StatusCode.INVALID_ARGUMENT,
                        'StreamID cannot be re-used and must increment')
            return
        self.last_stream_id = stream_id
        try:
            request = Request.FromString(frame.data)
        except DecodeError as error:
            self.reject(stream_id, grpc.StatusCode.INVALID_ARGUMENT, f'unmarshal request error: {error}')
            if frame.flags & FLAG_SHARED_MEMORY:
                self._protocol_violation('unreadable request with shared memory')
            return
        payload: bytes | memoryview = request.payload
        buffers: ReceivedBuffers | None = None
        shared = frame.flags & FLAG_SHARED_MEMORY
        if shared:
            # First, whatever else is wrong: the frame's descriptors must be claimed in order.
            resolved = self._resolve(stream_id, payload,
                                     f'the request of /{request.service}/{request.method}')
            if resolved is None:
                return
            payload, buffers = resolved
        server = self.server
        if request.service == HELLO_SERVICE and request.method == HELLO_METHOD and not shared:
            self._hello(stream_id)
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
        metadata = metadata_from_wire(request.metadata) if request.metadata else ()
        context_class = AsyncServicerContext if handler.is_async else ServicerContext
        context = context_class(deadline, metadata, handler.path)
        context._buffers = buffers
        # Buffers go with a single answer, to a client that agreed; elsewhere inline.
        context._can_attach = self.shared_memory is not None and not handler.response_streaming
        call = _Call(self, stream_id, handler, context)
        self.calls[stream_id] = call
        server._active += 1
        call.start(payload, frame.flags, timeout)

    def _resolve(self, stream_id: int, manifest: bytes, what: str
                 ) -> tuple[bytes | memoryview, ReceivedBuffers | None] | None:
        """The message and buffers a shared-memory frame refers to; ``None``
        after answering the stream with INVALID_ARGUMENT (a refused buffer)
        or closing the connection (descriptors missing)."""
        assert self.shared_memory is not None
        try:
            return unpack(manifest, self.decoder.take_fds, self.server.max_message_bytes,
                          self.shared_memory.max_bytes, what)
        except ValueError as error:  # fewer descriptors than announced
            self.reject(stream_id, grpc.StatusCode.INVALID_ARGUMENT, f'{what}: {error}')
            self._protocol_violation(str(error))
        except TooLargeError as error:
            self.reject(stream_id, grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except SharedMemoryError as error:
            self.reject(stream_id, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return None

    def _hello(self, stream_id: int) -> None:
        """Agree on shared memory with a vyra_base_ipc client; answered as an
        unknown method (like any other ttrpc server would) when it is off."""
        options = self.server.shared_memory
        if options is None:
            self.reject(stream_id, grpc.StatusCode.UNIMPLEMENTED, 'Method not found!')
            return
        self.shared_memory = options
        self.send(encode_frame(stream_id, _RESPONSE, 0, encode_ok_response(encode_hello())))

    def payload_frame(self, stream_id: int, message_type: int, payload: bytes,
                      buffers: Sequence[SharedBuffer] = ()) -> tuple[bytes, list[int]]:
        """A Response (OK) or Data frame carrying ``payload``, and the
        descriptors to pass with it: inline, or in shared memory when the
        client agreed and the payload is above the threshold, or ``buffers``
        go with it (only on a connection that agreed). Thread-safe.

        :raises _StatusError: RESOURCE_EXHAUSTED, the buffers could not be passed.
        """
        options = self.shared_memory
        flags = 0
        fds: list[int] = []
        if options is not None and (len(payload) > options.threshold or buffers):
            try:
                packed = pack(payload, options.threshold, buffers)
            except SharedMemoryError as error:
                if buffers:
                    raise _StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       f'cannot pass the shared buffers of the answer: {error}') from None
                # Out of descriptors or memory: inline still works.
                _logger.warning('sending %d bytes inline: %s', len(payload), error)
            else:
                if packed is not None:
                    payload, fds = packed  # type: ignore[assignment]
                    flags = FLAG_SHARED_MEMORY
        if message_type == _RESPONSE:
            return encode_frame(stream_id, _RESPONSE, flags, encode_ok_response(payload)), fds
        return encode_frame(stream_id, message_type, flags, payload), fds

    def _oversized(self, item: OversizedFrame) -> None:
        details = oversized_message(item.length, item.limit)
        call = self.calls.get(item.stream_id)
        if call is not None:
            call.fail(grpc.StatusCode.RESOURCE_EXHAUSTED, details)
        else:
            self.reject(item.stream_id, grpc.StatusCode.RESOURCE_EXHAUSTED, details)

    # -- writing ----------------------------------------------------------------------

    def send(self, frame: bytes, fds: list[int] = []) -> None:  # noqa: B006 (never changed)
        """Write a frame, coalescing bursts.

        A lone call's answer is written at once. While other calls are in
        flight on the connection, or while a batch of received frames is
        being handled, frames wait for the end of this turn of the event loop
        and leave in one write: a send on a Unix socket costs about as much
        as handling a small call, so 64 answers in one write instead of 64
        is most of the throughput of concurrent calls.
        """
        if self.receiving or len(self.calls) > 1:
            self._pending.append(frame)
            self._pending_bytes += len(frame)
            if fds:
                # They leave with the first byte of the batch: before their
                # frame, which is all the receiver needs (see framing).
                self._pending_fds.extend(fds)
            if self._pending_bytes >= _BATCH_BYTES or len(self._pending_fds) >= MAX_BATCH_FDS:
                self._flush()  # a full batch: the transport's flow control takes over
            elif not self.receiving and not self._flush_scheduled:
                self._flush_scheduled = True
                self.loop.call_soon(self._flush)
        elif self._pending:
            self._pending.append(frame)
            self._pending_fds.extend(fds)
            self._flush()
        else:
            self._write(frame, fds)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._pending:
            frames = b''.join(self._pending)
            fds, self._pending_fds = self._pending_fds, []
            self._pending.clear()
            self._pending_bytes = 0
            self._write(frames, fds)

    def _write(self, data: bytes, fds: list[int]) -> None:
        transport = self.transport
        if not self.closed and transport is not None and not transport.is_closing():
            transport.write(data, fds)  # type: ignore[call-arg]
        else:
            close_fds(fds)

    def reject(self, stream_id: int, code: grpc.StatusCode, details: str) -> None:
        """Answer a stream that never became a call."""
        self.send(encode_frame(stream_id, _RESPONSE, 0, encode_response(_number(code), details)))

    async def drain(self) -> None:
        """Wait until the client has read enough of what was written."""
        if not self.write_paused or self.closed:
            return
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- lifecycle --------------------------------------------------------------------

    def call_ended(self, call: _Call) -> None:
        if self.calls.pop(call.stream_id, None) is not None:
            self.server._call_ended()
        if self.server._stopping and not self.calls:
            self.close()

    def close(self) -> None:
        """Close after what was written has been sent."""
        self._flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def cancel_calls(self) -> list[asyncio.Future[Any]]:
        """Cancel every call; return the tasks of async handlers still unwinding."""
        tasks = [call.task for call in self.calls.values()
                 if call.task is not None and call.handler.is_async and not call.task.done()]
        for call in list(self.calls.values()):
            call.cancel()
        return tasks  # type: ignore[return-value]


class _State(enum.Enum):
    NEW = 'new'
    SERVING = 'serving'
    STOPPING = 'stopping'
    STOPPED = 'stopped'


class TtrpcServer:
    """Serves registered gRPC servicers over ttrpc on a Unix socket.

    The socket follows the rules of the gRPC socket
    (:class:`~vyra_base_ipc.socket_file.SocketFile`): a live server on the path
    is never replaced, a stale file is, the file gets ``socket_mode`` before
    anyone can connect, and it is removed on stop only if it is still ours.

    All coroutine methods run on one event loop, the one :meth:`start` ran
    on; ``async def`` handlers run on it too. ``def`` handlers run in
    ``executor`` (shared with the gRPC lane when the caller passes its pool),
    else in a pool of ``max_workers`` threads owned by this server.

    :param socket_path: where to listen.
    :param services: registrations from :func:`~vyra_base_ipc.methods.record_servicer`.
    :param max_message_bytes: largest request or response message; frames
        may be :data:`~vyra_base_ipc.ttrpc.messages.ENVELOPE_ALLOWANCE` bytes
        larger to hold the envelope.
    :param grace_period: default grace of :meth:`stop`, in seconds.
    :param socket_mode: permission bits of the socket file.
    :param directory_mode: permission bits of parent directories created for it.
    :param socket_group: group id given to the socket file and created
        directories (see :class:`~vyra_base_ipc.socket_file.SocketFile`).
    :param executor: thread pool for ``def`` handlers (not shut down here).
    :param max_workers: size of the pool created when ``executor`` is None.
    :param maximum_concurrent_rpcs: calls above this many in flight (over
        all connections) are refused at once with RESOURCE_EXHAUSTED, as
        gRPC does; ``None`` for no limit.
    :param shared_memory: how large messages travel to and from clients
        that agree on it (vyra_base_ipc's own); ``None`` to keep every message
        inline. Independent ttrpc clients always get inline answers.
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
    ) -> None:
        self.socket_path = validate_socket_path(socket_path)
        #: The shared-memory options offered to clients (None if off or unavailable here).
        self.shared_memory = usable_options(shared_memory)
        self.max_message_bytes = validate_max_message_bytes(max_message_bytes)
        self.frame_limit = self.max_message_bytes + ENVELOPE_ALLOWANCE
        #: Bytes of streamed requests one call may leave unread before it fails.
        self.request_backlog_bytes = 2 * self.max_message_bytes
        self.grace_period = grace_period
        if maximum_concurrent_rpcs is not None and (
                isinstance(maximum_concurrent_rpcs, bool) or not isinstance(maximum_concurrent_rpcs, int)
                or maximum_concurrent_rpcs < 1):
            raise ValueError(f'maximum_concurrent_rpcs must be a positive int or None, '
                             f'not {maximum_concurrent_rpcs!r}')
        self.maximum_concurrent_rpcs = maximum_concurrent_rpcs
        self._handlers: dict[tuple[str, str], _Handler] = {}
        for registration in services:
            if any(service == registration.name for service, _ in self._handlers):
                raise ValueError(f'service {registration.name} is registered twice')
            for name, handler in registration.handlers.items():
                self._handlers[(registration.name, name)] = _Handler(registration.name, name, handler)
        self._socket = SocketFile(self.socket_path, socket_mode=socket_mode,
                                  directory_mode=directory_mode, group=socket_group)
        self._given_executor = executor
        self._max_workers = max_workers
        self._executor: futures.Executor | None = executor
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_accepting: Callable[[], None] | None = None
        self._connections: set[_Connection] = set()
        self._state = _State.NEW
        self._stopping = False
        self._active = 0
        self._idle: asyncio.Event | None = None
        self._stop_task: asyncio.Future[None] | None = None
        self._deadlines: DeadlineQueue[_Deadline]

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
        self._deadlines = DeadlineQueue(self._loop, _call_finished, _expire_call)
        self._state = _State.STOPPED  # until serving, stop() has nothing to do
        listener: socket.socket | None = None
        try:
            self._socket.check()
            if self._executor is None:
                self._executor = futures.ThreadPoolExecutor(
                    max_workers=self._max_workers, thread_name_prefix='ttrpc-handler')
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(os.fspath(self._socket.private_bind_path()))
            listener.listen(socket.SOMAXCONN)
            self._stop_accepting = accept_connections(self._loop, listener, lambda: _Connection(self))
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
        new calls on open connections get UNAVAILABLE; calls in flight get
        ``grace`` seconds (default :attr:`grace_period`), then async handlers
        are cancelled and every connection is closed (their clients see
        UNAVAILABLE). ``def`` handlers cannot be interrupted: their answers are
        dropped. Returns when all of that is done.
        """
        if self._stop_task is None:
            if self._state is not _State.SERVING:
                self._state = _State.STOPPED
                return
            self._stop_task = asyncio.ensure_future(
                self._shutdown(self.grace_period if grace is None else grace))
        await asyncio.shield(self._stop_task)

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
        try:
            self._stop_accepting()
            removed = self._socket.remove()
            for connection in list(self._connections):
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
