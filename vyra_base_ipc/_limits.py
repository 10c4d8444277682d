"""What a peer may hold of a server: connections, streams, metadata, partial
frames, unread answers, shared buffers.

Every default is far above what a module uses in normal operation and far
below what takes a machine down, so that a greedy or broken peer loses its
own connection (or its new stream) while every other client keeps being
served. The gRPC lane gets the same numbers as grpc core options; the fast
lane enforces them itself.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
import resource

from ._options import MAX_SECONDS
from ._segment_pool import segment_pool

__all__ = ['CONCURRENT_RPC_LIMIT_EXCEEDED', 'ServerLimits', 'raise_descriptor_limit']

#: What a call beyond ``maximum_concurrent_rpcs`` is answered with on both
#: lanes (RESOURCE_EXHAUSTED), in grpc.aio's words.
CONCURRENT_RPC_LIMIT_EXCEEDED = 'Concurrent RPC limit exceeded!'

#: What the headers gRPC sends with every call take as grpc core counts them
#: (``:path``, ``:authority``, ``content-type``, ``te``, ``grpc-timeout``,
#: ``user-agent``...: about 600 bytes), on top of a call's own metadata.
_GRPC_OWN_HEADERS = 1024

_MIB = 1024 * 1024

#: Descriptors a server process uses besides its peers' connections and held
#: buffers: its listening sockets, epoll, eventfds, pooled segments, logs.
_OWN_DESCRIPTORS = 256


@dataclass(frozen=True)
class ServerLimits:
    """Per-server bounds on what peers may hold (``IPCServer(limits=...)``).

    :param max_connections: connections per lane. Beyond it a new connection
        is closed at once; the server keeps serving the others and accepts
        again as they go (gRPC: ``grpc.max_allowed_incoming_connections``).
    :param max_concurrent_streams: calls in flight on one connection. Beyond
        it a new call is answered RESOURCE_EXHAUSTED on the fast lane; gRPC
        advertises it as HTTP/2 ``MAX_CONCURRENT_STREAMS``.
    :param max_metadata_bytes: bytes of a call's metadata, counted as gRPC
        counts them (keys, values and 32 bytes an entry), gRPC's own
        default; more is RESOURCE_EXHAUSTED.
    :param frame_timeout: seconds a fast-lane frame that has started may
        take to arrive whole, and a gRPC-lane connection its HTTP/2 preface
        and settings; a peer that stalls inside a frame or the handshake
        (slowloris) loses its connection.
    :param max_partial_bytes: bytes of unfinished frames of all fast-lane
        connections together; the connection that would exceed it is closed.
    :param max_call_duration: seconds a call that came without a deadline
        may run, unless it streams responses (a watch: it lives as long as
        the client stays); it then ends DEADLINE_EXCEEDED. This package's
        clients always send a deadline but for such streams. A ``def``
        handler is told (``is_active()`` turns False), as when a client's
        deadline passes: its thread cannot be interrupted.
    :param max_queued_bytes: bytes of answers waiting for one fast-lane peer
        that does not read them; beyond it that connection is closed. Never
        less than two messages of the server's ``max_message_bytes``.
    :param max_held_buffers: explicit shared buffers (``SharedBuffer``) of
        requests that the calls in flight hold, over all fast-lane
        connections, one connection at most a quarter of them: each holds a
        descriptor and a mapping until its call ends. A request that would
        hold more is RESOURCE_EXHAUSTED. A connection's streamed requests in
        shared memory that wait for their handler count in its quarter too
        (a stream past it fails).
    """

    max_connections: int = 1024
    max_concurrent_streams: int = 1024
    max_metadata_bytes: int = 8 * 1024
    frame_timeout: float = 10.0
    max_partial_bytes: int = 256 * _MIB
    max_call_duration: float = 3600.0
    max_queued_bytes: int = 64 * _MIB
    max_held_buffers: int = 8192

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in ('frame_timeout', 'max_call_duration'):
                if isinstance(value, bool) or not isinstance(value, (int, float)) \
                        or not 0 < value <= MAX_SECONDS:
                    raise ValueError(f'ServerLimits.{field.name} must be a finite number of seconds > 0 '
                                     f'and at most {MAX_SECONDS:g}, not {value!r}')
            elif isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
                raise ValueError(f'ServerLimits.{field.name} must be an int between 1 and {2**31 - 1}, '
                                 f'not {value!r}')

    def grpc_options(self) -> tuple[tuple[str, int], ...]:
        """The same bounds as grpc core server options."""
        return (('grpc.max_allowed_incoming_connections', self.max_connections),
                ('grpc.max_concurrent_streams', self.max_concurrent_streams),
                # grpc core's max_metadata_size alone is a soft limit (a random
                # share of calls up to twice it get through): the absolute one
                # too. Both leave room for the headers gRPC sends itself, which
                # it counts and the fast lane does not have.
                ('grpc.max_metadata_size', self.max_metadata_bytes + _GRPC_OWN_HEADERS),
                ('grpc.absolute_max_metadata_size', self.max_metadata_bytes + _GRPC_OWN_HEADERS),
                # A connection's first frames: HTTP/2's preface and settings
                # (grpc's own default waits 120 s), in a C int of milliseconds.
                ('grpc.server_handshake_timeout_ms',
                 min(max(1, round(self.frame_timeout * 1000)), 2**31 - 1)))

    def descriptors_needed(self, lanes: int) -> int:
        """Descriptors a server on ``lanes`` lanes may come to hold under these
        limits: every connection, every held buffer, the segments of the
        process's shared-memory pool (two each, at its bound), and its own."""
        return (lanes * self.max_connections + self.max_held_buffers + 2 * segment_pool().max_segments
                + _OWN_DESCRIPTORS)

    def descriptor_shortfall(self, lanes: int) -> str | None:
        """Why this process's open-file limit (``RLIMIT_NOFILE``, soft) is too
        low for a server on ``lanes`` lanes under these limits; ``None`` when
        it is not. Past the limit, ``accept()`` fails (EMFILE) and fast-lane
        peers' shared memory cannot arrive."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        needed = self.descriptors_needed(lanes)
        if soft == resource.RLIM_INFINITY or soft >= needed:
            return None
        remedy = 'raise it (ulimit -n, LimitNOFILE=, docker run --ulimit nofile=)' if \
            hard != resource.RLIM_INFINITY and hard < needed else \
            f'raise the soft limit (ulimit -n {needed}; the hard limit allows {_count(hard)})'
        return (f'this process may open {soft} files (RLIMIT_NOFILE), but peers may make the server '
                f'hold {needed}: {lanes} x {self.max_connections} connections (max_connections per lane), '
                f'{self.max_held_buffers} shared buffers (max_held_buffers) and 2 x '
                f'{segment_pool().max_segments} for pooled shared memory beside its own; '
                f'{remedy} or lower those ServerLimits')


def raise_descriptor_limit(needed: int) -> int:
    """Raise this process's soft open-file limit to ``needed``, at most its
    hard limit, if it is lower (as Go's runtime and systemd advise for a
    server that does not use ``select()``); returns the soft limit now.

    For a process of its own (the ``ipc_server`` node); a library leaves a
    process's limits to its owner.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return max(soft, target)


def _count(limit: int) -> str:
    return 'any number' if limit == resource.RLIM_INFINITY else str(limit)
