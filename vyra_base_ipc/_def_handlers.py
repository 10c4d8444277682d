"""The gRPC lane's ``def`` handlers, run in the server's handler threads.

grpc.aio runs a ``def`` handler in its thread pool and tells it nothing of a
client that leaves (grpc/grpc#25327): the handler ran on until it returned, a
streaming handler's generator was never closed, no ``add_callback`` callback
ran. And a ``def`` stream handler's abort after it yielded raced grpc.aio's
loop sending that message, so that its client now and then waited until its
deadline (grpc/grpc#28989). So each ``def`` handler of a registered service
becomes an ``async def`` here, which grpc.aio runs on its loop, and which runs
the handler in the server's
:class:`~vyra_base_ipc._handler_threads.HandlerThreads` with a
:class:`~vyra_base_ipc._sync_context.SyncContext`, as the fast lane does:

- When grpc.aio cancels the call (the client left, the deadline passed, the
  server stopped), the context ends at once: ``is_active()`` turns False,
  the callbacks run, and the handler's next message written or request read
  raises :class:`~vyra_base_ipc._handler_threads.CallEnded`, which closes a
  generator handler. A handler that had not started yet never runs.
- A streaming handler's messages go to the loop one at a time: its thread
  goes on once grpc.aio has written the message, so an abort, initial
  metadata or a compression setting after a message comes after it.
- A handler that returns once its deadline has passed (one that works while
  ``is_active()`` holds) is answered DEADLINE_EXCEEDED, not with what it
  returned, whichever of it and grpc's timer came first, as on the fast lane.
- What a handler raises goes to the loop, which answers it, if it is an
  ``Exception`` other than ``StopIteration``; anything else is answered from
  its thread (see :func:`_handed_over`).
"""

from __future__ import annotations

import asyncio
from concurrent import futures
from typing import Any, AsyncIterator, Callable, Iterator

import grpc

from ._handler_threads import CallEnded
from ._sync_context import SyncContext

__all__ = ['in_handler_threads']

_SHUTTING_DOWN = 'server is shutting down'
_END = object()


#: Answers, in a handler's thread, what its handler raised that is not handed
#: over to the loop (see :func:`_handed_over`): it aborts the call.
Fail = Callable[[BaseException, SyncContext], None]


def in_handler_threads(behaviour: Callable[..., Any], executor: futures.Executor, fail: Fail, *,
                       request_streaming: bool, response_streaming: bool) -> Callable[..., Any]:
    """``behaviour``, a ``def`` handler, as an ``async def`` (an async
    generator for a method streaming responses) that runs it in ``executor``
    (see the module docstring)."""
    if response_streaming:
        return _streaming(behaviour, executor, fail, request_streaming)
    return _unary(behaviour, executor, fail, request_streaming)


def _unary(behaviour: Callable[..., Any], executor: futures.Executor, fail: Fail,
           request_streaming: bool) -> Callable[..., Any]:
    async def in_thread(argument: Any, context: Any) -> Any:
        sync_context = SyncContext(context, asyncio.get_running_loop())
        if request_streaming:
            argument = _Requests(argument, sync_context)
        done = await _started(executor, context, _run, behaviour, argument, sync_context, fail)
        try:
            response = await done
        except asyncio.CancelledError:
            sync_context.finish(left=True)
            raise
        finally:
            sync_context.finish(left=False)  # (if it had not ended)
        await _in_time(context)
        return response
    return in_thread


def _streaming(behaviour: Callable[..., Any], executor: futures.Executor, fail: Fail,
               request_streaming: bool) -> Callable[..., Any]:
    async def in_thread(argument: Any, context: Any) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        messages: asyncio.Queue[Any] = asyncio.Queue()

        def send(message: Any) -> None:  # in the handler's thread
            written: futures.Future[None] = futures.Future()
            try:
                loop.call_soon_threadsafe(messages.put_nowait, (message, written))
            except RuntimeError:  # the loop is closed
                raise CallEnded() from None
            sync_context.wait(written)

        def ended(future: asyncio.Future[Any]) -> None:
            messages.put_nowait(_END)
            if not future.cancelled():
                future.exception()  # (retrieved: a call that ended first never awaits it)

        sync_context = SyncContext(context, loop, send)
        if request_streaming:
            argument = _Requests(argument, sync_context)
        done = await _started(executor, context, _run_stream, behaviour, argument, sync_context, fail)
        done.add_done_callback(ended)
        try:
            while True:
                item = await messages.get()
                if item is _END:
                    break
                message, written = item
                yield message
                if not written.cancelled():  # (cancelled: its thread saw the call end)
                    written.set_result(None)
            await done  # what the handler raised, if it did
        except (asyncio.CancelledError, GeneratorExit):
            sync_context.finish(left=True)
            done.cancel()  # one that has not started never runs
            raise
        finally:
            sync_context.finish(left=False)  # (if it had not ended)
        await _in_time(context)
    return in_thread


