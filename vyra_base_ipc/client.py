"""Clients of a module's IPC server: :class:`IPCHandler` (asyncio) and
:class:`SyncIPCHandler` (blocking, for rclpy callbacks and other threads).

Both call methods by name on a grpcio-generated stub class, apply a deadline
to every call, share connections per socket, and raise
:mod:`~vyra_base_ipc.exceptions` types that keep the gRPC status.

Lanes: an :class:`~vyra_base_ipc.IPCServer` listens on a gRPC socket and,
beside it, on a fast-lane (ttrpc) socket serving the same services. With
``lane='auto'`` (the default) a client uses the fast lane whenever its socket
answers and gRPC otherwise (a server without a fast lane, or a third-party
gRPC server); ``lane='grpc'`` and ``lane='ttrpc'`` force one. Either way the
errors, deadlines, status codes and retry rules are the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from typing import Any, AsyncIterator, Iterable, Iterator, Protocol, Sequence

import grpc
from grpc_health.v1 import health_pb2

from .address import (
    StrPath,
    default_ttrpc_socket_path,
    grpc_target,
    resolve_socket_path,
    validate_socket_path,
)
from .busy_poll import DEFAULT_BUSY_POLL, validate_busy_poll
from .channel_pool import (
    AioChannelPool,
    SyncChannelPool,
    aio_pool,
    aio_ttrpc_pool,
    sync_pool,
    sync_ttrpc_pool,
)
from .exceptions import IPCError, IPCTimeoutError, IPCUnavailableError, error_from_status
from .methods import Method, MethodKind, stub_methods
from .payload import SharedMemoryOptions, usable_options
from .shared_buffer import ReceivedBuffers, SharedBuffer, inline_request
from .options import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT,
    channel_options,
    validate_max_message_bytes,
    validate_timeout,
)
from .socket_file import is_listening

__all__ = ['LANES', 'IPCHandler', 'SyncIPCHandler']

Metadata = Sequence[tuple[str, str | bytes]]

#: The values of a client's ``lane``.
LANES = ('auto', 'grpc', 'ttrpc')

#: With lane='auto', how long a fast-lane socket that did not answer is left
#: alone before it is tried again (a failed connect costs a system call and an
#: exception on every call otherwise).
_FAST_LANE_RETRY_INTERVAL = 1.0


class ServerContext(Protocol):
    """What :meth:`IPCHandler.call_method` needs of a calling handler's context
    (``grpc.ServicerContext``, ``grpc.aio.ServicerContext`` or the fast lane's)."""

    def time_remaining(self) -> float | None: ...


# connect() proves that a gRPC server answers with one health check. Any
# answer but UNAVAILABLE or DEADLINE_EXCEEDED will do: a server without the
# health service still says UNIMPLEMENTED.
_PROBE = Method(
    name='Check',
    path='/grpc.health.v1.Health/Check',
    kind=MethodKind.UNARY_UNARY,
    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
    response_deserializer=health_pb2.HealthCheckResponse.FromString,
)
_PROBE_REQUEST = health_pb2.HealthCheckRequest()


class _ClientBase:
    """What both clients share: configuration, lane choice, method look-up,
    deadlines, the retry rule and error translation."""

    _channel_pool: AioChannelPool | SyncChannelPool

    def __init__(
        self,
        socket_path: StrPath | None = None,
        service_stub: type | None = None,
        *,
        module_name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        default_method: str | None = None,
        wait_for_ready: bool = False,
        idempotent_methods: Iterable[str] = (),
        lane: str = 'auto',
        ttrpc_socket_path: StrPath | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        shared_memory: SharedMemoryOptions | None = SharedMemoryOptions(),
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path, module_name=module_name)
        self.shared_memory = usable_options(shared_memory)
        if lane not in LANES:
            raise ValueError(f'lane must be one of {", ".join(LANES)}, not {lane!r}')
        self.lane = lane
        self.ttrpc_socket_path = (default_ttrpc_socket_path(self.socket_path) if ttrpc_socket_path is None
                                  else validate_socket_path(ttrpc_socket_path))
        self.timeout = validate_timeout(timeout)
        self.wait_for_ready = bool(wait_for_ready)
        self.max_message_bytes = validate_max_message_bytes(max_message_bytes)
        self._methods = stub_methods(service_stub) if service_stub is not None else {}
        self._stub_name = service_stub.__qualname__ if service_stub is not None else None
        if default_method is not None:
            self._method(default_method)
        self.default_method = default_method
        self.idempotent_methods = frozenset(self._retryable(name) for name in
                                            ([idempotent_methods] if isinstance(idempotent_methods, str)
                                             else idempotent_methods))
        self._target = grpc_target(self.socket_path)
        self._options = channel_options(self.max_message_bytes)
        self._fast_lane_retry_at = 0.0
        self._lane_in_use: str | None = None
        self._connected = False
        self._channel: Any = None
        self._callables: dict[str, Any] = {}

    @property
    def methods(self) -> tuple[str, ...]:
        """Names of the methods this client can call."""
        return tuple(self._methods)

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def lane_in_use(self) -> str | None:
        """``'ttrpc'`` or ``'grpc'``: the lane of the last call (or of
        connect()); None while not connected."""
        return self._lane_in_use if self._connected else None

    def get_protocol(self) -> str:
        """The VYRA handler protocol identifier: ``"ipc"``."""
        return 'ipc'

    def is_available(self) -> bool:
        """Whether a server listens on a socket of this client's lane right
        now (one connect probe per socket; does not block)."""
        if self.lane != 'grpc' and is_listening(self.ttrpc_socket_path):
            return True
        return self.lane != 'ttrpc' and is_listening(self.socket_path)

    # -- per call ---------------------------------------------------------------------

    def _method(self, name: object, *, response_streaming: bool | None = None) -> Method:
        if not isinstance(name, str):
            raise TypeError(f'method name must be a str, not {type(name).__name__}')
        if not self._methods:
            raise ValueError(f'cannot call {name!r}: no service_stub was given to this client')
        method = self._methods.get(name)
        if method is None:
            raise ValueError(
                f'unknown method {name!r} for {self._stub_name}; '
                f'available: {", ".join(sorted(self._methods))}')
        if response_streaming is not None and method.kind.response_streaming != response_streaming:
            use = 'stream_method' if method.kind.response_streaming else 'call_method'
            raise TypeError(f'{name} is a {method.kind.value} method: call it with {use}()')
        return method

    def _wait(self, wait_for_ready: bool | None) -> bool:
        return self.wait_for_ready if wait_for_ready is None else wait_for_ready

    def _give_up_at(self, timeout: float | None, parent: ServerContext | None = None,
                    method: Method | None = None) -> float:
        """The ``time.monotonic()`` at which the call's deadline passes: its own
        timeout (or the default), capped by the time the calling handler has left."""
        own = self.timeout if timeout is None else validate_timeout(timeout)
        if parent is not None:
            remaining = parent.time_remaining()
            if remaining is not None:
                if remaining <= 0:
                    raise IPCTimeoutError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                          "the calling handler's deadline has already expired",
                                          method=method.path if method else None)
                own = min(own, remaining)
        return time.monotonic() + own

    @staticmethod
    def _remaining(give_up: float, method: Method | None = None) -> float:
        remaining = give_up - time.monotonic()
        if remaining <= 0:
            raise IPCTimeoutError(grpc.StatusCode.DEADLINE_EXCEEDED, 'deadline exceeded',
                                  method=method.path if method else None)
        return remaining

    def _retryable(self, name: str) -> str:
        method = self._method(name)
        if method.kind.request_streaming:
            raise ValueError(f'{name} streams its requests: it cannot be retried, so it cannot be '
                             'marked idempotent')
        return name

    def _retry_pause(self, method: Method, give_up: float, attempt: int) -> float | None:
        """Seconds to pause before retrying a call that failed with UNAVAILABLE,
        or None if it must not be retried.

        Only methods marked idempotent are retried: a call that failed this way
        may have run on the server already (a crash mid-call), so anything else
        would risk a silent duplicate. The pause grows from 50 ms to 0.5 s so
        that a server answering UNAVAILABLE itself is not hammered; retries
        wait for the server to be ready.
        """
        if method.name not in self.idempotent_methods:
            return None
        pause = min(0.05 * 2 ** attempt, 0.5)
        if time.monotonic() + pause >= give_up:
            return None
        return pause

    # -- lanes ------------------------------------------------------------------------

    def _fast_lane_due(self) -> bool:
        return self.lane == 'ttrpc' or (self.lane == 'auto'
                                        and time.monotonic() >= self._fast_lane_retry_at)

    def _fast_lane_wait_until(self, give_up: float, wait: bool) -> float | None:
        # With lane='auto', a server that is down is waited for on the gRPC
        # lane (which waits for it natively); the fast lane is tried at once.
        return give_up if wait and self.lane == 'ttrpc' else None

    def _use_grpc_for_a_while(self) -> None:
        """With lane='auto', after the fast-lane socket did not answer."""
        self._fast_lane_retry_at = time.monotonic() + _FAST_LANE_RETRY_INTERVAL

    # -- the gRPC lane ----------------------------------------------------------------

    def _socket_missing(self, method: str | None = None) -> IPCUnavailableError:
        return IPCUnavailableError(
            grpc.StatusCode.UNAVAILABLE,
            f'socket {str(self.socket_path)!r} does not exist (is the IPC server running?)',
            method=method)

    def _probe_failed(self, error: grpc.RpcError, timeout: float) -> IPCUnavailableError | None:
        """The error to raise for a failed connect() probe; None if the server answered."""
        code = error.code()
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return IPCUnavailableError(
                grpc.StatusCode.UNAVAILABLE,
                f'no server answered on {str(self.socket_path)!r} within {timeout:g} s')
        if code is grpc.StatusCode.UNAVAILABLE:
            if not os.path.exists(self.socket_path):
                return self._socket_missing()
            return IPCUnavailableError(
                code, f'no server answers on {str(self.socket_path)!r} (stale socket file?): '
                      f'{error.details()}')
        return None

    def _translate(self, error: grpc.RpcError, method: Method) -> IPCError:
        code, details = error.code(), error.details() or ''
        if code is grpc.StatusCode.UNAVAILABLE and not os.path.exists(self.socket_path):
            return self._socket_missing(method.path)
        return error_from_status(code, details, method=method.path)

    def _grpc_channel(self) -> Any:
        """This client's gRPC channel from its pool (``_channel_pool``), shared."""
        if self._channel is None:
            self._channel = self._channel_pool.acquire(self._target, self._options)
        self._lane_in_use = 'grpc'
        return self._channel

    def _callable(self, method: Method) -> Any:
        call = self._callables.get(method.name) if self._channel is not None else None
        if call is None:
            call = self._callables[method.name] = self._multicallable(self._grpc_channel(), method)
        self._lane_in_use = 'grpc'
        return call

    @staticmethod
    def _multicallable(channel: Any, method: Method) -> Any:
        return getattr(channel, method.kind.value)(
            method.path,
            request_serializer=method.request_serializer,
            response_deserializer=method.response_deserializer,
            _registered_method=True,
        )


