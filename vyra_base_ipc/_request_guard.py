"""The gRPC lane's handlers guarded against undecodable requests and exits.

grpc.aio lets a deserializer's exception escape: the caller gets UNKNOWN
("Unexpected <class 'DecodeError'>") and the server logs a traceback for every
such request. Here each handler of a registered service gets a deserializer
that never raises and a guard that aborts with INVALID_ARGUMENT, naming the
method and message type, before the user's handler could see the request.

grpc.aio catches only ``Exception`` from a handler: a ``SystemExit`` (a
``sys.exit()`` in a command) or ``KeyboardInterrupt`` leaves its task and
ends the server's event loop, silently, and every call after it hangs. The
guard answers such a call UNKNOWN like any other exception, in grpc.aio's
words, logs it, and the server serves on (the fast lane does the same). So it
answers what grpc.aio would answer with nothing, its caller waiting for the
deadline: a handler's own ``CancelledError`` (CANCELLED; UNKNOWN from a
``def`` handler), an exception whose ``str()`` raises, an ``AbortError``
raised by hand (see :func:`_answer`).

A ``def`` handler becomes an ``async def`` that runs it in the server's
handler threads (:mod:`vyra_base_ipc._def_handlers`), told when its call
ends, so that every guard here is one for ``async def`` handlers.

grpc.aio sends no status at all for a unary call whose request stream ends
without a complete message (it takes that for a cancellation): the call
stays open until its deadline, or without one until the connection closes.
:func:`reading_one_request` has such methods read their request themselves
and answer that call UNIMPLEMENTED, gRPC's code for a request cardinality
violation (``doc/statuscodes.md``), in the words of grpc's synchronous
server.
"""

from __future__ import annotations

import asyncio
from concurrent import futures
import inspect
import logging
from typing import Any, AsyncIterator, Callable, Mapping

import grpc

from ._call_duration import exceeded_details
from ._deadline import within
from ._def_handlers import in_handler_threads
from ._log_limit import log_limited
from ._methods import stream_returned
from ._status_details import checked_trailer
from ._sync_context import CheckedTrailer, abort_code

__all__ = ['HANDLER_EXITS', 'HANDLER_FAILURES', 'guard_handlers', 'reading_one_request',
           'unexpected_details']

#: What a handler may raise that asyncio does not keep inside its task.
HANDLER_EXITS = (SystemExit, KeyboardInterrupt)
#: What fails a handler's (or a user hook's) call: an exception, or an exit
#: that would otherwise leave the task and end the server's event loop.
HANDLER_FAILURES = (Exception, *HANDLER_EXITS)

_logger = logging.getLogger(__name__)

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class _Undecodable:
    """Stands in for a request whose bytes did not decode."""

    __slots__ = ('details',)

    def __init__(self, details: str) -> None:
        self.details = details


def guard_handlers(service: str, handlers: Mapping[str, grpc.RpcMethodHandler], executor: futures.Executor
                   ) -> dict[str, grpc.RpcMethodHandler]:
    """Return ``handlers`` with decoding failures answered INVALID_ARGUMENT,
    exits (:data:`HANDLER_EXITS`) answered UNKNOWN, and ``def`` handlers run
    in ``executor``."""
    return {name: _guard(f'/{service}/{name}', handler, executor) for name, handler in handlers.items()}


def _guard(path: str, handler: grpc.RpcMethodHandler, executor: futures.Executor) -> grpc.RpcMethodHandler:
    deserialize = handler.request_deserializer
    streaming = (bool(handler.request_streaming), bool(handler.response_streaming))
    behaviour = getattr(handler, _FACTORIES[streaming].__name__.replace('_rpc_method_handler', ''))
    if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
        behaviour = in_handler_threads(behaviour, executor, _failing(path),
                                       request_streaming=streaming[0], response_streaming=streaming[1])
    behaviour = _guard_exits(path, behaviour, streaming[1])
    if deserialize is not None:
        behaviour = (_guard_streaming_requests if handler.request_streaming else _guard_request)(behaviour)
        deserialize = _tolerant(path, deserialize)
    return _FACTORIES[streaming](behaviour, request_deserializer=deserialize,
                                 response_serializer=handler.response_serializer)


