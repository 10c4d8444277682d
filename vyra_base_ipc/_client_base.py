"""What both clients share (:class:`ClientBase`): configuration, method
look-up, the deadline of a call, the retry rule, the lane choice and the
words of a call's errors; the retry loops, one per way of waiting."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import threading
import time
from typing import (
    Any,
    Awaitable,
    Callable,
    ClassVar,
    ContextManager,
    Iterable,
    Literal,
    Protocol,
    Sequence,
    TypeVar,
)

import grpc

from ._busy_poll import DEFAULT_BUSY_POLL, validate_busy_poll
from ._deadline import Deadline
from ._fork_safety import ensure_usable_after_fork, locks_anew_after_fork, note_grpc_used
from ._inline_buffers import inline_size_over
from ._interceptors import ClientCall, ClientInterceptor, checked_interceptors, intercepted_call
from ._lanes import LaneChoice, ServerCameUp
from ._lifetime import Held
from ._methods import Method, MethodKind, request_type_error, stub_methods
from ._options import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT,
    MAX_SECONDS,
    channel_options,
    validate_max_message_bytes,
    validate_timeout,
)
from ._payload import SharedMemoryOptions, usable_options
from ._peer import trusted_server_uids
from ._pinned_channel import PinnedChannel
from ._pool import Disconnected, Pool
from ._shared_buffer import SharedBuffer, check_buffers
from ._socket_file import is_listening
from .address import StrPath, _client_ttrpc_socket_path, grpc_target, resolve_socket_path
from .exceptions import IPCError, IPCRemoteError, IPCTimeoutError, IPCUnavailableError, MessageTooLargeError
from .introspection_pb2 import ServerInfo, ServerInfoRequest
from .ttrpc import DEFAULT_STREAM_WINDOW
from .ttrpc._errors import NothingSent, not_started, refused_for_good, unsent
from .ttrpc._flow import validate_stream_window

__all__ = [
    'DEFAULT',
    'LAST_ATTEMPT',
    'NO_LOCK',
    'SERVER_INFO',
    'SERVER_INFO_REQUEST',
    'ClientBase',
    'Default',
    'Retry',
    'ServerContext',
    'retrying',
    'retrying_sync',
]

_T = TypeVar('_T')


class Default(enum.Enum):
    DEFAULT = 'the client default'

    def __repr__(self) -> str:
        return 'DEFAULT'


#: ``timeout=DEFAULT``: the client's ``timeout``. (``stream_method`` takes
#: ``timeout=None`` too: a stream without deadline.)
DEFAULT = Default.DEFAULT


class ServerContext(Protocol):
    """What :meth:`IPCHandler.call_method` needs of a calling handler's context
    (``grpc.ServicerContext``, ``grpc.aio.ServicerContext`` or the fast lane's)."""

    def time_remaining(self) -> float | None: ...


_NO_REQUEST: Any = object()


# What a server says of a method it does not have (grpc core and the fast
# lane alike); a handler that raises NotImplementedError says otherwise.
_METHOD_NOT_FOUND = 'Method not found!'

#: The server's own services, besides the ones it was given (ServerInfo lists those);
#: reflection only on the gRPC lane, where grpcurl and other tools ask for it.
_REFLECTION = 'grpc.reflection.v1alpha.ServerReflection'
_BUILT_IN_SERVICES = frozenset({'grpc.health.v1.Health', 'vyra.ipc.Introspection', _REFLECTION})

#: Asked after UNIMPLEMENTED, to say which services the server does have.
SERVER_INFO = Method(name='GetServerInfo', path='/vyra.ipc.Introspection/GetServerInfo',
                     kind=MethodKind.UNARY_UNARY, request_serializer=ServerInfoRequest.SerializeToString,
                     response_deserializer=ServerInfo.FromString)
SERVER_INFO_REQUEST = ServerInfoRequest()
#: A call that waits for its server (or retries) makes its last attempt at most this long before its deadline.
LAST_ATTEMPT = 0.1


class Retry:
    """When to try again after UNAVAILABLE, and after what pause: growing
    from ``first`` to 0.5 s, only while ``allowed``, the last one cut short
    to end :data:`LAST_ATTEMPT` before ``until``; and once, at once, whatever
    ``allowed``, after :class:`NothingSent` (a fast-lane connection found
    broken by the call's first write, or :class:`ServerCameUp`)."""

    __slots__ = ('allowed', 'until', 'attempts', 'resent', '_pause')

    def __init__(self, allowed: bool, until: Deadline | None, first: float) -> None:
        self.allowed = allowed
        self.until = until
        self.attempts = 0
        self.resent = False
        self._pause = first

    def pause_after(self, error: IPCUnavailableError) -> float:
        """The pause before the next attempt.

        :raises IPCUnavailableError: ``error``, when not to try again.
        """
        if isinstance(error, Disconnected):
            raise error
        if isinstance(error, (NothingSent, ServerCameUp)) and not self.resent:
            # Any call may go again, once, at once; after ServerCameUp it then
            # waits for the channel to connect (attempts > 0: wait_for_ready).
            self.resent = True
            if isinstance(error, ServerCameUp):
                self.attempts = 1
            return 0.0
        if not self.allowed or self.until is None:
            raise error
        # Not given up a whole pause (up to 0.5 s) early, missing a server come up
        # meanwhile; not tried without time left (the caller gets this error).
        left = self.until.remaining() - LAST_ATTEMPT
        if left <= 0:
            raise error
        pause = self._pause
        self._pause = min(pause * 2, 0.5)
        self.attempts += 1
        return min(pause, left)


class ClientBase:
    """What both clients share: configuration, method look-up, deadlines,
    the retry rule and the lane choice."""

    # Each face's own: the pools of its connections, how a gRPC channel is made, the lane over it.
    _fast_pool: ClassVar[Pool[Any]]
    _grpc_pool: ClassVar[Pool[Any]]
    _channel_factory: ClassVar[Callable[..., Any]]
    _grpc_lane_type: ClassVar[type[Any]]

    def __init__(
        self,
        socket_path: StrPath | None = None,
        service_stub: type[Any] | None = None,
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
        stream_window: int = DEFAULT_STREAM_WINDOW,
        server_uid: int | None = None,
        interceptors: Sequence[ClientInterceptor] = (),
        busy_poll: float = DEFAULT_BUSY_POLL,
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path, module_name=module_name)
        self.interceptors = checked_interceptors(interceptors, ClientInterceptor)
        self.server_uid = server_uid
        self._trusted = trusted_server_uids(server_uid)
        self.shared_memory = usable_options(shared_memory)
        self._choice = LaneChoice(lane)
        self.lane = lane
        self.ttrpc_socket_path, fast = _client_ttrpc_socket_path(self.socket_path, ttrpc_socket_path, lane)
        if not fast:  # (no server's fast lane can listen there)
            self._choice = LaneChoice('grpc')
        if self.ttrpc_socket_path == self.socket_path:  # (as IPCServer refuses it)
            raise ValueError(f'ttrpc_socket_path must differ from socket_path ({self.socket_path})')
        self.timeout = validate_timeout(timeout)
        self.wait_for_ready = bool(wait_for_ready)
        self.max_message_bytes = validate_max_message_bytes(max_message_bytes)
        self.stream_window = validate_stream_window(stream_window)
        self.busy_poll = validate_busy_poll(busy_poll)
        stub: type | None = service_stub  # (to mypy a type[Any] is no Hashable for lru_cache)
        self._methods = stub_methods(stub) if stub is not None else {}
        self._stub_name = stub.__qualname__ if stub is not None else None
        if default_method is not None and self._method(default_method).kind.response_streaming:
            raise ValueError(f'default_method {default_method!r} streams its answers: dispatch() '
                             'takes none (use stream_method())')
        self.default_method = default_method
        if idempotent_methods is None:
            raise TypeError('idempotent_methods must be method names, not None (the default is none: ())')
        self.idempotent_methods = frozenset(self._retryable(name) for name in
                                            ([idempotent_methods] if isinstance(idempotent_methods, str)
                                             else idempotent_methods))
        self._target = grpc_target(self.socket_path)
        self._options = channel_options(self.max_message_bytes)
        self._connected = False
        # Guards taking pool keys: a SyncIPCHandler's first calls may come
        # from several threads at once (each would take a key of its own),
        # and disconnect() must not drop a key a call just took, unreleased.
        # A forked child gets a new one, and its disconnect() goes without it:
        # a thread of the parent may have held it at fork() time, for good in the child.
        self._keys_lock = threading.Lock()
        locks_anew_after_fork(self)
        # The connections of the current owner (event loop or process):
        # pool keys (held apart, for the finalizer that gives them back if
        # the handler is collected without disconnect()), and the lanes made from them.
        self._held = Held(self, self._fast_pool, self._grpc_pool, os.fspath(self.socket_path))
        self._fast: Any = None
        self._grpc: dict[bool, Any] = {}

    def _locks_anew(self) -> None:
        """(in a forked child) See ``_keys_lock``."""
        self._keys_lock = threading.Lock()

    @property
    def _fast_key(self) -> Any:
        """The pool key of the fast-lane connection (``None`` while none is held)."""
        return self._held.fast_key

    @property
    def methods(self) -> tuple[str, ...]:
        """Names of the methods this client can call."""
        return tuple(self._methods)

    @property
    def is_connected(self) -> bool:
        """Whether this handler holds connections: from a successful
        ``connect()`` or its first call until ``disconnect()`` (a call that
        found no server counts too: the next one reconnects by itself)."""
        return self._connected

    @property
    def lane_in_use(self) -> str | None:
        """``'ttrpc'`` or ``'grpc'``: the lane of the last call (or of
        connect()); None while not connected."""
        return self._choice.in_use if self._connected else None

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

    def _method(self, name: object, *, response_streaming: bool | None = None,
                request: Any = _NO_REQUEST, response_type: type | None = None) -> Method:
        """The method called ``name`` (of the kind ``response_streaming``
        says, taking ``request`` if given, answering ``response_type`` if given).

        :raises TypeError, ValueError: a misuse, naming what was wrong.
        """
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
        if request is not _NO_REQUEST and method.request_type is not None \
                and not method.kind.request_streaming:  # (a stream's as each message goes)
            given = getattr(getattr(request, 'DESCRIPTOR', None), 'full_name', None)
            if given != method.request_type or isinstance(request, type):  # (tested in line: 1 call less)
                raise request_type_error(method, request) or TypeError(name)
        if response_type is not None:
            if not isinstance(response_type, type):
                raise TypeError(f'response_type must be a message class, not '
                                f'{type(response_type).__name__} {response_type!r}')
            answers = getattr(method.response_deserializer, '__self__', None)
            if answers is not response_type:
                answered = getattr(answers, '__qualname__', 'messages of unknown type')
                raise TypeError(f'{name} answers {answered}, not '
                                f'{getattr(response_type, "__qualname__", response_type)} (response_type)')
        return method

    def _intercepted(self, method: Method, metadata: Any, deadline: Deadline | None
                     ) -> ContextManager[ClientCall | None]:
        """The call under the client's interceptors (see
        :func:`~vyra_base_ipc._interceptors.intercepted_call`); a no-op
        yielding ``None`` without any. Send ``call.metadata``; set
        ``call.lane`` when the lane is chosen.

        :raises IPCError: an interceptor refused the call.
        """
        if not self.interceptors:
            return _NOT_INTERCEPTED
        call = ClientCall(method.path, list(metadata or ()), None if deadline is None else deadline.at)
        return intercepted_call(self.interceptors, call)

    def _wait(self, wait_for_ready: bool | None) -> bool:
        return self.wait_for_ready if wait_for_ready is None else wait_for_ready

    def _deadline(self, timeout: float | None | Default, parent: ServerContext | None = None,
                  method: Method | None = None) -> Deadline | None:
        """The call's deadline: its own timeout (``DEFAULT``: the client's;
        ``None``: none), capped by the time the calling handler has left."""
        seconds = (self.timeout if timeout is DEFAULT else validate_timeout(timeout)) if timeout is not None \
            else None
        now = time.monotonic()
        own = None if seconds is None else now + seconds
        capped = False
        if parent is not None:
            remaining = parent.time_remaining()
            if remaining is not None and remaining == remaining:  # (NaN, from a foreign context: none)
                remaining = min(remaining, MAX_SECONDS)  # (a foreign peer's, up to 292 years; inf)
                if remaining <= 0:
                    raise IPCTimeoutError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                          "the calling handler's deadline has already expired",
                                          method=method.path if method else None)
                if own is None or now + remaining < own:
                    own, seconds, capped = now + remaining, remaining, True
        return None if own is None else Deadline(own, seconds, capped)

    def _check_size(self, method: Method, request: Any, buffers: Sequence[SharedBuffer]) -> None:
        """Hold a request with explicit buffers to ``max_message_bytes`` as
        it would travel inline, whichever lane it takes: the gRPC lane must
        copy the buffers into it, and a call must not work on one lane only.
        A request without buffers is held to it by each lane, as it is
        serialized.

        :raises TypeError, ValueError: as :func:`~vyra_base_ipc._shared_buffer.check_buffers`.
        :raises MessageTooLargeError: it is larger; nothing was sent.
        """
        if not buffers:
            return
        check_buffers(method.path, method.kind.request_streaming, buffers)
        size = inline_size_over(request, buffers, self.max_message_bytes)
        if size is not None:
            raise MessageTooLargeError(size, self.max_message_bytes, method=method.path, buffers=len(buffers))

    def _explained(self, method: Method, deadline: Deadline | None) -> ContextManager[None]:
        """Let the errors of a call say what happened: each names the method,
        and a call that ran out of time says which timeout and how long
        (rather than the transport's bare "Deadline Exceeded"), whether it
        was a unary call or a stream, on either lane."""
        return _Explained(self, method, deadline)

    def _socket_in_use(self) -> str | None:
        """The socket of the lane calls took last (``None`` before the first)."""
        lane = self._choice.in_use
        if lane is None:
            return None
        return os.fspath(self.ttrpc_socket_path if lane == 'ttrpc' else self.socket_path)

    @staticmethod
    def _server_info_deadline(deadline: Deadline | None) -> Deadline | None:
        """How long to ask a server which services it has: a second at
        most, and never past the call's deadline (``None``: no time left)."""
        limit = time.monotonic() + 1.0
        if deadline is None or deadline.at >= limit:
            return Deadline(limit)
        return deadline if deadline.remaining() > 0.001 else None

    @staticmethod
    def _is_missing_method(error: IPCRemoteError) -> bool:
        return error.code is grpc.StatusCode.UNIMPLEMENTED and error.details == _METHOD_NOT_FOUND

    def _unimplemented(self, error: IPCRemoteError, method: Method, info: Any, lane: str) -> IPCError:
        """The UNIMPLEMENTED ``error`` of ``method`` on ``lane``, saying which services
        the server has (``info``: its ServerInfo, or None if it did not say)."""
        if info is None:
            return error
        services = tuple(info.services)
        service = method.path.lstrip('/').rpartition('/')[0]
        where = f'the server on {str(self.socket_path)!r}'
        if service == _REFLECTION and lane == 'ttrpc':
            details = f"{where} serves {service} on its gRPC lane only: call it with lane='grpc'"
        elif service in services or service in _BUILT_IN_SERVICES:
            details = (f'{where} serves {service} but has no method {method.name} '
                       '(is it built from another version of the .proto?)')
        else:
            details = (f'{where} has no service {service}; it serves '
                       f'{", ".join(sorted(services)) or "no services of its own"} '
                       '(the wrong socket, or a server without this service?)')
        return IPCRemoteError(error.code, details, method=method.path)

    def _retryable(self, name: str) -> str:
        method = self._method(name)
        if method.kind.request_streaming:
            raise ValueError(f'{name} streams its requests: it cannot be retried, so it cannot be '
                             'marked idempotent')
        return name

    def _retry(self, method: Method, deadline: Deadline | None) -> Retry:
        """The retry rule of a call: only methods marked idempotent are
        retried after UNAVAILABLE, since a call that failed this way may have
        run on the server already (a crash mid-call); the pause grows from
        50 ms to 0.5 s so that a server answering UNAVAILABLE itself is not
        hammered, and retries wait for the server to be ready."""
        return Retry(method.name in self.idempotent_methods, deadline, 0.05)

    def _retry_after(self, retry: Retry | None, method: Method, deadline: Deadline | None,
                     error: IPCUnavailableError) -> tuple[Retry, float]:
        """After an UNAVAILABLE: the call's retry rule (``retry``, or made now:
        a call that never fails needs none) and the pause before trying again.

        :raises IPCUnavailableError: ``error``, when not to try again.
        """
        retry = retry or self._retry(method, deadline)
        return retry, retry.pause_after(error)

    @staticmethod
    def _heed(lane: Any, error: IPCUnavailableError, method: Method) -> IPCUnavailableError:
        """After ``error`` of a call of ``method`` on ``lane``: a fast-lane
        connection whose server is shutting down is retired (no new calls), so
        that the next attempt connects anew, maybe to a server started in its
        place (as a gRPC channel after GOAWAY). Returns :class:`NothingSent` (go
        again once, at once) for a call the server refused before any handler
        saw it, unless its requests are a stream, some maybe taken; else ``error``."""
        if lane is None or lane.lane != 'ttrpc' or not refused_for_good(error):
            return error
        lane.retire()
        if not_started(error) and not method.kind.request_streaming:
            return unsent(error)
        return error

    def _connect_retry(self, deadline: Deadline | None, wait: bool) -> Retry:
        """A fast-lane server that is not there yet is tried again quickly at
        first, then every 0.5 s at most (the gRPC lane's reconnect cap)."""
        until = self._choice.fast_wait(deadline, wait)
        return Retry(until is not None, until, 0.025)

    def _dispatched_method(self) -> str:
        """The method dispatch() sends to.

        :raises ValueError: no ``default_method`` was configured.
        """
        if self.default_method is None:
            raise ValueError(f'dispatch() needs a default_method on this {type(self).__name__}')
        return self.default_method

    @staticmethod
    def _idle_timeout(idle_timeout: float | None) -> float | None:
        return None if idle_timeout is None else validate_timeout(idle_timeout, 'idle_timeout')

    def _waited_grpc_lane(self, retry: Retry) -> Any:
        """The gRPC lane for a call that waits for its server, once its socket
        file is there (waited for as ``retry``, :meth:`_socket_retry`, says);
        a server that came up meanwhile is called on the fast lane from the
        next call on."""
        lane = self._grpc_lane(True).there()
        if retry.attempts:
            self._choice.server_came_up()
        return self._choice.took('grpc', lane)

    def _socket_retry(self, deadline: Deadline | None) -> Retry:
        """How a call that waits for its server waits for the gRPC socket
        file to appear: here, as a fast-lane connect is retried, not inside
        grpc, which would connect to whatever appears at the path, another
        user's socket too (see ``_GrpcLaneBase._callable``)."""
        return Retry(True, deadline or Deadline.after(MAX_SECONDS), 0.025)

    def _connect_options(self) -> dict[str, Any]:
        """The arguments of a fast-lane connect()."""
        return {'socket_path': self.ttrpc_socket_path, 'max_message_bytes': self.max_message_bytes,
                'shared_memory': self.shared_memory, 'stream_window': self.stream_window,
                'server_uid': self.server_uid, 'busy_poll': self.busy_poll}

    def _fast_key_args(self) -> tuple[Any, ...]:
        return (os.fspath(self.ttrpc_socket_path), self.max_message_bytes, self.shared_memory,
                self.stream_window, self._trusted, self.busy_poll)

    def _grpc_lane(self, wait: bool) -> Any:
        """The gRPC lane over this owner's shared channel (made on first use)."""
        lane = self._grpc.get(wait)
        if lane is None:
            held = self._held
            key = held.grpc_key  # (read once: disconnect() in another thread may drop it)
            if key is None:
                ensure_usable_after_fork()
                with self._keys_lock:
                    key = held.grpc_key = held.grpc_key or self._grpc_pool.acquire(
                        (self._target, self._options, self._trusted))
            channel = self._grpc_pool.made_once(key[1], self._new_channel, os.fspath(self.socket_path))
            lane = self._grpc[wait] = self._grpc_lane_type(channel, self.socket_path, wait)
        return lane

    def _new_channel(self) -> PinnedChannel:
        note_grpc_used()
        return PinnedChannel.open(self._channel_factory, os.fspath(self.socket_path), self._trusted,
                                  self._options)

    def _forget_connections(self) -> None:
        self._held.fast_key = self._fast = self._held.grpc_key = None
        self._grpc = {}

    @staticmethod
    def _running_loop() -> asyncio.AbstractEventLoop:
        """The running event loop of an :class:`IPCHandler`'s call.

        :raises RuntimeError: none runs in this thread, saying what to use: a
            coroutine awaited by another runner, chiefly an rclpy executor's
            ``async def`` callback (asyncio's bare "no running event loop").
        """
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                'IPCHandler needs a running asyncio event loop, and none runs in this thread: await its '
                'methods in asyncio code (asyncio.run(), uvicorn, ...). rclpy runs async def callbacks '
                'without one: use SyncIPCHandler there') from None


