"""The IPC server's status on ``/diagnostics``, as ROS 2 tools show it
(``rqt_robot_monitor``, ``ros2 topic echo /diagnostics``).

One ``diagnostic_msgs/DiagnosticStatus`` per server, named like
diagnostic_updater's (``<node>: IPC server``), published every
``diagnostics_period`` seconds from the node's executor:

- ERROR while the server is not serving (not started, stopping, stopped,
  or its event loop ended under it: message ``event loop ended: ...``);
  published at once when the host begins to stop it (message ``stopping:
  ...``, while calls in flight get the grace period and nothing is
  published by a node whose executor stopped), and once more when it
  stopped. ERROR too while its event loop has not come round for more than
  :data:`LOOP_STALL_ERROR` seconds (message ``event loop not responding
  for ...``): something holds it (a blocking call in an ``async def``
  handler), and no call on either lane is answered meanwhile.
- WARN when, in the last period, more than :data:`ERROR_RATE_WARN` of the
  calls ended with a server error (:data:`SERVER_ERRORS`), or calls were
  refused at the server's limits (``maximum_concurrent_rpcs``, the fast
  lane's ``max_concurrent_streams``: the server sheds load), or every
  handler thread was busy, or a lane held more than :data:`CONNECTIONS_WARN`
  of its ``max_connections``.
- OK otherwise.

Its values say which lanes serve where, the connections per lane, calls per
second, errors per second (every status but OK), calls refused per second
and the p50/p99 latency of the last period, the calls in flight, and how
long the event loop took to run a callback handed to it from the publishing
thread (``event loop delay ms``, the last one answered).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import TYPE_CHECKING, Callable

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.duration import Duration
from rclpy.impl.implementation_singleton import rclpy_implementation
from rclpy.node import Node
from rclpy.timer import Timer

from ._metrics import LATENCY_BOUNDS, quantile
from .introspection_pb2 import Stats

if TYPE_CHECKING:
    from .server import IPCServer

__all__ = ['CONNECTIONS_WARN', 'ERROR_RATE_WARN', 'IPCDiagnostics', 'LOOP_STALL_ERROR', 'SERVER_ERRORS']

#: Share of a period's calls that may end with a server error before the status turns WARN.
ERROR_RATE_WARN = 0.1
#: The statuses that are the server's errors, as OpenTelemetry's conventions
#: for gRPC servers count them. The others answer the caller (NOT_FOUND,
#: INVALID_ARGUMENT, PERMISSION_DENIED, ...) or come from it (CANCELLED: a
#: caller that left, a browser leaving a stream): many of them are no sign
#: of trouble in the server.
SERVER_ERRORS = frozenset({'UNKNOWN', 'DEADLINE_EXCEEDED', 'UNIMPLEMENTED', 'INTERNAL', 'UNAVAILABLE',
                           'DATA_LOSS'})
#: Share of ``max_connections`` a lane may hold before the status turns WARN.
CONNECTIONS_WARN = 0.9
#: Seconds the server's event loop may leave a callback handed to it
#: unanswered before the status turns ERROR: no call is answered meanwhile.
#: (It answers within a millisecond even under load; a garbage collection
#: of a large heap takes some tens.)
LOOP_STALL_ERROR = 1.0

_TOPIC = '/diagnostics'
#: Longest the last status waits for the monitors to have it, as the publisher goes.
_LAST_STATUS_WAIT = Duration(seconds=1)
_InvalidHandle = rclpy_implementation.InvalidHandle


class IPCDiagnostics:
    """Publishes the status of the server ``server()`` returns (``None``
    before it exists) on ``/diagnostics`` every ``period`` seconds.

    :param node: the node that publishes (its executor runs the timer).
    :param server: the server now, or ``None``.
    :param hardware_id: the status's ``hardware_id`` (the module name).
    :param failure: what ended the server's event loop, if anything did (the
        server then no longer serves, whatever its own state says).
    :param loop: the server's event loop while it runs, else ``None``: each
        status hands it a callback, and one left unanswered for more than
        :data:`LOOP_STALL_ERROR` seconds makes the status ERROR.
    """

    def __init__(self, node: Node, server: Callable[[], 'IPCServer | None'], period: float,
                 hardware_id: str, failure: Callable[[], BaseException | None] = lambda: None,
                 loop: Callable[[], asyncio.AbstractEventLoop | None] = lambda: None) -> None:
        self._node = node
        self._server = server
        self._failure = failure
        self._loop = loop
        self._probe_lock = threading.Lock()
        #: When the callback handed to the loop and not run yet was handed over.
        self._probe_sent: float | None = None
        #: Seconds the last callback that ran waited for the loop.
        self._loop_delay: float | None = None
        #: The grace period of a stop under way (:meth:`stopping`).
        self._stopping: float | None = None
        self._period = period
        self._hardware_id = hardware_id
        self.name = f'{node.get_name()}: IPC server'
        self._publisher = node.create_publisher(DiagnosticArray, _TOPIC, 10)
        self._last: Stats | None = None
        self._timer: Timer | None = node.create_timer(period, self.publish)

    def publish(self) -> None:
        """Publish the status now."""
        array = DiagnosticArray(status=[self.status()])
        array.header.stamp = self._node.get_clock().now().to_msg()
        self._publisher.publish(array)

    def stopping(self, grace: float | None) -> None:
        """The host begins to stop the server, giving calls in flight
        ``grace`` seconds (``None``: the stop is over): from now on the status
        is ERROR ``stopping: ...``, published at once (the node's executor may
        have stopped already, and with it the timer, for the whole grace
        period), unless ROS shut down or :meth:`close` ran."""
        self._stopping = grace
        if grace is None or self._timer is None:
            return
        try:
            if self._node.context.ok():
                self.publish()
        except _InvalidHandle:  # destroyed with the node or the context meanwhile
            pass

    def close(self) -> None:
        """Publish one last status (ERROR once the server stopped) and stop
        publishing. After ``rclpy.shutdown()`` or the node's destruction,
        when the timer and publisher are gone already, only forgets them."""
        self._stopping = None
        timer, self._timer = self._timer, None
        if timer is None:
            return
        try:
            timer.cancel()
            self._node.destroy_timer(timer)
            if self._node.context.ok():
                self.publish()
                # Destroyed at once, the publisher may drop the last status
                # before the monitors got it (seen in CI at SIGTERM).
                self._publisher.wait_for_all_acked(_LAST_STATUS_WAIT)
            self._node.destroy_publisher(self._publisher)
        except _InvalidHandle:  # destroyed with the node or the context
            pass

    def status(self) -> DiagnosticStatus:
        """The server's status now, compared with the last one published."""
        server = self._server()
        status = DiagnosticStatus(name=self.name, hardware_id=self._hardware_id)
        failure = self._failure()
        stopping = self._stopping
        if server is None or not server.is_serving or failure is not None or stopping is not None:
            status.level = DiagnosticStatus.ERROR
            if failure is not None:
                status.message = f'event loop ended: {failure!r}'
            elif stopping is not None and server is not None:
                status.message = f'stopping: calls in flight get {stopping:g} s, new calls are refused'
            else:
                status.message = 'not serving'
            if server is not None:
                status.values = [KeyValue(key='socket_path', value=str(server.socket_path))]
            return status
        stalled = self._loop_stalled()
        stats = server.stats()
        values = {'socket_path': str(server.socket_path),
                  'ttrpc_socket_path': str(server.ttrpc_socket_path or 'off')}
        warnings = []
        if stats is not None:
            period = _Period.between(self._last, stats)
            self._last = stats
            for lane in stats.lanes:
                values[f'{lane.lane} connections'] = str(lane.connections)
                if lane.connections > CONNECTIONS_WARN * server.limits.max_connections:
                    warnings.append(f'{lane.lane} lane near max_connections')
            values['calls/s'] = period.per_second(period.calls)
            values['errors/s'] = period.per_second(period.errors)
            values['refused/s'] = period.per_second(period.refused)
            values['p50 ms'] = f'{quantile(period.latency_counts, 0.5) * 1e3:.3f}'
            values['p99 ms'] = f'{quantile(period.latency_counts, 0.99) * 1e3:.3f}'
            values['in flight'] = str(sum(method.in_flight for method in stats.methods))
            if period.calls and period.server_errors > ERROR_RATE_WARN * period.calls:
                warnings.append(f'{period.server_errors} of {period.calls} calls failed in the server')
            if period.refused:
                warnings.append(f'{period.refused} calls refused at maximum_concurrent_rpcs or '
                                'max_concurrent_streams')
        busy, threads = server.handler_threads
        values['handler threads busy'] = f'{busy}/{threads}'
        if self._loop_delay is not None:
            values['event loop delay ms'] = f'{self._loop_delay * 1e3:.3f}'
        if threads and busy >= threads:
            warnings.append('every handler thread is busy')
        status.values = [KeyValue(key=key, value=value) for key, value in values.items()]
        if stalled is not None:
            status.level = DiagnosticStatus.ERROR
            status.message = (f'event loop not responding for {stalled:.1f} s: no call is answered '
                              '(a blocking call in an async def handler?)')
            return status
        status.level = DiagnosticStatus.WARN if warnings else DiagnosticStatus.OK
        status.message = '; '.join(warnings) if warnings else 'serving'
        return status

    def _loop_stalled(self) -> float | None:
        """Seconds the callback handed to the server's loop has waited, if
        more than :data:`LOOP_STALL_ERROR`; else ``None``, after handing it a
        new one if the last one ran."""
        loop = self._loop()
        if loop is None:
            return None
        now = time.monotonic()
        with self._probe_lock:
            sent = self._probe_sent
            if sent is not None:
                waited = now - sent
                return waited if waited > LOOP_STALL_ERROR else None
            self._probe_sent = now
        try:
            loop.call_soon_threadsafe(self._probe_ran, now)
        except RuntimeError:  # the loop closed meanwhile: the server's state says so
            with self._probe_lock:
                self._probe_sent = None
        return None

    def _probe_ran(self, sent: float) -> None:
        """(On the server's loop) The callback handed over at ``sent`` ran."""
        ran = time.monotonic()
        with self._probe_lock:
            if self._probe_sent == sent:
                self._probe_sent = None
                self._loop_delay = ran - sent


