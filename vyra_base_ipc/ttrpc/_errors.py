"""The errors of fast-lane calls and connections, in the words both clients
share (and the gRPC lane's, :mod:`vyra_base_ipc.exceptions`)."""

from __future__ import annotations

import grpc

from .._deadline import Deadline
from .._methods import Method
from ..exceptions import (
    IPCError,
    IPCRemoteError,
    IPCTimeoutError,
    IPCUnavailableError,
    connection_lost,
    nobody_listening,
    socket_missing,
)

__all__ = ['NOT_STARTED', 'SHUTTING_DOWN', 'UNDECODABLE', 'NothingSent', 'SenderFailed', 'closed',
           'connect_error', 'forked_error', 'idle_error', 'lost', 'deadline_passed', 'not_accepted',
           'not_started', 'received_too_large', 'refused_for_good', 'timeout_error', 'undecodable', 'unsent',
           'wait_error']


def timeout_error(method: Method) -> IPCTimeoutError:
    return IPCTimeoutError(grpc.StatusCode.DEADLINE_EXCEEDED, 'Deadline Exceeded', method=method.path)


def idle_error(method: Method, idle_timeout: float) -> IPCTimeoutError:
    return IPCTimeoutError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f'no message within the idle timeout of {idle_timeout:g} s', method=method.path)


def deadline_passed(deadline: Deadline | None, idle_timeout: float | None) -> bool:
    """Whether a wait that ended at its :func:`wait_deadline` ended for the
    deadline (else for the idle timeout)."""
    return idle_timeout is None or (deadline is not None and deadline.expired())


def wait_error(method: Method, deadline: Deadline | None, idle_timeout: float | None) -> IPCTimeoutError:
    """The error of a wait that ended at its :func:`wait_deadline`: the idle
    timeout's, unless the deadline passed."""
    if deadline_passed(deadline, idle_timeout):
        return timeout_error(method)
    return idle_error(method, idle_timeout)  # type: ignore[arg-type]  # (not None: deadline_passed)


#: grpc's words (its blocking channel's) for an answer that does not parse
#: as the method's response type: a stub built from another version of the
#: .proto. grpc.aio logs the error and returns None instead.
UNDECODABLE = 'Exception deserializing response!'


def undecodable(method: Method, why: object = None) -> IPCRemoteError:
    """INTERNAL, in grpc's words (:data:`UNDECODABLE`), with ``why`` if known."""
    return IPCRemoteError(grpc.StatusCode.INTERNAL, UNDECODABLE if why is None else f'{UNDECODABLE} ({why})',
                          method=method.path)


def received_too_large(size: int, limit: int, *, server: bool) -> str:
    """The words of grpc core for a received message of ``size`` bytes over
    max_message_bytes (``limit``): a server's refusal of a request, or a
    client's of an answer (its channel removes the call's stream, and says so)."""
    words = f'Received message larger than max ({size} vs. {limit})'
    return f'SERVER: {words}' if server else f'Stream removed (CLIENT: {words})'


def connect_error(path: str, error: OSError) -> IPCUnavailableError:
    if isinstance(error, FileNotFoundError):
        return socket_missing(path)
    if isinstance(error, ConnectionRefusedError):
        return nobody_listening(path)
    if isinstance(error, PermissionError):
        details = f'not allowed to connect to {path!r}: {error.strerror}'
    elif isinstance(error, BlockingIOError):
        details = f'{path!r} takes no connection now: its listen backlog is full ({error.strerror})'
    else:
        details = f'cannot connect to {path!r}: {error}'
    return IPCUnavailableError(grpc.StatusCode.UNAVAILABLE, details)


def not_accepted(path: str, timeout: float) -> IPCUnavailableError:
    return IPCUnavailableError(grpc.StatusCode.UNAVAILABLE,
                               f'no server accepted a connection on {path!r} within {timeout:g} s')


#: Why a connection broke when its server went away (not a broken frame or a stuck send).
_PEER_GONE = ('closed by the server', 'Broken pipe', 'Connection reset by peer')


def lost(path: str, reason: object) -> IPCUnavailableError:
    if isinstance(reason, OSError) and reason.strerror:
        reason = reason.strerror  # (both clients in the same words)
    if reason in _PEER_GONE:
        return connection_lost(path, reason)
    return IPCUnavailableError(grpc.StatusCode.UNAVAILABLE, f'connection to {path!r} lost: {reason}')


#: A vyra_base_ipc server's answer to a call it ends as it stops.
SHUTTING_DOWN = 'server is shutting down'
#: Its answer to a call on an open connection that it refused as it stops,
#: before any handler saw it (it withdrew its socket files: a new server may
#: serve the path already). As an HTTP/2 stream above a GOAWAY's last stream
#: id, which grpc retries transparently, such a call may go again anywhere.
NOT_STARTED = f'{SHUTTING_DOWN}: the call was not started'


def refused_for_good(error: IPCError) -> bool:
    """Whether ``error`` says that the connection's server takes no new
    calls: it is shutting down. New calls need a new connection then (as an
    HTTP/2 client's after GOAWAY, which grpc's channels heed)."""
    return error.code is grpc.StatusCode.UNAVAILABLE and error.details in (SHUTTING_DOWN, NOT_STARTED)


def not_started(error: IPCError) -> bool:
    """Whether ``error`` is a stopping server's refusal of a call that no
    handler saw (:data:`NOT_STARTED`)."""
    return error.code is grpc.StatusCode.UNAVAILABLE and error.details == NOT_STARTED


def closed(path: str) -> IPCUnavailableError:
    return IPCUnavailableError(grpc.StatusCode.UNAVAILABLE, f'connection to {path!r} was closed')


def forked_error() -> IPCUnavailableError:
    """A call on a blocking connection in a forked child of its process."""
    return IPCUnavailableError(grpc.StatusCode.UNAVAILABLE, 'this ttrpc connection belongs to the parent '
                               'process; open a new one after fork()')


class NothingSent(IPCUnavailableError):
    """A call found its connection broken before any of its request left:
    the server never saw it, so it may go again over a new connection,
    whatever the method (the handlers send it again once, at once)."""


def unsent(error: IPCUnavailableError, again: bool = True) -> IPCUnavailableError:
    """The error of a call that met ``error`` before any of its request left:
    ``error``'s code, details and method as :class:`NothingSent` if ``again``
    (the call may go again), else ``error`` itself. A call goes again whose
    connection broke in its own write, or was retired and closed after the
    call took it, or whose stopping server refused it before any handler saw
    it; one that found its connection broken otherwise fails with the error."""
    return NothingSent(error.code, error.details, method=error.method) if again else error


class SenderFailed(IPCError):
    """Carries an exception raised by the caller's request iterator; re-raised as is."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        super().__init__(grpc.StatusCode.CANCELLED, f'request iterator raised {error!r}')
