"""Servicer contexts for handlers called over ttrpc.

Handlers written for gRPC receive a ``context`` argument; on the fast lane
they get one of these instead, implementing the parts of
:class:`grpc.ServicerContext` / ``grpc.aio.ServicerContext`` that handlers use.
``async def`` handlers get :class:`AsyncServicerContext` (``await
context.abort(...)``, as in grpc.aio); ``def`` handlers get
:class:`ServicerContext` (``context.abort(...)`` raises at once). Both raise
:class:`grpc.aio.AbortError` from ``abort``, the exception grpc.aio raises.

ttrpc has no response headers or trailers: initial and trailing metadata set
by a handler are accepted and kept, but not sent; but for a
``google.rpc.Status`` in ``grpc-status-details-bin`` (gRPC's richer error
model), whose ``details`` go in the ``Response``'s status.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from typing import Any, Callable

import grpc

from .._handler_threads import CallEnded
from .._log_limit import log_limited
from .._peer import PeerCredentials
from .._status_details import checked_trailer, status_details
from ._messages import code_of

__all__ = ['AsyncServicerContext', 'ServicerContext']

_logger = logging.getLogger(__name__)


class _End(enum.Enum):
    FINISHED = 'finished'
    CANCELLED = 'cancelled'
    EXPIRED = 'expired'


class ServicerContext:
    """Context of one call, for ``def`` handlers (which run in a worker thread).

    Thread-safe: the server's event loop ends the call (finish, deadline,
    cancellation) while the handler thread reads it.

    :param deadline: ``time.monotonic()`` value at which the call expires, or
        ``None`` without a deadline.
    :param metadata: the invocation metadata, already decoded.
    :param method: the full method path, for :meth:`method`-style logging.
    :param peer_credentials: the client process (read them with
        :func:`vyra_base_ipc.peer_credentials`).
    """

    def __init__(self, deadline: float | None, metadata: tuple[tuple[str, str | bytes], ...],
                 method: str, peer: str = 'unix:', peer_credentials: PeerCredentials | None = None) -> None:
        self._deadline = deadline
        self._metadata = metadata
        self._method = method
        self._peer = peer
        self.peer_credentials = peer_credentials
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._abort: tuple[grpc.StatusCode, str] | None = None
        self._end: _End | None = None
        self._trailing_metadata: tuple[Any, ...] = ()
        # Whether gRPC would have sent the response headers by now (the first
        # message, or send_initial_metadata()): what may not follow them fails as there.
        self._headers_sent = False
        # Explicit shared buffers sent with the request, and those the handler
        # answers with (see vyra_base_ipc._shared_buffer); set by the server.
        self._buffers: Any = None
        # The request of a def handler's call, until its thread takes it (a
        # view of shared memory, maybe: let go of as the call ends).
        self._request: bytes | memoryview | None = None
        # What the call counts against max_held_buffers (its buffers, and a
        # request in shared memory waiting for a handler thread); set by the server.
        self._held = 0
        self._can_attach = False
        self._reply_buffers: tuple[Any, ...] = ()
        self._lock = threading.Lock()
        # Lists made on first use: most calls register no callback.
        self._callbacks: list[Callable[[], Any]] | None = None
        self._done_callbacks: list[Callable[[Any], Any]] | None = None
        # Set by the server for response-streaming calls so write() works.
        self._writer: Callable[[Any], Any] | None = None

    # -- what the call is ------------------------------------------------------------

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The client's metadata as ``(key, value)`` pairs; values of ``-bin``
        keys are bytes."""
        return self._metadata

    def peer(self) -> str:
        """``"unix:"``, as gRPC reports a Unix-socket peer."""
        return self._peer

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def time_remaining(self) -> float | None:
        """Seconds until the deadline (<= 0 once it passed), or ``None`` if the
        client set none."""
        if self._deadline is None:
            return None
        return self._deadline - time.monotonic()

    def is_active(self) -> bool:
        """Whether the call still runs: not finished, cancelled or expired."""
        if self._end is not None:
            return False
        return self._deadline is None or time.monotonic() < self._deadline

    def cancelled(self) -> bool:
        """Whether the call was cancelled (client gone, server stopping) or its
        deadline expired."""
        if self._end is _End.CANCELLED or self._end is _End.EXPIRED:
            return True
        return self._deadline is not None and self._end is None and time.monotonic() >= self._deadline

    def done(self) -> bool:
        """Whether the call has ended, or its deadline has passed (before the
        deadline's timer ends it: so that a handler that saw ``is_active()``
        turn False at its deadline sees ``done()`` True too)."""
        return self._end is not None or (self._deadline is not None and time.monotonic() >= self._deadline)

    # -- status ----------------------------------------------------------------------

    def set_code(self, code: grpc.StatusCode | int) -> None:
        """Set the status code sent when the handler returns (a non-OK code
        turns the answer into that error), or raises (the exception's words
        go with it). A number is taken as grpc takes it: its status."""
        self._code = code_of(code) if isinstance(code, int) else code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        """Kept for :meth:`trailing_metadata`; ttrpc has no trailers to send it
        in. A ``google.rpc.Status`` in ``grpc-status-details-bin`` goes with a
        non-OK status the handler ends the call with, as its details.

        :raises TypeError: a ``str`` under a ``-bin`` key, as on the gRPC lane
            (:func:`~vyra_base_ipc._status_details.checked_trailer`)."""
        self._trailing_metadata = checked_trailer(trailing_metadata)

    def trailing_metadata(self) -> tuple[Any, ...]:
        return self._trailing_metadata

    def _status_details(self, code: int, details: str) -> tuple[Any, ...]:
        """The details of the ``google.rpc.Status`` in the trailing metadata,
        for the call ending with status ``code`` (its number) and ``details``
        (see :func:`~vyra_base_ipc._status_details.status_details`)."""
        if not self._trailing_metadata:
            return ()
        return status_details(self._trailing_metadata, code_of(code), details, self._method)

    def send_initial_metadata(self, initial_metadata: Any) -> None:
        """Accepted for compatibility (ttrpc has no response headers), once
        and before the first message, as gRPC takes it.

        :raises grpc.aio.UsageError: sent already, as gRPC says it.
        """
        if self._headers_sent:
            raise grpc.aio.UsageError('Send initial metadata failed: already sent')
        self._headers_sent = True

    def set_compression(self, compression: Any) -> None:
        """Accepted for compatibility (the fast lane never compresses),
        before the response headers, as gRPC takes it.

        :raises RuntimeError: after them, as gRPC says it.
        """
        if self._headers_sent:
            raise RuntimeError('Compression setting must be specified before sending initial metadata')

    def disable_next_message_compression(self) -> None:
        """Accepted for compatibility; the fast lane never compresses."""

    def _abort_status(self, code: grpc.StatusCode | int, details: str,
                      trailing_metadata: Any) -> grpc.aio.AbortError:
        if isinstance(code, int) and not isinstance(code, bool):
            code = code_of(code)  # as grpc takes a number (one no status has: UNKNOWN)
        if not isinstance(code, grpc.StatusCode):
            raise TypeError(f'abort() needs a grpc.StatusCode or its number, not {code!r}')
        if code is grpc.StatusCode.OK:
            # gRPC's synchronous server does the same; grpc.aio would hang.
            log_limited(_logger, logging.ERROR, ('abort with OK', self._method),  # (one in 10 s a method)
                        'abort() called with StatusCode.OK in %s; answering UNKNOWN', self._method)
            code = grpc.StatusCode.UNKNOWN
        if not details and self._details:
            details = self._details  # as grpc.aio: an abort without details sends those set before
        trailing_metadata = checked_trailer(trailing_metadata)  # (before the abort counts: as the gRPC lane)
        if self._abort is None:
            self._abort = (code, details)
            self._code, self._details = code, details
            if trailing_metadata:
                self._trailing_metadata = trailing_metadata
        return self._aborted()

    def _aborted(self) -> grpc.aio.AbortError:
        """(aborted) The error :meth:`abort` raised."""
        code, details = self._abort  # type: ignore[misc]
        return grpc.aio.AbortError(f'{code.name}: {details}')

    def abort(self, code: grpc.StatusCode, details: str = '', trailing_metadata: Any = ()) -> None:
        """End the call with a non-OK status: raises :class:`grpc.aio.AbortError`
        (let it propagate). The first abort of a call decides its status.

        :raises grpc.aio.AbortError: always.
        :raises TypeError: ``code`` is not a :class:`grpc.StatusCode`.
        """
        raise self._abort_status(code, details, trailing_metadata)

    def abort_with_status(self, status: grpc.Status) -> None:
        """:meth:`abort` with the ``code`` and ``details`` of a :class:`grpc.Status`."""
        raise self._abort_status(status.code, status.details,
                                 getattr(status, 'trailing_metadata', ()))

    # -- streaming -------------------------------------------------------------------

    def write(self, message: Any) -> None:
        """Send one response message of a response-streaming call (instead of
        yielding it). Blocks while the client does not keep up.

        :raises RuntimeError: the method does not stream responses.
        """
        if self._writer is None:
            raise RuntimeError(f'{self._method} does not stream responses: write() is not available')
        self._writer(message)

    # -- callbacks -------------------------------------------------------------------

    def add_callback(self, callback: Callable[[], Any]) -> bool:
        """Call ``callback()`` (in the server's event loop thread) when the call
        ends for any reason. Returns ``False`` if it has already ended."""
        with self._lock:
            if self._end is not None:
                return False
            if self._callbacks is None:
                self._callbacks = []
            self._callbacks.append(callback)
            return True

    def add_done_callback(self, callback: Callable[[Any], Any]) -> None:
        """Call ``callback(context)`` when the call ends (at once if it has)."""
        with self._lock:
            if self._end is None:
                if self._done_callbacks is None:
                    self._done_callbacks = []
                self._done_callbacks.append(callback)
                return
        self._run(callback, self)

    # -- for the server --------------------------------------------------------------

    def _finish(self, end: _End) -> None:
        """Mark the call ended and run the callbacks; only the first end counts."""
        with self._lock:
            if self._end is not None:
                return
            self._end = end
            # A request no thread took yet waited with its mapping (and, before
            # Python 3.13, a descriptor), no longer counted as held: let go of it.
            self._request = None
            callbacks, self._callbacks = self._callbacks, None
            done_callbacks, self._done_callbacks = self._done_callbacks, None
        if callbacks:
            for callback in callbacks:
                self._run(callback)
        if done_callbacks:
            for done_callback in done_callbacks:
                self._run(done_callback, self)

    def _run(self, callback: Callable[..., Any], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log_limited(_logger, logging.ERROR, ('callback raised', self._method),  # (one in 10 s a method)
                        'callback of %s raised', self._method, exc_info=True)

    def _take_request(self) -> bytes | memoryview:
        """The request a def handler's thread deserializes (once).

        :raises CallEnded: the call ended before (its request was let go of then).
        """
        with self._lock:
            request, self._request = self._request, None
        if request is None:
            raise CallEnded()
        return request

    def _attach_buffers(self, buffers: tuple[Any, ...]) -> bool:
        """Send ``buffers`` with the answer (see :func:`vyra_base_ipc.attach_buffers`);
        False if they cannot go as shared memory on this call."""
        if not self._can_attach:
            return False
        for buffer in self._reply_buffers:  # attached again: the last call counts
            buffer.close()
        # Descriptors of their own: the handler may close its buffers on return.
        self._reply_buffers = tuple(buffer.share() for buffer in buffers)
        return True


class AsyncServicerContext(ServicerContext):
    """Context of one call, for ``async def`` handlers (on the server's event loop)."""

    async def abort(self, code: grpc.StatusCode, details: str = '',  # type: ignore[override]
                    trailing_metadata: Any = ()) -> None:
        """End the call with a non-OK status: ``await context.abort(code, details)``
        raises :class:`grpc.aio.AbortError`, as in grpc.aio.

        :raises grpc.aio.AbortError: always.
        """
        raise self._abort_status(code, details, trailing_metadata)

    async def abort_with_status(self, status: grpc.Status) -> None:  # type: ignore[override]
        raise self._abort_status(status.code, status.details,
                                 getattr(status, 'trailing_metadata', ()))

    def details(self) -> str:
        """The details set, ``''`` before any, as grpc.aio's context says it."""
        return self._details or ''

    async def send_initial_metadata(self, initial_metadata: Any) -> None:  # type: ignore[override]
        """A coroutine, as in grpc.aio; otherwise as :meth:`ServicerContext.send_initial_metadata`."""
        ServicerContext.send_initial_metadata(self, initial_metadata)

    async def write(self, message: Any) -> None:  # type: ignore[override]
        """Send one response message of a response-streaming call; waits while
        the client does not keep up.

        :raises RuntimeError: the method does not stream responses.
        """
        if self._writer is None:
            raise RuntimeError(f'{self._method} does not stream responses: write() is not available')
        await self._writer(message)