class IPCHandler(_ClientBase):
    """Asyncio client of a module's IPC server, as documented for VYRA::

        ipc = IPCHandler(socket_path='/tmp/my_module_ipc.sock', service_stub=BackendServiceStub)
        await ipc.connect()
        response = await ipc.call_method('GetStatus', StatusRequest(), timeout=2.0)
        await ipc.disconnect()

    Every call has a deadline: ``timeout`` per call, else the handler's
    ``timeout`` (default 5 s). Handlers of the same socket in the same event
    loop share one connection per lane. A handler may be used from several
    event loops in turn (each gets its own connections), but from one loop at
    a time.

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
    :param max_message_bytes: largest message sent or accepted (inline).
    :param shared_memory: on the fast lane, messages above its threshold
        travel as sealed shared memory when the server agrees (see
        :mod:`vyra_base_ipc.payload`); ``None`` keeps every message inline.
    """

    _channel_pool = aio_pool

    def __init__(self, socket_path: StrPath | None = None, service_stub: type | None = None,
                 **kwargs: Any) -> None:
        super().__init__(socket_path, service_stub, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fast_key: Any = None
        self._fast: Any = None

    async def connect(self, timeout: float | None = None) -> None:
        """Open (or share) a connection and make sure a server answers: the
        fast lane's connect, or one ``grpc.health.v1.Health/Check`` round trip.

        Idempotent. Fails at once if nobody serves the socket; with
        ``wait_for_ready`` it waits for the server within ``timeout`` (default:
        the handler's timeout) instead.

        :raises IPCUnavailableError: no server could be reached in time; the
            message names the socket.
        """
        give_up = self._give_up_at(timeout)
        self._connected = True
        try:
            if self._fast_lane_due() and await self._fast_connection(give_up, self.wait_for_ready):
                return
            await self._connect_grpc(give_up)
        except BaseException:
            await self.disconnect()
            raise

    async def disconnect(self) -> None:
        """Release the connections (closed when their last user lets go). Idempotent."""
        self._connected = False
        channel, fast_key, loop = self._channel, self._fast_key, self._loop
        self._channel = self._fast_key = self._fast = self._loop = None
        self._callables = {}
        if loop is None:
            return
        if loop is asyncio.get_running_loop():
            await self._release(channel, fast_key)
        elif loop.is_running():
            await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(self._release(channel, fast_key), loop))

    async def call_method(self, method: str, request: Any, *, timeout: float | None = None,
                          metadata: Metadata | None = None, wait_for_ready: bool | None = None,
                          parent: ServerContext | None = None,
                          buffers: Sequence[SharedBuffer] = (), return_buffers: bool = False) -> Any:
        """Call a unary-response method and return its response.

        A method in ``idempotent_methods`` is retried after UNAVAILABLE
        (waiting for the server) until its deadline; no other call is ever
        retried, since it may have run on the server already.

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
        :param return_buffers: return ``(response, ReceivedBuffers)``: the
            buffers the handler answered with
            (:func:`~vyra_base_ipc.attach_buffers`); read them with
            ``shared_buffer(response.field, received)``. On the gRPC lane
            they come inline and the ReceivedBuffers are empty.
        :raises ValueError: unknown method name.
        :raises TypeError: the method streams responses (use :meth:`stream_method`).
        :raises IPCUnavailableError, IPCTimeoutError, IPCRemoteError: the call failed.
        """
        info = self._method(method, response_streaming=False)
        give_up = self._give_up_at(timeout, parent, info)
        wait = self._wait(wait_for_ready)
        for attempt in itertools.count():
            try:
                return await self._call_once(info, request, give_up, metadata, wait, buffers,
                                             return_buffers)
            except IPCUnavailableError:
                pause = self._retry_pause(info, give_up, attempt)
                if pause is None:
                    raise
            await asyncio.sleep(pause)
            wait = True
        raise AssertionError('unreachable')

    async def stream_method(self, method: str, request: Any, *, timeout: float | None = None,
                            metadata: Metadata | None = None, wait_for_ready: bool | None = None,
                            parent: ServerContext | None = None) -> AsyncIterator[Any]:
        """Call a response-streaming method; iterate over its responses.

        The deadline covers the whole stream. Leaving the iteration early
        ends the call (gRPC cancels it; the fast lane drops its answers and
        the server ends the handler at the deadline). Streams are never retried.

        :param request: the request message, or an (async) iterable of them
            for a bidirectional method.
        :raises ValueError, TypeError, IPCError: as :meth:`call_method`.
        """
        info = self._method(method, response_streaming=True)
        give_up = self._give_up_at(timeout, parent, info)
        wait = self._wait(wait_for_ready)
        self._here()
        if self._fast_lane_due():
            fast = await self._fast_connection(give_up, wait)
            if fast is not None:
                responses = fast.stream(info, request, timeout=self._remaining(give_up, info),
                                        metadata=metadata)
                async with contextlib.aclosing(responses):
                    async for response in responses:
                        yield response
                return
        call = self._callable(info)(request, timeout=self._remaining(give_up, info),
                                    metadata=metadata, wait_for_ready=wait)
        try:
            async for response in call:
                yield response
        except grpc.RpcError as error:
            raise self._translate(error, info) from None
        finally:
            call.cancel()

    async def dispatch(self, message: Any) -> None:
        """Send ``message`` to :attr:`default_method` (VYRA feeder interface);
        the response is discarded.

        :raises ValueError: no ``default_method`` was configured.
        """
        if self.default_method is None:
            raise ValueError('dispatch() needs a default_method on this IPCHandler')
        await self.call_method(self.default_method, message)

    async def __aenter__(self) -> 'IPCHandler':
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.disconnect()

    # -- internals ------------------------------------------------------------------

    async def _call_once(self, info: Method, request: Any, give_up: float,
                         metadata: Metadata | None, wait: bool, buffers: Sequence[SharedBuffer],
                         return_buffers: bool) -> Any:
        self._here()
        if self._fast_lane_due():
            fast = await self._fast_connection(give_up, wait)
            if fast is not None:
                return await fast.call(info, request, timeout=self._remaining(give_up, info),
                                       metadata=metadata, buffers=buffers, return_buffers=return_buffers)
        # Descriptors cannot travel on the gRPC lane: the buffers go inline.
        request = inline_request(info.path, info.kind.request_streaming, request, buffers)
        try:
            response = await self._callable(info)(request, timeout=self._remaining(give_up, info),
                                                  metadata=metadata, wait_for_ready=wait)
        except grpc.RpcError as error:
            raise self._translate(error, info) from None
        return (response, ReceivedBuffers()) if return_buffers else response

    def _here(self) -> None:
        """Make this handler's connections those of the running loop."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if not self._connected:
            raise RuntimeError('IPCHandler is not connected: await connect() first')
        # A handler moved to a new loop (asyncio.run() twice): the old loop's
        # connections cannot be used here, nor closed from here.
        self._loop, self._channel, self._fast_key, self._fast = loop, None, None, None
        self._callables = {}

    async def _fast_connection(self, give_up: float, wait: bool) -> Any:
        """The fast-lane connection, or None if its socket did not answer and
        gRPC should be used (lane='auto')."""
        fast = self._fast
        if fast is not None and not fast.is_closed:
            self._lane_in_use = 'ttrpc'
            return fast
        self._here()
        if self._fast_key is None:
            self._fast_key = aio_ttrpc_pool.acquire(os.fspath(self.ttrpc_socket_path),
                                                    self.max_message_bytes, self.shared_memory)
        try:
            self._fast = await aio_ttrpc_pool.connection(
                self._fast_key, self._fast_lane_wait_until(give_up, wait))
        except IPCUnavailableError:
            if self.lane == 'ttrpc':
                raise
            self._use_grpc_for_a_while()
            return None
        self._lane_in_use = 'ttrpc'
        return self._fast

    async def _connect_grpc(self, give_up: float) -> None:
        self._here()
        if not self.wait_for_ready and not os.path.exists(self.socket_path):
            raise self._socket_missing()
        timeout = self._remaining(give_up)
        try:
            await self._multicallable(self._grpc_channel(), _PROBE)(
                _PROBE_REQUEST, timeout=timeout, wait_for_ready=self.wait_for_ready)
        except grpc.RpcError as error:
            failure = self._probe_failed(error, timeout)
            if failure is not None:
                raise failure from None

    @staticmethod
    async def _release(channel: grpc.aio.Channel | None, fast_key: Any) -> None:
        if channel is not None:
            await aio_pool.release(channel)
        if fast_key is not None:
            await aio_ttrpc_pool.release(fast_key)


class SyncIPCHandler(_ClientBase):
    """Blocking client with the semantics of :class:`IPCHandler`.

    For code that is not async, chiefly rclpy callbacks: every call blocks the
    calling thread for at most its deadline. Thread-safe; all instances in a
    process share one connection per socket and lane. In a child forked after
    gRPC was used, the gRPC lane raises
    :class:`~vyra_base_ipc.fork_safety.ForkedProcessError`; the fast lane
    (plain sockets) opens a connection of the child's own.

    Takes the arguments of :class:`IPCHandler` and one more:

    :param busy_poll: seconds a thread waiting for a fast-lane answer polls
        the socket before it sleeps (:mod:`vyra_base_ipc.busy_poll`): a quick
        answer then costs no wakeup. It polls only while answers come that
        quickly, and never on a machine with one CPU. 0 turns it off.
    """

    _channel_pool = sync_pool

    def __init__(self, socket_path: StrPath | None = None, service_stub: type | None = None, *,
                 busy_poll: float = DEFAULT_BUSY_POLL, **kwargs: Any) -> None:
        super().__init__(socket_path, service_stub, **kwargs)
        self.busy_poll = validate_busy_poll(busy_poll)
        self._fast_key: Any = None
        self._fast: Any = None
        self._pid = 0

    def connect(self, timeout: float | None = None) -> None:
        """Open (or share) a connection and make sure a server answers; see
        :meth:`IPCHandler.connect`.

        :raises IPCUnavailableError: no server could be reached in time.
        """
        give_up = self._give_up_at(timeout)
        self._connected = True
        try:
            if self._fast_lane_due() and self._fast_connection(give_up, self.wait_for_ready):
                return
            self._connect_grpc(give_up)
        except BaseException:
            self.disconnect()
            raise

    def disconnect(self) -> None:
        """Release the connections (closed when their last user lets go). Idempotent."""
        self._connected = False
        channel, fast_key = self._channel, self._fast_key
        self._channel = self._fast_key = self._fast = None
        self._callables = {}
        if self._pid == os.getpid():
            if channel is not None:
                sync_pool.release(channel)
            if fast_key is not None:
                sync_ttrpc_pool.release(fast_key)

    def call_method(self, method: str, request: Any, *, timeout: float | None = None,
                    metadata: Metadata | None = None, wait_for_ready: bool | None = None,
                    parent: ServerContext | None = None,
                    buffers: Sequence[SharedBuffer] = (), return_buffers: bool = False) -> Any:
        """Call a unary-response method; block for at most the deadline.

        Parameters, retries and errors as :meth:`IPCHandler.call_method`.
        """
        info = self._method(method, response_streaming=False)
        give_up = self._give_up_at(timeout, parent, info)
        wait = self._wait(wait_for_ready)
        if info.kind.request_streaming:
            request = iter(request)  # grpc's blocking stubs call next() on it: lists welcome
        for attempt in itertools.count():
            try:
                return self._call_once(info, request, give_up, metadata, wait, buffers, return_buffers)
            except IPCUnavailableError:
                pause = self._retry_pause(info, give_up, attempt)
                if pause is None:
                    raise
            time.sleep(pause)
            wait = True
        raise AssertionError('unreachable')

    def stream_method(self, method: str, request: Any, *, timeout: float | None = None,
                      metadata: Metadata | None = None, wait_for_ready: bool | None = None,
                      parent: ServerContext | None = None) -> Iterator[Any]:
        """Call a response-streaming method; iterate over its responses.

        :raises ValueError, TypeError, IPCError: as :meth:`IPCHandler.stream_method`.
        """
        info = self._method(method, response_streaming=True)
        give_up = self._give_up_at(timeout, parent, info)
        wait = self._wait(wait_for_ready)
        if info.kind.request_streaming:
            request = iter(request)
        self._here()
        if self._fast_lane_due():
            fast = self._fast_connection(give_up, wait)
            if fast is not None:
                yield from fast.stream(info, request, timeout=self._remaining(give_up, info),
                                       metadata=metadata)
                return
        call = self._callable(info)(request, timeout=self._remaining(give_up, info),
                                    metadata=metadata, wait_for_ready=wait)
        try:
            yield from call
        except grpc.RpcError as error:
            raise self._translate(error, info) from None
        finally:
            call.cancel()

    def dispatch(self, message: Any) -> None:
        """Send ``message`` to :attr:`default_method`; the response is discarded."""
        if self.default_method is None:
            raise ValueError('dispatch() needs a default_method on this SyncIPCHandler')
        self.call_method(self.default_method, message)

    def __enter__(self) -> 'SyncIPCHandler':
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disconnect()

    # -- internals ------------------------------------------------------------------

    def _call_once(self, info: Method, request: Any, give_up: float, metadata: Metadata | None,
                   wait: bool, buffers: Sequence[SharedBuffer], return_buffers: bool) -> Any:
        self._here()
        if self._fast_lane_due():
            fast = self._fast_connection(give_up, wait)
            if fast is not None:
                return fast.call(info, request, timeout=self._remaining(give_up, info), metadata=metadata,
                                 buffers=buffers, return_buffers=return_buffers)
        # Descriptors cannot travel on the gRPC lane: the buffers go inline.
        request = inline_request(info.path, info.kind.request_streaming, request, buffers)
        try:
            response = self._callable(info)(request, timeout=self._remaining(give_up, info),
                                            metadata=metadata, wait_for_ready=wait)
        except grpc.RpcError as error:
            raise self._translate(error, info) from None
        return (response, ReceivedBuffers()) if return_buffers else response

    def _here(self) -> None:
        """Make this handler's connections those of this process (after fork)."""
        if self._pid == os.getpid():
            return
        if not self._connected:
            raise RuntimeError('SyncIPCHandler is not connected: call connect() first')
        self._pid, self._channel, self._fast_key, self._fast = os.getpid(), None, None, None
        self._callables = {}

    def _fast_connection(self, give_up: float, wait: bool) -> Any:
        fast = self._fast
        if fast is not None and not fast.is_closed:  # is_closed is also true after fork
            self._lane_in_use = 'ttrpc'
            return fast
        self._here()
        if self._fast_key is None:
            self._fast_key = sync_ttrpc_pool.acquire(os.fspath(self.ttrpc_socket_path),
                                                     self.max_message_bytes, self.shared_memory,
                                                     self.busy_poll)
        try:
            fast = sync_ttrpc_pool.connection(self._fast_key, self._fast_lane_wait_until(give_up, wait))
        except IPCUnavailableError:
            if self.lane == 'ttrpc':
                raise
            self._use_grpc_for_a_while()
            return None
        self._fast = fast
        self._lane_in_use = 'ttrpc'
        return fast

    def _connect_grpc(self, give_up: float) -> None:
        self._here()
        if not self.wait_for_ready and not os.path.exists(self.socket_path):
            raise self._socket_missing()
        timeout = self._remaining(give_up)
        try:
            self._multicallable(self._grpc_channel(), _PROBE)(
                _PROBE_REQUEST, timeout=timeout, wait_for_ready=self.wait_for_ready)
        except grpc.RpcError as error:
            failure = self._probe_failed(error, timeout)
            if failure is not None:
                raise failure from None

