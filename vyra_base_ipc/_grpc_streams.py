"""The gRPC lane's response streams end at once when the server stops.

grpc.aio keeps a stream open for the whole grace period of ``stop(grace)``
and then cancels it, so one watch stream makes every shutdown wait the full
grace, and its client learns only then, with CANCELLED. The fast lane ends
response streams at once with UNAVAILABLE ("server is shutting down");
here the gRPC lane's ``async def`` stream handlers do the same: each is
run through a wrapper that, once :meth:`OpenStreams.end_all` was called,
closes the handler's generator, or cancels a handler that writes with
``context.write()`` (either where it waits for something of its own, never
inside grpc's code), and aborts the call with that status. A ``def``
stream handler is one of them by then (:mod:`vyra_base_ipc._request_guard`
runs it from an async generator), and is told that its call ended.

:class:`CallTasks` keeps the task of every call on the lane, so that the
server's stop can wait until grpc.aio's tasks of the calls it cancelled have
ended (see there), and refuses the calls beyond ``maximum_concurrent_rpcs``
as grpc.aio would, where the server's metrics can count them.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping

import grpc

from ._limits import CONCURRENT_RPC_LIMIT_EXCEEDED
from ._request_guard import reading_one_request

__all__ = ['CallTasks', 'OpenStreams']

_SHUTTING_DOWN = 'server is shutting down'


class OpenStreams:
    """The gRPC lane's response streams in flight. Event-loop thread only."""

    def __init__(self) -> None:
        # The task of each stream, and whether it waits inside the handler's
        # generator right now (only there may it be cancelled: elsewhere it
        # is in grpc's own code, which would answer CANCELLED).
        self._streams: dict[asyncio.Task[Any], bool] = {}
        # The task of every tracked stream's call, until it has ended (its
        # status sent): what ended() waits for.
        self._calls: set[asyncio.Task[Any]] = set()
        self.stopping = False

    def track(self, handlers: Mapping[str, grpc.RpcMethodHandler]) -> dict[str, grpc.RpcMethodHandler]:
        """``handlers`` with their ``async def`` response-streaming
        generators run so that :meth:`end_all` can end them."""
        return {name: self._tracked(handler) for name, handler in handlers.items()}

    def end_all(self) -> None:
        """End every response stream now, and any that starts from now on."""
        self.stopping = True
        for task, inside in list(self._streams.items()):
            if inside:
                task.cancel()

    async def ended(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds until the call of every response
        stream in flight has ended (after :meth:`end_all`: its handler ended,
        its status sent); how many have not (a handler inside a write to a
        peer that does not read, one that goes on when cancelled)."""
        calls = set(self._calls)
        if calls and timeout > 0:
            _, calls = await asyncio.wait(calls, timeout=timeout)
        return len(calls)

    def _call(self) -> asyncio.Task[Any]:
        """The task of the stream call running now, kept in ``_calls`` until it ends."""
        task = asyncio.current_task()
        assert task is not None
        if task not in self._calls:
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
        return task

    def _tracked(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if not handler.response_streaming:
            return handler
        kind = 'stream_stream' if handler.request_streaming else 'unary_stream'
        behaviour = getattr(handler, kind)
        if inspect.isasyncgenfunction(behaviour):
            wrapped: Callable[..., Any] = self._wrap(behaviour)
        elif inspect.iscoroutinefunction(behaviour):  # it writes with context.write()
            wrapped = self._wrap_writer(behaviour)
        else:
            return handler
        factory = getattr(grpc, f'{kind}_rpc_method_handler')
        return factory(wrapped, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    def _wrap(self, behaviour: Callable[..., AsyncGenerator[Any, None]]) -> Callable[..., AsyncIterator[Any]]:
        streams = self._streams

        async def tracked(request: Any, context: Any) -> AsyncIterator[Any]:
            task = self._call()
            responses = behaviour(request, context)
            try:
                while not self.stopping:
                    streams[task] = True
                    try:
                        response = await responses.__anext__()
                    except StopAsyncIteration:
                        if not _swallowed_end(self, task):
                            return
                        break
                    except asyncio.CancelledError:
                        if not self.stopping:
                            raise
                        task.uncancel()  # ours: the call goes on to be aborted
                        break
                    finally:
                        streams[task] = False
                    yield response
            finally:
                streams.pop(task, None)
                await responses.aclose()
            await context.abort(grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)
        return tracked

    def _wrap_writer(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        streams = self._streams

        async def tracked(request: Any, context: Any) -> Any:
            task = self._call()
            if not self.stopping:
                streams[task] = True
                try:
                    result = await behaviour(request, _Writing(context, self, task))
                    if not _swallowed_end(self, task):
                        return result
                except asyncio.CancelledError:
                    if not self.stopping:
                        raise
                    if task.cancelling():
                        task.uncancel()  # ours: the call goes on to be aborted
                finally:
                    streams.pop(task, None)
            await context.abort(grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)
        return tracked


def _swallowed_end(open_streams: OpenStreams, task: asyncio.Task[Any]) -> bool:
    """Whether a stream handler that just finished had caught the
    cancellation :meth:`OpenStreams.end_all` sent it (taken back here): its
    call is aborted as if it had not, not ended OK as if complete (grpc.aio
    would answer it when the grace ends, the fast lane at once)."""
    if not (open_streams.stopping and task.cancelling()):
        return False
    task.uncancel()
    return True


class _Writing:
    """The context of a stream handler that writes with ``context.write()``:
    while grpc's own code runs for it (a write, an abort, initial metadata;
    the request guard's context turns ``abort_with_status()`` into ``abort()``),
    :meth:`OpenStreams.end_all` does not cancel it; a write that ends once
    the server is stopping cancels it there."""

    __slots__ = ('_context', '_open', '_task')

    def __init__(self, context: Any, open_streams: OpenStreams, task: asyncio.Task[Any]) -> None:
        self._context = context
        self._open = open_streams
        self._task = task

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def _in_grpc(self, step: Awaitable[Any]) -> Any:
        streams = self._open._streams
        task = self._task
        streams[task] = False
        try:
            return await step
        finally:
            if task in streams:
                streams[task] = True

    async def write(self, message: Any) -> None:
        await self._in_grpc(self._context.write(message))
        if self._open.stopping:
            # As end_all() would have, had the handler not been inside the
            # write: a cancellation of the task (a CancelledError raised
            # here would be the handler's own, answered CANCELLED).
            self._task.cancel()
            await asyncio.sleep(0)

    async def abort(self, *arguments: Any, **keywords: Any) -> None:
        await self._in_grpc(self._context.abort(*arguments, **keywords))

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        await self._in_grpc(self._context.send_initial_metadata(initial_metadata))


class CallTasks(grpc.aio.ServerInterceptor):
    """The task of each call in flight on the gRPC lane (every method, the
    tools' too), so that a stop can wait until they have ended.

    grpc.aio runs each call in a task of its own (``HandleExceptions[...]``),
    awaited by another of its tasks (``rpc_task``), which logs ERROR
    "Exception not handled by _handle_exceptions" with a traceback when a
    ``CancelledError`` reaches it there. grpc.aio's ``stop()`` returns once
    grpc core cancelled the calls still running at the end of the grace,
    before their tasks have run that cancellation. The end of the event loop
    right after (``asyncio.run()``, a node's loop thread) then cancelled what
    was left: a handler's cleanup was cut short, and an ``rpc_task`` whose
    call's task had just ended, not yet woken by that end, took the
    cancellation at its await and logged it (seen at stops with calls in
    flight that came without a deadline). Made a grpc.aio interceptor, this
    sees each call in its own task, before its handler is chosen. Event-loop
    thread only.

    With a ``limit``, a call that comes while that many are in flight (of
    every method, the tools' too) is answered RESOURCE_EXHAUSTED "Concurrent
    RPC limit exceeded!" without running its handler, as grpc.aio's own
    ``maximum_concurrent_rpcs`` does, and reported to ``refused`` with its
    method's path (grpc.aio's refusals are seen by nobody).

    Every method that takes one request reads it itself
    (:func:`~vyra_base_ipc._request_guard.reading_one_request`), so a call
    that never sends it whole is answered: here, where every handler passes
    last, no other wrapper sees the change; with ``max_call_duration``, one
    without a deadline that does not send it whole in that time ends
    DEADLINE_EXCEEDED.
    """

    def __init__(self, limit: int | None = None, refused: Callable[[str], None] | None = None,
                 max_call_duration: float | None = None) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        # Those of the calls let through: what the limit counts.
        self._admitted: set[asyncio.Task[Any]] = set()
        self._limit = limit
        self._refused = refused
        self._max_call_duration = max_call_duration
        # Each method's handler as reading_one_request() made it, by the
        # handler grpc has for it: one entry per method.
        self._reading: dict[grpc.RpcMethodHandler, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        task = asyncio.current_task()
        limit = self._limit
        refuse = limit is not None and len(self._admitted) >= limit
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            if limit is not None and not refuse:
                self._admitted.add(task)
                task.add_done_callback(self._admitted.discard)
        handler = await continuation(handler_call_details)
        if handler is not None:
            handler = self._reading.get(handler) or self._reading.setdefault(
                handler, reading_one_request(handler_call_details.method, handler, self._max_call_duration))
        if not refuse:
            return handler
        if self._refused is not None:
            self._refused(handler_call_details.method)
        return _refusal(handler)

    def __contains__(self, task: object) -> bool:
        """Whether ``task`` is that of a call of this server in flight."""
        return task in self._tasks

    async def ended(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds until the task of every call has
        ended; how many have not (a handler that goes on when cancelled).

        grpc's task awaiting a call's task is woken by its end before this
        one (its callback was added before, or this wait's wake-up is
        scheduled by a callback of the same end): once this returns, it has
        taken the end and finished.
        """
        tasks = set(self._tasks)
        if tasks and timeout > 0:
            _, tasks = await asyncio.wait(tasks, timeout=timeout)
        return len(tasks)


async def _refuse(request: Any, context: Any) -> None:
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, CONCURRENT_RPC_LIMIT_EXCEEDED)


def _refusal(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s shape (any, for none) that refuses the
    call, its request not deserialized."""
    if handler is None:
        return grpc.stream_stream_rpc_method_handler(_refuse)
    kind = f'{"stream" if handler.request_streaming else "unary"}_' \
           f'{"stream" if handler.response_streaming else "unary"}'
    return getattr(grpc, f'{kind}_rpc_method_handler')(_refuse)
