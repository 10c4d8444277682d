"""The status a fast-lane call ends with, from its handler's context and
what the handler raised, in grpc.aio's codes and words."""

from __future__ import annotations

import logging

import grpc

from .._request_guard import log_unexpected, unexpected_details
from ._context import ServicerContext

__all__ = ['StatusError', 'error_status', 'number', 'status_after_return', 'unexpected']

_logger = logging.getLogger(__name__)


def number(code: grpc.StatusCode) -> int:
    """The wire number of a status code."""
    return int(code.value[0])


class StatusError(Exception):
    """Ends a call with a chosen status from inside the server."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def unexpected(error: BaseException, path: str) -> tuple[int, str]:
    """UNKNOWN for an exception of the handler of ``path`` (logged), in grpc.aio's words."""
    log_unexpected(_logger, path, error)
    return number(grpc.StatusCode.UNKNOWN), unexpected_details(error)


def status_after_return(context: ServicerContext) -> tuple[int, str] | None:
    """The non-OK status a handler set (or aborted with), if any."""
    if context._abort is not None:
        code, details = context._abort
        return number(code), details
    set_code = context._code
    if set_code is not None and set_code is not grpc.StatusCode.OK:
        return number(set_code), context._details or ''
    return None


def error_status(context: ServicerContext, error: BaseException, path: str) -> tuple[int, str]:
    """The status of a call whose handler raised ``error``: its abort's (the
    first decides), a :class:`StatusError`'s, else UNKNOWN, or the code it
    set before, with the exception's words."""
    if context._abort is not None:  # the first abort decides, whatever followed
        code, details = context._abort
        return number(code), details
    if isinstance(error, StatusError):
        return number(error.code), error.details
    status, details = unexpected(error, path)
    set_code = context._code
    # As grpc.aio: a code the handler set before it raised is the status,
    # with the words of the exception.
    return (number(set_code) if set_code is not None and set_code is not grpc.StatusCode.OK
            else status), details
