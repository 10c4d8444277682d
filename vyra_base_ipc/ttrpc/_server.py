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
closed; nothing a peer sends affects other connections. This module holds
the server's lifecycle (listening, accepting, stopping); a connection is
:mod:`._server_connection`'s, its calls are :mod:`._dispatch`'s.
"""

from __future__ import annotations

import asyncio
from concurrent import futures
import contextlib
import enum
import logging
import math
import os
import socket
import time
from typing import Any, Callable, Iterable

from .._deadline import within
from .._handler_threads import HandlerThreads
from .._interceptors import CallObserver
from .._limits import ServerLimits
from .._log_limit import flush_held
from .._methods import ServiceRegistration
from .._options import DEFAULT_GRACE_PERIOD, DEFAULT_MAX_MESSAGE_BYTES, validate_max_message_bytes
from .._payload import SharedMemoryOptions, usable_options
from .._peer import PeerRule
from .._socket_file import SocketFile
from ..address import StrPath, validate_socket_path
from ._deadlines import DeadlineQueue
from ._dispatch import Handler, call_finished, expire_call
from ._flow import DEFAULT_STREAM_WINDOW, validate_stream_window
from ._messages import ENVELOPE_ALLOWANCE
from ._server_connection import ServerConnection
from ._transport import accept_connections

__all__ = ['CLOSE_TIME', 'TtrpcServer']

_logger = logging.getLogger(__name__)

#: How long past the grace, at most, a stop of either lane waits for its
#: connections to close: here for the clients to read the answers written to
#: them, on the gRPC lane for grpc core to flush a write (grpc.aio's stop()
#: waits for that without bound). IPCServer's bound of a stop: a peer that
#: does not read (a process stopped in a debugger) holds it no longer.
CLOSE_TIME = 1.0


class _State(enum.Enum):
    NEW = 'new'
    SERVING = 'serving'
    STOPPING = 'stopping'
    STOPPED = 'stopped'


class TtrpcServer:
    """Serves registered gRPC servicers over ttrpc on a Unix socket.

    The socket follows the rules of the gRPC socket
    (:class:`~vyra_base_ipc._socket_file.SocketFile`): a live server on the path
    is never replaced, a stale file is, the file gets ``socket_mode`` before
    anyone can connect, and it is removed on stop only if it is still ours.

    All coroutine methods run on one event loop, the one :meth:`start` ran
    on; ``async def`` handlers run on it too. ``def`` handlers run in
    ``executor`` (shared with the gRPC lane when the caller passes its pool),
    else in a pool of ``max_workers`` threads owned by this server.

    :param socket_path: where to listen.
    :param services: registrations from :func:`~vyra_base_ipc._methods.record_servicer`.
    :param max_message_bytes: largest request or response message; frames
        may be :data:`~vyra_base_ipc.ttrpc.ENVELOPE_ALLOWANCE` bytes
        larger to hold the envelope.
    :param grace_period: default grace of :meth:`stop`, in seconds.
    :param socket_mode: permission bits of the socket file.
    :param directory_mode: permission bits of parent directories created for it.
    :param socket_group: group id given to the socket file and created
        directories (see :class:`~vyra_base_ipc._socket_file.SocketFile`).
    :param executor: thread pool for ``def`` handlers (not shut down here).
    :param max_workers: size of the pool created when ``executor`` is None.
    :param maximum_concurrent_rpcs: calls above this many in flight (over
        all connections) are refused at once with RESOURCE_EXHAUSTED, as
        gRPC does; ``None`` for no limit.
    :param shared_memory: how large messages travel to and from clients
        that agree on it (vyra_base_ipc's own); ``None`` to keep every message
        inline. Independent ttrpc clients always get inline answers.
    :param stream_window: bytes of streamed requests a client under flow
        control may send on a stream before the handler has read them.
    :param limits: what peers may hold (:class:`~vyra_base_ipc.ServerLimits`).
    :param observer: metrics and interceptors (shared with the gRPC lane)
        that see every call of ``observed_services``.
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
        stream_window: int = DEFAULT_STREAM_WINDOW,
        limits: ServerLimits = ServerLimits(),
        observer: CallObserver | None = None,
        observed_services: Iterable[str] = (),
    ) -> None:
        self.socket_path = validate_socket_path(socket_path)
        #: The shared-memory options offered to clients (None if off or unavailable here).
        self.shared_memory = usable_options(shared_memory)
        self.max_message_bytes = validate_max_message_bytes(max_message_bytes)
        self.frame_limit = self.max_message_bytes + ENVELOPE_ALLOWANCE
        self.stream_window = validate_stream_window(stream_window)
        self.grace_period = grace_period
        if maximum_concurrent_rpcs is not None and (
                isinstance(maximum_concurrent_rpcs, bool) or not isinstance(maximum_concurrent_rpcs, int)
                or maximum_concurrent_rpcs < 1):
            raise ValueError(f'maximum_concurrent_rpcs must be a positive int or None, '
                             f'not {maximum_concurrent_rpcs!r}')
        self.maximum_concurrent_rpcs = maximum_concurrent_rpcs
        #: Metrics and interceptors of the calls of ``observed_services``.
        self.observer = observer
        self.lane_metrics = observer.metrics.lanes.get('ttrpc') if observer and observer.metrics else None
        observed = set(observed_services) if observer is not None else set()
        self._handlers: dict[tuple[str, str], Handler] = {}
        for registration in services:
            if any(service == registration.name for service, _ in self._handlers):
                raise ValueError(f'service {registration.name} is registered twice')
            for name, handler in registration.handlers.items():
                method = Handler(registration.name, name, handler)
                if observer is not None and registration.name in observed:
                    method.observed = True
                    method.metrics = observer.method_metrics(method.path, 'ttrpc')
                    metrics = method.metrics
                    method.counted_only = not observer.interceptors and metrics is not None
                self._handlers[(registration.name, name)] = method
        self._socket = SocketFile(self.socket_path, socket_mode=socket_mode,
                                  directory_mode=directory_mode, group=socket_group)
        #: Who may connect (checked per connection, beside the socket file's mode).
        self.peer_rule = PeerRule.default(socket_group)
        if not isinstance(limits, ServerLimits):
            raise TypeError(f'limits must be a ServerLimits, not {type(limits).__name__}')
        self.limits = limits
        #: Unread answer bytes one peer may leave: never less than two whole messages.
        self.queue_limit = max(limits.max_queued_bytes, 2 * self.frame_limit)
        self._partial_bytes = 0
        #: Explicit shared buffers the calls of all connections hold (max_held_buffers).
        self.held_buffers = 0
        self._refused = 0
        self._refusal_logged_at = -math.inf
        self._given_executor = executor
        self._max_workers = max_workers
        self._executor: futures.Executor | None = executor
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_accepting: Callable[[], None] | None = None
        self._withdrawn: bool | None = None
        self._connections: set[ServerConnection] = set()
        self._state = _State.NEW
        self._stopping = False
        self._active = 0
        self._idle: asyncio.Event | None = None
        self._stop_task: asyncio.Future[None] | None = None
        # (stopping) Done once every connection is gone (see connection_gone).
        self._gone: asyncio.Future[None] | None = None
        self._deadlines: DeadlineQueue[Any]

    def refused(self, reason: str) -> None:
        """Log a refused connection: at once, then at most once a second
        with the number refused meanwhile (a flood must not flood the log)."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= 1.0:
            more = f' ({self._refused - 1} more since the last report)' if self._refused > 1 else ''
            _logger.warning('fast lane %s refused a connection: %s%s', self.socket_path, reason, more)
            self._refused = 0
            self._refusal_logged_at = now

    def count_refused(self, method: str | None) -> None:
        """Count a call refused at a limit before its handler (see
        :meth:`ServerMetrics.refused`), if metrics are on."""
        if self.observer is not None and self.observer.metrics is not None:
            self.observer.metrics.refused(method, 'ttrpc')

    @property
    def connection_count(self) -> int:
        """Connections open now."""
        return len(self._connections)

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
        self._deadlines = DeadlineQueue(self._loop, call_finished, expire_call)
        self._state = _State.STOPPED  # until serving, stop() has nothing to do
        listener: socket.socket | None = None
        try:
            self._socket.check()
            if self._executor is None:
                self._executor = HandlerThreads(self._max_workers, thread_name_prefix='ttrpc-handler')
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(os.fspath(self._socket.private_bind_path()))
            listener.listen(socket.SOMAXCONN)
            self._stop_accepting = accept_connections(self._loop, listener, lambda: ServerConnection(self))
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
        # DEBUG: IPCServer, which runs this lane, says it for both lanes.
        _logger.debug('ttrpc server serving %d methods on %s', len(self._handlers), self.socket_path)

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving; idempotent and safe to call concurrently.

        Stops accepting at once and removes the socket file (if still ours);
        new calls on open connections get UNAVAILABLE; response streams end
        at once with UNAVAILABLE ("server is shutting down"), their handlers
        cancelled; other calls in flight get ``grace`` seconds (default
        :attr:`grace_period`), then async handlers are cancelled and every
        connection is closed (their clients see UNAVAILABLE). ``def``
        handlers cannot be interrupted: their answers are dropped. A
        connection closes once its client has read what was written to it
        (answers of calls that ended in the grace too), or 1 s after the
        grace (then without it, with a warning). Returns when all of that
        is done.
        """
        if self._stop_task is None:
            if self._state is not _State.SERVING:
                self._state = _State.STOPPED
                return
            self._stop_task = asyncio.ensure_future(
                self._shutdown(self.grace_period if grace is None else grace))
        await asyncio.shield(self._stop_task)

    def withdraw(self) -> bool:
        """Stop accepting connections and remove the socket file (if still
        ours): the first step of :meth:`stop`, for an owner that removes
        several socket files at one moment. Idempotent.

        :returns: whether the socket file was removed now.
        """
        if self._withdrawn is None:
            if self._stop_accepting is not None:
                self._stop_accepting()
            self._withdrawn = self._socket.remove()
        return self._withdrawn

    def abandon(self) -> None:
        """For a server whose event loop no longer runs (an exception ended
        it; the loop may be closed), from any thread: :meth:`withdraw`, and
        close every connection's socket at once (see
        :meth:`~._connection.FramedConnection.drop`), so that its client's
        calls fail UNAVAILABLE now instead of waiting for their deadlines on
        a socket nobody reads. Idempotent."""
        self.withdraw()
        for connection in list(self._connections):
            connection.drop()
        self._connections.clear()
        self._shutdown_executor()
        self._state = _State.STOPPED

    async def __aenter__(self) -> 'TtrpcServer':
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- internals ------------------------------------------------------------------

    def connection_gone(self, connection: ServerConnection) -> None:
        """(From :meth:`ServerConnection.lost`) ``connection`` is closed."""
        self._connections.discard(connection)
        if not self._connections and self._gone is not None and not self._gone.done():
            self._gone.set_result(None)

    def _call_ended(self) -> None:
        self._active -= 1
        # Only a stopping server waits for idleness (it clears the event first).
        if self._active == 0 and self._stopping and self._idle is not None:
            self._idle.set()

    async def _shutdown(self, grace: float) -> None:
        assert self._stop_accepting is not None and self._idle is not None and self._loop is not None
        closed_by = self._loop.time() + grace + CLOSE_TIME
        self._state = _State.STOPPING
        self._stopping = True
        removed = self.withdraw()
        try:
            for connection in list(self._connections):
                # Streams (watches) would use up the whole grace: they end now.
                for call in list(connection.calls.values()):
                    if call.response_streaming:
                        call.shut_down()
                if not connection.calls:
                    connection.close()
            if self._active:
                self._idle.clear()
                if self._active:
                    try:
                        await within(self._idle.wait(), grace)
                    except TimeoutError:
                        _logger.info('ttrpc server on %s: %d calls still running after %g s; '
                                     'cancelling them', self.socket_path, self._active, grace)
            tasks: list[asyncio.Future[Any]] = []
            for connection in list(self._connections):
                tasks.extend(connection.cancel_calls())
                connection.close()
            if tasks:
                await asyncio.wait(tasks, timeout=min(1.0, max(0.0, closed_by - self._loop.time())))
            # A connection closes once what was written to it is in its socket: the answers of the
            # calls that ended last may not be yet (a few MiB inline: the socket takes ~200 KiB at a
            # time). Dropping them at the next turn, as the stop did, lost a 2-8 MiB answer finished
            # in the grace every time (the client saw its connection closed). They go out first;
            # only a client that does not read them by the deadline loses them.
            if self._connections:
                self._gone = self._loop.create_future()
                with contextlib.suppress(TimeoutError):
                    await within(self._gone, closed_by - self._loop.time())
            if unread := [connection for connection in self._connections if connection.transport is not None]:
                _logger.warning('ttrpc server on %s: %d client(s) had not read their answers %g s after '
                                'the grace; closed without them', self.socket_path, len(unread), CLOSE_TIME)
            for connection in unread:
                # Still writing to a client that does not read: drop what is left.
                assert connection.transport is not None
                connection.transport.abort()
        finally:
            self._deadlines.close()
            self._shutdown_executor()
            self._state = _State.STOPPED
            flush_held()  # (the counts of records held back from its log, before it ends)
        _logger.debug('ttrpc server on %s stopped%s', self.socket_path,
                     '' if removed else ' (socket file was not ours any more)')

    def _shutdown_executor(self) -> None:
        if self._executor is not None and self._given_executor is None:
            # def handlers cannot be interrupted; do not wait for them.
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._given_executor
