"""The context a ``def`` handler gets on the gRPC lane.

grpc.aio gives ``def`` handlers (run in its thread pool) a context without
``is_active()``, ``cancelled()``, ``done()``, ``add_done_callback()``,
``code()``, ``details()`` or ``abort_with_status()``: calling one failed the call (AttributeError,
UNKNOWN), though the same servicer has them on the fast lane. This wrapper
adds them, built on what grpc.aio's context has: ``time_remaining()``, and
``add_callback`` (whose callbacks grpc.aio runs only for a call that ended
normally: it tells a ``def`` handler nothing of a client that left before
the deadline). Everything else is grpc.aio's context.

Every ``def`` handler of a registered service gets one (see
:mod:`vyra_base_ipc._request_guard`); the observation of a call
(:mod:`vyra_base_ipc._grpc_observe`) reads the status set on it.
"""

from __future__ import annotations

from typing import Any, Callable

import grpc

__all__ = ['SyncContext']


class SyncContext:
    """A ``def`` handler's context with the status set on it, and told when
    its call ends. Create it with :meth:`of`."""

    __slots__ = ('_context', '_code', '_details', 'finished')

    def __init__(self, context: Any) -> None:
        self._context = context
        self._code: Any = None
        self._details: str | None = None
        #: Set once the handler has returned or raised (by its wrapper).
        self.finished = False

    @classmethod
    def of(cls, context: Any) -> 'SyncContext':
        """``context`` wrapped, unless it already is."""
        return context if type(context) is cls else cls(context)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    # -- status ----------------------------------------------------------------------

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        self._details = details
        self._context.set_details(details)

    def abort(self, code: grpc.StatusCode, details: str = '', trailing_metadata: Any = ()) -> None:
        self._code, self._details = code, details
        self._context.abort(code, details, trailing_metadata)

    def abort_with_status(self, status: grpc.Status) -> None:
        """:meth:`abort` with a :class:`grpc.Status` (grpc.aio's ``def``
        context has no such method; the fast lane's and grpc's own have)."""
        self.abort(status.code, status.details, getattr(status, 'trailing_metadata', ()))

    def code(self) -> Any:
        return self._code

    def details(self) -> str | None:
        return self._details

    # -- the call's end --------------------------------------------------------------
    # grpc.aio tells a def handler's context nothing of a client that left
    # (its add_callback callbacks run only for calls that end normally): the
    # deadline is what there is to go by.

    def is_active(self) -> bool:
        """Whether the call still runs: the handler has not finished and the
        deadline has not passed."""
        if self.finished:
            return False
        remaining = self._context.time_remaining()
        return remaining is None or remaining > 0

    def cancelled(self) -> bool:
        """Whether the call's deadline has passed."""
        remaining = self._context.time_remaining()
        return remaining is not None and remaining <= 0

    def done(self) -> bool:
        """Whether the handler has finished or the deadline has passed."""
        return self.finished or self.cancelled()

    def add_done_callback(self, callback: Callable[[Any], Any]) -> None:
        """Call ``callback(context)`` when the call ends, as grpc.aio runs
        ``add_callback`` callbacks (only for a call that ends normally)."""
        self._context.add_callback(lambda *unused: callback(self))
