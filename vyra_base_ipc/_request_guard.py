"""Requests that cannot be decoded are answered INVALID_ARGUMENT.

grpc.aio lets a deserializer's exception escape: the caller gets UNKNOWN
("Unexpected <class 'DecodeError'>") and the server logs a traceback for every
such request. Here each handler of a registered service gets a deserializer
that never raises and a guard that aborts with INVALID_ARGUMENT, naming the
method and message type, before the user's handler could see the request.
Each handler keeps its shape (``def``, ``async def``, generators) so that
grpc.aio still runs ``def`` handlers in its thread pool.
"""

from __future__ import annotations

import inspect
from typing import Any, AsyncIterator, Callable, Iterator, Mapping

import grpc

__all__ = ['guard_handlers']

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


def guard_handlers(service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
                   ) -> dict[str, grpc.RpcMethodHandler]:
    """Return ``handlers`` with decoding failures answered INVALID_ARGUMENT."""
    return {name: _guard(f'/{service}/{name}', handler) for name, handler in handlers.items()}


def _guard(path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    deserialize = handler.request_deserializer
    if deserialize is None:
        return handler
    streaming = (handler.request_streaming, handler.response_streaming)
    behaviour = getattr(handler, _FACTORIES[streaming].__name__.replace('_rpc_method_handler', ''))
    guarded = (_guard_streaming_requests if handler.request_streaming else _guard_request)(behaviour)
    return _FACTORIES[streaming](guarded, request_deserializer=_tolerant(path, deserialize),
                                 response_serializer=handler.response_serializer)


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
    if inspect.iscoroutinefunction(behaviour):
        async def guarded(request: Any, context: Any) -> Any:
            if type(request) is _Undecodable:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
            return await behaviour(request, context)
        return guarded

    def guarded_sync(request: Any, context: Any) -> Any:
        if type(request) is _Undecodable:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
        return behaviour(request, context)
    return guarded_sync


def _guard_streaming_requests(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def checked(requests: Any, context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            if type(request) is _Undecodable:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
            yield request

    def checked_sync(requests: Any, context: Any) -> Iterator[Any]:
        for request in requests:
            if type(request) is _Undecodable:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
            yield request

    if inspect.isasyncgenfunction(behaviour):
        async def guarded_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
            async for response in behaviour(checked(requests, context), context):
                yield response
        return guarded_stream
    if inspect.iscoroutinefunction(behaviour):
        async def guarded(requests: Any, context: Any) -> Any:
            return await behaviour(checked(requests, context), context)
        return guarded

    def guarded_sync(requests: Any, context: Any) -> Any:
        return behaviour(checked_sync(requests, context), context)
    return guarded_sync
