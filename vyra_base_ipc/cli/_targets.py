"""Which server a command talks to, and how: the socket of a target, the
check that something listens there, a client on the lane asked for, and
reflection over a channel whose every call has a deadline."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
import socket
import stat
import time
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import grpc

from .. import SyncIPCHandler
from .._options import DEFAULT_MAX_MESSAGE_BYTES
from ..address import grpc_target, resolve_socket_path
from ..exceptions import IPCError, IPCUnavailableError, error_from_status, nobody_listening, socket_missing
from ._messages import Reflection

__all__ = ['CONNECT_TIMEOUT', 'check_reachable', 'client', 'deadline_channel', 'reflection',
           'resolve_target']

#: Seconds a plain connect to a socket may take (a full backlog blocks it).
CONNECT_TIMEOUT = 1.0


def resolve_target(target: str) -> Path:
    """The gRPC socket of ``target``: a socket path (anything with a ``/`` or
    ending in ``.sock``), else a module name, resolved as the clients do
    (``VYRA_IPC_SOCKET``, then ``/tmp/<module>_ipc.sock``).

    :raises ValueError: neither a usable path nor a valid module name, or
        the fast lane's socket (``*.ttrpc.sock``), naming the gRPC one.
    """
    if '/' in target or target.endswith('.sock'):
        path = resolve_socket_path(target)
        if path.name.endswith(_FAST_LANE_SUFFIX):
            grpc_path = path.with_name(path.name[:-len(_FAST_LANE_SUFFIX)] + '.sock')
            raise ValueError(f'{str(path)!r} is the socket of a fast lane; give the gRPC socket, '
                             f'{str(grpc_path)!r} (--lane ttrpc calls the fast lane beside it)')
        return path
    return resolve_socket_path(None, module_name=target)


#: How the fast lane's socket beside a gRPC socket ends (address.default_ttrpc_socket_path).
_FAST_LANE_SUFFIX = '.ttrpc.sock'


def check_reachable(path: Path) -> None:
    """Fail early, in the clients' words, when no server can be at ``path``.

    :raises IPCUnavailableError: no such file, not a socket, nobody listens
        (a stale socket), or no permission to connect.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise socket_missing(path) from None
    except OSError as error:
        raise IPCUnavailableError(grpc.StatusCode.UNAVAILABLE, f'cannot reach {str(path)!r}: {error.strerror}'
                                  ) from None
    if not stat.S_ISSOCK(mode):
        raise IPCUnavailableError(grpc.StatusCode.UNAVAILABLE, f'{str(path)!r} is not a socket')
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(CONNECT_TIMEOUT)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            raise nobody_listening(path) from None
        except PermissionError:
            raise IPCUnavailableError(
                grpc.StatusCode.UNAVAILABLE,
                f'no permission to connect to {str(path)!r} (a server of another user; '
                'its socket group may connect)') from None
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.ETIMEDOUT) or isinstance(error, TimeoutError):
                return  # a full backlog: somebody listens, the call will say more
            raise IPCUnavailableError(grpc.StatusCode.UNAVAILABLE,
                                      f'cannot connect to {str(path)!r}: {error.strerror}') from None


def client(path: Path, stub: type, lane: str, timeout: float,
           max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> SyncIPCHandler:
    """A client of the server at ``path`` on ``lane`` for ``stub``'s methods,
    after :func:`check_reachable`; ``timeout`` (> 0) is its calls' deadline."""
    check_reachable(path)
    return SyncIPCHandler(path, stub, lane=lane, timeout=timeout, max_message_bytes=max_message_bytes)


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _Deadline(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Gives every call without a timeout what is left until ``deadline``
    (``time.monotonic()``): grpcio-reflection's descriptor database calls
    without one, and a server that accepts but never answers would hold a
    command forever."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def _details(self, details: grpc.ClientCallDetails) -> Any:
        if details.timeout is not None:
            return details
        left = max(0.0, self.deadline - time.monotonic())
        return _CallDetails(details.method, left, details.metadata, details.credentials,
                            getattr(details, 'wait_for_ready', None), getattr(details, 'compression', None))

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails,
                              request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails,
                               request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails,
                               requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails,
                                requests: Any) -> Any:
        return continuation(self._details(details), requests)


@contextlib.contextmanager
def deadline_channel(path: Path, seconds: float) -> Iterator[grpc.Channel]:
    """A gRPC channel to ``path`` on which every call without a timeout of
    its own ends ``seconds`` from now at the latest."""
    with grpc.insecure_channel(grpc_target(path)) as channel:
        yield grpc.intercept_channel(channel, _Deadline(time.monotonic() + seconds))


@contextlib.contextmanager
def reflection(path: Path, seconds: float) -> Iterator[Reflection]:
    """The server reflection of the server at ``path`` (on its gRPC lane),
    for the body of the ``with``; all of its calls together take at most
    ``seconds``.

    :raises IPCError: the server did not answer in time, has no reflection,
        or failed otherwise, naming the socket.
    """
    check_reachable(path)
    with deadline_channel(path, seconds) as channel:
        try:
            yield Reflection(channel)
        except grpc.RpcError as error:
            raise _reflection_error(path, error.code(), error.details() or '', seconds) from None


def _reflection_error(path: Path, code: grpc.StatusCode, details: str, seconds: float) -> IPCError:
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        details = (f'the server at {str(path)!r} did not describe itself (server reflection) '
                   f'within {seconds:g} s')
    elif code is grpc.StatusCode.UNIMPLEMENTED:
        details = f'the server at {str(path)!r} has no server reflection (grpc.reflection.v1alpha)'
    else:
        details = f'server reflection of {str(path)!r}: {details}'
    return error_from_status(code, details)


def user_services(names: Sequence[str]) -> list[str]:
    """``names`` without the services every server has (health, reflection,
    introspection), in their order."""
    return [name for name in names if name not in TOOL_SERVICES]


#: Services of every IPCServer that are the tools' rather than the module's.
TOOL_SERVICES = frozenset({'grpc.health.v1.Health', 'grpc.reflection.v1alpha.ServerReflection',
                           'grpc.reflection.v1.ServerReflection', 'vyra.ipc.Introspection'})
