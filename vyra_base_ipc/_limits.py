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

from ._options import MAX_SECONDS

__all__ = ['ServerLimits']

#: What the headers gRPC sends with every call take as grpc core counts them
#: (``:path``, ``:authority``, ``content-type``, ``te``, ``grpc-timeout``,
#: ``user-agent``...: about 600 bytes), on top of a call's own metadata.
_GRPC_OWN_HEADERS = 1024

_MIB = 1024 * 1024


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
        clients always send a deadline but for such streams. On the gRPC
        lane ``def`` handlers are not bounded (their thread cannot be
        interrupted, as when a client's deadline passes).
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
