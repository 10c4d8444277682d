"""Clients of a module's IPC server: :class:`IPCHandler` (asyncio, here) and
:class:`SyncIPCHandler` (blocking, for rclpy callbacks and other threads:
:mod:`vyra_base_ipc._sync_handler`).

Both call methods by name on a grpcio-generated stub class, apply a deadline
to every call, share connections per socket, and raise
:mod:`~vyra_base_ipc.exceptions` types that keep the gRPC status.

Lanes: an :class:`~vyra_base_ipc.IPCServer` listens on a gRPC socket and,
beside it, on a fast-lane (ttrpc) socket serving the same services. With
``lane='auto'`` (the default) a client uses the fast lane whenever its socket
answers and gRPC otherwise (a server without a fast lane, or a third-party
gRPC server); ``lane='grpc'`` and ``lane='ttrpc'`` force one. Either way the
errors, deadlines, status codes and retry rules are the same.

Both faces are thin: what a call means (method look-up, its deadline, the
retry rule, the lane choice) is :class:`ClientBase`'s, the lanes are
objects of one shape (:mod:`vyra_base_ipc._lanes`), and the connections are
pooled by :mod:`vyra_base_ipc._pool`. The faces only wait their own way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any, AsyncGenerator, Iterable, Literal, Sequence, TypeVar, overload

import grpc

from ._busy_poll import DEFAULT_BUSY_POLL
from ._client_base import (
    DEFAULT,
    NO_LOCK,
    SERVER_INFO,
    SERVER_INFO_REQUEST,
    ClientBase,
    Default,
    Retry,
    ServerContext,
    retrying,
)
from ._deadline import Deadline
from ._fork_safety import this_process
from ._interceptors import ClientInterceptor
from ._lanes import LANES, GrpcLane, Metadata
from ._options import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TIMEOUT
from ._payload import SharedMemoryOptions
from ._pool import aio_pool, aio_ttrpc_pool, release_aio, release_elsewhere
from ._shared_buffer import ReceivedBuffers, SharedBuffer
from ._sync_handler import SyncIPCHandler
from .address import StrPath
from .exceptions import IPCError, IPCRemoteError, IPCUnavailableError
from .ttrpc import DEFAULT_STREAM_WINDOW, AsyncConnection
from .ttrpc._errors import NothingSent

__all__ = ['DEFAULT', 'LANES', 'IPCHandler', 'Metadata', 'SyncIPCHandler']

#: A response message class (``response_type=``).
_R = TypeVar('_R')
_Handler = TypeVar('_Handler', bound='IPCHandler')


class IPCHandler(ClientBase):
    """Asyncio client of a module's IPC server, as documented for VYRA.

    ::

        ipc = IPCHandler(socket_path='/tmp/my_module_ipc.sock', service_stub=BackendServiceStub)
        response = await ipc.call_method('GetStatus', StatusRequest(), timeout=2.0)
        await ipc.disconnect()

    Calls connect on demand, as gRPC channels do: a handler made before its server starts works as
    soon as the server is up, whether or not an earlier :meth:`connect` failed. Every call has a
    deadline: ``timeout`` per call, else the handler's ``timeout`` (default 5 s); only a stream may go without
    (``stream_method(..., timeout=None)``). Handlers of the same socket in the same event loop share one
    connection per lane. A handler may be used from several event loops in turn (each gets its own
    connections), but from one loop at a time: a call on another loop while the loop whose connections
    it holds still runs (in another thread) raises ``RuntimeError``. One collected without
    :meth:`disconnect` gives its connections back (closed with their last user, by its loop) and warns
    with a ``ResourceWarning``.

    :param socket_path: the server's (gRPC) socket; resolved as described in
        :mod:`vyra_base_ipc.address` when omitted.
    :param service_stub: the generated ``*Stub`` class whose methods to call.
    :param module_name: module whose default socket path to use.
    :param timeout: default deadline of a call, in seconds.
    :param default_method: method that :meth:`dispatch` sends to.
    :param wait_for_ready: default for calls: wait (within the deadline) for
        an unreachable server instead of failing at once.
    :param idempotent_methods: names of methods that are safe to run twice;
        only these are retried after UNAVAILABLE (within their deadline).
    :param lane: ``'auto'`` (the fast lane when its socket answers, else
        gRPC), ``'grpc'`` or ``'ttrpc'``.
    :param ttrpc_socket_path: the fast lane's socket; by default beside
        ``socket_path`` (``/tmp/x_ipc.sock`` -> ``/tmp/x_ipc.ttrpc.sock``).
    :param max_message_bytes: largest message sent or accepted (inline); a
        request's explicit SharedBuffers count as if inline, on both lanes.
    :param shared_memory: on the fast lane, messages above its threshold
        travel as sealed shared memory when the server agrees (see
        :mod:`vyra_base_ipc._payload`); ``None`` keeps every message inline.
    :param stream_window: on the fast lane, bytes of streamed messages the
        server may send ahead of what the caller has taken (flow control).
    :param server_uid: the user the server must run as; by default this
        process's own uid or root. A server (or, on the gRPC lane, a socket
        file or directory) of anyone else is refused with
        :class:`~vyra_base_ipc.UntrustedServerError` before anything is sent.
    :param interceptors: :class:`~vyra_base_ipc.ClientInterceptor` objects
        that see every call, in this order.
    :param busy_poll: seconds a call waiting for a fast-lane answer keeps the
        event loop from sleeping, its other tasks running (README, "Busy
        polling"); a quick answer then costs no wakeup. 0 turns it off.
    """

    _fast_pool = aio_ttrpc_pool
    _grpc_pool = aio_pool
    _channel_factory = staticmethod(grpc.aio.insecure_channel)
    _grpc_lane_type = GrpcLane

    # Restated (as in SyncIPCHandler), not inherited: a misspelt keyword's TypeError
    # then names this class, not ClientBase (test_typed_client).
    def __init__(self, socket_path: StrPath | None = None, service_stub: type[Any] | None = None, *,
                 module_name: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 default_method: str | None = None, wait_for_ready: bool = False,
                 idempotent_methods: Iterable[str] = (), lane: str = 'auto',
                 ttrpc_socket_path: StrPath | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 shared_memory: SharedMemoryOptions | None = SharedMemoryOptions(),
                 stream_window: int = DEFAULT_STREAM_WINDOW, server_uid: int | None = None,
                 interceptors: Sequence[ClientInterceptor] = (),
                 busy_poll: float = DEFAULT_BUSY_POLL) -> None:
        super().__init__(
            socket_path, service_stub, module_name=module_name, timeout=timeout,
            default_method=default_method, wait_for_ready=wait_for_ready,
            idempotent_methods=idempotent_methods, lane=lane, ttrpc_socket_path=ttrpc_socket_path,
            max_message_bytes=max_message_bytes, shared_memory=shared_memory, stream_window=stream_window,
            server_uid=server_uid, interceptors=interceptors, busy_poll=busy_poll)

    async def connect(self, timeout: float | None = None) -> None:
        """Open (or share) a connection and make sure a server answers: the
        answer to the fast lane's Hello, or one ``grpc.health.v1.Health/Check``
        round trip (a socket accepts connections while its server is stopped
        or its event loop held).

        Optional (calls connect on demand): an early check that the server
        is there. Idempotent. Fails at once if nobody serves the socket; with
        ``wait_for_ready`` it waits for the server within ``timeout`` (default:
        the handler's timeout) instead.

        :raises IPCUnavailableError: no server could be reached in time; the
            message names the socket.
        """
        deadline = self._deadline(DEFAULT if timeout is None else timeout)
        self._connected = True
        try:
            lane = await self._lane(deadline, self.wait_for_ready)
            await lane.probe(deadline)  # type: ignore[arg-type]
        except BaseException:
            await self.disconnect()
            raise

    async def disconnect(self) -> None:
        """Release the connections (closed when their last user lets go); a
        later call connects again. Idempotent."""
        self._connected = False
        held = self._held
        fast_key, grpc_key, loop = held.fast_key, held.grpc_key, held.loop
        self._forget_connections()
        held.loop = None
        if loop is None:
            return
        if loop is self._running_loop():
            await release_aio(fast_key, grpc_key)
        else:  # (not waited for: in a forked child, the loop's thread is the parent's)
            release_elsewhere(fast_key, grpc_key, loop)

    @overload
    async def call_method(self, method: str, request: Any, *, timeout: float | Default = DEFAULT,
                          metadata: Metadata | None = None, wait_for_ready: bool | None = None,
                          parent: ServerContext | None = None, buffers: Sequence[SharedBuffer] = (),
                          return_buffers: Literal[False] = False, response_type: type[_R]) -> _R: ...

    @overload
    async def call_method(self, method: str, request: Any, *, timeout: float | Default = DEFAULT,
                          metadata: Metadata | None = None, wait_for_ready: bool | None = None,
                          parent: ServerContext | None = None, buffers: Sequence[SharedBuffer] = (),
                          return_buffers: Literal[True], response_type: type[_R]
                          ) -> tuple[_R, ReceivedBuffers]: ...

    @overload
    async def call_method(self, method: str, request: Any, *, timeout: float | Default = DEFAULT,
                          metadata: Metadata | None = None, wait_for_ready: bool | None = None,
                          parent: ServerContext | None = None, buffers: Sequence[SharedBuffer] = (),
                          return_buffers: Literal[True], response_type: None = None
                          ) -> tuple[Any, ReceivedBuffers]: ...

    @overload
    async def call_method(self, method: str, request: Any, *, timeout: float | Default = DEFAULT,
                          metadata: Metadata | None = None, wait_for_ready: bool | None = None,
                          parent: ServerContext | None = None, buffers: Sequence[SharedBuffer] = (),
                          return_buffers: bool = False, response_type: type[Any] | None = None) -> Any: ...

    async def call_method(self, method: str, request: Any, *, timeout: float | Default = DEFAULT,
                          metadata: Metadata | None = None, wait_for_ready: bool | None = None,
                          parent: ServerContext | None = None,
                          buffers: Sequence[SharedBuffer] = (), return_buffers: bool = False,
                          response_type: type[Any] | None = None) -> Any:
        """Call a unary-response method and return its response.

        A method in ``idempotent_methods`` is retried after UNAVAILABLE
        (waiting for the server) until its deadline; no other call is
        retried, since it may have run on the server already, but for one
        never sent (README: "Retries"). Cancelling the calling task cancels
        the call on the server.

        :param method: the method's name, e.g. ``"GetStatus"``.
        :param request: the request message, or an (async) iterable of them
            for a client-streaming method.
        :param timeout: deadline in seconds (default: the handler's ``timeout``).
        :param parent: the context of the handler making this call, if any:
            the call then gets the smaller of ``timeout`` and the time that
            handler has left.
        :param buffers: the :class:`~vyra_base_ipc.SharedBuffer` objects
            whose ``ref`` the request carries (unary requests only). On the
            fast lane they are passed as shared memory, without a copy; on
            the gRPC lane (or to a server without shared memory) their bytes
            are copied into the request's ``SharedBufferRef.inline_data``.
            Either way the request with their bytes inline must fit
            ``max_message_bytes``: a call works or fails alike on both lanes.
        :param return_buffers: return ``(response, ReceivedBuffers)``: the
            buffers the handler answered with
            (:func:`~vyra_base_ipc.attach_buffers`); read them with
            ``shared_buffer(response.field, received)``. On the gRPC lane
            they come inline and the ReceivedBuffers are empty.
        :param response_type: the response message class the method
            answers; type checkers then know the result's type
            (``call_method('GetStatus', StatusRequest(), response_type=StatusResponse)``).
        :raises ValueError: unknown method name.
        :raises TypeError: the method streams responses (use :meth:`stream_method`),
            takes another request type or answers another response type.
        :raises MessageTooLargeError: the request (its buffers counted inline)
            is larger than ``max_message_bytes``; nothing was sent.
        :raises IPCUnavailableError, IPCTimeoutError, IPCRemoteError: the call
            failed: no server listens on the socket (it names it), the
            deadline passed (the message says which timeout and how long),
            or the server answered an error (for a method it lacks, the
            message lists the services it has).
        """
        info = self._method(method, response_streaming=False, request=request, response_type=response_type)
        self._check_size(info, request, buffers)
        deadline = self._deadline(DEFAULT if timeout is None else timeout, parent, info)
        wait = self._wait(wait_for_ready)
        retry = lane = None  # no Retry, no closure: the usual call needs neither
        with self._intercepted(info, metadata, deadline) as call, self._explained(info, deadline):
            while True:
                try:
                    lane = self._open_lane() or await self._lane(deadline,
                                                                 wait or bool(retry and retry.attempts))
                    if call is not None:
                        call.lane = lane.lane
                    return await lane.call(info, request, timeout=deadline,
                                           metadata=metadata if call is None else call.metadata,
                                           buffers=buffers, return_buffers=return_buffers)
                except IPCUnavailableError as error:
                    retry, pause = self._retry_after(retry, info, deadline, self._heed(lane, error, info))
                except IPCRemoteError as error:
                    raise await self._explain_remote(error, info, [lane] if lane else [], deadline) from None
                await asyncio.sleep(pause)

    @overload
    def stream_method(self, method: str, request: Any, *, timeout: float | None | Default = DEFAULT,
                      idle_timeout: float | None = None, metadata: Metadata | None = None,
                      wait_for_ready: bool | None = None, parent: ServerContext | None = None,
                      response_type: type[_R]) -> AsyncGenerator[_R, None]: ...

    @overload
    def stream_method(self, method: str, request: Any, *, timeout: float | None | Default = DEFAULT,
                      idle_timeout: float | None = None, metadata: Metadata | None = None,
                      wait_for_ready: bool | None = None, parent: ServerContext | None = None,
                      response_type: None = None) -> AsyncGenerator[Any, None]: ...

    async def stream_method(self, method: str, request: Any, *, timeout: float | None | Default = DEFAULT,
                            idle_timeout: float | None = None, metadata: Metadata | None = None,
                            wait_for_ready: bool | None = None,
                            parent: ServerContext | None = None,
                            response_type: type[Any] | None = None) -> AsyncGenerator[Any, None]:
        """Call a response-streaming method; iterate over its responses.

        The deadline covers the whole stream; ``timeout=None`` opens a stream
        without one (a watch that lives as long as the caller iterates: the
        one exception to "every call has a deadline"). Leaving the iteration
        early (``break``, ``aclose()``, the generator collected) or
        cancelling the task cancels the call on the server, on both lanes.
        Streams are not retried, but for one never sent (README: "Retries").

        :param request: the request message, or an (async) iterable of them
            for a bidirectional method.
        :param idle_timeout: seconds to wait for each message at most; the
            call then fails with :class:`IPCTimeoutError`.
        :param response_type: as for :meth:`call_method`.
        :raises ValueError, TypeError, IPCError: as :meth:`call_method`.
        """
        info = self._method(method, response_streaming=True, request=request, response_type=response_type)
        deadline = self._deadline(timeout, parent, info)
        idle_timeout = self._idle_timeout(idle_timeout)
        with self._intercepted(info, metadata, deadline) as call, self._explained(info, deadline):
            for again in (False, True):  # again if its connection broke before it was sent
                lane = await self._lane(deadline, self._wait(wait_for_ready))
                if call is not None:
                    call.lane, metadata = lane.lane, call.metadata
                responses = lane.stream(info, request, timeout=deadline, metadata=metadata,
                                        idle_timeout=idle_timeout)
                try:
                    async with contextlib.aclosing(responses):
                        async for response in responses:
                            yield response
                    return
                except NothingSent:
                    if again:
                        raise
                except IPCUnavailableError as error:
                    error = self._heed(lane, error, info)
                    if again or not isinstance(error, NothingSent):
                        raise error from None
                except IPCRemoteError as error:
                    raise await self._explain_remote(error, info, [lane], deadline) from None

    async def dispatch(self, message: Any) -> None:
        """Send ``message`` to :attr:`default_method` (VYRA feeder interface);
        the response is discarded.

        :raises ValueError: no ``default_method`` was configured.
        """
        await self.call_method(self._dispatched_method(), message)

    async def __aenter__(self: _Handler) -> _Handler:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.disconnect()

    async def _explain_remote(self, error: IPCRemoteError, method: Any, used: Sequence[Any],
                              deadline: Deadline | None) -> IPCError:
        """``error``; for a method the server does not have, saying which
        services it has (asked on the same lane, within the call's deadline)."""
        if not self._is_missing_method(error) or not used:
            return error
        until = self._server_info_deadline(deadline)
        try:
            info = None if until is None else await used[0].call(SERVER_INFO, SERVER_INFO_REQUEST,
                                                                  timeout=until)
        except IPCError:
            info = None  # a server that does not say: the error as it was
        return self._unimplemented(error, method, info, used[0].lane)

    # -- lanes ------------------------------------------------------------------------

    def _open_lane(self) -> AsyncConnection | None:
        """The fast lane's connection if open on the running loop (found without a coroutine), else None."""
        self._here()
        fast = self._fast
        return self._choice.took('ttrpc', fast) if fast is not None and not fast.is_closed else None

    async def _lane(self, deadline: Deadline | None, wait: bool) -> AsyncConnection | GrpcLane:
        """The lane for a call (see :class:`~vyra_base_ipc._lanes.LaneChoice`)."""
        fast = self._open_lane()
        if fast is None and self._choice.fast_first():
            try:
                fast = self._choice.took('ttrpc', await self._fast_connection(deadline, wait))
            except IPCUnavailableError as error:
                self._choice.fast_unavailable(error)
        if fast is None and wait:
            retry = self._socket_retry(deadline)
            return await retrying(lambda: self._waited(retry), retry, NO_LOCK)
        return fast or self._choice.took('grpc', self._grpc_lane(wait))

    async def _waited(self, retry: Retry) -> GrpcLane:
        return self._waited_grpc_lane(retry)

    def _here(self) -> None:
        """Make this handler's connections those of the running loop."""
        loop = self._running_loop()
        held = self._held
        if held.loop is loop:
            return
        # First use (or since disconnect()), or moved to a new loop (asyncio.run() twice): let go there.
        if held.loop is not None:
            if held.loop.is_running() and self._holds_here():
                # Moving would close that loop's connections under its calls: they failed UNAVAILABLE
                # "connection ... was closed" (a web frontend's 503, as if the server were down), or
                # with futures of the wrong loop, and this loop's calls likewise when it moved back.
                raise RuntimeError(
                    f'this IPCHandler of {os.fspath(self.socket_path)!r} is in use on another event loop, '
                    'which still runs (in another thread): a handler serves one loop at a time. Make one '
                    'IPCHandler per loop (those of a socket share its connection), call it on its own '
                    'loop, use SyncIPCHandler in threads, or await disconnect() on its loop before moving it')
            release_elsewhere(held.fast_key, held.grpc_key, held.loop)
        self._forget_connections()
        held.loop = loop
        self._connected = True

    def _holds_here(self) -> bool:
        """Whether this handler holds connections of this process (a forked
        child's keys are its parent's: the child may move freely)."""
        return any(key is not None and key[0][0] == this_process.pid
                   for key in (self._held.fast_key, self._held.grpc_key))

    async def _fast_connection(self, deadline: Deadline | None, wait: bool) -> AsyncConnection:
        """The fast lane's shared connection, (re)connected if needed; raises
        :class:`IPCUnavailableError` if its socket did not answer (in time)."""
        held = self._held
        if held.fast_key is None:
            held.fast_key = aio_ttrpc_pool.acquire(self._fast_key_args())
        entry = held.fast_key[1]

        async def connected() -> AsyncConnection:  # (entry lock held: one connect for all waiting)
            connection = entry.connection
            if connection is None or connection.is_closed:
                if connection is not None:
                    connection.retire()  # (a retired one's calls in flight go on)
                made = await AsyncConnection.connect(**self._connect_options())
                connection = aio_ttrpc_pool.kept(entry, made)
            return connection
        self._fast = await retrying(connected, self._connect_retry(deadline, wait), entry.lock)
        return self._fast