async def _started(executor: futures.Executor, context: Any, function: Callable[..., Any],
                   *arguments: Any) -> asyncio.Future[Any]:
    """``function(*arguments)`` submitted to ``executor``; a call the stopping
    server's executor refuses is aborted UNAVAILABLE, as on the fast lane."""
    try:
        return asyncio.wrap_future(executor.submit(function, *arguments))
    except RuntimeError as error:  # shut down
        await context.abort(grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)  # (raises)
        raise error


def _handed_over(error: BaseException) -> bool:
    """Whether ``error``, raised by a handler, goes to the loop as it is (to
    be answered there): an ``Exception``, but not ``StopIteration``, which no
    asyncio future takes (the call was left unanswered, its future pending
    for ever). Anything else is answered in the handler's thread: an exit; a
    ``CancelledError`` or ``GeneratorExit`` of its own, which would pass for
    the call's end; another ``BaseException``, which grpc.aio answers with
    nothing (the caller waited for its deadline)."""
    return isinstance(error, Exception) and not isinstance(error, StopIteration)


def _answer(fail: Fail, error: BaseException, context: SyncContext) -> None:
    """``fail(error, context)`` unless the call has ended.

    :raises grpc.aio.AbortError: (``fail``'s) the call is answered.
    """
    try:
        fail(error, context)
    except CallEnded:
        pass


def _run(behaviour: Callable[..., Any], argument: Any, context: SyncContext, fail: Fail) -> Any:
    """(In the handler's thread) ``behaviour(argument, context)``; ``None``
    once the call ended, or after answering what is not handed over."""
    try:
        return behaviour(argument, context)
    except CallEnded:
        return None
    except BaseException as error:
        if _handed_over(error):
            raise
        _answer(fail, error, context)
        return None


def _run_stream(behaviour: Callable[..., Any], argument: Any, context: SyncContext, fail: Fail) -> None:
    """:func:`_run` of a response-streaming handler, each message written."""
    def write_all(argument: Any, context: SyncContext) -> None:
        responses = behaviour(argument, context)
        if responses is None:  # it wrote with context.write()
            return
        try:
            for message in responses:
                context.write(message)
        finally:
            close = getattr(responses, 'close', None)
            if close is not None:  # a generator left early: its finally blocks run now
                close()
    _run(write_all, argument, context, fail)


async def _in_time(context: Any) -> None:
    """Abort DEADLINE_EXCEEDED if the call's deadline has passed.

    :raises grpc.aio.AbortError: it has (unless grpc's timer ended the call
        meanwhile: the status sent is then grpc's, and grpc.aio sends
        nothing of what the handler returned either).
    """
    remaining = context.time_remaining()
    if remaining is None or remaining > 0:
        return
    try:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, 'Deadline Exceeded')
    except grpc.aio.AbortError:
        raise
    except Exception:  # (ExecuteBatchError) the call had ended
        pass


class _Requests(Iterator[Any]):
    """A request stream, read on the loop for a handler's thread.

    :raises CallEnded: from ``next()`` once the call has ended.
    """

    def __init__(self, requests: AsyncIterator[Any], context: SyncContext) -> None:
        self._requests = requests
        self._context = context

    def __next__(self) -> Any:
        try:
            return self._context.on_loop(_next(self._requests))
        except StopAsyncIteration:
            raise StopIteration from None


async def _next(requests: AsyncIterator[Any]) -> Any:
    return await requests.__anext__()
