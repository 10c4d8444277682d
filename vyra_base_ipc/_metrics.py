"""What a server counts about its calls: per method and lane, calls, errors
by status, calls in flight and a latency histogram; per lane, message bytes
inline and through shared memory.

Counting is on the hot path of every call, so it is a handful of integer
updates and one ``bisect`` per call, with no lock: both lanes count on the
server's event loop only (the gRPC lane's ``def`` handlers too: they are run
from ``async def`` wrappers, and their messages are sent from the loop).
A snapshot, taken from any thread, copies in one step each what the loop
may change meanwhile. It is the ``vyra.ipc.Stats`` message of
``introspection.proto``.
"""

from __future__ import annotations

from bisect import bisect_left
import time
from typing import Iterable, Mapping

import grpc

from .introspection_pb2 import LaneStats, MethodStats, Stats

__all__ = ['LATENCY_BOUNDS', 'UNKNOWN_METHOD', 'LaneMetrics', 'MethodMetrics', 'ServerMetrics', 'quantile']

#: Upper bounds (seconds) of the latency buckets: 10 µs to ~21 s, doubling.
LATENCY_BOUNDS: tuple[float, ...] = tuple(10e-6 * 2 ** i for i in range(22))

_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]

#: What calls of methods the server does not have are counted as, per lane
#: (a peer probing, or built against another version of the protos).
UNKNOWN_METHOD = '(unknown method)'


class MethodMetrics:
    """The counters of one method on one lane."""

    __slots__ = ('method', 'lane', 'calls', 'in_flight', 'errors', 'counts', 'max')

    def __init__(self, method: str, lane: str) -> None:
        self.method = method
        self.lane = lane
        self.calls = 0
        self.in_flight = 0
        #: {status code number: calls that ended with it}, OK not counted.
        self.errors: dict[int, int] = {}
        self.counts = [0] * (len(LATENCY_BOUNDS) + 1)
        self.max = 0.0

    def started(self) -> float:
        """Count a call as in flight; returns its start time for :meth:`ended`."""
        self.in_flight += 1
        return time.perf_counter()

    def ended(self, started: float, code: int) -> None:
        """Count a call that started at ``started`` as ended with status ``code``."""
        elapsed = time.perf_counter() - started
        self.in_flight -= 1
        self.calls += 1
        self.counts[bisect_left(LATENCY_BOUNDS, elapsed)] += 1
        if elapsed > self.max:
            self.max = elapsed
        if code:
            self.errors[code] = self.errors.get(code, 0) + 1

    def answered_at_once(self, code: int) -> None:
        """Count a call answered ``code`` as it came, without a handler."""
        self.ended(self.started(), code)

    def snapshot(self) -> MethodStats:
        """The counters as a ``vyra.ipc.MethodStats`` message; from any thread."""
        # Copied first, in one step each (no bytecode runs while the
        # interpreter copies a list or dict of ints): another thread may add
        # a status to ``errors`` meanwhile, and iterating it then would fail.
        counts = list(self.counts)
        errors = dict(self.errors)
        return MethodStats(
            method=self.method, lane=self.lane, calls=self.calls, in_flight=max(self.in_flight, 0),
            errors={_STATUS_NAMES.get(code, str(code)): count for code, count in errors.items()},
            latency_counts=counts, latency_p50_seconds=quantile(counts, 0.5, self.max),
            latency_p99_seconds=quantile(counts, 0.99, self.max), latency_max_seconds=self.max)


class LaneMetrics:
    """Message bytes one lane carried, inline and as shared memory, and the
    calls it refused at the server's limits."""

    __slots__ = ('lane', 'inline_received', 'inline_sent', 'shared_received', 'shared_sent', 'refused')

    def __init__(self, lane: str) -> None:
        self.lane = lane
        self.inline_received = 0
        self.inline_sent = 0
        self.shared_received = 0
        self.shared_sent = 0
        #: Calls refused before a handler at the server's limits.
        self.refused = 0

    def snapshot(self, connections: int) -> LaneStats:
        """The counters as a ``vyra.ipc.LaneStats`` message."""
        return LaneStats(lane=self.lane, connections=connections,
                         inline_bytes_received=self.inline_received, inline_bytes_sent=self.inline_sent,
                         shared_memory_bytes_received=self.shared_received,
                         shared_memory_bytes_sent=self.shared_sent, calls_refused=self.refused)


class ServerMetrics:
    """Every counter of one server, readable while it serves
    (``IPCServer.metrics``; over the socket: ``vyra.ipc.Introspection``)."""

    def __init__(self, lanes: Iterable[str]) -> None:
        #: When the server started serving (``time.time()``); when it was made, until then.
        self.start_time = time.time()
        self._started = time.monotonic()
        self.lanes = {lane: LaneMetrics(lane) for lane in lanes}
        self._methods: dict[tuple[str, str], MethodMetrics] = {}

    def started(self) -> None:
        """Count the uptime and the start time from now: the server serves."""
        self.start_time = time.time()
        self._started = time.monotonic()

    def method(self, method: str, lane: str) -> MethodMetrics:
        """The counters of ``method`` on ``lane``, made on first use (servers
        make them when they register handlers, so calls only look them up)."""
        metrics = self._methods.get((method, lane))
        if metrics is None:
            metrics = self._methods[(method, lane)] = MethodMetrics(method, lane)
        return metrics

    def unknown_method(self, lane: str) -> None:
        """Count a call of a method the server does not have (answered
        UNIMPLEMENTED) under :data:`UNKNOWN_METHOD`. On the event loop only."""
        self.method(UNKNOWN_METHOD, lane).answered_at_once(grpc.StatusCode.UNIMPLEMENTED.value[0])

    def refused(self, method: str | None, lane: str) -> None:
        """Count a call ``lane`` refused at one of the server's limits
        (``maximum_concurrent_rpcs``, the fast lane's ``max_concurrent_streams``)
        before a handler ran: in the lane's ``calls_refused`` and, for a
        method of the server's own services (``method``: its path, ``None``
        if unread), as a call of it that ended RESOURCE_EXHAUSTED. Other
        paths make no counters: a peer names them. On the event loop only."""
        self.lanes[lane].refused += 1
        metrics = self._methods.get((method, lane)) if method is not None else None
        if metrics is not None:
            metrics.answered_at_once(_RESOURCE_EXHAUSTED)

    def snapshot(self, connections: Mapping[str, int]) -> Stats:
        """All counters as a ``vyra.ipc.Stats`` message, from any thread
        (``/diagnostics`` reads it from the ROS executor's); methods never
        called are left out.

        :param connections: open connections per lane.
        """
        return Stats(
            uptime_seconds=time.monotonic() - self._started,
            lanes=[lane.snapshot(connections.get(name, 0)) for name, lane in self.lanes.items()],
            # (list(): copied in one step, as the loop may add a method meanwhile)
            methods=[metrics.snapshot() for metrics in list(self._methods.values())
                     if metrics.calls or metrics.in_flight],
            latency_bounds_seconds=LATENCY_BOUNDS)


def quantile(counts: list[int], q: float, maximum: float | None = None) -> float:
    """The ``q`` quantile estimated from bucket counts (see
    :data:`LATENCY_BOUNDS`): the upper bound of the bucket it falls in, never
    above ``maximum``, the largest value seen, where known; 0 without counts."""
    total = sum(counts)
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if total and seen >= q * total:
            if index == len(LATENCY_BOUNDS):  # the bucket without bound
                return maximum if maximum is not None else LATENCY_BOUNDS[-1]
            bound = LATENCY_BOUNDS[index]
            return bound if maximum is None else min(bound, maximum)
    return 0.0
