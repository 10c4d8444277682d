"""The IPC servers on this machine: socket files in directories, each
probed (who listens, is it healthy, what does it serve) within a short
deadline, all at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
import errno
import os
from pathlib import Path
import socket
import stat
from typing import Any, Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .._peer import socket_peer
from ..address import default_socket_path, default_ttrpc_socket_path
from ..introspection_pb2 import ServerInfoRequest
from ..introspection_pb2_grpc import IntrospectionStub
from ._messages import Reflection
from ._targets import deadline_channel, user_services

__all__ = ['DEFAULT_DIRECTORY', 'PROBE_TIMEOUT', 'ServerEntry', 'discover']

#: Where servers are looked for without arguments: the directory of the
#: default socket paths (``/tmp/<module>_ipc.sock``).
DEFAULT_DIRECTORY = default_socket_path('module').parent
#: Seconds all probes of one socket may take together: a server that
#: accepts and never answers must not stall the listing.
PROBE_TIMEOUT = 1.0
#: Sockets probed at the same time.
_PARALLEL = 16


@dataclass
class ServerEntry:
    """One gRPC socket file as ``list`` reports it."""

    #: The server's module name; else the socket file's name without ``_ipc.sock``.
    module: str
    socket_path: str
    #: The fast lane's socket when its file exists.
    ttrpc_socket_path: str | None
    #: ``serving``, ``not serving`` (grpc.health.v1), ``stale`` (nobody
    #: listens), ``no answer`` (within PROBE_TIMEOUT), ``refused`` (no
    #: permission to connect), ``not vyra`` (no health service), ``not gRPC``
    #: (it answers in another protocol), ``unreachable``.
    state: str
    #: Owner of the socket file.
    uid: int
    #: The listening process (``SO_PEERCRED``).
    pid: int | None = None
    #: The module's own services (not health, reflection, introspection).
    services: list[str] = field(default_factory=list)
    #: Why, for the states that need one.
    detail: str = ''

    def as_json(self) -> dict[str, Any]:
        """The entry as a JSON object."""
        return asdict(self)


def discover(directories: Iterable[Path]) -> list[ServerEntry]:
    """Every gRPC socket file (``*.sock`` but not ``*.ttrpc.sock``) in
    ``directories``, probed; sorted by module name. Takes about
    :data:`PROBE_TIMEOUT` at most, for any number of silent servers up to 16.

    :raises OSError: a directory cannot be listed, naming it.
    """
    found: list[tuple[Path, int]] = []
    for directory in directories:
        try:
            names = sorted(os.listdir(directory))
        except OSError as error:
            raise OSError(error.errno, f'cannot list {directory}: {error.strerror}') from None
        for name in names:
            if name.endswith('.ttrpc.sock') or not name.endswith('.sock'):
                continue
            path = Path(directory).absolute() / name
            try:
                status = os.lstat(path)
            except OSError:
                continue  # gone meanwhile
            if stat.S_ISSOCK(status.st_mode):
                found.append((path, status.st_uid))
    if not found:
        return []
    with ThreadPoolExecutor(min(_PARALLEL, len(found)), thread_name_prefix='vyra-ipc-probe') as pool:
        entries = list(pool.map(lambda item: _probe(*item), found))
    return sorted(entries, key=lambda entry: (entry.module, entry.socket_path))


def _probe(path: Path, uid: int) -> ServerEntry:
    try:
        fast: Path | None = default_ttrpc_socket_path(path)
    except ValueError:
        fast = None  # too long a path for a fast lane beside it
    module = path.name.removesuffix('.sock').removesuffix('_ipc')
    fast_path = str(fast) if fast is not None and os.path.lexists(fast) else None
    entry = ServerEntry(module, str(path), fast_path, 'stale', uid)
    peer = _peer_pid(path)
    if isinstance(peer, str):
        entry.state = peer
        return entry
    entry.pid = peer
    with deadline_channel(path, PROBE_TIMEOUT) as channel:
        try:
            health: Any = health_pb2_grpc.HealthStub(channel)  # typeshed's stub has no methods
            answer = health.Check(health_pb2.HealthCheckRequest())
        except grpc.RpcError as error:
            entry.state, entry.detail = _unhealthy(error)
            return entry
        entry.state = 'serving' if answer.status == health_pb2.HealthCheckResponse.SERVING else 'not serving'
        try:
            info = IntrospectionStub(channel).GetServerInfo(ServerInfoRequest())
        except grpc.RpcError as error:
            # Another gRPC server, or an older vyra_base_ipc: its services from reflection.
            entry.detail = f'no vyra.ipc.Introspection ({error.code().name})'
            try:
                entry.services = user_services(Reflection(channel).services())
            except grpc.RpcError:
                pass
            return entry
    entry.module = info.module_name or entry.module
    entry.services = user_services(list(info.services))
    return entry


def _peer_pid(path: Path) -> int | str:
    """The pid of the process listening on ``path``, or the state of a
    socket nobody can be reached on."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(str(path))
        except OSError as error:
            if error.errno == errno.ECONNREFUSED:
                return 'stale'  # a socket file nobody listens on: its server died
            if error.errno in (errno.EACCES, errno.EPERM):
                return 'refused'  # another user's server
            if error.errno == errno.EAGAIN or isinstance(error, TimeoutError):
                return 'no answer'  # its backlog is full
            return 'unreachable'
        return socket_peer(probe, groups=False).pid


def _unhealthy(error: grpc.RpcError) -> tuple[str, str]:
    """State and detail of a listening socket whose health check failed."""
    code, details = error.code(), error.details() or ''
    if 'Failed parsing HTTP/2' in details:
        # grpc-core's words for a first frame that is no SETTINGS frame: it answered,
        # in another protocol. (Its "Did not receive HTTP/2 settings" is silence.)
        parsing = details[details.index('Failed parsing HTTP/2'):]
        return 'not gRPC', f'it answered in another protocol than HTTP/2: {parsing}'
    if code is grpc.StatusCode.DEADLINE_EXCEEDED or (
            code is grpc.StatusCode.UNAVAILABLE and 'SETTINGS' in details):
        # Connected, but no gRPC answer (not even HTTP/2 settings) in time.
        return 'no answer', f'within {PROBE_TIMEOUT:g} s'
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return 'not vyra', 'a gRPC server without grpc.health.v1'
    return 'unreachable', f'{code.name}: {details}'
