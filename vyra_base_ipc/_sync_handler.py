"""The blocking client of a module's IPC server: :class:`SyncIPCHandler`.

The face of :class:`~vyra_base_ipc._client_base.ClientBase` that waits by
blocking its thread, for code that is not async (rclpy callbacks, worker
threads); :mod:`vyra_base_ipc.client` has the asyncio one and says what both
share. Imported from there, or from :mod:`vyra_base_ipc`.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Generator, Iterable, Literal, Sequence, TypeVar, overload

import grpc

from ._busy_poll import DEFAULT_BUSY_POLL
from ._client_base import (
    DEFAULT,
    NO_LOCK,
    SERVER_INFO,
    SERVER_INFO_REQUEST,
    ClientBase,
    Default,
    ServerContext,
    retrying_sync,
)
from ._deadline import Deadline
from ._interceptors import ClientInterceptor
from ._lanes import Metadata, SyncGrpcLane
from ._options import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TIMEOUT
from ._payload import SharedMemoryOptions
from ._pool import sync_pool, sync_ttrpc_pool
from ._request_stream import RequestStream
from ._served_loops import refuse_own_loop
from ._shared_buffer import ReceivedBuffers, SharedBuffer
from .address import StrPath
from .exceptions import IPCError, IPCRemoteError, IPCUnavailableError
from .ttrpc import DEFAULT_STREAM_WINDOW, SyncConnection
from .ttrpc._errors import NothingSent

__all__ = ['SyncIPCHandler']

#: A response message class (``response_type=``).
_R = TypeVar('_R')
_Handler = TypeVar('_Handler', bound='SyncIPCHandler')


class SyncIPCHandler(ClientBase):
    """Blocking client with the semantics of :class:`IPCHandler`.

    For code that is not async, chiefly rclpy callbacks: every call blocks the
    calling thread for at most its deadline. Thread-safe; all instances in a
    process share one connection per socket and lane. In a child forked after
    gRPC was used, the gRPC lane raises
    :class:`~vyra_base_ipc.ForkedProcessError`; the fast lane
    (plain sockets) opens a connection of the child's own.

    Takes the arguments of :class:`~vyra_base_ipc.IPCHandler`; ``busy_poll`` is how long
    a thread waiting for a fast-lane answer polls the socket before it sleeps.
    """

    _fast_pool = sync_ttrpc_pool
    _grpc_pool = sync_pool
    _channel_factory = staticmethod(grpc.insecure_channel)
    _grpc_lane_type = SyncGrpcLane

    # Restated (as in IPCHandler), not inherited: a misspelt keyword's TypeError
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
        self._pid = 0

    def connect(self, timeout: float | None = None) -> None:
        """Open (or share) a connection and make sure a server answers; see
        :meth:`~vyra_base_ipc.IPCHandler.connect`.

        :raises IPCUnavailableError: no server could be reached in time.
        :raises RuntimeError: called on the event loop of the server it calls.
        """
        refuse_own_loop(self.socket_path, type(self).__name__)
        deadline = self._deadline(DEFAULT if timeout is None else timeout)
        self._connected = True
        try:
            lane = self._lane(deadline, self.wait_for_ready)
            lane.probe(deadline)  # type: ignore[arg-type]
        except BaseException:
            self.disconnect()
            raise

    def disconnect(self) -> None:
        """Release the connections (closed when their last user lets go); a
        later call connects again. Idempotent."""
        self._connected = False
        with self._keys_lock if self._pid == os.getpid() else contextlib.nullcontext():  # (see _keys_lock)
            fast_key, grpc_key, pid = self._held.fast_key, self._held.grpc_key, self._pid
            self._pid = 0
            self._forget_connections()
        if pid == os.getpid():  # (a forked child's keys are its parent's)
            for pool, key in ((sync_ttrpc_pool, fast_key), (sync_pool, grpc_key)):
                connection = pool.release(key[0]) if key is not None else None
                if connection is not None:
                    connection.close()

    @overload
    def call_method(self, method: str, request: Any, *, timeout: float | Default = DEFAULT,
                    metadata: Metadata | None = None, wait_for_ready: bool | None = None,
                    parent: ServerContext | None = None, buffers: Sequence[SharedBuffer] = (),
                    return_buffers: Literal[False] = False, response_type: type[_R]) -> _R: ...

    @overload
    def call_method(self, method: str, request: Any, *, timeout: float | Default = DEFAULT,
                    metadata: Metadata | None = None, wait_for_ready: bool | None = None,
                    parent: ServerContext | None = None, buffers: Sequence[SharedBuffer] = (),
                    return_buffers: Literal[True], response_type: type[_R]) -> tuple[_R, ReceivedBuffers]: ...

    @overload
    def call_method(self, method: str, request: Any, *, timeout: float | Default = DEFAULT,
                    metadata: Metadata | None = None, wait_for_ready: bool | None = None,
                    parent: ServerContext | None = None, buffers: Sequence[SharedBuffer] = (),
                    return_buffers: Literal[True], response_type: None = None
                    ) -> tuple[Any, ReceivedBuffers]: ...

    @overload
    def call_method(self, method: str, request: Any, *, timeout: float | Default = DEFAULT,
                    metadata: Metadata | None = None, wait_for_ready: bool | None = None,
                    parent: ServerContext | None = None, buffers: Sequence[SharedBuffer] = (),
                    return_buffers: bool = False, response_type: type[Any] | None = None) -> Any: ...

    def call_method(self, method: str, request: Any, *, timeout: float | Default = DEFAULT,
                    metadata: Metadata | None = None, wait_for_ready: bool | None = None,
                    parent: ServerContext | None = None,
                    buffers: Sequence[SharedBuffer] = (), return_buffers: bool = False,
                    response_type: type[Any] | None = None) -> Any:
        """Call a unary-response method; block for at most the deadline.

        Parameters, retries and errors as :meth:`~vyra_base_ipc.IPCHandler.call_method`.

        :raises RuntimeError: called on the event loop of the server it calls
            (from an ``async def`` handler of that server: await an
            :class:`~vyra_base_ipc.IPCHandler` there), which could never answer.
        """
        refuse_own_loop(self.socket_path, type(self).__name__)
        info = self._method(method, response_streaming=False, request=request, response_type=response_type)
        self._check_size(info, request, buffers)
        deadline = self._deadline(DEFAULT if timeout is None else timeout, parent, info)
        wait = self._wait(wait_for_ready)
        if info.kind.request_streaming:
            request = RequestStream(info, request)  # consumed once, whichever attempt sends it
        retry = lane = None  # as in IPCHandler.call_method
        with self._intercepted(info, metadata, deadline) as call, self._explained(info, deadline):
            while True:
                try:
                    lane = self._lane(deadline, wait or bool(retry and retry.attempts))
                    if call is not None:
                        call.lane = lane.lane
                    return lane.call(info, request, timeout=deadline,
                                     metadata=metadata if call is None else call.metadata,
                                     buffers=buffers, return_buffers=return_buffers)
                except IPCUnavailableError as error:
                    retry, pause = self._retry_after(retry, info, deadline, self._heed(lane, error, info))
                except IPCRemoteError as error:
                    raise self._explain_remote(error, info, [lane] if lane else [], deadline) from None
                time.sleep(pause)

    @overload
    def stream_method(self, method: str, request: Any, *, timeout: float | None | Default = DEFAULT,
                      idle_timeout: float | None = None, metadata: Metadata | None = None,
                      wait_for_ready: bool | None = None, parent: ServerContext | None = None,
                      response_type: type[_R]) -> Generator[_R, None, None]: ...

    @overload
    def stream_method(self, method: str, request: Any, *, timeout: float | None | Default = DEFAULT,
                      idle_timeout: float | None = None, metadata: Metadata | None = None,
                      wait_for_ready: bool | None = None, parent: ServerContext | None = None,
                      response_type: None = None) -> Generator[Any, None, None]: ...

    def stream_method(self, method: str, request: Any, *, timeout: float | None | Default = DEFAULT,
                      idle_timeout: float | None = None, metadata: Metadata | None = None,
                      wait_for_ready: bool | None = None, parent: ServerContext | None = None,
                      response_type: type[Any] | None = None) -> Generator[Any, None, None]:
        """Call a response-streaming method; iterate over its responses.

        Deadline, ``idle_timeout``, leaving early, ``response_type`` and
        errors as :meth:`~vyra_base_ipc.IPCHandler.stream_method`.

        :raises RuntimeError: as :meth:`call_method`.
        """
        refuse_own_loop(self.socket_path, type(self).__name__)
        info = self._method(method, response_streaming=True, request=request, response_type=response_type)
        deadline = self._deadline(timeout, parent, info)
        idle_timeout = self._idle_timeout(idle_timeout)
        with self._intercepted(info, metadata, deadline) as call, self._explained(info, deadline):
            for again in (False, True):  # again if its connection broke before it was sent
                lane = self._lane(deadline, self._wait(wait_for_ready))
                if call is not None:
                    call.lane, metadata = lane.lane, call.metadata
                try:
                    yield from lane.stream(info, request, timeout=deadline, metadata=metadata,
                                           idle_timeout=idle_timeout)
                    return
                except NothingSent:
                    if again:
                        raise
                except IPCUnavailableError as error:
                    error = self._heed(lane, error, info)
                    if again or not isinstance(error, NothingSent):
                        raise error from None
                except IPCRemoteError as error:
                    raise self._explain_remote(error, info, [lane], deadline) from None

    def dispatch(self, message: Any) -> None:
        """Send ``message`` to :attr:`default_method`; the response is discarded."""
        self.call_method(self._dispatched_method(), message)

    def __enter__(self: _Handler) -> _Handler:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disconnect()

    def _explain_remote(self, error: IPCRemoteError, method: Any, used: Sequence[Any],
                        deadline: Deadline | None) -> IPCError:
        """As :meth:`~vyra_base_ipc.IPCHandler._explain_remote`, blocking."""
        if not self._is_missing_method(error) or not used:
            return error
        until = self._server_info_deadline(deadline)
        try:
            info = None if until is None else used[0].call(SERVER_INFO, SERVER_INFO_REQUEST, timeout=until)
        except IPCError:
            info = None
        return self._unimplemented(error, method, info, used[0].lane)

    # -- lanes ------------------------------------------------------------------------

    def _lane(self, deadline: Deadline | None, wait: bool) -> SyncConnection | SyncGrpcLane:
        """The lane for a call, as :meth:`~vyra_base_ipc.IPCHandler._lane`."""
        fast = self._fast
        if fast is not None and not fast.is_closed:  # is_closed is also true after fork
            return self._choice.took('ttrpc', fast)
        self._here()
        if self._choice.fast_first():
            try:
                return self._choice.took('ttrpc', self._fast_connection(deadline, wait))
            except IPCUnavailableError as error:
                self._choice.fast_unavailable(error)
        if wait:
            retry = self._socket_retry(deadline)
            return retrying_sync(lambda: self._waited_grpc_lane(retry), retry, NO_LOCK)
        return self._choice.took('grpc', self._grpc_lane(wait))

    def _here(self) -> None:
        """Make this handler's connections those of this process: on first
        use (or first since disconnect()), and in a child after fork."""
        if self._pid == os.getpid():
            return
        with self._keys_lock:
            if self._pid != os.getpid():
                self._forget_connections()
                self._connected = True
                self._pid = os.getpid()  # last: other threads go on only after the forgetting

    def _fast_connection(self, deadline: Deadline | None, wait: bool) -> SyncConnection:
        """As :meth:`~vyra_base_ipc.IPCHandler._fast_connection`, blocking."""
        held = self._held
        key = held.fast_key  # (read once: disconnect() in another thread may drop it)
        if key is None:
            with self._keys_lock:
                key = held.fast_key = held.fast_key or sync_ttrpc_pool.acquire(self._fast_key_args())
        entry = key[1]

        def connected() -> SyncConnection:  # (entry lock held: one connect for all waiting)
            connection = entry.connection
            if connection is None or connection.is_closed:
                if connection is not None:
                    connection.retire()  # (a retired one's calls in flight go on)
                connection = sync_ttrpc_pool.kept(entry, SyncConnection.connect(**self._connect_options()))
            return connection
        self._fast = retrying_sync(connected, self._connect_retry(deadline, wait), entry.lock)
        return self._fast
