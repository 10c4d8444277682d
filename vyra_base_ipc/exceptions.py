"""Exceptions raised by the IPC clients.

Every failed call raises an :class:`IPCError` subclass that keeps the gRPC
status code and details, so callers can tell *handle* (server down, too slow)
from *fix* (the server said no). Misuse of the API (wrong argument types,
unknown method names, malformed paths) raises :class:`ValueError` or
:class:`TypeError` instead, never an :class:`IPCError`.
"""

from __future__ import annotations

import errno
import os

import grpc

__all__ = [
    'IPCError',
    'IPCRemoteError',
    'IPCTimeoutError',
    'IPCUnavailableError',
    'SocketInUseError',
    'error_from_status',
]


class IPCError(Exception):
    """Base class of every error of an IPC call.

    :ivar code: the gRPC status code of the failure.
    :ivar details: the status details, as sent by the server or the transport.
    :ivar method: the full method path (``/package.Service/Method``), if known.
    """

    def __init__(self, code: grpc.StatusCode, details: str, *, method: str | None = None) -> None:
        self.code = code
        self.details = details
        self.method = method
        where = f'{method}: ' if method else ''
        super().__init__(f'{where}{code.name}: {details}')

    def for_method(self, method: str) -> 'IPCError':
        """This error if it names its method, else a copy naming ``method``
        (a broken connection fails every call on it with one error)."""
        if self.method is not None:
            return self
        return type(self)(self.code, self.details, method=method)


class IPCUnavailableError(IPCError):
    """Raised when the server cannot be reached: no socket file, nobody listening,
    or the connection broke during the call.

    A call that fails this way *may* have run on the server (for example when
    the server crashed mid-call); it is only retried automatically when the
    method is marked idempotent.
    """


class IPCTimeoutError(IPCError):
    """Raised when a call's deadline expired before the answer arrived."""


class IPCRemoteError(IPCError):
    """Raised when the server answered with a non-OK status (the handler
    aborted, raised, or the method does not exist there)."""


def error_from_status(code: grpc.StatusCode, details: str, *, method: str | None = None) -> IPCError:
    """Return the :class:`IPCError` subclass instance for a non-OK status."""
    if code is grpc.StatusCode.UNAVAILABLE:
        return IPCUnavailableError(code, details, method=method)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return IPCTimeoutError(code, details, method=method)
    return IPCRemoteError(code, details, method=method)


class SocketInUseError(OSError):
    """Raised by :meth:`IPCServer.start` when a live server already listens on
    the socket path; that server keeps its socket."""

    def __init__(self, path: 'os.PathLike[str] | str') -> None:
        super().__init__(
            errno.EADDRINUSE,
            'another server is listening on this socket path; refusing to take it over',
            os.fspath(path))
