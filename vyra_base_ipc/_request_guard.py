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

A ``def`` handler gets the context of
:class:`~vyra_base_ipc._sync_context.SyncContext`: grpc.aio's, with what
grpc.aio leaves out of it (``is_active()``, ``cancelled()``, ``done()``...).

Each handler keeps its shape (``def``, ``async def``, generators) so that
grpc.aio still runs ``def`` handlers in its thread pool.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, AsyncIterator, Callable, Iterator, Mapping

import grpc

from ._sync_context import SyncContext

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


def guard_handlers(service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
                   ) -> dict[str, grpc.RpcMethodHandler]:
    """Return ``handlers`` with decoding failures answered INVALID_ARGUMENT
    and exits (:data:`HANDLER_EXITS`) answered UNKNOWN."""
    return {name: _guard(f'/{service}/{name}', handler) for name, handler in handlers.items()}


def _guard(path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    deserialize = handler.request_deserializer
    streaming = (handler.request_streaming, handler.response_streaming)
    behaviour = _guard_exits(path, getattr(handler, _FACTORIES[streaming].__name__.replace(
        '_rpc_method_handler', '')), handler.response_streaming)
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


def _guard_exits(path: str, behaviour: Callable[..., Any], response_streaming: bool) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):
        async def guarded_stream(argument: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for response in behaviour(argument, context):
                    yield response
            except HANDLER_EXITS as error:
                await context.abort(grpc.StatusCode.UNKNOWN, _exited(path, error))
        return guarded_stream
    if inspect.iscoroutinefunction(behaviour):
        async def guarded(argument: Any, context: Any) -> Any:
            try:
                return await behaviour(argument, context)
            except HANDLER_EXITS as error:
                await context.abort(grpc.StatusCode.UNKNOWN, _exited(path, error))
        return guarded
    # def handlers: with the context of SyncContext (is_active() and the rest).
    if response_streaming:  # a generator, or a def returning an iterator
        def guarded_sync_stream(argument: Any, context: Any) -> Iterator[Any]:
            context = SyncContext.of(context)
            try:
                responses = behaviour(argument, context)
                if responses is not None:
                    yield from responses
            except HANDLER_EXITS as error:
                context.abort(grpc.StatusCode.UNKNOWN, _exited(path, error))
            finally:
                context.finished = True
        return guarded_sync_stream

    def guarded_sync(argument: Any, context: Any) -> Any:
        context = SyncContext.of(context)
        try:
            return behaviour(argument, context)
        except HANDLER_EXITS as error:
            context.abort(grpc.StatusCode.UNKNOWN, _exited(path, error))
        finally:
            context.finished = True
    return guarded_sync


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
