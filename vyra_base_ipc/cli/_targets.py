"""Which server a command talks to, and which servers there are."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
import errno
import os
from pathlib import Path
import socket
import stat
from typing import Any, Iterable

import grpc

from .._peer import socket_peer
from ..address import default_socket_path, default_ttrpc_socket_path, resolve_socket_path
from ..introspection_pb2 import ServerInfoRequest
from ..introspection_pb2_grpc import IntrospectionStub

__all__ = ['ServerEntry', 'discover', 'resolve_target']

#: Where servers are looked for without arguments: the directory of the
#: default socket paths (``/tmp/<module>_ipc.sock``).
DEFAULT_DIRECTORY = default_socket_path('module').parent
#: Seconds any probe of ``list`` may take: a server that accepts and never
#: answers must not stall the listing.
PROBE_TIMEOUT = 1.0
_TOOL_SERVICES = ('grpc.health.v1.Health', 'grpc.reflection.v1alpha.ServerReflection',
                  'grpc.reflection.v1.ServerReflection', 'vyra.ipc.Introspection')


def resolve_target(target: str) -> Path:
    """The gRPC socket of ``target``: a socket path (anything with a ``/`` or
    ending in ``.sock``), else a module name, resolved as the clients do
    (``VYRA_IPC_SOCKET``, then ``/tmp/<module>_ipc.sock``).

    :raises ValueError: neither a usable path nor a valid module name.
    """
    if '/' in target or target.endswith('.sock'):
        return resolve_socket_path(target)
    return resolve_socket_path(None, module_name=target)


@dataclass
class ServerEntry:
    """One socket file as ``list`` reports it."""

    module: str
    socket_path: str
    ttrpc_socket_path: str | None
    state: str  # serving, not serving, stale, no answer, refused
    uid: int
    pid: int | None = None
    services: list[str] = field(default_factory=list)
    detail: str = ''

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def discover(directories: Iterable[Path]) -> list[ServerEntry]:
    """Every gRPC socket file in ``directories`` (fast-lane sockets are shown
    with theirs), probed; sorted by module name."""
    entries = []
    for directory in directories:
        try:
            names = sorted(os.listdir(directory))
        except OSError as error:
            raise OSError(error.errno, f'cannot list {directory}: {error.strerror}') from None
        for name in names:
            path = Path(directory) / name
            if name.endswith('.ttrpc.sock') or not name.endswith('.sock'):
                continue
            try:
                status = os.lstat(path)
            except OSError:
                continue  # gone meanwhile
            if stat.S_ISSOCK(status.st_mode):
                entries.append(_probe(path, status.st_uid))
    return sorted(entries, key=lambda entry: (entry.module, entry.socket_path))


def _probe(path: Path, uid: int) -> ServerEntry:
    fast = default_ttrpc_socket_path(path)
    module = path.name.removesuffix('.sock').removesuffix('_ipc')
    entry = ServerEntry(module, str(path), str(fast) if fast.exists() else None, 'stale', uid)
    peer = _peer_pid(path)
    if isinstance(peer, str):
        entry.state, entry.detail = peer, ''
        return entry
    entry.pid = peer
    with grpc.insecure_channel(f'unix:{path}') as channel:
        try:
            info = IntrospectionStub(channel).GetServerInfo(ServerInfoRequest(), timeout=PROBE_TIMEOUT)
        except grpc.RpcError as error:
            entry.state, entry.detail = _other_server(channel, entry, error)
            return entry
    entry.state = 'serving'
    entry.module = info.module_name or entry.module
    entry.services = list(info.services)
    return entry


def _peer_pid(path: Path) -> int | str:
    """The pid of the process listening on ``path``, or why there is none."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(str(path))
        except OSError as error:
            if error.errno == errno.ECONNREFUSED:
                return 'stale'  # a socket file nobody listens on
            if error.errno == errno.EACCES:
                return 'refused'  # another user's server
            return f'unreachable ({error.strerror})'
        return socket_peer(probe).pid


def _other_server(channel: grpc.Channel, entry: ServerEntry, error: grpc.RpcError) -> tuple[str, str]:
    """State and detail of a gRPC server without vyra.ipc.Introspection
    (another gRPC server, or an old vyra_base_ipc)."""
    if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
        return 'no answer', f'within {PROBE_TIMEOUT:g} s'
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    try:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs' stub has no methods
        health = stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT)
    except grpc.RpcError as health_error:
        return 'no health', f'{health_error.code().name}: {health_error.details()}'
    state = 'serving' if health.status == health_pb2.HealthCheckResponse.SERVING else 'not serving'
    try:
        from ._messages import Reflection
        entry.services = [name for name in Reflection(channel).services() if name not in _TOOL_SERVICES]
    except grpc.RpcError:
        pass
    return state, 'no vyra.ipc.Introspection'


def user_services(names: Iterable[str]) -> list[str]:
    """``names`` without the services every server has (health, reflection, introspection)."""
    return [name for name in names if name not in _TOOL_SERVICES]
