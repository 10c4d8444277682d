"""What one variant of an interleaved section costs: its latencies, the wall
time of its blocks and the CPU time both sides spent in them.

Shared by the sections that interleave variants in rotating rounds
(:func:`bench.overhead.round_order`): busy polling and the peers.
"""

from __future__ import annotations

import time
from typing import Any

from .stats import Sample, summarize

__all__ = ['Tally', 'process_cpu_seconds']


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) the process ``pid`` has used so
    far, in seconds, read from outside the process with nanosecond resolution.

    Linux gives every process a CPU-time clock whose id is derived from its
    pid (``MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)`` in
    ``include/linux/posix-timers.h``: what glibc's ``clock_getcpuclockid``
    returns); ``/proc/PID/stat`` would count in 10 ms ticks.

    :raises OSError: the process does not exist (any more).
    """
    return time.clock_gettime((~pid << 3) | 2)


class Tally:
    """Latencies, wall time and CPU time of both sides, of one variant.

    :param payload_bytes: the payload of every call (for MiB/s).
    """

    def __init__(self, payload_bytes: int) -> None:
        self.payload_bytes = payload_bytes
        self.latencies: list[int] = []
        self.wall_ns = 0
        self.client_cpu = 0.0
        self.server_cpu = 0.0
        self._opened = (0.0, 0.0, 0)
        self._ended: tuple[float, int] | None = None

    def open_block(self, server_cpu: float) -> None:
        """A block of calls begins; ``server_cpu``: the server's CPU time now."""
        self._opened = (server_cpu, time.process_time(), time.perf_counter_ns())
        self._ended = None

    def end_calls(self) -> None:
        """The block's calls are done: its wall time and the client's CPU
        time end here, even if the server's is read later (:meth:`close_block`)."""
        if self._ended is None:
            self._ended = (time.process_time(), time.perf_counter_ns())

    def close_block(self, server_cpu: float) -> None:
        """The block ends; ``server_cpu``: the server's CPU time now."""
        self.end_calls()
        assert self._ended is not None
        (server_before, client_before, began), (client_after, ended) = self._opened, self._ended
        self.wall_ns += ended - began
        self.client_cpu += client_after - client_before
        self.server_cpu += server_cpu - server_before

    def report(self) -> dict[str, Any]:
        """The row: :func:`~bench.stats.summarize` of the latencies, and the
        CPU µs per call of the client (this process) and of the server."""
        calls = len(self.latencies)
        return {**summarize(Sample(self.latencies, self.wall_ns), self.payload_bytes),
                'client_cpu_us_per_call': round(self.client_cpu / calls * 1e6, 1),
                'server_cpu_us_per_call': round(self.server_cpu / calls * 1e6, 1)}