@dataclasses.dataclass(frozen=True)
class _Period:
    """What the server's counters say of the time between two :class:`Stats`."""

    seconds: float
    calls: int
    #: Calls that ended with any error.
    errors: int
    #: Calls that ended with a server error (:data:`SERVER_ERRORS`).
    server_errors: int
    #: Calls refused at the server's limits.
    refused: int
    #: Calls per latency bucket (:data:`~._metrics.LATENCY_BOUNDS`).
    latency_counts: list[int]

    @classmethod
    def between(cls, last: Stats | None, stats: Stats) -> _Period:
        """The period from ``last`` (``None``: the server's start) to ``stats``."""
        before = {(method.method, method.lane): method for method in last.methods} if last else {}
        calls = errors = server_errors = 0
        counts = [0] * (len(LATENCY_BOUNDS) + 1)
        for method in stats.methods:
            previous = before.get((method.method, method.lane))
            calls += method.calls - (previous.calls if previous else 0)
            for name, count in method.errors.items():
                count -= previous.errors.get(name, 0) if previous else 0
                errors += count
                if name in SERVER_ERRORS:
                    server_errors += count
            for index, count in enumerate(method.latency_counts):
                counts[index] += count - (previous.latency_counts[index] if previous else 0)
        refused = sum(lane.calls_refused for lane in stats.lanes) - (
            sum(lane.calls_refused for lane in last.lanes) if last else 0)
        seconds = stats.uptime_seconds - (last.uptime_seconds if last else 0.0)
        return cls(seconds, calls, errors, server_errors, refused, counts)

    def per_second(self, count: int) -> str:
        """``count`` over the period, per second, as /diagnostics shows it."""
        return f'{count / self.seconds:.1f}' if self.seconds > 0 else '0'
