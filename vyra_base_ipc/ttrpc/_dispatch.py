"""Calls on the fast-lane server: running handlers, feeding them streamed
requests, sending their answers, and ending them (answer, deadline, client
gone, CANCEL, shutdown), with the status codes and wording of grpc.aio.

A :class:`Call` runs on the server's event loop, except the methods named
``*_thread`` / ``_run_sync``, which run in a ``def`` handler's worker thread.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Any, Callable, Union

import grpc

from .._answer_size import answer_too_large
from .._handler_threads import CallEnded
from .._interceptors import Observation
from .._methods import MethodKind, stream_returned
from .._metrics import MethodMetrics
from .._payload import Pieces, SharedMemoryError, close_fds
from .._request_guard import HANDLER_FAILURES
from ..exceptions import CallRejected
from ._context import ServicerContext, _End
from ._eager import run_eagerly
from ._errors import NOT_STARTED, SHUTTING_DOWN, received_too_large
from ._flow import ReceiveWindow, SendCredit, message_cost
from ._frames import FLAG_NO_DATA, FLAG_REMOTE_CLOSED, FLAG_REMOTE_OPEN, Frame, MessageType, encode_frame
from ._messages import encode_response, ok_response_frame
from ._pieces import serialized
from ._requests import AFTER_END, AsyncRequests, SyncRequests
from ._shared_memory import inline, joined, outgoing
from ._status import StatusError, error_status, number, status_after_return, unexpected

if TYPE_CHECKING:
    from .._shared_buffer import SharedBuffer
    from ._server_connection import ServerConnection

__all__ = ['Call', 'Handler']

_logger = logging.getLogger(__name__)

_RESPONSE = int(MessageType.RESPONSE)
_DATA = int(MessageType.DATA)
_OK = 0
_CANCELLED = int(grpc.StatusCode.CANCELLED.value[0])
#: What fails a ``def`` handler's call, with the status error_status() gives it.
_SYNC_FAILURES = (*HANDLER_FAILURES, asyncio.CancelledError)

# Answer of a call: (status code number, details, payload); payload None
# ends a response stream with a bare close instead of a Response frame.
_Answer = tuple[int, str, Union[bytes, Pieces, None]]


class Handler:
    """One registered method, ready to call."""

    __slots__ = ('path', 'kind', 'function', 'deserialize', 'serialize', 'is_async',
                 'request_streaming', 'response_streaming', 'request_type', 'observed', 'metrics',
                 'counted_only')

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
        #: Whether the server's metrics and interceptors see its calls, and
        #: its counters (set by the server).
        self.observed = False
        self.metrics: MethodMetrics | None = None
        #: Whether the server observes its calls only to count them in
        #: ``metrics`` (no interceptors): the calls then do that
        #: without an :class:`Observation` (set by the server).
        self.counted_only = False

    def decode(self, payload: bytes | memoryview, context: ServicerContext) -> Any:
        """The request message, or the call aborted with INVALID_ARGUMENT (as
        the gRPC lane's request guard answers an undecodable request).

        :raises grpc.aio.AbortError: the bytes do not decode.
        """
        try:
            if self.deserialize is _identity:  # a method without (de)serializers takes bytes
                return bytes(payload)
            return self.deserialize(payload)  # type: ignore[arg-type]
        except Exception as error:  # DecodeError, or whatever a custom deserializer raises
            raise context._abort_status(
                grpc.StatusCode.INVALID_ARGUMENT,
                f'{self.path}: the request is not a valid {self.request_type}: {error}', ()) from None


def _identity(value: Any) -> Any:
    return value


class Call:
    """One stream on a connection: the handler's run and its answer."""

    __slots__ = ('connection', 'stream_id', 'handler', 'context', 'task', 'finished', 'requests',
                 'response_streaming', 'deadline', 'credit', 'observation', 'started')

    def __init__(self, connection: 'ServerConnection', stream_id: int, handler: Handler,
                 context: ServicerContext) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.handler = handler
        self.context = context
        self.task: asyncio.Future[Any] | None = None
        self.finished = False
        self.requests: AsyncRequests | SyncRequests | None = None
        self.response_streaming = handler.response_streaming
        self.deadline: _DeadlineEntry | None = None
        #: What the response stream may still send (flow control), if agreed.
        self.credit: SendCredit | None = None
        #: The call as metrics and interceptors see it, until it ends.
        self.observation: Observation | None = None
        #: When a call of a ``counted_only`` handler started (its
        #: ``metrics.started()``), until it is counted as ended; else None.
        self.started: float | None = None

    # -- start ------------------------------------------------------------------------

    def start(self, payload: bytes | memoryview, flags: int, timeout: float | None) -> None:
        connection = self.connection
        handler = self.handler
        loop = connection.loop
        agreement = connection.agreement
        if handler.counted_only:
            # The default (metrics, no interceptors): what an Observation
            # does, without making one (4 % of the server's instructions
            # for a small call, measured).
            self.started = handler.metrics.started()  # type: ignore[union-attr]
        elif handler.observed:
            server = connection.server
            assert server.observer is not None
            try:
                self.observation = server.observer.start(
                    handler.metrics, handler.path, 'ttrpc', self.context, connection.peer,
                    self.context._deadline)
            except CallRejected as rejection:  # counted already
                self.context.set_trailing_metadata(rejection.trailing_metadata())  # (its status details)
                self.answer(number(rejection.code), rejection.details)
                return
        expires = None if timeout is None else loop.time() + timeout
        if expires is not None and not handler.is_async:
            self._expire_at(expires)
        if handler.response_streaming and agreement.send_window:
            self.credit = SendCredit(agreement.send_window)
        argument: Any
        if handler.request_streaming:
            context = self.context

            def decode(data: bytes | memoryview) -> Any:
                return handler.decode(data, context)

            window = (ReceiveWindow(agreement.receive_window, self.connection.server.max_message_bytes)
                      if agreement.receive_window else None)
            requests: AsyncRequests | SyncRequests = (
                AsyncRequests(loop, decode, window, self._grant) if handler.is_async
                else SyncRequests(decode, window, self._grant_thread))
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
                self.answer(*error_status(self.context, error, handler.path))
                return
        else:  # deserialized in the handler's thread, which takes it from the context
            argument = None
            self.context._request = payload  # (let go of if the call ends first: see _take_request())
        if handler.is_async:
            # Started at once: a handler that does not suspend answers inside
            # data_received, without a trip through the event loop.
            self.task = run_eagerly(self._serve_async(argument), loop)
            if expires is not None and not self.finished:
                # Only now: most handlers answer in their first step, and
                # a call that has ended needs no deadline (one heap entry
                # less per call). Its expiry time is still the request's.
                self._expire_at(expires)
        else:
            try:
                future = loop.run_in_executor(connection.server._executor, self._run_sync, argument)
            except RuntimeError:  # executor shut down: the server is stopping, the handler never ran
                self.answer(number(grpc.StatusCode.UNAVAILABLE), NOT_STARTED)
                return
            self.task = future
            future.add_done_callback(self._sync_done)

    def _expire_at(self, when: float) -> None:
        """End the call at ``when`` (``loop.time()``) unless it has ended."""
        self.deadline = _DeadlineEntry(self)
        self.connection.server._deadlines.add(when, self.deadline)

    def _grant(self, increment: int) -> None:
        if not self.finished:
            self.connection.send_window_update(self.stream_id, increment)

    def _grant_thread(self, increment: int) -> None:
        try:
            self.connection.loop.call_soon_threadsafe(self._grant, increment)
        except RuntimeError:  # the loop is closed: nobody to grant to
            pass

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
            returned = await result  # a handler that sends with context.write()
            if returned is not None:
                raise stream_returned(self.handler.path, returned)

    async def _write_async(self, message: Any) -> None:
        if self.finished:
            raise asyncio.CancelledError()
        context = self.context
        if context._abort is not None:  # it caught its abort: nothing goes after it, as on gRPC
            raise context._aborted()
        context._headers_sent = True
        credit = self.credit
        if credit is not None and credit.credit <= 0:
            await credit.wait()  # the client has not taken what it got
            if self.finished:
                raise asyncio.CancelledError()
        frame, fds, size = self._data_frame(message)
        connection = self.connection
        connection.send(frame, fds)
        self._count_sent(size, bool(fds))
        if connection.write_paused:
            await connection.drain()
        else:
            # Give the loop back between messages, as gRPC's runtime does by
            # awaiting each write: a handler that never waits for anything
            # else must not hold up other calls and connections.
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
                self.answer(number(grpc.StatusCode.CANCELLED), 'Cancelled')
            raise
        except HANDLER_FAILURES as error:
            if not self.finished:
                self.answer(*error_status(self.context, error, self.handler.path))
            return
        if self.finished:
            return
        if self.response_streaming:
            self._end_stream()
        else:
            # Not answer(*...): a call with * is not inlined by the interpreter.
            code, details, payload = self._answer_for(result)
            self.answer(code, details, payload)

    # -- def handlers (in a worker thread) --------------------------------------------

    def _run_sync(self, argument: Any) -> _Answer | None:
        context = self.context
        if context._end is not None:
            return None  # ended (deadline, client gone) before a thread was free
        handler = self.handler
        try:
            if not handler.request_streaming:
                argument = handler.decode(context._take_request(), context)
            if self.response_streaming:
                context._writer = self._write_thread
                result = handler.function(argument, context)
                if result is not None:
                    for message in result:
                        self._write_thread(message)
                status = status_after_return(context)
                return (status[0], status[1], b'') if status else (_OK, '', None)
            return self._answer_for(handler.function(argument, context))
        except CallEnded:
            return None
        except _SYNC_FAILURES as error:  # (a def handler's CancelledError is its own, not the call's end)
            code, details = error_status(context, error, handler.path)
            return code, details, b''

    def _write_thread(self, message: Any) -> None:
        context = self.context
        if context._end is not None:
            raise CallEnded()
        if context._abort is not None:  # as in _write_async
            raise context._aborted()
        context._headers_sent = True
        credit = self.credit
        if credit is not None:
            while not credit.wait_blocking(0.1):  # the client has not taken what it got
                if self.context._end is not None:
                    raise CallEnded()
        frame, fds, size = self._data_frame(message)
        connection = self.connection
        try:
            connection.loop.call_soon_threadsafe(self._send_from_thread, frame, fds, size)
        except RuntimeError:  # the loop is closed
            close_fds(fds)
            raise CallEnded() from None
        while not connection.writable.wait(0.1):
            if self.context._end is not None:
                raise CallEnded()

    def _send_from_thread(self, frame: bytes, fds: list[int], size: int) -> None:
        if self.finished:
            close_fds(fds)
        else:
            self.connection.send(frame, fds)
            self._count_sent(size, bool(fds))

    def _sync_done(self, future: asyncio.Future[Any]) -> None:
        if self.finished:
            return
        if future.cancelled():
            self.answer(number(grpc.StatusCode.UNAVAILABLE), SHUTTING_DOWN)
            return
        error = future.exception()
        if error is not None:
            self.answer(*unexpected(error, self.handler.path))
            return
        answer = future.result()
        if answer is None:
            return
        if self.context.cancelled():
            # It returned once its deadline had passed (is_active() said so),
            # before the deadline's timer ended the call: the answer is the
            # timer's, whichever came first (the gRPC lane's too).
            self.expire()
            return
        code, details, payload = answer
        if payload is None:
            self._end_stream()
        else:
            self.answer(code, details, payload)

    # -- answers ----------------------------------------------------------------------

    def _count_sent(self, size: int, shared: bool) -> None:
        # On the event loop only: the fast lane's counters take no lock.
        # Observed handlers' answers only, as for requests (see ServerConnection._count_received).
        lane = self.connection.server.lane_metrics
        if lane is not None and self.handler.observed:
            if shared:
                lane.shared_sent += size
            else:
                lane.inline_sent += size

    def _serialized(self, message: Any) -> bytes | Pieces:
        """An answer message serialized as this connection takes it (:func:`serialized`)."""
        return serialized(self.handler.serialize, message, self.connection.agreement.shared_memory)

    def _data_frame(self, message: Any) -> tuple[bytes, list[int], int]:
        """A streamed answer as a data frame, the descriptors to pass with it
        and its serialized size, its cost spent from the stream's credit.

        :raises StatusError: RESOURCE_EXHAUSTED, over max_message_bytes.
        """
        payload = self._serialized(message)
        size = len(payload)
        self._check_size(size)
        data, fds, flags = outgoing(payload, self.connection.agreement)
        if self.credit is not None:
            self.credit.spend(message_cost(size))
        return encode_frame(self.stream_id, _DATA, flags, data), fds, size

    def _answer_for(self, result: Any) -> tuple[int, str, bytes | Pieces]:
        context = self.context
        if context._abort is not None or context._code is not None:  # (most handlers set neither)
            status = status_after_return(context)
            if status is not None:
                return status[0], status[1], b''
        try:
            payload = self._serialized(result)
            if len(payload) > self.connection.server.max_message_bytes:  # (tested before the call)
                self._check_size(len(payload))
        except Exception as error:
            code, details = error_status(context, error, self.handler.path)
            return code, details, b''
        return _OK, '', payload

    def _check_size(self, size: int) -> None:
        if size > (limit := self.connection.server.max_message_bytes):  # (said, and logged limited)
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, answer_too_large(self.handler.path, size,
                                                                                   limit))

    def answer(self, code: int, details: str, payload: bytes | Pieces = b'', end: _End = _End.FINISHED
               ) -> None:
        """End the call with a Response frame (status and, if OK, payload)."""
        if self.finished:
            return
        connection = self.connection
        if code == _OK:
            replies = self.context._reply_buffers
            if (data := inline(payload, connection.agreement, replies)) is not None:
                # Most answers: sent without outgoing(), which would return them as they are.
                self.finished = True  # the answer goes out before _end() may close the connection
                connection.send(ok_response_frame(self.stream_id, 0, data))
                lane = connection.server.lane_metrics
                if lane is not None and self.handler.observed:  # (as in _count_sent)
                    lane.inline_sent += len(data)
                self._end(end, code, details)
            elif connection.holding:
                self._answer_shared(payload, replies, end)
            else:
                # In shared memory, outside a read (a def handler, or one that
                # awaited): held until _end() gave back the request's lends, so
                # that their RELEASE leaves in the same write (see hold()).
                connection.hold()
                try:
                    self._answer_shared(payload, replies, end)
                finally:
                    connection.flush_held()
            return
        self.finished = True
        # The handler's google.rpc.Status details, with the status it ended its call with.
        rich = self.context._status_details(code, details) if end is _End.FINISHED else ()
        response = encode_response(code, details, joined(payload), rich)
        connection.send(encode_frame(self.stream_id, _RESPONSE, 0, response))
        self._end(end, code, details)

    def _answer_shared(self, payload: bytes | Pieces, replies: tuple[SharedBuffer, ...], end: _End) -> None:
        """(:meth:`answer`, OK) Send ``payload`` and the ``replies`` buffers in shared memory."""
        self.finished = True  # the answer goes out before _end() may close the connection
        connection = self.connection
        try:
            data, fds, flags = outgoing(payload, connection.agreement, replies, hand_over=True)
        except SharedMemoryError as error:
            code = number(grpc.StatusCode.RESOURCE_EXHAUSTED)
            details = f'cannot pass the shared buffers of the answer: {error}'
            connection.send(encode_frame(self.stream_id, _RESPONSE, 0, encode_response(code, details, b'')))
            self._end(end, code, details)
            return
        connection.send(ok_response_frame(self.stream_id, flags, data), fds)
        size = len(payload)
        for buffer in replies:
            size += buffer.size
        self._count_sent(size, bool(fds))
        self._end(end)

    def _end_stream(self) -> None:
        if self.finished:
            return
        status = status_after_return(self.context)
        if status is not None:
            self.answer(*status)
            return
        self.finished = True
        self.connection.send(encode_frame(self.stream_id, _DATA, FLAG_REMOTE_CLOSED | FLAG_NO_DATA))
        self._end(_End.FINISHED)

    def _end(self, how: _End, code: int = _OK, details: str = '') -> None:
        self.finished = True
        started = self.started
        if started is not None:
            self.started = None
            self.handler.metrics.ended(started, code)  # type: ignore[union-attr]
        observation = self.observation
        if observation is not None:
            self.observation = None
            observation.end(code, details)
        if self.deadline is not None:
            self.deadline.call = None  # the queue drops it lazily: it must not hold the call
        if self.requests is not None:
            self.requests.cancel()
        if self.credit is not None:
            self.credit.close()
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
        self.answer(number(grpc.StatusCode.DEADLINE_EXCEEDED), 'Deadline Exceeded', end=_End.EXPIRED)
        self._cancel_task()

    def fail(self, code: grpc.StatusCode, details: str, end: _End = _End.FINISHED) -> None:
        """End the call with ``code`` because of what the client did (or
        the server stopping), and stop the handler."""
        if self.finished:
            return
        self.answer(number(code), details, end=end)
        self._cancel_task()

    def shut_down(self, details: str = SHUTTING_DOWN) -> None:
        """The server stops: end the call with UNAVAILABLE, cancelling its handler."""
        self.fail(grpc.StatusCode.UNAVAILABLE, details, _End.CANCELLED)

    def cancel(self, expired: bool = False) -> None:
        """The client left (CANCEL, connection gone): end without an answer,
        cancelling the handler. ``expired``: its CANCEL said it left because
        the deadline passed; the call ends DEADLINE_EXCEEDED, as by :meth:`expire`."""
        if self.finished:
            return
        if expired:
            self._end(_End.EXPIRED, number(grpc.StatusCode.DEADLINE_EXCEEDED), 'Deadline Exceeded')
        else:
            self._end(_End.CANCELLED, _CANCELLED, 'the client cancelled the call or went away')
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

    def data(self, frame: Frame, payload: bytes | memoryview, shared: bool = False) -> None:
        """A data frame of this call, with its message (resolved from shared
        memory if the frame came that way: ``shared``)."""
        requests = self.requests
        if requests is None:
            self.fail(grpc.StatusCode.INVALID_ARGUMENT,
                      f'{self.handler.path} takes no streamed requests: data frame not allowed')
            return
        if not frame.flags & FLAG_NO_DATA:
            if requests.ended:  # the handler must not read it: refused, as by containerd's server
                self.fail(grpc.StatusCode.INVALID_ARGUMENT, f'{self.handler.path}: {AFTER_END}')
                return
            # Each streamed message is held to the limit a single request has
            # (the frame limit leaves room for a request's envelope).
            server = self.connection.server
            if len(payload) > server.max_message_bytes:
                self.fail(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          received_too_large(len(payload), server.max_message_bytes, server=True))
                return
            requests.feed(payload, shared)
            overrun = requests.overrun(len(payload), self.connection.request_backlog_bytes)
            if overrun is not None:
                self.fail(grpc.StatusCode.RESOURCE_EXHAUSTED, overrun)
                return
        if frame.flags & FLAG_REMOTE_CLOSED:
            requests.close()


class _DeadlineEntry:
    """A call's entry in the deadline queue, let go of when the call ends."""

    __slots__ = ('call',)

    def __init__(self, call: Call) -> None:
        self.call: Call | None = call


def call_finished(entry: _DeadlineEntry) -> bool:
    return entry.call is None


def expire_call(entry: _DeadlineEntry, _: Any) -> None:
    if entry.call is not None:
        entry.call.expire()
