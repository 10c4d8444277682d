"""The context a ``def`` handler gets on the gRPC lane.

Such a handler runs in one of the server's handler threads, started by
:mod:`vyra_base_ipc._def_handlers` from an ``async def`` that grpc.aio runs
(not by grpc.aio, whose thread-pool handlers are told nothing of a client
that leaves: grpc/grpc#25327). This context is grpc.aio's context of that
call, made usable from the thread, with what the fast lane's context has:

- ``abort()``, ``abort_with_status()``, ``send_initial_metadata()`` and
  ``write()`` run on the event loop; the thread waits until they are done
  (``abort`` then raises ``grpc.aio.AbortError``, as grpc.aio's own does).
- ``is_active()``, ``cancelled()``, ``done()``, ``add_callback()`` and
  ``add_done_callback()`` follow the call's end: the handler finished, the
  client left, the deadline passed, or the server stopped.
- ``code()`` and ``details()`` tell what the handler set.

Everything else (``invocation_metadata()``, ``time_remaining()``, ``peer()``...)
is grpc.aio's context; ``set_trailing_metadata()`` too, its binary values
checked first (see :func:`~._status_details.checked_trailer`).
"""

from __future__ import annotations

import asyncio
from concurrent import futures
import logging
import threading
from typing import Any, Callable, Coroutine, TypeVar

import grpc

from ._handler_threads import CallEnded
from ._log_limit import log_limited
from ._status_details import checked_trailer

__all__ = ['CheckedTrailer', 'SyncContext', 'abort_code']

_T = TypeVar('_T')
_logger = logging.getLogger(__name__)
#: How often a handler thread waiting for the loop looks whether its call ended.
_POLL_SECONDS = 0.1


def abort_code(code: Any) -> Any:
    """The code an ``abort(code)`` sends: OK is taken for UNKNOWN (logged),
    as grpc's synchronous server and the fast lane take it; grpc.aio answered
    nothing, its caller waiting for the deadline."""
    if code is grpc.StatusCode.OK or (type(code) is int and code == 0):
        log_limited(_logger, logging.ERROR, 'abort with OK',  # (at most one in 10 s)
                    'abort() called with StatusCode.OK; answering UNKNOWN')
        return grpc.StatusCode.UNKNOWN
    return code


class CheckedTrailer:
    """Base of the contexts that stand in for grpc.aio's (``_context``), a
    ``def`` handler's and an ``async def`` one's: ``set_trailing_metadata()``
    checks the trailer first."""

    __slots__ = ()
    _context: Any

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        """grpc.aio's, but that a ``str`` under a ``-bin`` key raises
        ``TypeError`` here (:func:`~._status_details.checked_trailer`)."""
        self._context.set_trailing_metadata(checked_trailer(trailing_metadata))


