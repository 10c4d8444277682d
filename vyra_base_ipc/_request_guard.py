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
words, logs it, and the server serves on (the fast lane does the same).

A ``def`` handler becomes an ``async def`` that runs it in the server's
handler threads (:mod:`vyra_base_ipc._def_handlers`), told when its call
ends, so that every guard here is one for ``async def`` handlers.
"""

from __future__ import annotations

from concurrent import futures
import inspect
import logging
from typing import Any, AsyncIterator, Callable, Mapping

import grpc

from ._def_handlers import in_handler_threads

__all__ = ['HANDLER_EXITS', 'HANDLER_FAILURES', 'guard_handlers']

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
        behaviour = in_handler_threads(behaviour, executor, request_streaming=streaming[0],
                                       response_streaming=streaming[1])
    behaviour = _guard_exits(path, behaviour)
    if deserialize is not None:
        behaviour = (_guard_streaming_requests if handler.request_streaming else _guard_request)(behaviour)
        deserialize = _tolerant(path, deserialize)
    return _FACTORIES[streaming](behaviour, request_deserializer=deserialize,
                                 response_serializer=handler.response_serializer)


def _exited(path: str, error: BaseException) -> str:
    """Log a handler's exit; the details grpc.aio gives an exception."""
    _logger.error('Unexpected [%s] raised by servicer method [%s]', type(error).__name__, path,
                  exc_info=error)
    return f'Unexpected {type(error)}: {error}'


def _guard_exits(path: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):
        async def guarded_stream(argument: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for response in behaviour(argument, context):
                    yield response
            except HANDLER_EXITS as error:
                await context.abort(grpc.StatusCode.UNKNOWN, _exited(path, error))
        return guarded_stream

    async def guarded(argument: Any, context: Any) -> Any:
        try:
            return await behaviour(argument, context)
        except HANDLER_EXITS as error:
            await context.abort(grpc.StatusCode.UNKNOWN, _exited(path, error))
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
