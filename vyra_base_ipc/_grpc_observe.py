"""The gRPC lane's calls under the server's metrics and interceptors.

grpc.aio's own server interceptors run before the handler is even chosen and
never see how a call ended, so each handler is wrapped instead: the wrapper
starts the call's :class:`~vyra_base_ipc._interceptors.Observation`, runs the
handler, and ends it with the status grpc.aio will send (the code a handler
set or aborted with, CANCELLED or DEADLINE_EXCEEDED when it was cancelled,
UNKNOWN for an exception, or the code it set before it raised). Handlers
here are ``async def`` ones (a ``def`` handler runs in a thread from one:
:mod:`vyra_base_ipc._def_handlers`). The wrapper serializes the responses itself, so that one
that does not serialize ends the observation as what grpc.aio sends for it
(UNKNOWN), not as the handler's success, and so that one over the server's
``max_message_bytes`` ends its call RESOURCE_EXHAUSTED saying so
(:mod:`vyra_base_ipc._answer_size`) at the cost of a ``len()``, not a second
serialization: grpc.aio's serializer then passes those bytes on. Every kind
of answer (a response, a yielded message, a ``context.write()``) goes
through one :class:`_Answers` of its method. Where nothing is observed (a
server without metrics and interceptors, and the tools of every server:
:mod:`vyra_base_ipc._tools`) the wrappers only check the answers. Message
sizes are counted as messages are (de)serialized.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from typing import Any, AsyncIterator, Callable, Iterator, Mapping

import grpc

from ._answer_size import answer_too_large
from ._interceptors import CallObserver, Observation
from ._log_limit import log_limited
from ._metrics import LaneMetrics, ServerMetrics
from ._request_guard import unexpected_details
from .exceptions import CallRejected

__all__ = ['UnknownMethods', 'observe_handlers']

_LANE = 'grpc'
_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
_OK = (0, '')
_UNKNOWN = grpc.StatusCode.UNKNOWN.value[0]
_logger = logging.getLogger(__name__)


def observe_handlers(service: str, handlers: Mapping[str, grpc.RpcMethodHandler],
                     observer: CallObserver | None, max_message_bytes: int
                     ) -> dict[str, grpc.RpcMethodHandler]:
    """``handlers`` of ``service`` with every call seen by ``observer``
    (if any), and every answer over ``max_message_bytes`` ended
    RESOURCE_EXHAUSTED (:func:`~._answer_size.answer_too_large`)."""
    metrics = observer.metrics if observer is not None else None
    lane = metrics.lanes.get(_LANE) if metrics is not None else None
    return {name: _observe(f'/{service}/{name}', handler, observer, lane, max_message_bytes)
            for name, handler in handlers.items()}


def _observe(path: str, handler: grpc.RpcMethodHandler, observer: CallObserver | None,
             lane: LaneMetrics | None, limit: int) -> grpc.RpcMethodHandler:
    streaming = (bool(handler.request_streaming), bool(handler.response_streaming))
    factory = _FACTORIES[streaming]
    behaviour = getattr(handler, factory.__name__.replace('_rpc_method_handler', ''))
    encode, serialize = _serializers(handler.response_serializer, lane)
    answers = _Answers(encode, path, limit)
    yields = inspect.isasyncgenfunction(behaviour)
    writes = handler.response_streaming and not yields  # (a coroutine that writes with context.write())
    deserialize = handler.request_deserializer
    if lane is not None:
        deserialize = _counting(deserialize, lane, received=True)
    metrics = observer.method_metrics(path, _LANE) if observer is not None else None
    ending: Callable[[Any, Any], contextlib.AbstractContextManager[None]] = \
        _ending if observer is not None else _unobserved

    def start(context: Any) -> Observation | None:
        if observer is None:
            return None  # (nothing observed: the answers checked alone)
        deadline = None
        if observer.interceptors:
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
        return observer.start(metrics, path, _LANE, context, None, deadline)

    if yields:
        async def observed_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                observation = start(context)
            except CallRejected as rejection:
                await context.abort(rejection.code, rejection.details, rejection.trailing_metadata())
            with ending(observation, context):
                # Closed here when this wrapper is (grpc.aio closes a stream
                # handler left while it had yielded), as if it were the handler.
                # (Its context's write() checked too: a generator may write as well.)
                sized = _SizedWrites(context, answers)
                async with contextlib.aclosing(behaviour(request, sized)) as responses:
                    async for response in responses:
                        yield await answers.encoded(response, context)
        return factory(observed_stream, request_deserializer=deserialize, response_serializer=serialize)

    async def observed(request: Any, context: Any) -> Any:
        try:
            observation = start(context)
        except CallRejected as rejection:
            await context.abort(rejection.code, rejection.details, rejection.trailing_metadata())
        with ending(observation, context):
            if writes:
                return await behaviour(request, _SizedWrites(context, answers))
            response = await behaviour(request, context)
            if _number(context.code()) is not None:
                return response  # (grpc.aio drops it: the handler set a code other than OK)
            return await answers.encoded(response, context)
    return factory(observed, request_deserializer=deserialize, response_serializer=serialize)


class UnknownMethods(grpc.GenericRpcHandler):
    """Answers every method no other handler has, as grpc.aio does
    (UNIMPLEMENTED "Method not found!"), counting it in ``metrics``
    (grpc.aio answers those itself, unseen). Added after every other handler."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        # Any shape of call: the requests, if any, are not read.
        self._handler: grpc.RpcMethodHandler = grpc.stream_stream_rpc_method_handler(self._answer)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return self._handler

    async def _answer(self, requests: Any, context: Any) -> None:
        self._metrics.unknown_method(_LANE)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, 'Method not found!')


