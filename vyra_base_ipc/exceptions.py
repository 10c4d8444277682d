"""Every exception this package raises on purpose, importable from
:mod:`vyra_base_ipc` (and from the modules that raise them).

- A failed call raises an :class:`IPCError` subclass that keeps the gRPC
  status code and details, so callers can tell *handle* from *fix*:
  :class:`IPCUnavailableError` and :class:`IPCTimeoutError` (server down, too
  slow: retry later, or report) from :class:`IPCRemoteError` (the server said
  no: usually a bug to fix). Calls of ROS 2 services from asyncio code
  (:mod:`vyra_base_ipc.ros_bridge`) fail the same way:
  :class:`ServiceUnavailable`, :class:`ServiceCallTimeout`. A request too
  large to send raises :class:`MessageTooLargeError` before anything is sent.
- Setting up fails with :class:`SocketInUseError` (an :class:`OSError`),
  :class:`ForkedProcessError` (a :class:`RuntimeError`: fix how the process
  is started) or :class:`ParameterError` (a :class:`ValueError`: fix the
  parameter).
- Shared memory that cannot be created, or a received buffer that is refused,
  raises :class:`SharedMemoryError`.
- :class:`CommandError` is raised by *your* command handlers, to answer a
  :class:`~vyra_base_ipc.module_service.ModuleService` command with a chosen
  status; :class:`CallRejected` by *your* interceptors, to refuse a call.

Misuse of the API (wrong argument types, unknown method names, malformed
paths) raises :class:`ValueError` or :class:`TypeError`, never an
:class:`IPCError`.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any, Iterable, Sequence

from google.protobuf import any_pb2
from google.protobuf.message import Message
import grpc

from ._status_details import status_trailer

__all__ = [
    'CallRejected',
    'CommandError',
    'ForkedProcessError',
    'IPCError',
    'IPCRemoteError',
    'IPCTimeoutError',
    'IPCUnavailableError',
    'MessageTooLargeError',
    'ParameterError',
    'ServiceCallTimeout',
    'ServiceUnavailable',
    'SharedMemoryError',
    'SocketInUseError',
    'TooLargeError',
    'UnsafeDirectoryError',
    'UntrustedServerError',
    'error_from_status',
]


# -- failed calls ---------------------------------------------------------------------


class IPCError(Exception):
    """Raised when an IPC call failed; the base class of the errors of calls.

    :ivar code: the gRPC status code of the failure.
    :ivar details: the status details, as sent by the server or the transport.
    :ivar method: the full method path (``/package.Service/Method``), if known.
    :ivar status_details: the error details of gRPC's richer error model: the
        ``details`` of the ``google.rpc.Status`` the server's handler ended the
        call with (``context.abort_with_status(rpc_status.to_status(...))``),
        packed :class:`google.protobuf.any_pb2.Any` messages such as a
        ``google.rpc.BadRequest``; empty when it sent none. Read one with
        ``detail.Is(BadRequest.DESCRIPTOR)`` and ``detail.Unpack(message)``.
    """

    def __init__(self, code: grpc.StatusCode, details: str, *, method: str | None = None,
                 status_details: Sequence[any_pb2.Any] = ()) -> None:
        self.code = code
        self.details = details
        self.method = method
        self.status_details = tuple(status_details)
        where = f'{method}: ' if method else ''
        super().__init__(f'{where}{code.name}: {details}')

    def for_method(self, method: str) -> IPCError:
        """This error if it names its method, else a copy naming ``method``
        (a broken connection fails every call on it with one error)."""
        if self.method is not None:
            return self
        return type(self)(self.code, self.details, method=method, status_details=self.status_details)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (a process pool's worker raising it, copy.copy) with its
        # attributes: the default remakes it from its message alone.
        return _restored, (type(self), self.args, _state(self))


class IPCUnavailableError(IPCError):
    """Raised when the server cannot be reached: no socket file, nobody listening,
    or the connection broke during the call.

    A call that fails this way *may* have run on the server (for example when
    the server crashed mid-call); it is only retried automatically when the
    method is marked idempotent.
    """


class UntrustedServerError(IPCUnavailableError):
    """Raised when the process serving a socket (or the socket file, or its
    directory) belongs to a user the client does not trust as its server:
    by default anyone but itself and root (``server_uid=`` on the clients).
    Nothing was sent. The details name the socket, the owner found and the
    owners expected; the code is UNAVAILABLE."""


class IPCTimeoutError(IPCError):
    """Raised when a call's deadline expired before the answer arrived."""


