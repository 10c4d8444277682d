"""``vyra.ipc.Introspection``: what a running server says about itself
(served by every :class:`~vyra_base_ipc.IPCServer` on both lanes, like health)."""

from __future__ import annotations

import asyncio
from importlib import metadata
import os
from pathlib import Path
import time
from typing import TYPE_CHECKING, Any

import grpc

from . import introspection_pb2_grpc
from ._grpc_sockets import count_connections
from .introspection_pb2 import ServerInfo, ServerInfoRequest, Stats, StatsRequest

if TYPE_CHECKING:
    from .server import IPCServer

__all__ = ['SERVICE_NAME', 'IntrospectionServicer', 'unix_connections']

SERVICE_NAME = 'vyra.ipc.Introspection'

# /proc/net/unix: the socket state of an accepted (connected) socket.
_SS_CONNECTED = b'03'


class IntrospectionServicer(introspection_pb2_grpc.IntrospectionServicer):
    """Answers from the live state of ``server``."""

    def __init__(self, server: 'IPCServer') -> None:
        self._server = server
        # The start time whether metrics are on or off (see started()).
        self._start_time = time.time()

    def started(self) -> None:
        """Take now as the server's start time (and its metrics' uptime's start)."""
        metrics = self._server.metrics
        if metrics is not None:
            metrics.started()
        self._start_time = metrics.start_time if metrics is not None else time.time()

    async def GetServerInfo(self, request: ServerInfoRequest, context: Any) -> ServerInfo:
        server = self._server
        return ServerInfo(
            module_name=server.module_name or '', socket_path=str(server.socket_path),
            ttrpc_socket_path=str(server.ttrpc_socket_path or ''), pid=os.getpid(), uid=os.geteuid(),
            services=server.service_names, version=package_version(), start_time=self._start_time)

    async def GetStats(self, request: StatsRequest, context: grpc.aio.ServicerContext[Any, Any]) -> Stats:
        # The gRPC lane's connections are counted in a thread: reading the
        # machine's socket table must not hold up the loop's other calls.
        grpc_connections = await asyncio.to_thread(self._server.count_grpc_connections)
        stats = self._server.stats(grpc_connections)
        if stats is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f'metrics are off on the server of {self._server.socket_path} '
                                '(IPCServer(metrics=False))')
        return stats


def unix_connections(bound_path: Path) -> int:
    """Connections open to the Unix socket bound at ``bound_path``, counted
    in ``/proc/net/unix`` (accepted sockets carry their listener's path);
    where that cannot be read (no ``/proc``), among this process's
    descriptors (:func:`~vyra_base_ipc._grpc_sockets.count_connections`).

    The table lists every Unix socket of the network namespace (on a busy
    machine tens of thousands; 8,000 lines take the kernel 7 ms to write):
    call it off the event loop. Only the lines ending in the path are split
    (a loop over every line took 15 ms for 20,000, a search 0.7 ms).
    """
    try:
        with open('/proc/net/unix', 'rb') as table:
            data = table.read()
    except OSError:
        return count_connections(bound_path)
    ending = b' ' + os.fsencode(bound_path) + b'\n'
    count = 0
    found = data.find(ending)
    while found >= 0:
        fields = data[data.rfind(b'\n', 0, found) + 1:found].split()
        if len(fields) == 7 and fields[5] == _SS_CONNECTED:
            count += 1
        found = data.find(ending, found + 1)
    return count


def package_version() -> str:
    """This package's version as installed (``''`` when it is imported from a tree not installed)."""
    try:
        return metadata.version('vyra_base_ipc')
    except metadata.PackageNotFoundError:
        return ''