#: (:func:`_unobserved`) Reentrant: one for every call.
_NOTHING = contextlib.nullcontext()


def _unobserved(observation: Observation | None, context: Any) -> contextlib.nullcontext[None]:
    """:func:`_ending` where nothing is observed."""
    return _NOTHING


@contextlib.contextmanager
def _ending(observation: Observation, context: Any) -> Iterator[None]:
    """End ``observation`` with the status of the handler run in the body.

    It is always ended, even if reading the status fails: a call must not
    stay in flight in the metrics (that failure is logged, the call counted
    UNKNOWN).
    """
    try:
        yield
    except BaseException as error:
        _end(observation, _failure, context, error, observation)
        raise
    _end(observation, _returned, context, observation)


def _end(observation: Observation, status: Callable[..., tuple[int, str]], *arguments: Any) -> None:
    try:
        code, details = status(*arguments)
    except Exception:
        log_limited(_logger, logging.ERROR, 'status unread',  # (at most one in 10 s)
                    'could not tell how a call of %s ended; counted as UNKNOWN',
                    observation.call.method if observation.call is not None else 'a method', exc_info=True)
        code, details = _UNKNOWN, 'the status could not be read'
    observation.end(code, details)


#: How much later than its client's the server's copy of a deadline may pass,
#: as a share of the timeout: grpc-timeout rounds it up (a 1 s or 3 s timeout
#: arrived 6-9 ms longer), so a client's cancellation at its own deadline
#: reached the server that much before the server's copy passed...
_ROUNDING = 0.01
#: ...and on top of it (time_remaining() reads the wall clock; a 0.5 s one was
#: cancelled up to 2.1 ms before it passed, on a loaded machine).
_SLACK = 0.005


def _left(context: Any, observation: Observation) -> tuple[int, str]:
    """The status of a call that ended before its handler: out of time,
    cancelled by its client, or by the server's stop once its grace ran out.
    A call cancelled within the rounding of its deadline (see :data:`_ROUNDING`)
    is taken as out of time: its client's deadline passed (grpc sends no
    reason with a cancellation)."""
    remaining = context.time_remaining()
    if remaining is not None:
        timeout = time.perf_counter() - observation.started + remaining
        if remaining <= _ROUNDING * timeout + _SLACK:
            return grpc.StatusCode.DEADLINE_EXCEEDED.value[0], 'Deadline Exceeded'
    cancels_all_at = observation.observer.cancels_all_at
    if cancels_all_at is not None and time.monotonic() >= cancels_all_at:
        return _CANCELLED_BY_STOP
    return grpc.StatusCode.CANCELLED.value[0], 'Cancelled'


#: What grpc.aio's stop answers the calls still running after the grace.
_CANCELLED_BY_STOP = (grpc.StatusCode.UNAVAILABLE.value[0], 'Cancelling all calls')


def _number(code: Any) -> int | None:
    """The number of a status ``code`` as grpc takes it (a ``grpc.StatusCode``
    or its number), ``None`` for none or OK."""
    if code is None:
        return None
    number = code.value[0] if isinstance(code, grpc.StatusCode) else int(code)
    return number or None


