"""Interceptors, server and client: one hook API on both lanes, and the
per-call bookkeeping (metrics, then interceptors) every call of a module's
own services goes through on the server.

A :class:`ServerInterceptor` sees each call twice: when it starts, before
the handler runs (it may refuse the call by raising :class:`CallRejected`),
and when it ends, with its status and duration. The fast lane calls both
hooks from its call lifecycle, the gRPC lane from a wrapper around each
handler (see :mod:`vyra_base_ipc._grpc_observe`); what an interceptor sees
is the same on both. Health, reflection and introspection are not
intercepted: tools must reach them whatever a module's rules say.

A :class:`ClientInterceptor` sees each call of an ``IPCHandler`` or
``SyncIPCHandler`` the same way: before anything is sent (it may add
metadata, or refuse the call) and once it has ended, on whichever lane.
"""

from __future__ import annotations

import asyncio
from concurrent import futures
import contextlib
from dataclasses import dataclass, field
import functools
import inspect
import logging
import time
from typing import Any, Iterable, Iterator, Sequence, TypeVar, Union

import grpc

from ._log_limit import log_limited
from ._metrics import MethodMetrics, ServerMetrics
from ._peer import PeerCredentials
from ._request_guard import HANDLER_FAILURES
from .exceptions import CallRejected, IPCError, error_from_status

__all__ = ['CallObserver', 'ClientCall', 'ClientInterceptor', 'Observation', 'ServerCall',
           'ServerInterceptor', 'checked_interceptors', 'intercepted_call']

_logger = logging.getLogger(__name__)

#: How a call ends when its caller leaves it: the task cancelled, the
#: stream closed early, Ctrl-C.
_LEFT = (GeneratorExit, KeyboardInterrupt, asyncio.CancelledError, futures.CancelledError)


@dataclass(frozen=True)
class ServerCall:
    """One call as an interceptor sees it.

    :ivar method: full method path, ``/vyra.ipc.ModuleService/ExecuteCommand``.
    :ivar lane: ``"grpc"`` or ``"ttrpc"`` (the fast lane).
    :ivar metadata: the client's metadata as ``(key, value)`` pairs.
    :ivar peer: the client process (pid, uid, gid, groups) on the fast lane;
        ``None`` on the gRPC lane, whose runtime does not tell (its groups
        ``None`` where the kernel does not tell them).
    :ivar deadline: ``time.monotonic()`` value at which the call expires,
        ``None`` without a deadline.
    :ivar context: the handler's servicer context, to read. A hook refuses a
        call by raising :class:`CallRejected`, never with ``context.abort()``:
        a coroutine for ``async def`` handlers and on the gRPC lane, which a
        hook cannot await (the call would go on as if nothing happened).
    """

    method: str
    lane: str
    metadata: tuple[tuple[str, str | bytes], ...]
    peer: PeerCredentials | None
    deadline: float | None
    context: Any

    @property
    def service(self) -> str:
        """The full service name, ``vyra.ipc.ModuleService``."""
        return self.method.split('/')[1]


class ServerInterceptor:
    """Override either hook; both run for every call of the server's own
    services on both lanes, on the server's event loop (``def`` handlers'
    calls too), so they must not block: a hook that waits holds up every
    call of the server.

    Exceptions other than :class:`CallRejected` are logged and ignored:
    a broken interceptor does not fail calls.
    """

    def call_started(self, call: ServerCall) -> None:
        """Called before the handler runs. Raise :class:`CallRejected` to
        refuse the call with that status (the handler then never runs)."""

    def call_ended(self, call: ServerCall, code: grpc.StatusCode, details: str, duration: float) -> None:
        """Called once the call has ended: its status and how long it took, in seconds."""


class Observation:
    """One call between its start and its end (see :meth:`CallObserver.start`)."""

    __slots__ = ('observer', 'metrics', 'started', 'call', 'interceptors')

    def __init__(self, observer: 'CallObserver', metrics: MethodMetrics | None, call: ServerCall | None
                 ) -> None:
        self.observer = observer
        self.metrics = metrics
        self.call = call
        self.started = 0.0
        #: The interceptors whose call_started saw the call: they, and only
        #: they, see it end (one that refused it stops the others seeing it).
        self.interceptors = observer.interceptors

    def end(self, code: int, details: str) -> None:
        """The call ended with status number ``code``."""
        metrics = self.metrics
        if metrics is not None:
            metrics.ended(self.started, code)
        if self.call is not None:
            _server_ended(self.interceptors, self.call, code, details, self.started)


