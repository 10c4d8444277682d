"""The two lanes of a client, in one shape, and the choice between them.

A client calls through a *lane*: the fast lane's connection
(:class:`~vyra_base_ipc.ttrpc.AsyncConnection` /
:class:`~vyra_base_ipc.ttrpc.SyncConnection`) or a gRPC channel wrapped in
:class:`GrpcLane` / :class:`SyncGrpcLane`, which offer the same
``call``/``stream``/``is_closed`` and raise the same errors. Which lane a
call takes is decided (and recorded) by :class:`LaneChoice`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
from typing import Any, AsyncGenerator, Iterator, Sequence, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from ._deadline import Deadline, within
from ._idle_watch import IdleWatch, OverdueWatch
from ._methods import Method, MethodKind
from ._pinned_channel import PinnedChannel
from ._request_stream import SEND_FAILED, AioRequestSender, RequestStream, server_status
from ._shared_buffer import ReceivedBuffers, SharedBuffer, inline_request
from ._socket_file import is_listening
from ._status_details import status_details
from .exceptions import (
    IPCTimeoutError,
    IPCUnavailableError,
    MessageTooLargeError,
    UntrustedServerError,
    connection_lost,
    error_from_status,
    no_answer,
    nobody_listening,
    socket_missing,
)
from .ttrpc._errors import closed, timeout_error, undecodable
from .ttrpc._messages import checked_metadata

__all__ = ['LANES', 'GrpcLane', 'LaneChoice', 'Metadata', 'ServerCameUp', 'SyncGrpcLane']

_logger = logging.getLogger(__name__)

_T = TypeVar('_T')

#: Metadata of a call: ``(key, value)`` pairs, a value ``bytes`` for a ``-bin`` key.
Metadata = Sequence[tuple[str, 'str | bytes']]

#: The values of a client's ``lane``.
LANES = ('auto', 'grpc', 'ttrpc')

#: With lane='auto', how long a fast-lane socket that did not answer is left
#: alone before it is tried again (a failed connect costs a system call and an
#: exception on every call otherwise).
FAST_LANE_RETRY_INTERVAL = 1.0

# connect() proves that a gRPC server answers with one health check. Any
# answer but UNAVAILABLE or DEADLINE_EXCEEDED will do: a server without the
# health service still says UNIMPLEMENTED.
_PROBE = Method(name='Check', path='/grpc.health.v1.Health/Check', kind=MethodKind.UNARY_UNARY,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString)
_PROBE_REQUEST = health_pb2.HealthCheckRequest()

# grpc core's texts: a request over the channel's send limit ("CLIENT:", the
# client's own refusal; a server's reads "SERVER:" or "Received"), and a
# connection that broke under a call.
_CLIENT_TOO_LARGE = re.compile(r'CLIENT: Sent message larger than max \((\d+) vs\. (\d+)\)')
_CONNECTION_BROKE = ('Socket closed', 'Connection reset by peer', 'Broken pipe')
# ...and its refusal of metadata over a bound: the server's of the request's, or the channel's of an answer's.
_METADATA_TOO_LARGE = 'received metadata size exceeds'
# ...and of a channel this process closed (disconnect()) under a call, or
# before it ('Channel closed!', 'Cannot invoke RPC on closed channel!'; grpc.aio's
# UsageError 'Channel is closed.').
_CLOSED = re.compile(r'[Cc]hannel (is )?closed|closed channel')
#: What grpc raises for a call on a channel closed before it: blocking, grpc.aio.
_CLOSED_BEFORE = (ValueError, grpc.aio.UsageError)
#: How long past its deadline a gRPC-lane call is cancelled if grpc core has not
#: ended it: core keeps a call whose request it is still writing (the server does
#: not read: stopped, or its loop stuck) until the server reads, maybe never.
_OVERDUE = 0.25
#: Largest request (serialized) a call or stream goes without a watch for _OVERDUE (a future or a
#: timer thread: about twice a call's time). With grpcio 1.85 core ended calls at their deadline while
#: the server did not read, however many in flight (40 of 4 KiB, 8 of 64 KiB, 4 of 200 KB), unless one
#: request was over about 250 KB.
_BLOCKING_MOST = 64 * 1024
#: grpc core's whole details of a call its server cancelled as it shut down,
#: having taken it in but not yet to a handler (a plain grpc.aio server does
#: it too; a call a handler ran ends "Cancelling all calls" at the grace's end).
_CANCELLED_AT_SHUTDOWN = 'CANCELLED'


class ServerCameUp(IPCUnavailableError):
    """A call failed on a gRPC channel that could not connect before its
    server was up, and the socket listens now: grpc waits out its reconnect
    backoff (at most 0.5 s, see ``_options``) before it connects again, and
    fails calls with the old error meanwhile. Nothing was sent, so any call
    may be tried again at once, waiting for the channel to connect."""


class LaneChoice:
    """Which lane a client's calls take: the fast lane when ``lane`` is
    ``'ttrpc'``, or ``'auto'`` and its socket answered (or was last tried
    more than a second ago, or a call that waited saw the server come up
    since); gRPC otherwise.

    :param lane: one of :data:`LANES`.
    :raises ValueError: ``lane`` is not one of them.
    """

    __slots__ = ('lane', 'in_use', '_fast_retry_at')

    def __init__(self, lane: str) -> None:
        if lane not in LANES:
            raise ValueError(f'lane must be one of {", ".join(LANES)}, not {lane!r}')
        self.lane = lane
        #: ``'ttrpc'`` or ``'grpc'``: the lane of the last call, None before.
        self.in_use: str | None = None
        self._fast_retry_at = 0.0

    def fast_first(self) -> bool:
        """Whether to try the fast lane now."""
        return self.lane == 'ttrpc' or (self.lane == 'auto' and time.monotonic() >= self._fast_retry_at)

    def fast_wait(self, deadline: Deadline | None, wait: bool) -> Deadline | None:
        """Until when to wait for the fast lane's server. With lane='auto' a
        server that is down is waited for on the gRPC lane (which waits for
        it natively); the fast lane is tried once."""
        return deadline if wait and self.lane == 'ttrpc' else None

    def fast_unavailable(self, error: IPCUnavailableError) -> None:
        """The fast lane's socket did not answer: use gRPC for a while.

        :raises IPCUnavailableError: ``error``, with lane='ttrpc'.
        """
        if self.lane == 'ttrpc':
            raise error
        if isinstance(error, UntrustedServerError):  # a squatter on the fast lane's socket: say so
            _logger.warning('%s; using the gRPC lane', error.details)
        self._fast_retry_at = time.monotonic() + FAST_LANE_RETRY_INTERVAL

    def server_came_up(self) -> None:
        """A call that waited on the gRPC lane saw its server come up: try the
        fast lane at once again (IPCServer publishes its gRPC socket last,
        once both lanes are up)."""
        self._fast_retry_at = 0.0

    def took(self, lane: str, connection: _T) -> _T:
        """Record that a call takes ``lane`` (``connection``)."""
        self.in_use = lane
        return connection


class _GrpcLaneBase:
    """What both gRPC lanes share: the channel's callables and the errors."""

    #: The lane's name, as ``lane=`` takes it.
    lane = 'grpc'

    def __init__(self, pinned: PinnedChannel, socket_path: Any, wait_for_ready: bool) -> None:
        self._pinned = pinned
        self._channel = pinned.channel
        self._pin = pinned.pin
        self.socket_path = socket_path
        self.wait_for_ready = wait_for_ready
        self._path = os.fspath(socket_path)
        self._callables: dict[str, Any] = {}
        self.is_closed = False

    def _callable(self, method: Method) -> Any:
        """The channel's callable for ``method``, once the socket is checked
        to be there and a trusted server's, and the channel pinned to it
        (before every call: see :mod:`vyra_base_ipc._pinned_channel`).

        :raises UntrustedServerError: it is not a trusted server's.
        :raises IPCUnavailableError: there is no socket file: grpc, left to
            wait, would connect to whatever appears at the path (a call that
            waits for its server waits for the file first, see :meth:`there`).
        :raises ValueError: a blocking channel was closed (by disconnect()).
        """
        if not self._pin.check():
            raise self._socket_missing(method.path)
        call = self._callables.get(method.path)
        if call is None:
            call = self._callables[method.path] = self._pinned.multi_callable(
                method.kind.value, method.path, method.request_serializer, method.response_deserializer)
        return call

    def _socket_missing(self, method: str | None = None) -> IPCUnavailableError:
        return socket_missing(self.socket_path, method)

    def there(self) -> '_GrpcLaneBase':
        """This lane, once a trusted server listens on its socket file (what
        a call that waits for its server waits for, outside grpc, which would
        wait for the socket it is pinned to, see :meth:`_callable`; a
        connected channel has one).

        :raises IPCUnavailableError: it does not (:class:`UntrustedServerError`:
            the socket file is not a trusted server's).
        """
        if not self._pin.check():
            raise self._socket_missing()
        if not self._pinned.is_ready() and not self._pin.listening():
            raise nobody_listening(self.socket_path)
        return self

    def _translate(self, error: grpc.RpcError, method: Method, request: Any = None) -> BaseException:
        if isinstance(request, RequestStream) and request.error is not None:
            return request.error  # the caller's request stream failed: grpc only says UNKNOWN or cancelled
        code, details = error.code(), self._details(error)
        if code is grpc.StatusCode.UNAVAILABLE:
            unreachable = self._unreachable(details, method.path)
            if isinstance(unreachable, ServerCameUp) and method.kind.request_streaming:
                # Not gone again as ServerCameUp: grpc may have read requests (the rest went: 'b,c' of 'abc').
                return IPCUnavailableError(code, f'the server on {self._path!r} came up while the channel '
                                           'waited to connect again; the call is not started again, as some '
                                           f'of its request stream may have been read ({details})',
                                           method=method.path)
            if unreachable is not None:
                return unreachable
        elif code is grpc.StatusCode.CANCELLED and _CLOSED.search(details):
            return closed(self._path).for_method(method.path)
        elif code is grpc.StatusCode.CANCELLED and details == _CANCELLED_AT_SHUTDOWN and self._pin.replaced():
            # Its server withdrew its socket file as it shut down: UNAVAILABLE,
            # as the fast lane refuses such a call (not retried unless idempotent).
            return IPCUnavailableError(grpc.StatusCode.UNAVAILABLE,
                                       f'the server on {self._path!r} shut down as the call came in '
                                       '(grpc core cancelled it)', method=method.path)
        elif code is grpc.StatusCode.INTERNAL and details == SEND_FAILED:
            # (a write failed and no status of the server's came: see AioRequestSender)
            get_state = getattr(self._channel, 'get_state', None)
            if get_state is None or get_state(False) is not grpc.ChannelConnectivity.READY:
                return connection_lost(self.socket_path, 'a request message could not be sent', method.path)
            details = 'the server ended the call while its request messages were being sent'
        elif code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            # grpc core refused to send it: the client's own limit, nothing left.
            too_large = _CLIENT_TOO_LARGE.match(details)
            if too_large is not None:
                return MessageTooLargeError(int(too_large[1]), int(too_large[2]), method=method.path)
            if _METADATA_TOO_LARGE in details:  # the call's own headers listed: the server refused them
                details = (f"the server refused the call's metadata, over its max_metadata_bytes: {details}"
                           if ' :path:' in details else "the server's answer carries more metadata or "
                           'status details than this client takes (max_message_bytes and 64 KiB, as the '
                           f'fast lane): {details}')
        return error_from_status(code, details, method=method.path, status_details=_rich(error, method))

    def _details(self, error: grpc.RpcError) -> str:
        """``error``'s details, naming the socket file where grpc names the
        descriptor the channel is pinned to."""
        return re.sub(re.escape(self._pin.address) + r'(?!\d)', lambda _: self._path, error.details() or '')

    def _closed_under(self, error: BaseException, method: Method, request: Any = None) -> BaseException:
        """What to raise for ``error`` from a call: the exception of the
        caller's request stream, if it raised one (grpc.aio then cancels the
        call); the fast lane's "was closed" if this process closed the
        channel under the call (grpc.aio cancels it, though nobody cancelled
        the caller's task) or before it (grpc raises ValueError, grpc.aio
        UsageError); else ``error`` itself."""
        if isinstance(request, RequestStream) and request.error is not None:
            return request.error
        if isinstance(error, _CLOSED_BEFORE):
            closed_here = _CLOSED.search(str(error)) is not None
        else:
            task = asyncio.current_task()
            closed_here = task is not None and task.cancelling() == 0
        return closed(self._path).for_method(method.path) if closed_here else error

    def _unreachable(self, details: str, method: str | None = None) -> IPCUnavailableError | None:
        """The error, in the fast lane's words, for grpc core's text of a
        connection that could not be made or broke (``None`` for other
        texts: a server's own UNAVAILABLE, e.g. while it shuts down, keeps
        its details)."""
        if details.startswith('failed to connect'):
            if is_listening(self.socket_path):
                return ServerCameUp(grpc.StatusCode.UNAVAILABLE,
                                    f'the server on {self._path!r} came up while the channel waited to '
                                    f'connect again; nothing was sent ({details})', method=method)
            # "...; last error: ...: connect failed: addr: unix:PATH error: REASON"
            reason = details.rpartition(' error: ')[2]
            if not os.path.exists(self.socket_path):
                return self._socket_missing(method)
            if reason in ('No such file or directory', 'Connection refused'):
                # The reason is of grpc's last attempt, which its reconnect
                # backoff may have made a second ago: a file that appeared
                # since is described as it is now (nobody listens there).
                return nobody_listening(self.socket_path, method)
            what = 'not allowed to connect' if reason == 'Permission denied' else 'cannot connect'
            return IPCUnavailableError(grpc.StatusCode.UNAVAILABLE, f'{what} to {self._path!r}: {reason}',
                                       method=method)
        if any(word in details for word in _CONNECTION_BROKE):
            return connection_lost(self.socket_path, details, method)
        return None

    def _probe_failed(self, error: grpc.RpcError, deadline: Deadline) -> IPCUnavailableError | None:
        """The error to raise for a failed probe; None if the server answered."""
        code = error.code()
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            # The timeout the caller gave (not what was left of it when the probe began).
            return no_answer(self.socket_path, deadline.timeout)
        if code is grpc.StatusCode.UNAVAILABLE:
            if not os.path.exists(self.socket_path):
                return self._socket_missing()
            details = self._details(error)
            return self._unreachable(details) or IPCUnavailableError(
                code, f'no server answers on {self._path!r}: {details}')
        return None

    def _open_stream(self, method: Method, request: Any, timeout: Deadline | None,
                     metadata: Metadata | None, wait: bool) -> Any:
        """Start a response-streaming call (grpc's call object)."""
        try:
            return self._callable(method)(request, timeout=_remaining(timeout, method),
                                          metadata=metadata and checked_metadata(metadata),
                                          wait_for_ready=wait)
        except _CLOSED_BEFORE as error:  # (a channel closed meanwhile, also when opened again)
            raise self._closed_under(error, method) from None

    def _started_again(self, error: grpc.RpcError, method: Method, call: Any, request: Any,
                       timeout: Deadline | None, metadata: Metadata | None, allowed: bool) -> Any:
        """``call``, which failed with ``error`` before its first message,
        started again waiting for the channel, if that is ``allowed`` (once
        per stream, before any message), it failed as :class:`ServerCameUp`
        (nothing was sent) and its request is one message (a request stream
        may have been read already).

        :raises grpc.RpcError: ``error``, when the call is not started again.
        """
        if not allowed or method.kind.request_streaming or \
                not isinstance(self._translate(error, method), ServerCameUp):
            raise error
        call.cancel()
        return self._open_stream(method, request, timeout, metadata, True)

    def _check_probe(self, deadline: Deadline) -> tuple[float, bool]:
        """The probe's timeout, and whether it waits for the channel to connect:
        with ``wait_for_ready``, or when the socket listens (the channel may
        still be waiting out a reconnect backoff from before the server was
        up: see :class:`ServerCameUp`)."""
        if self.wait_for_ready:
            return _remaining(deadline, None) or 0.0, True
        if not os.path.exists(self.socket_path):
            raise self._socket_missing()
        return _remaining(deadline, None) or 0.0, is_listening(self.socket_path)

    def _request(self, method: Method, request: Any, buffers: Sequence[SharedBuffer] = ()) -> Any:
        """What grpc is given to send: a request stream checked as it goes
        (see :mod:`vyra_base_ipc._request_stream`); a request with its
        buffers inline (descriptors cannot travel on the gRPC lane; the
        client held the request with them to max_message_bytes already)."""
        if method.kind.request_streaming:
            return RequestStream(method, request)
        if not buffers:
            return request
        return inline_request(method.path, False, request, buffers)

    def close(self) -> None:
        self.is_closed = True