class IPCRemoteError(IPCError):
    """Raised when the server answered with a non-OK status (the handler
    aborted, raised, or the method does not exist there)."""


class MessageTooLargeError(IPCError):
    """Raised before sending when a request is larger than the client's
    ``max_message_bytes``, on either lane; nothing was sent. Explicit
    :class:`~vyra_base_ipc.SharedBuffer` objects count with the bytes they
    add inline (as the gRPC lane carries them), so that a call fails or
    travels alike on both lanes. Its code is RESOURCE_EXHAUSTED; the
    details say the size, the limit and what to change.

    :ivar size: the request's size in bytes (with its buffers inline).
    :ivar limit: the client's ``max_message_bytes``.
    :ivar buffers: how many SharedBuffers were counted in ``size``.
    """

    def __init__(self, size: int, limit: int, *, method: str | None = None, buffers: int = 0) -> None:
        self.size = size
        self.limit = limit
        self.buffers = buffers
        what = ('the request' if not buffers else
                f'the request with its {buffers} SharedBuffer{"s" if buffers > 1 else ""} inline')
        super().__init__(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f'{what} is {size} bytes, over max_message_bytes ({limit}); nothing was sent. To send it, '
            'raise max_message_bytes on the client and the server (both lanes then carry it)',
            method=method)

    def for_method(self, method: str) -> IPCError:
        """As :meth:`IPCError.for_method`."""
        if self.method is not None:
            return self
        return MessageTooLargeError(self.size, self.limit, method=method, buffers=self.buffers)


