"""The fast lane's asyncio client: :class:`AsyncConnection`."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, AsyncGenerator, Awaitable, Callable, Sequence, TypeVar
import warnings

from .._busy_poll import DEFAULT_BUSY_POLL, BusyPoll, await_polling
from .._deadline import Deadline, Timeout, deadline_of, wait_deadline, within
from .._methods import Method
from .._options import DEFAULT_MAX_MESSAGE_BYTES
from .._payload import SharedMemoryOptions, close_fds
from .._peer import check_server_connection
from .._request_stream import RequestStream
from .._shared_buffer import SharedBuffer
from ..address import StrPath
from ..exceptions import IPCError, IPCTimeoutError, IPCUnavailableError, no_answer
from ._call import (
    HELLO,
    ClientCore,
    ClientStream,
    Item,
    Outcome,
    check_kind,
    close_send_frame,
    connect_arguments,
    data_frame,
    deserialize,
    prepare,
    unary_response,
)
from ._connection import FramedConnection
from ._deadlines import DeadlineQueue
from ._errors import SenderFailed, closed, connect_error, idle_error, lost, timeout_error, unsent, wait_error
from ._flow import DEFAULT_STREAM_WINDOW
from ._frames import Frame, OversizedFrame
from ._messages import ENVELOPE_ALLOWANCE, Metadata
from ._transport import UnixTransport

__all__ = ['AsyncConnection']

_T = TypeVar('_T')


class _AsyncStream(ClientStream):
    """Items received for one call, with a waiter for the next."""

    __slots__ = ('loop', 'busy_poll', 'waiter')

    def __init__(self, loop: asyncio.AbstractEventLoop, busy_poll: BusyPoll) -> None:
        super().__init__()
        self.loop = loop
        self.busy_poll = busy_poll
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self, until: float | None = None) -> Item | None:
        """The next item (its mappings, if :attr:`held`, the caller's to let go:
        :meth:`HeldMappings.taken`); ``None`` if none came by ``until`` (``loop.time()``)."""
        while not self.items:
            if until is not None and self.loop.time() >= until:
                return None
            self.waiter = waiter = self.loop.create_future()
            # A plain timer, not asyncio.wait_for: that costs a task per message.
            timer = None if until is None else self.loop.call_at(until, _wake, waiter)
            try:
                await await_polling(self.busy_poll, waiter)
            finally:
                self.waiter = None
                if timer is not None:
                    timer.cancel()
        return self.items.popleft()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _deliver(target: Any, item: Item) -> None:
    if target.__class__ is _AsyncStream:
        target.push(item)
    elif target.__class__ is _Unary:
        target.deliver(item)
    elif not target.done():  # the Hello's future
        target.set_result(item)


class _ClientProtocol(FramedConnection):
    """The client end of a connection: routes frames to calls."""

    def __init__(self, path: str, message_limit: int, shared_memory: SharedMemoryOptions | None,
                 stream_window: int, busy_poll: BusyPoll) -> None:
        super().__init__(asyncio.get_running_loop(), message_limit + ENVELOPE_ALLOWANCE)
        #: How long a waiting call keeps the loop awake; one policy for the
        #: connection, whose calls all run on one loop.
        self.busy_poll = busy_poll
        self.core = ClientCore(path, message_limit, self.decoder, shared_memory, stream_window, _deliver,
                               self.unread_by_peer)
        self.accepts_fds = shared_memory is not None
        #: Why the connection is unusable (closed, lost), else None.
        self.error: IPCUnavailableError | None = None
        #: Closed with its last call in flight (see AsyncConnection.retire()).
        self.retired = False
        self.deadlines: DeadlineQueue[_Unary] = DeadlineQueue(self.loop, _ended, _expire)

    def in_flight(self) -> int:
        return len(self.core.streams)

    def frame_received(self, item: Frame | OversizedFrame) -> None:
        reason = self.core.route(item)
        if reason is not None:
            self.violation(reason)

    def violation(self, reason: str) -> None:
        if self.error is None:
            self.error = lost(self.core.path, reason)
        super().violation(reason)

    def lost(self, exc: Exception | None) -> None:
        if self.error is None:
            self.error = lost(self.core.path, exc or 'closed by the server')
        self.core.fail_all(self.error)
        self.deadlines.close()

    async def drain(self, opening: bool = False) -> None:
        """Wait until the server has read enough (:meth:`FramedConnection.drain`).

        :raises IPCUnavailableError: the connection is gone; :class:`NothingSent` if it
            was retired and a call waits here before ``opening`` (nothing of it sent, as in
            :meth:`open`). A request stream's later messages wait here too: theirs is the error.
        """
        await super().drain()
        if self.error is not None:
            raise unsent(self.error, opening and self.retired)

    def send(self, frame: bytes, fds: Sequence[int] = ()) -> None:
        """:raises IPCUnavailableError: the connection is closed or lost."""
        if self.error is not None:
            close_fds(fds)
            raise self.error
        super().send(frame, fds)

    def open(self, target: Any, prepared: Any) -> int:
        """Register a call and send its request (passing its descriptors);
        ids increase on the wire because nothing else runs between
        allocation and write.

        :raises NothingSent: the connection broke in this write (a socket
            write that fails writes nothing, and queued frames wait for it),
            or was retired and closed before (the caller took it before).
        """
        if self.error is not None:
            prepared.discard()
            raise unsent(self.error, self.retired)
        stream_id = self.core.register(target, prepared)
        self.send(prepared.frame(stream_id), prepared.take_fds())
        if self.error is not None:
            raise unsent(self.error)
        return stream_id

    def finish(self, stream_id: int, stream: _AsyncStream | None = None) -> None:
        """The caller is done with a call (``stream``'s items unread let go): tell the server if
        it may still be at work; close a retired connection with its last call."""
        cancel = self.core.finish(stream_id, stream)
        if cancel is not None and self.error is None:
            super().send(cancel)
        if self.retired and not self.core.streams:
            self.abort()

    def abort(self) -> None:
        """Close the connection at once (see :meth:`AsyncConnection.abort`)."""
        if self.error is None:
            self.error = closed(self.core.path)
        if self.transport is not None and not self.transport.is_closing():
            # At once, dropping what was not sent: it is for calls that fail
            # now anyway, and a server that stopped reading would keep it,
            # and the socket, for ever.
            self.transport.abort()


class AsyncConnection:
    """One ttrpc connection for asyncio code.

    Open it with ``await AsyncConnection.connect(path)`` (or ``async with``).
    Bound to the event loop it was opened on; any number of tasks of that
    loop may call concurrently (one connection multiplexes them). Not
    thread-safe. A broken connection stays broken: :attr:`is_closed` turns
    true and every call raises :class:`IPCUnavailableError`.

    Deadlines: ``timeout`` (seconds, or a deadline) per call, ``None`` for no
    deadline. The server is told the deadline and stops the handler when it
    passes. With a vyra_base_ipc server, a call the caller leaves early (a
    stream left, a task cancelled, the deadline passed) is cancelled on the
    server at once, and streams are flow-controlled (see :mod:`._flow`);
    with other ttrpc servers, the server's handler runs on until it ends or
    its deadline passes, and its answers are dropped.
    """

    #: The lane's name, as ``lane=`` takes it.
    lane = 'ttrpc'

    def __init__(self, socket_path: str, transport: UnixTransport, protocol: _ClientProtocol,
                 max_message_bytes: int) -> None:
        self.socket_path = socket_path
        self.max_message_bytes = max_message_bytes
        self._transport = transport
        self._protocol = protocol

    @classmethod
    async def connect(cls, socket_path: StrPath, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                      timeout: float | None = None,
                      shared_memory: SharedMemoryOptions | None = SharedMemoryOptions(),
                      stream_window: int = DEFAULT_STREAM_WINDOW,
                      busy_poll: float = DEFAULT_BUSY_POLL,
                      server_uid: int | None = None) -> 'AsyncConnection':
        """Connect to the ttrpc server on ``socket_path``.

        A Hello call sent right away offers the server this package's
        extensions (cancellation, flow control, and shared memory for large
        messages if ``shared_memory``); the first call waits for its answer
        (within that call's deadline), so connecting costs no round trip.
        Servers other than vyra_base_ipc's say no, and the connection is
        plain ttrpc.

        :param max_message_bytes: largest message sent or accepted.
        :param timeout: validated as :meth:`SyncConnection.connect`'s; a
            Unix socket connects at once or not at all (a full listen backlog
            is :class:`IPCUnavailableError` at once, as there).
        :param shared_memory: options to offer, ``None`` to keep every message inline.
        :param stream_window: bytes of streamed messages the server may send
            on a stream before this end has taken them (flow control).
        :param busy_poll: seconds a call waiting for an answer keeps the
            event loop from sleeping (:func:`~vyra_base_ipc._busy_poll.await_polling`); 0 never.
        :param server_uid: the user the server must run as (``SO_PEERCRED``
            of the connection, checked before anything is sent); by default
            this process's own uid or root.
        :raises UntrustedServerError: the server runs as another user.
        :raises IPCUnavailableError: no socket, nobody listening, not allowed.
        :raises TypeError, ValueError: invalid arguments.
        """
        path, limit, timeout, shared, window, trusted = connect_arguments(
            socket_path, max_message_bytes, timeout, shared_memory, stream_window, server_uid)
        policy = BusyPoll(busy_poll)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            # A Unix socket connects at once or fails, with EAGAIN if the
            # server's listen backlog is full (loop.sock_connect() waits on
            # that as on a connect in progress, then returns a socket that
            # never connected).
            sock.connect(path)
        except OSError as error:
            sock.close()
            raise connect_error(path, error) from None
        except BaseException:
            sock.close()
            raise
        try:
            check_server_connection(sock, path, trusted)
        except BaseException:
            sock.close()
            raise
        protocol = _ClientProtocol(path, limit, shared, window, policy)
        transport = UnixTransport(loop, sock, protocol)
        protocol.transport = transport  # usable at once; connection_made follows
        # Sent now, answered while the caller gets ready: the first call
        # settles it, so connecting costs no round trip.
        protocol.core.hello = loop.create_future()
        protocol.open(protocol.core.hello, protocol.core.hello_request())
        return cls(path, transport, protocol, limit)

    @property
    def shared_memory(self) -> SharedMemoryOptions | None:
        """The shared-memory options agreed on this connection; ``None`` if
        every message travels inline (or before the first call has settled
        the agreement)."""
        return self._protocol.core.agreement.shared_memory

    @property
    def cancels(self) -> bool:
        """Whether calls left early are cancelled on the server (agreed
        with a vyra_base_ipc server, once the first call settled it)."""
        return self._protocol.core.agreement.cancel

    def _begin(self, method: Method, response_streaming: bool) -> _ClientProtocol:
        """Checks every call starts with (not a coroutine: a call awaits
        :meth:`_settle_hello` only while the connection's first answer is
        due)."""
        check_kind(method, response_streaming)
        protocol = self._protocol
        if asyncio.get_running_loop() is not protocol.loop:
            raise RuntimeError('this AsyncConnection belongs to another event loop; open one per loop')
        return protocol

    async def probe(self, deadline: Deadline) -> None:
        """Make sure the server answers: wait for the answer to the
        connection's Hello (no wait once a call had it). A socket accepts
        connections while its server is stopped or its event loop held.

        :raises IPCUnavailableError: no answer within ``deadline``.
        """
        protocol = self._protocol
        if protocol.core.hello is not None:
            try:
                await self._settle_hello(protocol, HELLO, deadline)
            except IPCTimeoutError:
                raise no_answer(self.socket_path, deadline.timeout) from None

    async def _settle_hello(self, protocol: _ClientProtocol, method: Method,
                            deadline: Deadline | None, idle_timeout: float | None = None) -> None:
        """The first call of the connection waits for the answer to its
        Hello (within its deadline, and a stream's idle timeout)."""
        hello = protocol.core.hello
        item = await _within(asyncio.shield(hello), method, deadline, idle_timeout)
        if protocol.core.hello is hello:  # else another call settled it meanwhile
            protocol.core.settle(item)
            segments = protocol.core.agreement.segments
            if segments is not None:  # RELEASE frames leave from the loop
                segments.attach(protocol.loop, protocol.send)

    @property
    def is_closed(self) -> bool:
        """Whether the connection was closed, broke, was retired or used up
        its stream ids; calls would fail (those in flight go on in the last two cases)."""
        return self._protocol.error is not None or self._protocol.core.exhausted

    def retire(self) -> None:
        """Take no new calls (:attr:`is_closed` turns true); close once those in flight have ended.
        A call that took the connection before and finds it closed raises :class:`NothingSent`.
        In the loop's thread, as every call (each registers in one step with its send)."""
        protocol = self._protocol
        protocol.core.exhausted = protocol.retired = True
        if not protocol.core.streams:
            protocol.abort()

    async def close(self) -> None:
        """Close the connection; calls in flight fail with
        :class:`IPCUnavailableError`. Idempotent."""
        self.abort()

    def abort(self) -> None:
        """Close the connection at once, as :meth:`close` does, from code
        that cannot await: in its loop's thread, or while its loop does not
        run (also once it closed)."""
        self._protocol.abort()

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

    async def call(self, method: Method, request: Any, *, timeout: Timeout = None,
                   metadata: Metadata | None = None, buffers: Sequence[SharedBuffer] = (),
                   return_buffers: bool = False) -> Any:
        """Call a unary-response method (``unary_unary`` or ``stream_unary``)
        and return its response. A call cancelled (its task) or past its
        deadline is cancelled on the server.

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
            deadline = deadline_of(timeout)
            protocol = self._protocol
            if (method.__class__ is not Method or method.kind.response_streaming
                    or asyncio.get_running_loop() is not protocol.loop):
                self._begin(method, False)  # raises (the checks in line: 2 calls less per call)
            if protocol.core.hello is not None:
                await self._settle_hello(protocol, method, deadline)
            if protocol.write_paused:  # the server does not read: new calls wait, not queue
                await _within(protocol.drain(opening=True), method, deadline)
            prepared = prepare(method, request, deadline, metadata, self.max_message_bytes,
                               protocol.core.agreement, buffers)
            loop = protocol.loop
            if method.kind.request_streaming:
                stream = _AsyncStream(loop, protocol.busy_poll)
                stream_id = protocol.open(stream, prepared)
                sender = loop.create_task(self._send_requests(stream_id, method, request, stream))
                try:
                    item = await stream.next(None if deadline is None else loop.time() + deadline.remaining())
                    stream.expired = item is None
                finally:
                    protocol.finish(stream_id)
                    sender.cancel()
                if item is None:
                    raise timeout_error(method)
                return unary_response(method, self.max_message_bytes, item, return_buffers)
            future: asyncio.Future[None] = loop.create_future()
            unary = _Unary(future)
            stream_id = protocol.open(unary, prepared)
            if deadline is not None:
                protocol.deadlines.add(loop.time() + deadline.remaining(), unary, method)
            try:
                await await_polling(protocol.busy_poll, future)
            finally:
                protocol.finish(stream_id)
                answer = unary.take()
            assert answer is not None  # the future is done only by deliver()
            return unary_response(method, self.max_message_bytes, answer, return_buffers)
        except IPCError as error:
            # One error object fails every call of a broken connection: name this call.
            raise error.for_method(method.path) from None

    async def stream(self, method: Method, request: Any, *, timeout: Timeout = None,
                     metadata: Metadata | None = None, idle_timeout: float | None = None
                     ) -> AsyncGenerator[Any, None]:
        """Call a response-streaming method (``unary_stream`` or
        ``stream_stream``); iterate over its responses.

        The deadline covers the whole stream (``None``: the stream lives as
        long as the caller wants). Leaving the iteration early, cancelling
        the task or the deadline passing cancels the call on the server.

        :param request: the request message; for ``stream_stream`` an
            iterable or async iterable of them, sent concurrently with
            receiving.
        :param idle_timeout: seconds to wait for each message at most; the
            call fails with :class:`IPCTimeoutError` when one takes longer.
        :raises TypeError: the method does not stream responses (use :meth:`call`).
        :raises IPCUnavailableError, IPCTimeoutError, IPCRemoteError: the call failed.
        """
        try:
            deadline = deadline_of(timeout)
            protocol = self._begin(method, True)
            if protocol.core.hello is not None:
                await self._settle_hello(protocol, method, deadline, idle_timeout)
            if protocol.write_paused:  # the server does not read: new calls wait, not queue
                await _within(protocol.drain(opening=True), method, deadline, idle_timeout)
            outcome = Outcome(method, self.max_message_bytes)
            loop = protocol.loop
            prepared = prepare(method, request, deadline, metadata, self.max_message_bytes,
                               protocol.core.agreement)
            stream = _AsyncStream(loop, protocol.busy_poll)
            stream_id = protocol.open(stream, prepared)
            sender = (loop.create_task(self._send_requests(stream_id, method, request, stream))
                      if method.kind.request_streaming else None)
            until = None if deadline is None else loop.time() + deadline.remaining()
            try:
                while True:
                    if until is not None and stream.items and loop.time() >= until and \
                            outcome.too_late(stream, stream_id not in protocol.core.streams):
                        stream.expired = True
                        raise timeout_error(method)
                    wait_until = until if idle_timeout is None else min(until or float('inf'),
                                                                       loop.time() + idle_timeout)
                    item = await stream.next(wait_until)
                    if item is None:
                        stream.expired = until is not None and loop.time() >= until
                        raise (timeout_error(method) if stream.expired
                               else idle_error(method, idle_timeout))  # type: ignore[arg-type]
                    if stream.held:
                        protocol.core.held.taken(stream, item)
                    ended, payload = outcome.streamed(item)
                    if not ended:
                        increment = stream.taken(item)
                        if increment and protocol.error is None:  # (none to a connection gone: what
                            protocol.send_window_update(stream_id, increment)  # came is still read)
                    if payload is not None:
                        yield deserialize(method, payload)
                    if ended:
                        return
            finally:
                protocol.finish(stream_id, stream)
                if sender is not None:
                    sender.cancel()
        except IPCError as error:
            # One error object fails every call of a broken connection: name this call.
            raise error.for_method(method.path) from None

    async def _send_requests(self, stream_id: int, method: Method, requests: Any,
                             stream: _AsyncStream) -> None:
        """Send a request stream as data frames, then close it; waits while
        the server has not granted credit. A failure (the iterator raised, a
        message too large) ends the call with it."""
        protocol = self._protocol
        shared = protocol.core.agreement
        credit = stream.credit
        try:
            async for message in RequestStream(method, requests):
                if credit is not None and credit.credit <= 0:
                    await credit.wait()
                    if credit.closed:
                        return
                frame, fds, cost = data_frame(stream_id, method, message, self.max_message_bytes, shared)
                protocol.send(frame, fds)
                if credit is not None:
                    credit.spend(cost)
                if protocol.write_paused:
                    await protocol.drain()
            protocol.send(close_send_frame(stream_id))
        except asyncio.CancelledError:
            raise
        except IPCError as error:
            stream.push(error)
        except Exception as error:
            # The caller's own iterator failed: the caller gets its exception,
            # and the server a cancel as the caller leaves, never the end of
            # the stream, which it would take for the whole one (but a server
            # without cancel: its handler ends rather than waits).
            stream.push(SenderFailed(error))
            if protocol.error is None and not shared.cancel:
                protocol.send(close_send_frame(stream_id))


async def _within(awaitable: Awaitable[_T], method: Method, deadline: Deadline | None,
                  idle_timeout: float | None = None) -> _T:
    """What ``awaitable`` gives, awaited until ``deadline`` (or a stream's
    ``idle_timeout``, if that comes first).

    A task cancelled meanwhile is cancelled, also when ``awaitable`` is done
    in the same pass of the loop (see :func:`~vyra_base_ipc._deadline.within`:
    Python 3.11's ``asyncio.wait_for()`` returned its result, and the
    cancelled call went on, its request sent).

    :raises IPCTimeoutError: the deadline (or idle timeout) passed first (``method``'s).
    """
    wait = wait_deadline(deadline, idle_timeout)
    if wait is None:
        return await awaitable
    try:
        return await within(awaitable, max(wait.remaining(), 0))
    except TimeoutError:
        raise wait_error(method, deadline, idle_timeout) from None


class _Unary:
    """A unary call waiting for its answer, and its entry in the deadline
    queue. The answer is kept here for the caller to :meth:`take`, not as
    the future's result: the loop's handle that resumes the caller holds the
    future until the caller next suspends, and an answer in shared memory
    held that long would keep its segment from the caller's next call."""

    __slots__ = ('future', 'item', 'expired')

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future: asyncio.Future[None] | None = future
        self.item: Item | None = None
        #: The deadline queue answered it: the caller leaves by its deadline.
        self.expired = False

    def deliver(self, item: Item) -> None:
        """The call's answer or error (the first one counts)."""
        future = self.future
        if future is not None and not future.done():
            self.item = item
            future.set_result(None)

    def take(self) -> Item | None:
        """The answer, if it came (``None`` if not); let go of everything:
        the deadline queue drops this entry lazily."""
        item, self.item, self.future = self.item, None, None
        return item


def _ended(unary: _Unary) -> bool:
    return unary.future is None or unary.future.done()


def _expire(unary: _Unary, method: Method) -> None:
    if not _ended(unary):
        unary.expired = True
        unary.deliver(timeout_error(method))