def _returned(context: Any, observation: Observation) -> tuple[int, str]:
    """The status of a call whose handler returned: the code it set, if
    any; but that of a call grpc.aio ended (its client left, its deadline
    passed, the stop's grace ran out) whose handler caught the cancellation
    and returned, for its client got that (it was observed OK, where the
    fast lane observes what its client got). The wrappers inside take back
    the cancellations of their own (at ``max_call_duration``, at a stop)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return _left(context, observation)
    number = _number(context.code())
    if number is None:
        return _OK
    return number, context.details() or ''


#: How a handler is ended from outside: its abort, or grpc.aio cancelling or closing it.
_ENDINGS = (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit)


def _failure(context: Any, error: BaseException, observation: Observation) -> tuple[int, str]:
    """The status grpc.aio sends for a handler that raised ``error``: an
    exception goes with the code the handler set, if it set one."""
    number = _number(context.code())
    if isinstance(error, _ENDINGS):
        # Also a stream that caught its abort and went on: grpc.aio closes
        # it (GeneratorExit) and sends the abort's status.
        if number is not None:
            return number, context.details() or ''
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return _left(context, observation)
    return number or _UNKNOWN, unexpected_details(error)


class _Encoded:
    """A response serialized by the wrapper, for the response serializer to pass on."""

    __slots__ = ('data',)

    def __init__(self, data: bytes) -> None:
        self.data = data


def _serializers(serialize: Callable[[Any], bytes] | None, lane: LaneMetrics | None
                 ) -> tuple[Callable[[Any], bytes] | None, Callable[[Any], Any] | None]:
    """``encode`` for the wrapper (``None``: the method has no serializer)
    and the serializer for grpc.aio.

    The wrapper serializes what the handler answers (:class:`_Answers`) so
    that a response that does not serialize fails inside the observation, as
    the UNKNOWN grpc.aio sends for it, and so that its size is known before
    it is sent; grpc.aio's serializer then only passes the bytes on: nothing
    is serialized twice.
    """
    if serialize is None:
        return None, None
    counted = _counting(serialize, lane, received=False) if lane is not None else serialize
    assert counted is not None

    def serializer(message: Any) -> bytes:
        if type(message) is _Encoded:
            return message.data
        return counted(message)  # (what no wrapper serialized: nothing of a method's handler)
    return counted, serializer


class _Answers:
    """How the answers of one method go to grpc.aio, the one place for
    every kind (a unary response, a yielded message, a ``context.write()``):
    each serialized here, and one over the server's ``max_message_bytes``
    ending its call RESOURCE_EXHAUSTED, saying so, instead of being sent
    (grpc core would fail the send, logging an ERROR that does not say why;
    see :mod:`vyra_base_ipc._answer_size`)."""

    __slots__ = ('_encode', '_path', '_limit')

    def __init__(self, encode: Callable[[Any], bytes] | None, path: str, limit: int) -> None:
        self._encode = encode
        self._path = path
        self._limit = limit

    async def encoded(self, message: Any, context: Any) -> Any:
        """``message`` as grpc.aio's serializer of this method passes it on:
        serialized (an :class:`_Encoded`), or as it is for a method without
        a serializer (the handler's own bytes).

        :raises grpc.aio.AbortError: (``context.abort()``) RESOURCE_EXHAUSTED:
            ``message`` is over the limit (logged, limited).
        :raises Exception: what serializing it raised.
        """
        if self._encode is None:
            encoded, size = message, len(message) if isinstance(message, (bytes, bytearray)) else 0
        else:
            data = self._encode(message)
            encoded, size = _Encoded(data), len(data)
        if size > self._limit:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                answer_too_large(self._path, size, self._limit))
        return encoded


class _SizedWrites:
    """The context of a stream handler, for its ``context.write()``s: each
    message goes through the method's :class:`_Answers`, so that one over
    the limit ends the call as a yielded one does; all else is grpc.aio's
    context."""

    __slots__ = ('_context', '_answers')

    def __init__(self, context: Any, answers: _Answers) -> None:
        self._context = context
        self._answers = answers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: Any) -> None:
        await self._context.write(await self._answers.encoded(message, self._context))


def _counting(convert: Callable[[Any], Any] | None, lane: LaneMetrics, received: bool
              ) -> Callable[[Any], Any] | None:
    if convert is None:
        return None
    if received:
        def deserialize(data: bytes) -> Any:
            lane.inline_received += len(data)
            return convert(data)
        return deserialize

    def serialize(message: Any) -> bytes:
        data = convert(message)
        lane.inline_sent += len(data)
        return data
    return serialize
