"""IPCServer: user servicers on two lanes, gRPC and ttrpc, with health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import signal
import time
from typing import Any, Callable, Iterable, Sequence

import grpc
from grpc_health.v1 import health_pb2

from ._call_duration import bound_call_duration
from ._deadline import within
from ._fork_safety import ensure_usable_after_fork, note_grpc_used
from ._grpc_observe import UnknownMethods, observe_handlers
from ._grpc_sockets import end_connections, read_by_peers
from ._grpc_streams import CallTasks, OpenStreams
from ._handler_threads import HandlerThreads
from ._health import HealthServicer
from ._interceptors import CallObserver, ServerInterceptor, checked_interceptors
from ._introspection import IntrospectionServicer, unix_connections
from ._limits import ServerLimits
from ._log_limit import flush_held
from ._methods import ServiceRegistration, record_servicer
from ._metrics import ServerMetrics
from ._options import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_MAX_MESSAGE_BYTES,
    server_options,
    validate_count,
    validate_grace,
    validate_max_message_bytes,
)
from ._payload import SharedMemoryOptions
from ._request_guard import guard_handlers
from ._segment_pool import segment_pool
from ._served_loops import not_serving, serving
from ._server_log import logged_to_stderr, serving_calls
from ._socket_file import SocketFile, socket_access
from ._tools import grpc_tool_handlers, tool_registrations
from .address import (
    StrPath,
    default_ttrpc_socket_path,
    grpc_target,
    resolve_socket_path,
    validate_socket_path,
)
from .introspection_pb2 import Stats
from .module_service import ModuleService
from .ttrpc import TtrpcServer
from .ttrpc._server import CLOSE_TIME

__all__ = ['IPCServer']

_logger = logging.getLogger(__name__)

#: How long, at most (and at most the grace), a stop waits for the gRPC lane's
#: clients to read the ends of the streams it ended before grpc.aio's stop()
#: (see _shutdown).
_DELIVER_TIME = 1.0


class _State(enum.Enum):
    NEW = 'new'
    STARTING = 'starting'
    SERVING = 'serving'
    STOPPING = 'stopping'
    STOPPED = 'stopped'


class IPCServer:
    """Serves gRPC servicers on Unix domain sockets inside one module, on two lanes.

    - The **gRPC lane** (HTTP/2) on ``socket_path``, for every gRPC tool and
      language. Always serves ``grpc.health.v1.Health`` (SERVING for ``""``
      and every registered service while up, NOT_SERVING from the moment
      shutdown begins) and server reflection, so ``grpcurl``,
      ``grpc_health_probe`` and friends work against the socket.
    - The **fast lane** (containerd's ttrpc framing, see
      :mod:`vyra_base_ipc.ttrpc`) on ``ttrpc_socket_path``, serving the very
      same servicer objects (health included), for this package's clients.
      Same socket rules, same limits, same thread pool.

    Handlers may be ``def`` (run in a thread pool of ``max_workers`` threads)
    or ``async def`` (run on the server's event loop), mixed freely.

    All coroutine methods must be awaited on one event loop, the one
    :meth:`start` ran on. Usable as ``async with IPCServer(...) as server:``.

    :param socket_path: where to listen; resolved as described in
        :mod:`vyra_base_ipc.address` when omitted.
    :param module_name: module whose default socket path to use.
    :param servicers: servicer objects, or ``(servicer, add_function)`` pairs
        for servicers that do not derive from a generated ``*Servicer`` class.
    :param max_message_bytes: largest message sent or accepted (both ways).
    :param max_workers: threads for ``def`` handlers.
    :param maximum_concurrent_rpcs: calls above this many in flight (per
        lane) are rejected at once with RESOURCE_EXHAUSTED, and counted in
        :attr:`metrics`; ``None`` for no limit.
    :param grace_period: default grace of :meth:`stop`, in seconds.
    :param ttrpc: whether to serve the fast lane too.
    :param ttrpc_socket_path: the fast lane's socket; by default beside
        ``socket_path`` with the suffix ``.ttrpc.sock``
        (``/tmp/demo_ipc.sock`` -> ``/tmp/demo_ipc.ttrpc.sock``).
    :param shared_memory: on the fast lane, messages above its threshold
        travel to and from this package's clients as sealed shared memory
        (see :mod:`vyra_base_ipc._payload`); ``None`` keeps them all inline.
    :param socket_group: group (name or id) that may connect too: the socket
        file gets this group and mode 0660, directories created for it 0750.
        Without it only this user (and root) may connect: 0600 and 0700.
    :param socket_mode: permission bits of the socket file, overriding the above.
    :param directory_mode: permission bits of parent directories created for
        it, overriding the above. Existing directories are not changed.
    :param limits: what peers may hold: connections per lane, calls per
        connection, metadata, unfinished frames, unread answers (see
        :class:`~vyra_base_ipc.ServerLimits` for the defaults).
    :param interceptors: :class:`~vyra_base_ipc.ServerInterceptor` objects
        that see every call of the registered services on both lanes, in
        this order (health, reflection and introspection are not
        intercepted).
    :param metrics: count calls, errors, latency and bytes per method and
        lane (:attr:`metrics`, :meth:`stats`, and ``vyra.ipc.Introspection``
        over the socket).
    :raises TypeError, ValueError: an argument of the wrong type or out of
        range; the message names it.
    """

    def __init__(
        self,
        socket_path: StrPath | None = None,
        *,
        module_name: str | None = None,
        servicers: Iterable[Any] = (),
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_workers: int | None = None,
        maximum_concurrent_rpcs: int | None = None,
        grace_period: float = DEFAULT_GRACE_PERIOD,
        ttrpc: bool = True,
        ttrpc_socket_path: StrPath | None = None,
        shared_memory: SharedMemoryOptions | None = SharedMemoryOptions(),
        socket_group: str | int | None = None,
        socket_mode: int | None = None,
        directory_mode: int | None = None,
        limits: ServerLimits = ServerLimits(),
        interceptors: Sequence[ServerInterceptor] = (),
        metrics: bool = True,
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path, module_name=module_name)
        #: The module name given, if any.
        self.module_name = module_name
        interceptors = checked_interceptors(interceptors, ServerInterceptor)
        if not isinstance(limits, ServerLimits):
            raise TypeError(f'limits must be a ServerLimits, not {type(limits).__name__}')
        self.limits = limits
        self.max_message_bytes = validate_max_message_bytes(max_message_bytes)
        self.grace_period = validate_grace(grace_period)
        self._max_workers = None if max_workers is None else validate_count(
            max_workers, 'max_workers', 'an int or None')
        self._maximum_concurrent_rpcs = None if maximum_concurrent_rpcs is None else validate_count(
            maximum_concurrent_rpcs, 'maximum_concurrent_rpcs', 'an int or None')
        for flag, name in ((ttrpc, 'ttrpc'), (metrics, 'metrics')):
            if not isinstance(flag, bool):  # ('no' would switch it on)
                raise TypeError(f'{name} must be True or False, not {type(flag).__name__}')
        self.ttrpc_socket_path = None if not ttrpc else (
            default_ttrpc_socket_path(self.socket_path) if ttrpc_socket_path is None
            else validate_socket_path(ttrpc_socket_path))
        if self.ttrpc_socket_path == self.socket_path:
            raise ValueError(f'ttrpc_socket_path must differ from socket_path ({self.socket_path})')
        if shared_memory is not None and not isinstance(shared_memory, SharedMemoryOptions):
            raise TypeError(f'shared_memory must be a SharedMemoryOptions or None, '
                            f'not {type(shared_memory).__name__}')
        self.shared_memory = shared_memory
        group, self._socket_options = socket_access(socket_mode, directory_mode, socket_group)
        self._socket_group = group
        self._socket = SocketFile(self.socket_path, group=group, **self._socket_options)
        #: Counters of calls, errors, latency and bytes; ``None`` with ``metrics=False``.
        self.metrics = ServerMetrics(('grpc', 'ttrpc') if self.ttrpc_socket_path else ('grpc',)) \
            if metrics else None
        self._observer = CallObserver(self.metrics, interceptors) if metrics or interceptors else None
        self._bound_path: Any = None
        self._introspection = IntrospectionServicer(self)
        # Whether start and stop are logged here; a host that logs them
        # itself (IPCServerHost, through its node) turns this off.
        self._announce = True
        self._ttrpc: TtrpcServer | None = None
        self._open_streams = OpenStreams()
        refused = None if self.metrics is None else functools.partial(self.metrics.refused, lane='grpc')
        self._call_tasks = CallTasks(self._maximum_concurrent_rpcs, refused, limits.max_call_duration)
        self._services: list[ServiceRegistration] = []
        self._state = _State.NEW
        self._server: grpc.aio.Server | None = None
        self._executor: HandlerThreads | None = None
        self._health: HealthServicer | None = None
        self._stop_task: asyncio.Task[None] | None = None
        # A lane's stop() still waiting for a peer that does not read (kept: not collected while pending).
        self._left_stopping: set[asyncio.Task[None]] = set()
        self._terminated: asyncio.Event | None = None
        #: The event loop start() ran on: the only one this server works on.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = asyncio.Event()  # (made anew by start(), on its loop)
        try:
            servicers = list(servicers)
        except TypeError:  # one given alone, or None: "'X' object is not iterable" said less
            raise TypeError(f'servicers must be a list of servicers, not {type(servicers).__name__}'
                            ' (one servicer too: servicers=[...])') from None
        for servicer in servicers:
            if isinstance(servicer, tuple):
                self.add_servicer(*servicer)
            else:
                self.add_servicer(servicer)

    # -- registration ---------------------------------------------------------------

    def add_servicer(self, servicer: Any,
                     add_to_server: Callable[[Any, Any], None] | None = None) -> None:
        """Register a servicer before :meth:`start`.

        :param add_to_server: the generated ``add_*Servicer_to_server``;
            found from the servicer's generated base class when omitted.
        :raises TypeError: if the servicer's services cannot be determined.
        :raises ValueError: if a service of that name is already registered.
        :raises RuntimeError: after :meth:`start`.
        """
        if self._state is not _State.NEW:
            raise RuntimeError('add_servicer() must be called before start()')
        registrations = record_servicer(servicer, add_to_server)
        known = set(self.service_names)
        for registration in registrations:
            if registration.name in known:
                raise ValueError(f'service {registration.name} is already registered')
        self._services.extend(registrations)

    @property
    def service_names(self) -> tuple[str, ...]:
        """Full names of the registered user services, e.g. ``vyra.ipc.ModuleService``."""
        return tuple(registration.name for registration in self._services)

    @property
    def services(self) -> tuple[ServiceRegistration, ...]:
        """The registered user services with their method handlers."""
        return tuple(self._services)

    @property
    def is_serving(self) -> bool:
        """Whether the server is up: started and not stopping."""
        return self._state is _State.SERVING

    @property
    def handler_threads(self) -> tuple[int, int]:
        """Threads for ``def`` handlers: how many run one now, and how many there may be."""
        executor = self._executor
        if executor is None:
            return 0, 0
        return executor.busy, executor.max_workers

    def count_grpc_connections(self) -> int:
        """Connections open on the gRPC lane now (read from ``/proc/net/unix``,
        which lists every Unix socket of the machine: milliseconds on a busy
        one, so not on the event loop)."""
        return unix_connections(self._bound_path) if self._bound_path else 0

    def stats(self, grpc_connections: int | None = None) -> Stats | None:
        """The :attr:`metrics` now, with the connections open per lane, as the
        ``vyra.ipc.Stats`` message ``vyra.ipc.Introspection/GetStats`` answers;
        ``None`` with ``metrics=False``.

        :param grpc_connections: the count of :meth:`count_grpc_connections`
            if the caller made it (off the loop); else it is made here.
        """
        if self.metrics is None:
            return None
        if grpc_connections is None:
            grpc_connections = self.count_grpc_connections()
        connections = {'grpc': grpc_connections}
        if self._ttrpc is not None:
            connections['ttrpc'] = self._ttrpc.connection_count
        stats = self.metrics.snapshot(connections)
        pool = segment_pool().snapshot()
        stats.segment_pool.SetInParent()
        for name in ('bytes', 'free_bytes', 'created', 'reused', 'dropped', 'exhausted'):
            setattr(stats.segment_pool, name, pool[name])
        stats.segment_pool.written_bytes = pool['written']
        return stats

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket and start serving.

        :raises SocketInUseError: a live server listens on the path already.
        :raises OSError: the path cannot be used (a directory or other file is
            there, the directory is not writable); the message names the path.
        :raises RuntimeError: if called twice.
        :raises ForkedProcessError: in a forked child of a process that used gRPC.
        """
        ensure_usable_after_fork()
        if self._state is not _State.NEW:
            raise RuntimeError(f'start() called on a server that is {self._state.value}')
        self._state = _State.STARTING
        self._loop = asyncio.get_running_loop()
        self._terminated = asyncio.Event()
        self._started = asyncio.Event()
        grpc_started: asyncio.Future[None] | None = None
        try:
            self._socket.check()
            note_grpc_used()
            self._executor = HandlerThreads(self._max_workers)
            for registration in self._services:
                if isinstance(registration.servicer, ModuleService):  # its def commands, here too
                    registration.servicer.use_handler_threads(self._executor)
            self._server = grpc.aio.server(
                migration_thread_pool=self._executor,
                options=(*server_options(self.max_message_bytes), *self.limits.grpc_options()),
                interceptors=(self._call_tasks,),  # (which keeps maximum_concurrent_rpcs, counted)
            )
            serving_calls(self._call_tasks, True)  # (grpc's records of their failed sends: limited)
            self._add_services(self._server)
            self._bound_path = self._socket.private_bind_path()
            bound = self._server.add_insecure_port(grpc_target(self._bound_path))
            if bound == 0:  # older grpcio reported failure this way
                raise OSError(f'gRPC could not bind a socket for {self.socket_path}')
            # Shielded: grpc cannot stop a server cancelled inside its start()
            # (InvalidStateError); a cancelled start() lets it finish, then stops it.
            grpc_started = asyncio.ensure_future(self._server.start())
            await asyncio.shield(grpc_started)
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            if self.ttrpc_socket_path is not None:
                # Health too, so that a client on either lane sees NOT_SERVING first.
                assert self._health is not None
                tools = tool_registrations(self._health, self._introspection)
                self._ttrpc = TtrpcServer(
                    self.ttrpc_socket_path, [*self._services, *tools],
                    observer=self._observer, observed_services=self.service_names,
                    max_message_bytes=self.max_message_bytes,
                    grace_period=self.grace_period, socket_group=self._socket_group,
                    executor=self._executor, maximum_concurrent_rpcs=self._maximum_concurrent_rpcs,
                    shared_memory=self.shared_memory, limits=self.limits, **self._socket_options)
                await self._ttrpc.start()
            # Said before the socket appears, so that whoever sees it can find it said.
            shortfall = self.limits.descriptor_shortfall(2 if self._ttrpc is not None else 1)
            if shortfall is not None:
                _logger.warning('IPC server on %s: %s', self.socket_path, shortfall)
            # The gRPC socket appears last: whoever sees it finds both lanes up.
            self._socket.publish()
        except BaseException:
            # The files go at once; the rest in a task of its own: cancelled
            # again (a second Ctrl-C), start() must not leave it half-done.
            self._withdraw()
            await asyncio.shield(asyncio.ensure_future(self._abort_start(grpc_started)))
            raise
        self._started.set()  # (a stop() waiting goes on once this step is done)
        self._state = _State.SERVING
        serving(self._loop, self.socket_path)
        self._introspection.started()
        if self._announce:
            _logger.info('IPC server serving %s on %s%s', ', '.join(self.service_names) or 'no services',
                         self.socket_path,
                         f' (fast lane: {self.ttrpc_socket_path})' if self.ttrpc_socket_path else '')

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving; idempotent and safe to call concurrently.

        In this order, at once: health turns NOT_SERVING, both socket files
        are removed (if they are still this server's: new clients find no
        server, and a new one may start on the path while this one drains),
        response streams end with UNAVAILABLE "server is shutting down"
        (their ``async def`` handlers cancelled), and new calls on open
        connections are refused with UNAVAILABLE (on the gRPC lane once its
        clients have read those ends: within 1 s and the grace). Other calls in flight get
        ``grace`` seconds (default :attr:`grace_period`), then they are
        cancelled and the connections closed. Returns when all of that is
        done and the cancelled handlers have ended (``def`` ones too: the end
        of the loop or process right after cuts none short, and grpc.aio logs
        no error), or 1 s after the grace at the latest: a connection whose
        peer does not read (a process stopped in a debugger) is not waited
        for, nor a handler that goes on when cancelled (logged as warnings). A server still
        starting is stopped once it started.

        :raises RuntimeError: awaited on another event loop than :meth:`start`'s
            (nothing is changed then).
        :raises TypeError, ValueError: ``grace`` is not a number of seconds
            from 0 to 1e9.
        """
        if grace is not None:
            grace = validate_grace(grace, 'grace')
        if self._loop is not None and asyncio.get_running_loop() is not self._loop:
            raise RuntimeError('stop() awaited on another event loop than the one start() ran on; '
                               'await it there (asyncio.run_coroutine_threadsafe() from another thread), '
                               'or call abandon() if that loop ended')
        if self._state is _State.STARTING:
            await self._started.wait()
        if self._stop_task is None and self._state is not _State.SERVING:
            # Never started, or start() failed and already cleaned up.
            self._state = _State.STOPPED
            if self._terminated is not None:
                self._terminated.set()
            return
        if self._stop_task is None:
            grace = self.grace_period if grace is None else grace
            self._state = _State.STOPPING
            self._stop_task = asyncio.ensure_future(self._shutdown(grace))
        await asyncio.shield(self._stop_task)

    def abandon(self) -> None:
        """Let go of a server whose event loop ended under it (an exception escaped the loop),
        where :meth:`stop` can no longer run: remove both socket files, each only if it is still
        this server's (the inode it bound, never another server's), stop accepting on both lanes
        and end every connection (their clients' calls, in flight or next, fail UNAVAILABLE at
        once), let the handler threads go. Synchronous, for once the loop's thread has ended;
        idempotent. The gRPC lane's sockets are grpc core's (grpc.aio stops its server only by
        coroutines on the dead loop): they are shut down, not closed, and grpc core closes them;
        its listener is left open where grpc core polls with poll() instead of epoll, and without
        ``/proc`` descriptors from 65536 up are not inspected (both logged; see :mod:`._grpc_sockets`).

        :raises RuntimeError: the loop still runs: await :meth:`stop` on it.
        """
        if self._loop is not None and self._loop.is_running():
            raise RuntimeError('abandon() is for a server whose event loop ended; '
                               'its loop still runs: await stop() there')
        if self._ttrpc is not None:
            self._ttrpc.abandon()
        self._stopped(tell=False)  # (its waiters are the dead loop's: nothing could wake them)
        if self._bound_path is not None:  # (after the files: no client finds the path meanwhile)
            ended, self._bound_path = end_connections(self._bound_path), None
            if ended:
                _logger.info('IPC server on %s abandoned: %d gRPC-lane connection(s) ended',
                             self.socket_path, ended)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Wait until the server has stopped.

        :returns: ``True`` once the server has stopped, ``False`` if
            ``timeout`` expired first. (Unlike ``grpc.aio.Server``, whose
            result means "timed out".)
        :raises TypeError, ValueError: ``timeout`` is not a number of seconds from 0 to 1e9.
        :raises RuntimeError: the server was never started.
        """
        if timeout is not None:
            timeout = validate_grace(timeout, 'timeout')  # (0: whether it has stopped now)
        if self._terminated is None:
            raise RuntimeError('wait_for_termination() before start()')
        if self._terminated.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            return await within(self._terminated.wait(), timeout)  # (Event.wait() gives True)
        return False

    async def serve(self, *, stop_signals: Iterable[signal.Signals] = (signal.SIGINT, signal.SIGTERM)
                    ) -> None:
        """Start, serve until one of ``stop_signals`` arrives or :meth:`stop` is
        called, then stop with the grace period. For a process's main coroutine.

        Says so through the ``vyra_base_ipc`` logger: where it serves, the
        signal, and that it stopped. In a process that has not configured
        :mod:`logging`, those lines go to stderr while it serves.
        """
        loop = asyncio.get_running_loop()
        installed = []
        for stop_signal in stop_signals:
            loop.add_signal_handler(stop_signal, self._on_signal, stop_signal)
            installed.append(stop_signal)
        try:
            with logged_to_stderr():
                try:
                    await self.start()
                    await self.wait_for_termination()
                finally:
                    await self.stop()
        finally:
            for stop_signal in installed:
                loop.remove_signal_handler(stop_signal)

    async def __aenter__(self) -> 'IPCServer':
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- internals ------------------------------------------------------------------

    def _on_signal(self, stop_signal: signal.Signals) -> None:
        _logger.info('received %s: stopping IPC server on %s', stop_signal.name, self.socket_path)
        asyncio.ensure_future(self.stop())

    def _add_services(self, server: grpc.aio.Server) -> None:
        assert self._executor is not None
        served: list[tuple[str, dict[str, grpc.RpcMethodHandler]]] = []
        for registration in self._services:
            handlers = self._open_streams.track(bound_call_duration(guard_handlers(
                registration.name, registration.handlers, self._executor), self.limits.max_call_duration))
            # (always: it also ends an answer over max_message_bytes RESOURCE_EXHAUSTED, saying so)
            handlers = observe_handlers(registration.name, handlers, self._observer, self.max_message_bytes)
            served.append((registration.name, handlers))
        self._health = HealthServicer()
        served += grpc_tool_handlers(self._health, self._introspection, self.service_names, self._executor,
                                     self._open_streams, self.max_message_bytes)
        for name, handlers in served:
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
            server.add_registered_method_handlers(name, handlers)
        if self.metrics is not None:  # the last handler: what none of the others has
            server.add_generic_rpc_handlers((UnknownMethods(self.metrics),))

    async def _set_health(self, status: int) -> None:
        assert self._health is not None
        for name in ('', *self.service_names):
            await self._health.set(name, status)

    async def _shutdown(self, grace: float) -> None:
        """The one stop path (see :meth:`stop`)."""
        assert self._server is not None and self._health is not None and self._executor is not None
        removed = False
        loop = asyncio.get_running_loop()
        until = loop.time() + grace + CLOSE_TIME
        try:
            await self._health.enter_graceful_shutdown()
            removed = self._withdraw()
            self._open_streams.end_all()
            if self._observer is not None:
                self._observer.cancels_all_at = time.monotonic() + grace
            stops = [] if self._ttrpc is None else [asyncio.ensure_future(self._ttrpc.stop(grace))]
            # grpc core shuts a connection down once its last call ended after grpc.aio's stop() (the
            # process exits soon after), read by its client or not: a grpc client behind in reading
            # that then writes (a WINDOW_UPDATE as it takes a message) gets EPIPE and drops what it did
            # not read, its streams end UNAVAILABLE "Stream removed (sendmsg: Broken pipe)". So the
            # ended streams' calls end first, and their clients read them, then grpc's stop (GOAWAY).
            delivered = loop.time() + min(grace, _DELIVER_TIME)
            if not await self._open_streams.ended(delivered - loop.time()) and self._bound_path:
                await read_by_peers(self._bound_path, delivered - loop.time())
            left = max(0.0, until - CLOSE_TIME - loop.time())  # (of the grace: the bound stays)
            stops.insert(0, asyncio.ensure_future(self._server.stop(left)))
            done, self._left_stopping = await asyncio.wait(stops, timeout=until - loop.time())
            for stopped in done:
                stopped.result()
            if self._left_stopping:
                _logger.warning('IPC server on %s: a connection did not take the shutdown %g s after '
                                'the grace (its peer does not read); stopped without waiting for it',
                                self.socket_path, CLOSE_TIME)
            # grpc's tasks of cancelled calls (see CallTasks), def handlers told so: done before the exit.
            if stops[0].done() and (left := await self._call_tasks.ended(until - loop.time())):
                _logger.warning('IPC server on %s: %d call(s) went on when cancelled at the stop',
                                self.socket_path, left)
            if left := await self._executor.wait_idle(until - loop.time()):
                _logger.warning('IPC server on %s: %d def handler(s) still ran at the end of the stop',
                                self.socket_path, left)
        finally:
            self._stopped()  # (the files: if an error came first)
            if self._announce:
                _logger.info('IPC server on %s stopped%s', self.socket_path,
                             '' if removed else ' (a socket file stayed: see the warning above)')

    def _withdraw(self) -> bool:
        """Remove both socket files (each if still ours) and the private bind directory, stop
        accepting on the fast lane; whether both files were removed now. Idempotent."""
        removed = self._socket.remove()
        if self._ttrpc is not None:
            removed = self._ttrpc.withdraw() and removed
        return removed

    async def _abort_start(self, grpc_started: asyncio.Future[None] | None) -> None:
        """Undo a start() that failed or was cancelled half-way; sets ``_started`` when done."""
        try:
            if self._ttrpc is not None:
                await self._ttrpc.stop(0)
            if grpc_started is not None:
                await asyncio.wait([grpc_started])  # (its outcome is the server's stop's business)
            if self._server is not None:
                await self._server.stop(None)
        finally:
            self._stopped()
            self._started.set()

    def _stopped(self, tell: bool = True) -> None:
        """The end of every stop path: both socket files withdrawn (each if still ours), the
        handler threads let go (sync handlers cannot be interrupted: not waited for), the state
        STOPPED, the log records held back told (:func:`~._log_limit.flush_held`); with ``tell``,
        :meth:`wait_for_termination` told."""
        self._withdraw()
        if self._executor is not None:
            for registration in self._services:  # (it may serve on another server still)
                if isinstance(registration.servicer, ModuleService):
                    registration.servicer.stop_using_handler_threads(self._executor)
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._loop is not None:
            not_serving(self._loop, self.socket_path)
        self._state = _State.STOPPED
        flush_held()  # (what its log held back, told before it ends: both lanes' records)
        serving_calls(self._call_tasks, False)
        if tell:
            assert self._terminated is not None
            self._terminated.set()

