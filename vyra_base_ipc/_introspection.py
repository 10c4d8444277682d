"""``vyra.ipc.Introspection``: what a running server says about itself
(served by every :class:`~vyra_base_ipc.IPCServer` on both lanes, like health)."""

from __future__ import annotations

from importlib import metadata
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from . import introspection_pb2_grpc
from .introspection_pb2 import ServerInfo, ServerInfoRequest, Stats, StatsRequest

if TYPE_CHECKING:
    from .server import IPCServer

__all__ = ['SERVICE_NAME', 'IntrospectionServicer', 'unix_connections']

SERVICE_NAME = 'vyra.ipc.Introspection'

# /proc/net/unix: the socket state of an accepted (connected) socket.
_SS_CONNECTED = '03'


class IntrospectionServicer(introspection_pb2_grpc.IntrospectionServicer):
    """Answers from the live state of ``server``."""

    def __init__(self, server: 'IPCServer') -> None:
        self._server = server

    async def GetServerInfo(self, request: ServerInfoRequest, context: Any) -> ServerInfo:
        server = self._server
        metrics = server.metrics
        return ServerInfo(
            module_name=server.module_name or '', socket_path=str(server.socket_path),
            ttrpc_socket_path=str(server.ttrpc_socket_path or ''), pid=os.getpid(), uid=os.geteuid(),
            services=server.service_names, version=_version(),
            start_time=metrics.start_time if metrics is not None else 0.0)

    async def GetStats(self, request: StatsRequest, context: grpc.aio.ServicerContext[Any, Any]) -> Stats:
        stats = self._server.stats()
        if stats is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f'metrics are off on the server of {self._server.socket_path} '
                                '(IPCServer(metrics=False))')
        return stats


def unix_connections(bound_path: Path) -> int:
    """Connections open to the Unix socket bound at ``bound_path``, counted
    in ``/proc/net/unix`` (accepted sockets carry their listener's path);
    0 where that file cannot be read."""
    name = os.fsdecode(os.fsencode(bound_path))
    count = 0
    try:
        with open('/proc/net/unix', encoding='utf-8', errors='replace') as table:
            next(table, None)  # the header
            for line in table:
                fields = line.split(None, 7)
                if len(fields) == 8 and fields[5] == _SS_CONNECTED and fields[7].rstrip('\n') == name:
                    count += 1
    except OSError:
        return 0
    return count


def _version() -> str:
    try:
        return metadata.version('vyra_base_ipc')
    except metadata.PackageNotFoundError:
        return ''