def _rich(error: grpc.RpcError, method: Method) -> tuple[Any, ...]:
    """The ``google.rpc.Status`` details the server sent with ``error``
    (its ``grpc-status-details-bin`` trailer; see :func:`status_details`)."""
    trailers = getattr(error, 'trailing_metadata', None)
    return status_details(trailers() if trailers is not None else (), error.code(), error.details() or '',
                          method.path)


def _remaining(deadline: Deadline | None, method: Method | None) -> float | None:
    if deadline is None:
        return None
    remaining = deadline.remaining()
    if remaining <= 0:
        raise IPCTimeoutError(grpc.StatusCode.DEADLINE_EXCEEDED, 'deadline exceeded',
                              method=method.path if method else None)
    return remaining


class GrpcLane(_GrpcLaneBase):
    """A grpc.aio channel in the shape of :class:`~vyra_base_ipc.ttrpc.AsyncConnection`."""

    async def probe(self, deadline: Deadline) -> None:
        """Make sure a server answers (one health check).

        :raises IPCUnavailableError: it does not, in time.
        """
        timeout, wait = self._check_probe(deadline)
        try:
            await self._callable(_PROBE)(_PROBE_REQUEST, timeout=timeout, wait_for_ready=wait)
        except grpc.aio.UsageError:  # (disconnect() in another task closed the channel)
            raise closed(self._path) from None
        except grpc.RpcError as error:
            failure = self._probe_failed(error, deadline)
            if failure is not None:
                raise failure from None

    async def call(self, method: Method, request: Any, *, timeout: Deadline | None,
                   metadata: Metadata | None = None,
                   buffers: Sequence[SharedBuffer] = (), return_buffers: bool = False) -> Any:
        """As :meth:`AsyncConnection.call <vyra_base_ipc.ttrpc.AsyncConnection.call>`;
        returned buffers are always empty (they come inline)."""
        request = self._request(method, request, buffers)
        streaming = method.kind.request_streaming
        sender = None
        try:
            call = self._callable(method)(
                None if streaming else request, timeout=_remaining(timeout, method),
                metadata=metadata and checked_metadata(metadata), wait_for_ready=self.wait_for_ready)
            sender = AioRequestSender(call, request) if streaming else None
            overdue = None if timeout is None else _cancel_overdue(call, timeout)
            try:
                response = await call
            finally:
                if overdue is not None:
                    overdue.cancel()
            if response is None:
                # An answer that did not parse as the response type (a stub of
                # another version): grpc.aio logs the error and gives None as if
                # all were well. Its blocking channel (SyncGrpcLane) fails the
                # call INTERNAL instead, as the fast lane does: so does this lane.
                raise undecodable(method)
        except grpc.RpcError as error:
            raise self._translate(await server_status(error, sender, timeout), method, request) from None
        except (asyncio.CancelledError, *_CLOSED_BEFORE) as error:
            if isinstance(error, asyncio.CancelledError) and timeout is not None and timeout.expired() \
                    and _not_cancelled():
                raise timeout_error(method) from None  # (cancelled overdue: see _OVERDUE)
            raise self._closed_under(error, method, request) from None
        finally:
            if sender is not None:
                sender.stop()
        return (response, ReceivedBuffers()) if return_buffers else response

    async def stream(self, method: Method, request: Any, *, timeout: Deadline | None,
                     metadata: Metadata | None = None, idle_timeout: float | None = None
                     ) -> AsyncGenerator[Any, None]:
        """As :meth:`AsyncConnection.stream <vyra_base_ipc.ttrpc.AsyncConnection.stream>`;
        leaving early cancels the call."""
        request = self._request(method, request)
        streaming = method.kind.request_streaming
        call = self._open_stream(method, None if streaming else request, timeout, metadata,
                                 self.wait_for_ready)
        sender = AioRequestSender(call, request) if streaming else None
        may_restart = not self.wait_for_ready
        # grpc.aio's first read waits for the request to be written, past the
        # deadline (see _OVERDUE): bounded, for a request that may not be.
        overdue = timeout is not None and not streaming and request.ByteSize() > _BLOCKING_MOST
        try:
            while True:
                bound = idle_timeout
                if overdue:
                    bound = min(bound or math.inf, timeout.remaining() + _OVERDUE)  # type: ignore[union-attr]
                try:
                    response = await (call.read() if bound is None else within(call.read(), bound))
                except asyncio.TimeoutError:
                    if overdue and timeout.expired():  # type: ignore[union-attr]
                        raise timeout_error(method) from None
                    raise _idle_error(method, idle_timeout) from None  # type: ignore[arg-type]
                except grpc.RpcError as error:
                    call = self._started_again(error, method, call, request, timeout, metadata, may_restart)
                    may_restart = False
                    continue
                if response is grpc.aio.EOF:
                    return
                if response is None:  # a message that did not parse: as in call()
                    raise undecodable(method)  # (leaving cancels the call)
                may_restart = overdue = False  # (an answer: the request was written)
                yield response
                _remaining(timeout, method)  # (grpc may give what came in time to a read after the deadline)
        except grpc.RpcError as error:
            raise self._translate(await server_status(error, sender, timeout), method, request) from None
        except asyncio.CancelledError as error:
            raise self._closed_under(error, method, request) from None
        finally:
            call.cancel()
            if sender is not None:
                sender.stop()