def reading_one_request(path: str, handler: grpc.RpcMethodHandler, max_call_duration: float | None = None
                        ) -> grpc.RpcMethodHandler:
    """``handler`` of the method ``path``, if it takes one request and is
    ``async def``, as one that takes the request stream and reads its first
    message itself: a call whose stream ends without one is answered
    UNIMPLEMENTED '"``path``" requires exactly one request message.', as
    grpc's synchronous server answers it, where grpc.aio answered nothing. The
    method's clients see no difference; a message after the first is not
    read, as grpc.aio does not read it. Any other ``handler`` is returned as
    it is.

    With ``max_call_duration``, a call of a method with one response that
    came without a deadline and whose request does not arrive whole within
    that many seconds (a peer that sends none, or part of one, and keeps the
    stream open) ends DEADLINE_EXCEEDED, as its handler would be ended
    (:mod:`~vyra_base_ipc._call_duration`, whose bound starts once the
    request is read)."""
    if handler.request_streaming:
        return handler
    bound = None if handler.response_streaming else max_call_duration
    factory = grpc.stream_stream_rpc_method_handler if handler.response_streaming \
        else grpc.stream_unary_rpc_method_handler
    behaviour = handler.unary_stream if handler.response_streaming else handler.unary_unary
    reading: Callable[..., Any]
    # The read is spelled out in both: a helper coroutine would add a frame to every call.
    if inspect.isasyncgenfunction(behaviour):
        async def reading_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
            request = await context.read()
            if request is grpc.aio.EOF:
                await _no_request(path, context)
            responses = behaviour(request, context)
            try:
                async for response in responses:
                    yield response
            finally:
                await responses.aclose()
        reading = reading_stream
    elif inspect.iscoroutinefunction(behaviour):  # a unary answer, or a stream it writes
        async def reading_call(requests: Any, context: Any) -> Any:
            if bound is None or context.time_remaining() is not None:
                request = await context.read()
            else:
                request = await _read_within(context, bound)
            if request is grpc.aio.EOF:
                await _no_request(path, context)
            return await behaviour(request, context)
        reading = reading_call
    else:
        return handler
    return factory(reading, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


async def _read_within(context: Any, seconds: float) -> Any:
    """``context.read()``; the call aborted DEADLINE_EXCEEDED if that takes ``seconds``.

    :raises grpc.aio.AbortError: it did.
    """
    try:
        return await within(context.read(), seconds)
    except TimeoutError:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, exceeded_details(seconds))


async def _no_request(path: str, context: Any) -> None:
    """Answer a call of ``path`` whose request stream ended without a message.

    :raises grpc.aio.AbortError: always.
    """
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f'"{path}" requires exactly one request message.')


def unexpected_details(error: BaseException) -> str:
    """The details grpc.aio gives a call whose handler raised ``error``:
    ``Unexpected <class '...'>: `` and its ``str()``; for an exception whose
    ``str()`` raises, words saying so (grpc.aio then sent no status at all,
    and its caller waited for the deadline)."""
    try:
        words = str(error)
    except Exception as failure:
        words = f'<str() of the exception raised {type(failure).__name__}>'
    return f'Unexpected {type(error)}: {words}'


def _exited(path: str, error: BaseException) -> str:
    """Log a handler's exception (limited: :func:`~._log_limit.log_limited`);
    the details grpc.aio gives it."""
    log_unexpected(_logger, path, error)
    return unexpected_details(error)


def log_unexpected(logger: logging.Logger, path: str, error: BaseException) -> None:
    """Log, in grpc.aio's words, that the handler of ``path`` raised
    ``error``: the first of a kind (method and exception type) with its
    traceback, then at most one a kind every 10 s, with how many were not
    (a peer chooses how often a handler fails on its input)."""
    kind = type(error)
    log_limited(logger, logging.ERROR, ('servicer raised', path, kind.__module__, kind.__qualname__),
                'Unexpected [%s] raised by servicer method [%s]', kind.__name__, path, exc_info=error,
                stacklevel=2)  # (the place: where the exception was caught)


def _failed_code(context: Any) -> Any:
    """The status of a call whose handler raised: the code it set before
    (a ``grpc.StatusCode`` or its number), else UNKNOWN, as grpc.aio takes it."""
    code = context.code()
    if code is None or code == 0 or code is grpc.StatusCode.OK:
        return grpc.StatusCode.UNKNOWN
    return code


def _unanswered(error: Exception, context: Any) -> bool:
    """Whether grpc.aio would not answer a handler's ``error`` as it answers
    an exception (UNKNOWN, or the code set before, with its words): one whose
    ``str()`` raises, which it answers with nothing; an ``AbortError`` the
    handler raised itself, not through ``abort()`` (no code set), which it
    answers "Unexpected <class 'AssertionError'>: Abort error has been replaced!"."""
    if isinstance(error, grpc.aio.AbortError) and context.code() is None:
        return True
    try:
        str(error)
    except Exception:
        return True
    return False


