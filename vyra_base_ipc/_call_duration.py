"""Calls that arrive on the gRPC lane without a deadline end after
:attr:`ServerLimits.max_call_duration <vyra_base_ipc.ServerLimits>`, as they
do on the fast lane.

grpc.aio has no server-side bound of its own: a peer that sends no deadline
(this package's clients always send one, but for watch streams) could hold a
handler for ever. Handlers of methods with one response are cancelled at
the bound and the call ends DEADLINE_EXCEEDED; a ``def`` handler is one too
by then (:mod:`vyra_base_ipc._request_guard` runs it from an ``async def``),
and is told that its call ended, as when a client's own deadline passes.
Streams of responses are left alone (a watch lives as long as its client).
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Callable, Mapping

import grpc

__all__ = ['bound_call_duration', 'exceeded_details']


def exceeded_details(seconds: float) -> str:
    """The details of a call ended at the bound of ``seconds``."""
    return f'the call came without a deadline and ran for {seconds:g} s (max_call_duration)'


def bound_call_duration(handlers: Mapping[str, grpc.RpcMethodHandler], seconds: float
                        ) -> dict[str, grpc.RpcMethodHandler]:
    """``handlers``, those of ``async def`` one-response methods bounded to
    ``seconds`` when their call has no deadline."""
    bounded = {}
    for name, handler in handlers.items():
        behaviour = handler.stream_unary if handler.request_streaming else handler.unary_unary
        if handler.response_streaming or not inspect.iscoroutinefunction(behaviour):
            bounded[name] = handler
            continue
        factory = (grpc.stream_unary_rpc_method_handler if handler.request_streaming
                   else grpc.unary_unary_rpc_method_handler)
        bounded[name] = factory(_bounded(behaviour, seconds),
                                request_deserializer=handler.request_deserializer,
                                response_serializer=handler.response_serializer)
    return bounded


def _bounded(behaviour: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    async def bounded(request: Any, context: Any) -> Any:
        if context.time_remaining() is not None:
            return await behaviour(request, context)
        # The call's own task is cancelled at the bound, told so by a flag: a
        # TimeoutError the handler raises (asyncio.timeout(), a socket's) is
        # its own, answered as any exception (asyncio.wait_for() took it for
        # the bound's and answered it DEADLINE_EXCEEDED at once).
        task = asyncio.current_task()
        assert task is not None
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()
        timer = asyncio.get_running_loop().call_later(seconds, expire)
        try:
            response = await behaviour(request, context)
            if not expired:
                return response
            task.uncancel()  # (the handler caught it and answered all the same: too late, as at a deadline)
        except asyncio.CancelledError:
            if not expired or task.uncancel() > 0:  # (not only ours: grpc.aio ends the call)
                raise
        finally:
            timer.cancel()
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, exceeded_details(seconds))
    return bounded