class SyncContext(CheckedTrailer):
    """A ``def`` handler's context (see the module docstring).

    :param context: grpc.aio's context of the call.
    :param loop: the event loop serving the call.
    :param send: hands a response message to the loop and returns once it is
        written (``write()`` and the messages a stream handler yields);
        ``None`` for a method answering one message.
    """

    def __init__(self, context: Any, loop: asyncio.AbstractEventLoop,
                 send: Callable[[Any], None] | None = None) -> None:
        self._context = context
        self._loop = loop
        self._send = send
        self._code: Any = None
        self._details: str | None = None
        self._abort_error: BaseException | None = None
        self._lock = threading.Lock()
        self._ended = False
        self._left = False
        self._waiting: futures.Future[Any] | None = None  # what the handler's thread waits for
        self._callbacks: list[Callable[[], Any]] = []
        self._done_callbacks: list[Callable[[Any], Any]] = []

    def __getattr__(self, name: str) -> Any:
        if name == 'read':  # a coroutine of grpc.aio's: it would not run from here
            raise AttributeError("a def handler's context has no read(): iterate over the request iterator")
        return getattr(self._context, name)

    # -- status ----------------------------------------------------------------------

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        self._details = details
        self._context.set_details(details)

    def code(self) -> Any:
        return self._code

    def details(self) -> str | None:
        return self._details

    def abort(self, code: grpc.StatusCode, details: str = '', trailing_metadata: Any = ()) -> None:
        """End the call with ``code`` and ``details`` now (without details of
        its own: those set before, as grpc sends). OK is taken for UNKNOWN, as
        grpc's synchronous server and the fast lane take it (grpc.aio sent no
        answer at all).

        :raises grpc.aio.AbortError: always, to end the handler.
        :raises CallEnded: instead, once the call has ended or its deadline
            has passed (nothing is sent: the client's status is grpc's).
        """
        code, trailing_metadata = abort_code(code), checked_trailer(trailing_metadata)
        self._code, self._details = code, details or self._details
        try:
            self.on_loop(self._context.abort(code, details, trailing_metadata))
        except grpc.aio.AbortError as error:
            self._abort_error = error
            raise

    def abort_with_status(self, status: grpc.Status) -> None:
        """:meth:`abort` with a :class:`grpc.Status`."""
        self.abort(status.code, status.details, getattr(status, 'trailing_metadata', ()))

    def send_initial_metadata(self, initial_metadata: Any) -> None:
        """Send ``initial_metadata`` now; returns once it is sent.

        :raises CallEnded: the call has ended, or its deadline has passed.
        """
        self.on_loop(self._context.send_initial_metadata(initial_metadata))

    def write(self, message: Any) -> None:
        """Send ``message`` on a response-streaming call; returns once it is
        written.

        :raises grpc.aio.AbortError: the handler aborted this call before.
        :raises CallEnded: the call has ended.
        """
        if self._send is None:
            raise RuntimeError('write() is for methods that stream responses')
        if self._abort_error is not None:  # nothing after an abort is sent
            raise self._abort_error
        self._send(message)

    # -- the call's end --------------------------------------------------------------

    def is_active(self) -> bool:
        """Whether the call still runs: not ended and not past its deadline."""
        if self._ended:
            return False
        remaining = self._context.time_remaining()
        return remaining is None or remaining > 0

    def cancelled(self) -> bool:
        """Whether the call was cancelled (client gone, server stopping) or
        its deadline passed."""
        if self._left:
            return True
        remaining = self._context.time_remaining()
        return remaining is not None and remaining <= 0

    def done(self) -> bool:
        """Whether the call has ended, or its deadline has passed (before
        grpc's timer ends it: a handler that saw ``is_active()`` turn False at
        its deadline sees ``done()`` True too)."""
        return self._ended or self.cancelled()

    def add_callback(self, callback: Callable[[], Any]) -> bool:
        """Call ``callback()`` (in the server's event loop thread) when the
        call ends for any reason. Returns ``False`` if it has already ended."""
        with self._lock:
            if self._ended:
                return False
            self._callbacks.append(callback)
            return True

    def add_done_callback(self, callback: Callable[[Any], Any]) -> None:
        """Call ``callback(context)`` when the call ends (at once if it has)."""
        with self._lock:
            if not self._ended:
                self._done_callbacks.append(callback)
                return
        self._run(callback, self)

    # -- for the handler's runner ------------------------------------------------------

    def finish(self, left: bool) -> None:
        """Mark the call ended (``left``: before its handler finished) and run
        the callbacks; only the first end counts."""
        with self._lock:
            if self._ended:
                return
            self._ended, self._left = True, left
            callbacks, self._callbacks = self._callbacks, []
            done_callbacks, self._done_callbacks = self._done_callbacks, []
        waiting = self._waiting
        if left and waiting is not None:
            # Its thread goes on now (CallEnded), not at its next look: a
            # stream's message the client never took is never written.
            waiting.cancel()
        for callback in callbacks:
            self._run(callback)
        for done_callback in done_callbacks:
            self._run(done_callback, self)

    def wait(self, future: futures.Future[_T]) -> _T:
        """The result of ``future`` (work on the loop for this call), waited
        for in the handler's thread; :meth:`finish` cancels it when the call
        ends first.

        :raises CallEnded: the call ended first, or the server's event loop
            stopped (``future`` is cancelled).
        """
        self._waiting = future
        try:
            if self._left:  # (it ended before finish() could see the future)
                future.cancel()
            while True:
                try:
                    return future.result(_POLL_SECONDS)
                except futures.CancelledError:
                    raise CallEnded() from None
                except futures.TimeoutError:
                    if self._left or not self._loop.is_running():  # (a loop that died answers nothing)
                        future.cancel()
                        raise CallEnded() from None
        finally:
            self._waiting = None

    def on_loop(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coroutine`` (work on grpc.aio's context) on the loop and wait
        for its result (see :meth:`wait`); not once the call has ended, nor
        once its deadline has passed: grpc never completes an operation
        started on a call it has ended, and it kept that operation's future
        for ever (one per such abort or initial metadata of a handler whose
        client had left); one started as grpc core ended the call at its
        deadline, before the loop knew, raised grpc's ``ExecuteBatchError``.

        :raises CallEnded: the call has ended, or its deadline has passed
            (before it ran, too).
        """
        guarded = self._unless_ended(coroutine)
        try:
            future = asyncio.run_coroutine_threadsafe(guarded, self._loop)
        except RuntimeError:  # the loop is closed
            guarded.close()
            coroutine.close()
            raise CallEnded() from None
        return self.wait(future)

    async def _unless_ended(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        # On the loop, where the call's end is marked: the check and the start
        # of grpc's operation are one step of it. Past its deadline the call
        # has ended too: grpc core ends it then, and its word of that reaches
        # the loop after whatever is queued there already (this, say).
        if self._ended or self._context.time_remaining() == 0:
            coroutine.close()
            raise CallEnded()
        try:
            return await coroutine
        except grpc.aio.InternalError:  # (ExecuteBatchError) grpc core had ended the call all the same
            raise CallEnded() from None

    def _run(self, callback: Callable[..., Any], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log_limited(_logger, logging.ERROR, 'def callback raised',  # (at most one in 10 s)
                        'callback of a def handler raised', exc_info=True)
