"""Clients of a module's IPC server: :class:`IPCHandler` (asyncio) and
:class:`SyncIPCHandler` (blocking, for rclpy callbacks and other threads).

Both call methods by name on a grpcio-generated stub class, apply a deadline
to every call, share channels per socket, and raise :mod:`~vyra_base_ipc.exceptions`
types that keep the gRPC status.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Any, AsyncIterator, Iterable, Iterator, Protocol, Sequence

import grpc
from grpc_health.v1 import health_pb2

from .address import StrPath, grpc_target, resolve_socket_path
from .channel_pool import aio_pool, sync_pool
from .exceptions import IPCError, IPCTimeoutError, IPCUnavailableError, error_from_status
from .methods import Method, MethodKind, stub_methods
from .options import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT,
    channel_options,
    validate_max_message_bytes,
    validate_timeout,
)
from .socket_file import is_listening

__all__ = ['IPCHandler', 'SyncIPCHandler']

Metadata = Sequence[tuple[str, str | bytes]]


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
    """What both clients share: configuration, method look-up, error translation."""

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
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path, module_name=module_name)
        self.timeout = validate_timeout(timeout)
        self.wait_for_ready = bool(wait_for_ready)
        self._methods = stub_methods(service_stub) if service_stub is not None else {}
        self._stub_name = service_stub.__qualname__ if service_stub is not None else None
        if default_method is not None:
            self._method(default_method)
        self.default_method = default_method
        self.idempotent_methods = frozenset(self._retryable(name) for name in
                                            ([idempotent_methods] if isinstance(idempotent_methods, str)
                                             else idempotent_methods))
        self._target = grpc_target(self.socket_path)
        self._options = channel_options(validate_max_message_bytes(max_message_bytes))

    @property
    def methods(self) -> tuple[str, ...]:
        """Names of the methods this client can call."""
        return tuple(self._methods)

    def get_protocol(self) -> str:
        """The VYRA handler protocol identifier: ``"ipc"``."""
        return 'ipc'

    def is_available(self) -> bool:
        """Whether a server listens on the socket right now (one connect probe;
        does not block)."""
        return is_listening(self.socket_path)

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

    def _deadline(self, timeout: float | None, parent: ServerContext | None = None,
                  method: Method | None = None) -> float:
        """The call's timeout: its own (or the default), capped by the time the
        calling handler has left."""
        own = self.timeout if timeout is None else validate_timeout(timeout)
        if parent is None:
            return own
        remaining = parent.time_remaining()
        if remaining is None:
            return own
        if remaining <= 0:
            raise IPCTimeoutError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  "the calling handler's deadline has already expired",
                                  method=method.path if method else None)
        return min(own, remaining)

    def _retryable(self, name: str) -> str:
        method = self._method(name)
        if method.kind.request_streaming:
            raise ValueError(f'{name} streams its requests: it cannot be retried, so it cannot be '
                             'marked idempotent')
        return name

    def _retry_pause(self, method: Method, error: grpc.RpcError, give_up: float,
                     attempt: int) -> float | None:
        """Seconds to pause before retrying, or None if the call must not be retried.

        Only methods marked idempotent are retried, and only after UNAVAILABLE:
        such a call may have run on the server already (a crash mid-call), so
        anything else would risk a silent duplicate. The pause grows from
        50 ms to 0.5 s so that a server answering UNAVAILABLE itself is not
        hammered; retries wait for the server to be ready.
        """
        if method.name not in self.idempotent_methods or error.code() is not grpc.StatusCode.UNAVAILABLE:
            return None
        pause = min(0.05 * 2 ** attempt, 0.5)
        if time.monotonic() + pause >= give_up:
            return None
        return pause

    def _socket_missing(self, method: str | None = None) -> IPCUnavailableError:
        return IPCUnavailableError(
            grpc.StatusCode.UNAVAILABLE,
            f'socket {str(self.socket_path)!r} does not exist (is the IPC server running?)',
            method=method)

    def _check_socket(self) -> None:
        if not os.path.exists(self.socket_path):
            raise self._socket_missing()

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
    loop share one channel. A handler may be used from several event loops in
    turn (each gets its own channel), but from one loop at a time.

    :param socket_path: the server's socket; resolved as described in
        :mod:`vyra_base_ipc.address` when omitted.
    :param service_stub: the generated ``*Stub`` class whose methods to call.
    :param module_name: module whose default socket path to use.
    :param timeout: default deadline of a call, in seconds.
    :param default_method: method that :meth:`dispatch` sends to.
    :param wait_for_ready: default for calls: wait (within the deadline) for
        an unreachable server instead of failing at once.
    :param idempotent_methods: names of methods that are safe to run twice;
        only these are retried after UNAVAILABLE (within their deadline).
    :param max_message_bytes: largest message sent or accepted.
    """

    def __init__(self, socket_path: StrPath | None = None, service_stub: type | None = None,
                 **kwargs: Any) -> None:
        super().__init__(socket_path, service_stub, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel: grpc.aio.Channel | None = None
        self._callables: dict[str, Any] = {}
        self._connected = False

    @property
    def is_connected(self) -> bool:
        return self._connected

    async def connect(self, timeout: float | None = None) -> None:
        """Open (or share) the channel and make sure a server answers (one
        ``grpc.health.v1.Health/Check`` round trip).

        Idempotent. Fails at once if the socket file does not exist or nobody
        listens; with ``wait_for_ready`` it waits for the server within
        ``timeout`` (default: the handler's timeout) instead.

        :raises IPCUnavailableError: no server could be reached in time.
        """
        deadline = self._deadline(timeout)
        if not self.wait_for_ready:
            self._check_socket()
        probe = self._multicallable(self._channel_here(), _PROBE)
        self._connected = True
        try:
            await probe(_PROBE_REQUEST, timeout=deadline, wait_for_ready=self.wait_for_ready)
        except grpc.RpcError as error:
            failure = self._probe_failed(error, deadline)
            if failure is not None:
                await self.disconnect()
                raise failure from None
        except BaseException:
            await self.disconnect()
            raise

    async def disconnect(self) -> None:
        """Release the channel (closed when its last user lets go). Idempotent."""
        self._connected = False
        channel, loop = self._channel, self._loop
        self._channel, self._loop, self._callables = None, None, {}
        if channel is None or loop is None:
            return
        if loop is asyncio.get_running_loop():
            await aio_pool.release(channel)
        elif loop.is_running():
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(aio_pool.release(channel), loop))

    async def call_method(self, method: str, request: Any, *, timeout: float | None = None,
                          metadata: Metadata | None = None, wait_for_ready: bool | None = None,
                          parent: ServerContext | None = None) -> Any:
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
        :raises ValueError: unknown method name.
        :raises TypeError: the method streams responses (use :meth:`stream_method`).
        :raises IPCUnavailableError, IPCTimeoutError, IPCRemoteError: the call failed.
        """
        info = self._method(method, response_streaming=False)
        call = self._callable(info)
        deadline = self._deadline(timeout, parent, info)
        give_up = time.monotonic() + deadline
        wait = self._wait(wait_for_ready)
        for attempt in itertools.count():
            try:
                return await call(request, timeout=deadline, metadata=metadata, wait_for_ready=wait)
            except grpc.RpcError as error:
                pause = self._retry_pause(info, error, give_up, attempt)
                if pause is None:
                    raise self._translate(error, info) from None
            await asyncio.sleep(pause)
            deadline, wait = give_up - time.monotonic(), True
        raise AssertionError('unreachable')

    async def stream_method(self, method: str, request: Any, *, timeout: float | None = None,
                            metadata: Metadata | None = None, wait_for_ready: bool | None = None,
                            parent: ServerContext | None = None) -> AsyncIterator[Any]:
        """Call a response-streaming method; iterate over its responses.

        The deadline covers the whole stream. Leaving the iteration early
        cancels the call. Streams are never retried.

        :param request: the request message, or an (async) iterable of them
            for a bidirectional method.
        :raises ValueError, TypeError, IPCError: as :meth:`call_method`.
        """
        info = self._method(method, response_streaming=True)
        call = self._callable(info)(request, timeout=self._deadline(timeout, parent, info),
                                    metadata=metadata, wait_for_ready=self._wait(wait_for_ready))
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

    def _channel_here(self) -> grpc.aio.Channel:
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop:
            # A handler moved to a new loop (asyncio.run() twice): the old
            # loop's channel cannot be used here, nor closed from here.
            self._channel = aio_pool.acquire(self._target, self._options)
            self._loop = loop
            self._callables = {}
        return self._channel

    def _callable(self, method: Method) -> Any:
        if self._loop is not asyncio.get_running_loop():
            if not self._connected:
                raise RuntimeError('IPCHandler is not connected: await connect() first')
            self._channel_here()
        call = self._callables.get(method.name)
        if call is None:
            call = self._callables[method.name] = self._multicallable(self._channel, method)
        return call


class SyncIPCHandler(_ClientBase):
    """Blocking client with the semantics of :class:`IPCHandler`.

    For code that is not async, chiefly rclpy callbacks: every call blocks the
    calling thread for at most its deadline. Thread-safe; all instances in a
    process share one channel per socket. In a child forked after gRPC was
    used, calls raise :class:`~vyra_base_ipc.fork_safety.ForkedProcessError`.
    """

    def __init__(self, socket_path: StrPath | None = None, service_stub: type | None = None,
                 **kwargs: Any) -> None:
        super().__init__(socket_path, service_stub, **kwargs)
        self._channel: grpc.Channel | None = None
        self._pid = 0
        self._callables: dict[str, Any] = {}

    @property
    def is_connected(self) -> bool:
        return self._channel is not None and self._pid == os.getpid()

    def connect(self, timeout: float | None = None) -> None:
        """Open (or share) the channel and make sure a server answers; see
        :meth:`IPCHandler.connect`.

        :raises IPCUnavailableError: no server could be reached in time.
        """
        deadline = self._deadline(timeout)
        if not self.wait_for_ready:
            self._check_socket()
        probe = self._multicallable(self._channel_here(), _PROBE)
        try:
            probe(_PROBE_REQUEST, timeout=deadline, wait_for_ready=self.wait_for_ready)
        except grpc.RpcError as error:
            failure = self._probe_failed(error, deadline)
            if failure is not None:
                self.disconnect()
                raise failure from None

    def disconnect(self) -> None:
        """Release the channel (closed when its last user lets go). Idempotent."""
        channel, self._channel, self._callables = self._channel, None, {}
        if channel is not None and self._pid == os.getpid():
            sync_pool.release(channel)

    def call_method(self, method: str, request: Any, *, timeout: float | None = None,
                    metadata: Metadata | None = None, wait_for_ready: bool | None = None,
                    parent: ServerContext | None = None) -> Any:
        """Call a unary-response method; block for at most the deadline.

        Parameters, retries and errors as :meth:`IPCHandler.call_method`.
        """
        info = self._method(method, response_streaming=False)
        call = self._callable(info)
        deadline = self._deadline(timeout, parent, info)
        give_up = time.monotonic() + deadline
        wait = self._wait(wait_for_ready)
        if info.kind.request_streaming:
            request = iter(request)  # grpc's blocking stubs call next() on it: lists welcome
        for attempt in itertools.count():
            try:
                return call(request, timeout=deadline, metadata=metadata, wait_for_ready=wait)
            except grpc.RpcError as error:
                pause = self._retry_pause(info, error, give_up, attempt)
                if pause is None:
                    raise self._translate(error, info) from None
            time.sleep(pause)
            deadline, wait = give_up - time.monotonic(), True
        raise AssertionError('unreachable')

    def stream_method(self, method: str, request: Any, *, timeout: float | None = None,
                      metadata: Metadata | None = None, wait_for_ready: bool | None = None,
                      parent: ServerContext | None = None) -> Iterator[Any]:
        """Call a response-streaming method; iterate over its responses.

        :raises ValueError, TypeError, IPCError: as :meth:`IPCHandler.stream_method`.
        """
        info = self._method(method, response_streaming=True)
        if info.kind.request_streaming:
            request = iter(request)
        call = self._callable(info)(request, timeout=self._deadline(timeout, parent, info),
                                    metadata=metadata, wait_for_ready=self._wait(wait_for_ready))
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

    def _channel_here(self) -> grpc.Channel:
        if self._channel is None or self._pid != os.getpid():
            self._channel = sync_pool.acquire(self._target, self._options)
            self._pid = os.getpid()
            self._callables = {}
        return self._channel

    def _callable(self, method: Method) -> Any:
        if not self.is_connected:
            if self._channel is None:
                raise RuntimeError('SyncIPCHandler is not connected: call connect() first')
            self._channel_here()
        call = self._callables.get(method.name)
        if call is None:
            call = self._callables[method.name] = self._multicallable(self._channel, method)
        return call