def _state(error: BaseException) -> dict[str, Any]:
    """``error``'s attributes: those of its ``__dict__``, and those a subclass
    keeps in ``__slots__`` (which ``__dict__`` does not hold)."""
    state = dict(error.__dict__)
    for cls in type(error).__mro__:
        slots = cls.__dict__.get('__slots__', ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name.startswith('__') and not name.endswith('__'):
                name = f'_{cls.__name__.lstrip("_")}{name}'  # (a private slot's mangled name)
            if name not in ('__dict__', '__weakref__') and hasattr(error, name):
                state.setdefault(name, getattr(error, name))
    return state


def _restored(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    """An exception of ``cls`` as it was pickled: its ``args`` and attributes
    (see :func:`_state`), without ``__init__``, whose parameters are not its ``args``."""
    error = cls.__new__(cls, *args)
    for name, value in state.items():
        object.__setattr__(error, name, value)
    return error


def error_from_status(code: grpc.StatusCode, details: str, *, method: str | None = None,
                      status_details: Sequence[any_pb2.Any] = ()) -> IPCError:
    """Return the :class:`IPCError` subclass instance for a non-OK status
    (``status_details``: see :attr:`IPCError.status_details`)."""
    if code is grpc.StatusCode.UNAVAILABLE:
        return IPCUnavailableError(code, details, method=method, status_details=status_details)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return IPCTimeoutError(code, details, method=method, status_details=status_details)
    return IPCRemoteError(code, details, method=method, status_details=status_details)


# The texts of a server out of reach, the same on both lanes.

def socket_missing(path: os.PathLike[str] | str, method: str | None = None) -> IPCUnavailableError:
    """The error of a call or connect that found no socket file at ``path``;
    when ``path`` is a module's name (given as the socket path, which comes
    first: ``IPCHandler('arm', ...)``) and that module's socket is there, says so."""
    from .address import default_socket_path

    name = os.path.basename(os.fspath(path))
    # (The fast lane's socket beside such a path: 'arm' -> 'arm.ttrpc.sock'.)
    name = name[:-len('.ttrpc.sock')] if name.endswith('.ttrpc.sock') else name
    try:
        meant: str | None = os.fspath(default_socket_path(name))
    except ValueError:  # not a module name
        meant = None
    hint = (f'; {name!r} is a module name (its socket: {meant!r}): pass module_name={name!r}, not a '
            'socket path' if meant is not None and meant != os.fspath(path) and os.path.exists(meant) else '')
    missing = f'socket {os.fspath(path)!r} does not exist (is the IPC server running?)'
    return IPCUnavailableError(grpc.StatusCode.UNAVAILABLE, missing + hint, method=method)


def nobody_listening(path: os.PathLike[str] | str, method: str | None = None) -> IPCUnavailableError:
    """The error of a call or connect refused at ``path``: the socket file is
    there, its server is not (killed, crashed, or not started yet); or
    another kind of file is there (connect() is refused alike)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = stat.S_IFSOCK
    if not stat.S_ISSOCK(mode):
        what = ('a directory' if stat.S_ISDIR(mode) else
                'a regular file' if stat.S_ISREG(mode) else 'another kind of file')
        return IPCUnavailableError(grpc.StatusCode.UNAVAILABLE,
                                   f'{os.fspath(path)!r} is {what}, not a socket: is the socket path right?',
                                   method=method)
    return IPCUnavailableError(
        grpc.StatusCode.UNAVAILABLE,
        f'no server answers on {os.fspath(path)!r}: the socket file is there but no server is listening '
        '(the server went away, or has not started yet)', method=method)


def no_answer(path: os.PathLike[str] | str, timeout: float | None) -> IPCUnavailableError:
    """The error of a connect whose server, listening at ``path``, did not
    answer within ``timeout`` seconds (stopped, or its event loop held)."""
    when = 'in time' if timeout is None else f'within {timeout:g} s'
    return IPCUnavailableError(grpc.StatusCode.UNAVAILABLE, f'no server answered on {str(path)!r} {when}')


def connection_lost(path: os.PathLike[str] | str, reason: object, method: str | None = None
                    ) -> IPCUnavailableError:
    """The error of calls on a connection to ``path`` that broke."""
    return IPCUnavailableError(
        grpc.StatusCode.UNAVAILABLE,
        f'connection to {os.fspath(path)!r} lost: {reason} (the server went away or closed it)',
        method=method)


class ServiceUnavailable(IPCUnavailableError):
    """Raised when no server of a ROS 2 service appeared before the call's
    deadline (:mod:`vyra_base_ipc.ros_bridge`); the request was not sent.
    Its code is UNAVAILABLE; the details name the service."""


class ServiceCallTimeout(IPCTimeoutError):
    """Raised when a ROS 2 service did not answer before the call's deadline
    (:mod:`vyra_base_ipc.ros_bridge`); the request was withdrawn. Its code is
    DEADLINE_EXCEEDED; the details name the service."""


# -- setting up ----------------------------------------------------------------------


class SocketInUseError(OSError):
    """Raised by :meth:`IPCServer.start` when a live server already listens on
    the socket path; that server keeps its socket."""

    def __init__(self, path: os.PathLike[str] | str) -> None:
        super().__init__(
            errno.EADDRINUSE,
            'another server is listening on this socket path; refusing to take it over',
            os.fspath(path))

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.filename,)  # (OSError's would pass all three of its args)


class UnsafeDirectoryError(PermissionError):
    """Raised by :meth:`IPCServer.start` when the socket's directory, or one
    above it, belongs to another user or lets other users replace what is in
    it (writable by them and not a root-owned sticky directory like /tmp):
    they could swap the server's socket. The message names the directory,
    its owner and its mode."""


class ForkedProcessError(RuntimeError):
    """Raised when IPC is used in a child forked from a process that had
    already used gRPC. Start such processes with multiprocessing's ``spawn``
    or ``forkserver`` method, or create clients and servers before any gRPC
    use in the parent."""


class ParameterError(ValueError):
    """Raised when a parameter of the IPC server is unusable.

    :ivar parameter: the parameter's name.
    :ivar reason: what is wrong with its value.
    """

    def __init__(self, parameter: str, reason: str) -> None:
        self.parameter = parameter
        self.reason = reason
        super().__init__(f"parameter '{parameter}': {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return _restored, (type(self), self.args, _state(self))  # (as IPCError's)


# -- shared memory -------------------------------------------------------------------


class SharedMemoryError(Exception):
    """Raised when a shared-memory buffer cannot be created, or a received
    one is refused (missing, not sealed, wrong size, not a memfd). The
    message names the buffer and what was wrong."""


class TooLargeError(SharedMemoryError):
    """Raised when a received message or buffer in shared memory is larger
    than the receiver accepts (answered RESOURCE_EXHAUSTED, like an inline one)."""


# -- raised by your code: command handlers, interceptors --------------------------------


class CommandError(Exception):
    """Raised by a command handler (your code) to answer the command with a
    chosen non-OK status instead of INTERNAL.

    ``code`` is a :class:`grpc.StatusCode` other than OK, or its number
    (``14`` or ``google.rpc.code_pb2.UNAVAILABLE`` for UNAVAILABLE, as
    ``status_code`` carries it). Anything else (OK or 0: a failed command
    cannot answer OK; a number no status has; a name as text) raises
    :class:`TypeError` naming it, here in the handler's traceback. A handler
    that raises it so answers INTERNAL, as for any bug of the handler's (a
    ``ValueError`` would answer INVALID_ARGUMENT: the caller's mistake).

    :ivar code: the status the command answers with (``status_code``), a
        :class:`grpc.StatusCode`; set later, it is held to the same rule.
    """

    def __init__(self, message: str,
                 code: grpc.StatusCode | int = grpc.StatusCode.FAILED_PRECONDITION) -> None:
        super().__init__(message)
        self.code = code

    @property
    def code(self) -> grpc.StatusCode:
        """The status the command answers with."""
        return self._code

    @code.setter
    def code(self, code: grpc.StatusCode | int) -> None:
        self._code = _error_status(code)


class CallRejected(Exception):
    """Raised by :meth:`ServerInterceptor.call_started` to answer the call
    with ``code`` and ``details`` instead of running its handler (and by
    :meth:`ClientInterceptor.call_started` to fail it at once).

    ``status_details``: messages (a ``google.rpc.ErrorInfo``, say) that go
    with the status as the details of a ``google.rpc.Status``, as a handler's
    ``abort_with_status()`` sends them; each is packed in an
    ``google.protobuf.any_pb2.Any`` unless it is one. The caller reads them
    as :attr:`IPCError.status_details`.

    :raises ValueError: ``code`` is not a :class:`grpc.StatusCode`, or is OK.
    :raises TypeError: ``status_details`` is not a sequence of protobuf
        messages. Raised here, in the interceptor, as any bug of its (an
        interceptor that raises so is logged and the call goes on: its
        refusal was never made).
    """

    def __init__(self, code: grpc.StatusCode, details: str = '', *,
                 status_details: Sequence[Message] = ()) -> None:
        if not isinstance(code, grpc.StatusCode) or code is grpc.StatusCode.OK:
            raise ValueError(f'CallRejected needs a grpc.StatusCode other than OK, not {code!r}')
        if isinstance(status_details, (str, bytes, Message)) or not isinstance(status_details, Iterable):
            raise TypeError('CallRejected status_details must be a sequence of protobuf messages, '
                            f'not {type(status_details).__name__}')
        super().__init__(f'{code.name}: {details}')
        self.code = code
        self.details = details
        #: The details as they go: each an ``Any``.
        self.status_details = tuple(_packed(detail) for detail in status_details)

    def __reduce__(self) -> tuple[Any, ...]:
        # As IPCError's: its parameters are not its args.
        return _restored, (type(self), self.args, _state(self))

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        """The ``grpc-status-details-bin`` trailer of the rejection's
        ``google.rpc.Status``; empty without ``status_details``."""
        return status_trailer(self.code, self.details, self.status_details)


def _packed(detail: Message) -> any_pb2.Any:
    """``detail`` in an ``Any`` (itself if it is one).

    :raises TypeError: it is not a protobuf message.
    """
    if isinstance(detail, any_pb2.Any):
        return detail
    if not isinstance(detail, Message):
        raise TypeError(f'CallRejected status_details must be protobuf messages, not {type(detail).__name__}')
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


#: Error statuses by number (google.rpc.Code), OK left out.
_ERROR_STATUSES = {status.value[0]: status for status in grpc.StatusCode if status is not grpc.StatusCode.OK}
_WANTED = ('CommandError code must be an error status (a grpc.StatusCode other than OK, '
           'or its number, 1 to 16)')


def _error_status(code: object) -> grpc.StatusCode:
    """``code`` as an error status; :class:`TypeError` naming what it is not."""
    if isinstance(code, bool) or not isinstance(code, (grpc.StatusCode, int)):
        raise TypeError(f'{_WANTED}, not {code!r} (a {type(code).__name__})')
    if code is grpc.StatusCode.OK or code == 0:
        shown = 'grpc.StatusCode.OK' if code is grpc.StatusCode.OK else '0 (OK)'
        raise TypeError(f'{_WANTED}, not {shown}: a failed command cannot answer OK')
    if isinstance(code, grpc.StatusCode):
        return code
    status = _ERROR_STATUSES.get(int(code))
    if status is None:
        raise TypeError(f'{_WANTED}, not {int(code)}: no status has that number')
    return status