def _cancel_overdue(call: Any, deadline: Deadline) -> asyncio.TimerHandle:
    """Cancel the grpc.aio ``call`` if it still runs :data:`_OVERDUE` past ``deadline``."""
    loop = asyncio.get_running_loop()
    return loop.call_at(loop.time() + deadline.remaining() + _OVERDUE, call.cancel)


def _not_cancelled() -> bool:
    """Whether nobody cancelled the running task (a CancelledError is then the call's own)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def _idle_error(method: Method, idle_timeout: float) -> IPCTimeoutError:
    return IPCTimeoutError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f'no message within the idle timeout of {idle_timeout:g} s', method=method.path)


class SyncGrpcLane(_GrpcLaneBase):
    """A blocking grpc channel in the shape of :class:`~vyra_base_ipc.ttrpc.SyncConnection`."""

    def probe(self, deadline: Deadline) -> None:
        """As :meth:`GrpcLane.probe`, blocking."""
        timeout, wait = self._check_probe(deadline)
        try:
            self._callable(_PROBE)(_PROBE_REQUEST, timeout=timeout, wait_for_ready=wait)
        except ValueError:  # (disconnect() in another thread closed the channel)
            raise closed(self._path) from None
        except grpc.RpcError as error:
            failure = self._probe_failed(error, deadline)
            if failure is not None:
                raise failure from None

    def call(self, method: Method, request: Any, *, timeout: Deadline | None,
             metadata: Metadata | None = None,
             buffers: Sequence[SharedBuffer] = (), return_buffers: bool = False) -> Any:
        """As :meth:`GrpcLane.call`, blocking."""
        request = self._request(method, request, buffers)  # (an iterator: lists welcome)
        try:
            remaining = _remaining(timeout, method)
            multi_callable = self._callable(method)
            checked = metadata and checked_metadata(metadata)
            if remaining is None or (not method.kind.request_streaming
                                     and request.ByteSize() <= _BLOCKING_MOST):
                response = multi_callable(request, timeout=remaining, metadata=checked,
                                          wait_for_ready=self.wait_for_ready)
            else:
                call = multi_callable.future(request, timeout=remaining, metadata=checked,
                                             wait_for_ready=self.wait_for_ready)
                try:
                    response = call.result(remaining + _OVERDUE)
                except grpc.FutureTimeoutError:
                    call.cancel()  # (see _OVERDUE)
                    raise timeout_error(method) from None
        except grpc.RpcError as error:
            raise self._translate(error, method, request) from None
        except ValueError as error:
            raise self._closed_under(error, method) from None
        return (response, ReceivedBuffers()) if return_buffers else response

    def stream(self, method: Method, request: Any, *, timeout: Deadline | None,
               metadata: Metadata | None = None, idle_timeout: float | None = None) -> Iterator[Any]:
        """As :meth:`GrpcLane.stream`, blocking."""
        request = self._request(method, request)
        call = self._open_stream(method, request, timeout, metadata, self.wait_for_ready)
        may_restart = not self.wait_for_ready
        watch = None if idle_timeout is None else IdleWatch(call, idle_timeout)
        # As for call(): only a request grpc may not have written whole by its deadline.
        overdue = None if timeout is None or method.kind.request_streaming or \
            request.ByteSize() <= _BLOCKING_MOST else OverdueWatch(call, timeout.remaining() + _OVERDUE)
        try:
            while True:
                if watch is not None:
                    watch.waiting()
                try:
                    response = next(call)
                except StopIteration:
                    return
                except grpc.RpcError as error:
                    call = self._started_again(error, method, call, request, timeout, metadata, may_restart)
                    may_restart = False
                    if watch is not None:
                        watch.stop()
                        watch = IdleWatch(call, idle_timeout)  # type: ignore[arg-type]
                    if overdue is not None:
                        overdue.stop()
                        overdue = OverdueWatch(call, timeout.remaining() + _OVERDUE)  # type: ignore[union-attr]
                    continue
                if watch is not None:
                    watch.message()
                may_restart = False
                yield response
                _remaining(timeout, method)  # (grpc may give what came in time to a read after the deadline)
        except grpc.RpcError as error:
            if watch is not None and watch.expired:
                raise _idle_error(method, idle_timeout) from None  # type: ignore[arg-type]
            if overdue is not None and overdue.expired:
                raise timeout_error(method) from None  # (see _OVERDUE)
            raise self._translate(error, method, request) from None
        finally:
            if watch is not None:
                watch.stop()
            if overdue is not None:
                overdue.stop()
            call.cancel()