def _cancelled_from_outside() -> bool:
    """Whether the running task is being cancelled (grpc.aio ending the
    call), not a handler raising ``CancelledError`` of its own (an inner
    task's, say), which grpc.aio would take for the call's end and answer
    with nothing."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


async def _answer(path: str, context: Any, error: BaseException) -> None:
    """Answer what a handler raised, if grpc.aio would not answer it as an
    exception (the call's own end passes: the caller re-raises it): an exit
    (:data:`HANDLER_EXITS`) UNKNOWN, a ``CancelledError`` of the handler's
    own CANCELLED (as the fast lane answers it), and what
    :func:`_unanswered` tells.

    :raises grpc.aio.AbortError: it answered.
    """
    if isinstance(error, HANDLER_EXITS):
        await context.abort(grpc.StatusCode.UNKNOWN, _exited(path, error))
    elif isinstance(error, asyncio.CancelledError):
        if not _cancelled_from_outside():
            await context.abort(grpc.StatusCode.CANCELLED, 'Cancelled')
    elif isinstance(error, Exception) and (not isinstance(error, grpc.aio.BaseError)
                                           or _unanswered(error, context)):
        # Answered here as grpc.aio answers it, for the log: grpc.aio logs
        # every one, at the rate a peer makes a handler fail (150 calls, 150
        # tracebacks); _exited() limits them. grpc.aio's own errors (an abort,
        # a write after the client left, the server's stop) are left to it.
        details = _exited(path, error)
        try:
            await context.abort(_failed_code(context), details)
        except grpc.aio.AbortError:
            raise
        except grpc.aio.BaseError:
            return  # (the call had ended: grpc.aio takes the error as before)


class _AsyncContext(CheckedTrailer):
    """grpc.aio's context of an ``async def`` handler, but that ``abort()``
    with OK aborts UNKNOWN, as grpc's synchronous server and the fast lane
    answer it: grpc.aio answered nothing, its caller waiting for the deadline
    (for a watch without one, for ever); and that ``set_trailing_metadata()``
    checks the trailer first (:class:`~._sync_context.CheckedTrailer`)."""

    __slots__ = ('_context',)

    def __init__(self, context: Any) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = '', trailing_metadata: Any = ()) -> None:
        await self._context.abort(abort_code(code), details, checked_trailer(trailing_metadata))

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details, status.trailing_metadata)


def _failing(path: str) -> Callable[[BaseException, Any], None]:
    """How the thread of a ``def`` handler of ``path`` answers what its
    handler raised that is not handed over to the loop (an exit, a
    ``CancelledError`` of its own, ``StopIteration``...: see
    :func:`~vyra_base_ipc._def_handlers._handed_over`): as any exception,
    UNKNOWN or the code set before, as on the fast lane."""
    def fail(error: BaseException, context: Any) -> None:
        context.abort(_failed_code(context), _exited(path, error))
    return fail


def _guard_exits(path: str, behaviour: Callable[..., Any], streams: bool) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):
        async def guarded_stream(argument: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for response in behaviour(argument, _AsyncContext(context)):
                    yield response
            except BaseException as error:
                await _answer(path, context, error)
                raise
        return guarded_stream

    async def guarded(argument: Any, context: Any) -> Any:
        try:
            result = await behaviour(argument, _AsyncContext(context))
            if streams and result is not None:  # (grpc.aio drops it: the stream ends OK, empty)
                raise stream_returned(path, result)
            return result
        except BaseException as error:
            await _answer(path, context, error)
            raise
    return guarded


def _tolerant(path: str, deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message_type = getattr(getattr(deserialize, '__self__', None), 'DESCRIPTOR', None)
    type_name = getattr(message_type, 'full_name', 'the request message')

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as error:  # DecodeError, or whatever a custom deserializer raises
            return _Undecodable(f'{path}: the request is not a valid {type_name}: {error}')
    return decode


def _guard_request(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):
        async def guarded_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if type(request) is _Undecodable:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
            async for response in behaviour(request, context):
                yield response
        return guarded_stream

    async def guarded(request: Any, context: Any) -> Any:
        if type(request) is _Undecodable:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
        return await behaviour(request, context)
    return guarded


def _guard_streaming_requests(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def checked(requests: Any, context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            if type(request) is _Undecodable:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
            yield request

    if inspect.isasyncgenfunction(behaviour):
        async def guarded_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
            async for response in behaviour(checked(requests, context), context):
                yield response
        return guarded_stream

    async def guarded(requests: Any, context: Any) -> Any:
        return await behaviour(checked(requests, context), context)
    return guarded
