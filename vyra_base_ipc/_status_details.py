"""gRPC's richer error model on both lanes.

A handler that ends its call with a ``google.rpc.Status`` (grpc's idiom:
``context.abort_with_status(rpc_status.to_status(status))``) puts it, as
grpc does, in the ``grpc-status-details-bin`` trailing metadata. The gRPC
lane sends that trailer; the fast lane, which has no trailers, carries the
status's ``details`` in its own ``Response.status``, which is wire-compatible
with ``google.rpc.Status`` (containerd's Go clients read them there too).
Clients of both lanes give them as :attr:`IPCError.status_details`.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
import grpc

from . import ttrpc_pb2
from ._log_limit import log_limited
from ._metadata import check_key, check_text

__all__ = ['STATUS_DETAILS_KEY', 'checked_trailer', 'status_details', 'status_trailer']

#: The trailing-metadata key of a serialized ``google.rpc.Status``
#: (``grpc_status.rpc_status``'s ``GRPC_DETAILS_METADATA_KEY``).
STATUS_DETAILS_KEY = 'grpc-status-details-bin'

_logger = logging.getLogger(__name__)


def status_details(metadata: Iterable[tuple[str, Any]] | None, code: grpc.StatusCode, message: str,
                   method: str) -> tuple[any_pb2.Any, ...]:
    """The ``details`` of the ``google.rpc.Status`` in ``metadata``'s
    ``grpc-status-details-bin`` entry, for a call of ``method`` that ended
    with ``code`` and ``message``; empty without one.

    That status must be the call's: its code and message those the call
    ended with, as ``grpc_status.rpc_status.from_call`` requires (a handler
    that set the trailer and then raised, or aborted with another status,
    did not end its call with that one). An entry that is not a serialized
    ``google.rpc.Status``, or not that one, gives none, with a warning
    naming ``method`` (:func:`~._log_limit.log_limited`, one kind a method
    and problem: a handler with that bug, called in a loop, logged a line a
    call, in the fast lane's server and the gRPC lane's client alike).
    """
    try:
        return _details(metadata, code, message)
    except _Unread as problem:
        log_limited(_logger, logging.WARNING, ('status details unread', method, problem.kind),
                    '%s: %s; the call ends without status details', method, problem)
        return ()


class _Unread(ValueError):
    """(:func:`_details`) What is wrong with a status trailer; its
    :attr:`kind` is one of a few, whatever the peer's bytes."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _details(metadata: Iterable[tuple[str, Any]] | None, code: grpc.StatusCode,
             message: str) -> tuple[any_pb2.Any, ...]:
    """(:func:`status_details`) :raises _Unread: what is wrong with the entry."""
    for key, value in metadata or ():
        if key == STATUS_DETAILS_KEY:
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise _Unread('not bytes', f'{STATUS_DETAILS_KEY} is a {type(value).__name__}, not the '
                              'bytes of a google.rpc.Status')
            try:
                status = ttrpc_pb2.Status.FromString(bytes(value))
            except DecodeError as error:
                raise _Unread('no status',
                              f'{STATUS_DETAILS_KEY} is not a google.rpc.Status: {error}') from None
            if (status.code, status.message) != (code.value[0], message):
                raise _Unread('another status', f'{STATUS_DETAILS_KEY} holds a google.rpc.Status of code '
                              f'{status.code} and message {status.message!r}, not the status the call ended '
                              f'with, {code.name} ({code.value[0]}) and {message!r}')
            return tuple(status.details)
    return ()


def status_trailer(code: grpc.StatusCode, message: str, details: Sequence[any_pb2.Any]
                   ) -> tuple[tuple[str, bytes], ...]:
    """The ``grpc-status-details-bin`` trailer of a ``google.rpc.Status`` of
    ``code``, ``message`` and ``details``; empty without ``details``."""
    if not details:
        return ()
    status = ttrpc_pb2.Status(code=code.value[0], message=message, details=details)
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


def checked_trailer(trailing_metadata: Any) -> tuple[Any, ...]:
    """A handler's ``trailing_metadata`` (for ``set_trailing_metadata()`` and
    ``abort()`` on both lanes) as a tuple, checked as grpc checks it, but at
    once: the handler fails there and then, UNKNOWN on both lanes, saying
    what is wrong. grpc.aio checks most of it only once it sends the status:
    a ``str`` under a ``-bin`` key made it send no status at all (its caller
    waiting for the deadline, for ever without one), a key or value it does
    not allow ended the call INTERNAL "Invalid metadata", whatever the
    handler answered; and the fast lane, which sends no trailers, answered
    as if all were well.

    :raises TypeError: not ``(key, value)`` pairs of a ``str`` and a ``str``
        or ``bytes`` (grpc's words), or a ``-bin`` key's value not bytes.
    :raises ValueError: a key of other characters than 0-9, a-z, ``_``,
        ``-`` and ``.``, or a value not printable ASCII under a key that does
        not end in ``-bin``; the message names the key.
    """
    items = tuple(trailing_metadata or ())
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], (str, bytes))):
            raise TypeError('Invalid trailing metadata type, expected '
                            f'Tuple[Tuple[str, Union[str, bytes]]...]: {trailing_metadata!r}')
        key, value = item
        if key.endswith('-bin'):
            if not isinstance(value, bytes):
                raise TypeError(f'Binary metadata key="{key}" expected bytes, got {type(value)}')
            continue
        check_key(key, 'trailing metadata')
        check_text(key, value if isinstance(value, str) else value.decode('latin-1'), 'trailing metadata')
    return items