#: What _intercepted() gives without interceptors (reusable: it holds nothing).
_NOT_INTERCEPTED: ContextManager[None] = contextlib.nullcontext()


class _Explained:
    """:meth:`ClientBase._explained`'s context manager: a class, not a
    generator, as it wraps every call (entering and leaving a generator's
    context manager costs ~1.5 us, this one a fraction)."""

    __slots__ = ('client', 'method', 'deadline')

    def __init__(self, client: ClientBase, method: Method, deadline: Deadline | None) -> None:
        self.client = client
        self.method = method
        self.deadline = deadline

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: Any) -> Literal[False]:
        if error is None or not isinstance(error, IPCError):
            return False
        method = self.method
        if isinstance(error, IPCTimeoutError):
            deadline = self.deadline
            explained = error if deadline is None else deadline.explain(
                error, method.kind.response_streaming, self.client._socket_in_use())
            raise explained.for_method(method.path) from None
        if error.method is None:
            raise error.for_method(method.path) from None
        return False


#: retrying()'s lock where attempts need none.
NO_LOCK = contextlib.nullcontext()


async def retrying(attempt: Callable[[], Awaitable[_T]], retry: Retry,
                   lock: contextlib.AbstractAsyncContextManager[Any]) -> _T:
    """``attempt()`` under ``lock`` until it succeeds or ``retry`` gives up;
    the pauses between attempts outside the lock, so that a caller that does
    not wait for its server (or waits less) is never held by another's waiting."""
    while True:
        async with lock:
            try:
                return await attempt()
            except IPCUnavailableError as error:
                pause = retry.pause_after(error)
        await asyncio.sleep(pause)


def retrying_sync(attempt: Callable[[], _T], retry: Retry,
                  lock: contextlib.AbstractContextManager[Any]) -> _T:
    """As :func:`retrying`, blocking."""
    while True:
        with lock:
            try:
                return attempt()
            except IPCUnavailableError as error:
                pause = retry.pause_after(error)
        time.sleep(pause)
