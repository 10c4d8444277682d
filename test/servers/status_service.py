"""StatusService: handlers that use their context as grpc.aio lets them (see echo.proto)."""

from __future__ import annotations

import collections
from typing import Any, AsyncIterator, Iterator

import grpc
from vyra_ipc_test import echo_pb2, echo_pb2_grpc

_NOT_FOUND = 5  # grpc.StatusCode.NOT_FOUND as a number, as grpc.aio takes it


class _Status(collections.namedtuple('_Status', ('code', 'details', 'trailing_metadata')), grpc.Status):
    """A :class:`grpc.Status` (an abstract class: grpc_status makes them from rich errors)."""


def _misbehave(how: str, context: Any) -> Any:
    """Do what ``how`` says; an awaitable for an async context's abort."""
    if how == 'set-code-then-raise':
        context.set_code(grpc.StatusCode.NOT_FOUND)
        raise ValueError('after set_code')
    if how == 'abort-with-number':
        return context.abort(_NOT_FOUND, 'aborted with 5')
    if how == 'set-code-number':
        context.set_code(_NOT_FOUND)
        context.set_details('set to 5')
        return None
    if how == 'abort-with-status':
        return context.abort_with_status(_Status(grpc.StatusCode.NOT_FOUND, 'aborted with a status', ()))
    if how == 'compression-after-first':
        context.set_compression(grpc.Compression.Gzip)
        return None
    if how == 'initial-metadata-after-first':
        return context.send_initial_metadata((('x-late', 'yes'),))  # awaitable on an async context
    raise AssertionError(f'no such how: {how!r}')


class StatusService(echo_pb2_grpc.StatusServiceServicer):
    async def Misbehave(self, request: echo_pb2.MisbehaveRequest, context: Any) -> echo_pb2.EchoReply:
        aborting = _misbehave(request.how, context)
        if aborting is not None:
            await aborting
        return echo_pb2.EchoReply()

    def MisbehaveSync(self, request: echo_pb2.MisbehaveRequest, context: Any) -> echo_pb2.EchoReply:
        _misbehave(request.how, context)
        return echo_pb2.EchoReply()

    async def MisbehaveStream(self, request: echo_pb2.MisbehaveRequest,
                              context: Any) -> AsyncIterator[echo_pb2.EchoReply]:
        yield echo_pb2.EchoReply(text='first')
        if request.how == 'yield-after-abort':
            try:
                await context.abort(grpc.StatusCode.NOT_FOUND, 'stop')
            except grpc.aio.AbortError:
                yield echo_pb2.EchoReply(text='after-abort')
            return
        aborting = _misbehave(request.how, context)
        if aborting is not None:
            await aborting

    def MisbehaveStreamSync(self, request: echo_pb2.MisbehaveRequest,
                            context: Any) -> Iterator[echo_pb2.EchoReply]:
        yield echo_pb2.EchoReply(text='first')
        if request.how == 'yield-after-abort':
            try:
                context.abort(grpc.StatusCode.NOT_FOUND, 'stop')
            except Exception:  # (grpc's def context raises a plain Exception)
                yield echo_pb2.EchoReply(text='after-abort')
            return
        _misbehave(request.how, context)