class CallObserver:
    """Metrics and interceptors of one server: what both lanes call at the
    start and the end of each call."""

    def __init__(self, metrics: ServerMetrics | None, interceptors: Sequence[ServerInterceptor]) -> None:
        self.metrics = metrics
        self.interceptors = tuple(interceptors)
        #: ``time.monotonic()`` from which a stopping server cancels the
        #: calls still running (its grace over), ``None`` while it serves:
        #: grpc.aio answers those UNAVAILABLE, and the gRPC lane's wrapper
        #: sees only its handler cancelled.
        self.cancels_all_at: float | None = None

    def method_metrics(self, method: str, lane: str) -> MethodMetrics | None:
        """The counters a call of ``method`` on ``lane`` updates, if metrics are on."""
        if self.metrics is None:
            return None
        return self.metrics.method(method, lane)

    def start(self, metrics: MethodMetrics | None, method: str, lane: str, context: Any,
              peer: PeerCredentials | None, deadline: float | None) -> Observation:
        """A call starts: count it, then ask the interceptors.

        :raises CallRejected: an interceptor refused the call; it is
            counted as ended with that status already.
        """
        call = None
        if self.interceptors:
            call = ServerCall(method, lane, tuple(context.invocation_metadata() or ()), peer, deadline,
                              context)
        observation = Observation(self, metrics, call)
        if metrics is not None:
            observation.started = metrics.started()
        else:
            observation.started = time.perf_counter()
        if call is not None:
            for index, interceptor in enumerate(self.interceptors):
                try:
                    interceptor.call_started(call)
                except CallRejected as rejection:
                    # As in a chain of grpc interceptors: those after it never see the call.
                    observation.interceptors = self.interceptors[:index + 1]
                    observation.end(rejection.code.value[0], rejection.details)
                    raise
                except HANDLER_FAILURES:  # (an exit too: it would end the server's event loop)
                    _failed(interceptor, 'call_started', method)
        return observation


def _server_ended(interceptors: Sequence[ServerInterceptor], call: ServerCall, code: int, details: str,
                  started: float) -> None:
    duration = time.perf_counter() - started
    status = _STATUS_CODES.get(code, grpc.StatusCode.UNKNOWN)
    for interceptor in interceptors:
        try:
            interceptor.call_ended(call, status, details, duration)
        except HANDLER_FAILURES:
            _failed(interceptor, 'call_ended', call.method)


_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _failed(interceptor: object, hook: str, method: str, side: str = '') -> None:
    """Log that ``interceptor``'s ``hook`` raised (in an ``except``): the first
    of an interceptor's hook with its traceback, then at most one every 10 s
    (:func:`~._log_limit.log_limited`): a hook that fails on what calls carry
    fails at their rate."""
    log_limited(_logger, logging.ERROR, ('interceptor failed', type(interceptor), hook, side),
                '%sinterceptor %r failed in %s of %s', side, interceptor, hook, method, exc_info=True,
                stacklevel=2)


# -- clients ------------------------------------------------------------------------


@dataclass
class ClientCall:
    """One call of a client as its interceptors see it.

    :ivar method: full method path, ``/vyra.ipc.ModuleService/ExecuteCommand``.
    :ivar metadata: the metadata to send; ``call_started`` may add to it.
    :ivar deadline: ``time.monotonic()`` value at which the call expires,
        ``None`` without a deadline.
    :ivar lane: ``"grpc"`` or ``"ttrpc"`` once the call has a lane (in
        ``call_ended``; ``None`` if it failed before one was chosen).
    """

    method: str
    metadata: list[tuple[str, Union[str, bytes]]]
    deadline: float | None
    lane: str | None = None
    started: float = field(default=0.0, repr=False)


class ClientInterceptor:
    """Override either hook; both run for every call of the client they are
    given to (``IPCHandler(..., interceptors=[...])``), in the calling
    thread or task. Exceptions other than :class:`CallRejected` raised by a
    hook are logged and ignored.
    """

    def call_started(self, call: ClientCall) -> None:
        """Called before anything is sent. Append to ``call.metadata`` to
        send more; raise :class:`CallRejected` to fail the call at once with
        the :class:`~vyra_base_ipc.IPCError` that status maps to."""

    def call_ended(self, call: ClientCall, code: grpc.StatusCode, details: str, duration: float) -> None:
        """Called once the call has ended (for a stream: the caller stopped
        iterating): its status and how long it took, in seconds."""


_Interceptor = TypeVar('_Interceptor', ServerInterceptor, ClientInterceptor)


def checked_interceptors(interceptors: Iterable[_Interceptor] | None, kind: type[_Interceptor]
                         ) -> tuple[_Interceptor, ...]:
    """``interceptors`` as a tuple, each checked to be a ``kind`` whose hooks
    are plain functions.

    Hooks are called and never awaited: an ``async def`` hook would only make
    a coroutine that never runs, so a refusal it raises would let every call
    through (Python's "never awaited" warning aside). Refused here, at once.

    :raises TypeError: ``None``, an object that is not a ``kind``, or an
        ``async def`` hook (named).
    """
    if interceptors is None:
        raise TypeError(f'interceptors must be a sequence of {kind.__name__} objects, not None')
    checked = tuple(interceptors)
    for interceptor in checked:
        if not isinstance(interceptor, kind):
            raise TypeError(f'interceptors must be {kind.__name__} objects, not {interceptor!r}')
        for hook in ('call_started', 'call_ended'):
            if _is_async(getattr(interceptor, hook)):
                raise TypeError(
                    f'{type(interceptor).__qualname__}.{hook} is an async def: interceptor hooks are called, '
                    "never awaited (they run on the server's event loop or in the caller's thread or task, "
                    'and must not block), so it would never run; make it a def')
    return checked


def _is_async(hook: Any) -> bool:
    """Whether calling ``hook`` makes a coroutine or an async generator: an
    ``async def`` function or method, a :func:`functools.partial` of one, or
    an object whose ``__call__`` is one."""
    while isinstance(hook, functools.partial):
        hook = hook.func  # (inspect unwraps partials of functions, not of callable objects)
    return any(inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function)
               for function in (hook, type(hook).__call__ if callable(hook) else None))


@contextlib.contextmanager
def intercepted_call(interceptors: Sequence[ClientInterceptor], call: ClientCall) -> Iterator[ClientCall]:
    """Run ``call_started`` of each interceptor, then the body (the call),
    then ``call_ended`` with the status the body ended with: OK, the
    :class:`~vyra_base_ipc.IPCError`'s, CANCELLED when the caller left (task
    cancelled, stream closed early), UNKNOWN for anything else.

    :raises IPCError: an interceptor refused the call (with its status).
    """
    call.started = time.perf_counter()
    for index, interceptor in enumerate(interceptors):
        try:
            interceptor.call_started(call)
        except CallRejected as rejection:
            # Those after it never saw the call start: they do not see it end.
            _client_ended(interceptors[:index + 1], call, rejection.code, rejection.details)
            raise error_from_status(rejection.code, rejection.details, method=call.method,
                                    status_details=rejection.status_details) from None
        except Exception:
            _failed(interceptor, 'call_started', call.method, 'client ')
    try:
        yield call
    except IPCError as error:
        _client_ended(interceptors, call, error.code, error.details)
        raise
    except _LEFT:
        _client_ended(interceptors, call, grpc.StatusCode.CANCELLED, 'the caller left the call')
        raise
    except BaseException as error:
        _client_ended(interceptors, call, grpc.StatusCode.UNKNOWN, f'{type(error).__name__}: {error}')
        raise
    _client_ended(interceptors, call, grpc.StatusCode.OK, '')


def _client_ended(interceptors: Sequence[ClientInterceptor], call: ClientCall, code: grpc.StatusCode,
                  details: str) -> None:
    duration = time.perf_counter() - call.started
    for interceptor in interceptors:
        try:
            interceptor.call_ended(call, code, details, duration)
        except Exception:
            _failed(interceptor, 'call_ended', call.method, 'client ')

