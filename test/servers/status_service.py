"""StatusService: handlers that use their context as grpc.aio lets them, and
end their calls in unusual ways (see echo.proto; and "until-inactive": a def
handler that works until is_active() says its call ended, then returns;
"abort-after-end", "metadata-after-end": one that then aborts or sends
initial metadata, and journals what that raised; "raise-timeout": one that
raises a TimeoutError of its own; "swallow-cancel": an async def one that
waits until cancelled, then answers all the same, or ends its stream)."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from typing import Any, AsyncIterator, Callable, Iterator

import grpc
from grpc_status import rpc_status
from rich_status import RICH_MESSAGE, STATUS_DETAILS_KEY, rich_status
from vyra_ipc_test import echo_pb2, echo_pb2_grpc

_NOT_FOUND = 5  # grpc.StatusCode.NOT_FOUND as a number, as grpc.aio takes it


class _Status(collections.namedtuple('_Status', ('code', 'details', 'trailing_metadata')), grpc.Status):
    """A :class:`grpc.Status` (an abstract class: grpc_status makes them from rich errors)."""


#: Trailers gRPC does not send, by how ("trailer-..."): grpc.aio ended such
#: a call INTERNAL "Invalid metadata", or raised TypeError in the handler.
BAD_TRAILERS: dict[str, Any] = {
    'trailer-upper-key': (('X-Note', 'a note'),),
    'trailer-space-in-key': (('x note', 'a note'),),
    'trailer-non-ascii-value': (('x-note', 'caf\u00e9'),),
    'trailer-newline-in-value': (('x-note', 'two\nlines'),),
    'trailer-int-value': (('x-note', 5),),
    'trailer-not-a-pair': (('x-note',),),
}


def _misbehave(how: str, context: Any) -> Any:
    """Do what ``how`` says; an awaitable for an async context's abort."""
    if how == 'raise-timeout':  # (the handler's own, as asyncio.timeout() or a socket raises it)
        raise TimeoutError('a timeout of its own')
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
    if how == 'abort-with-rich-status':
        return context.abort_with_status(rpc_status.to_status(rich_status()))
    if how == 'trailer-rich-status':
        context.set_trailing_metadata(((STATUS_DETAILS_KEY, rich_status().SerializeToString()),))
        context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        context.set_details(RICH_MESSAGE)
        return None
    if how == 'trailer-rich-status-then-raise':  # (the call ends UNKNOWN: not the trailer's status)
        context.set_trailing_metadata(((STATUS_DETAILS_KEY, rich_status().SerializeToString()),))
        raise ValueError('after the rich trailer')
    if how == 'trailer-rich-status-then-abort':  # (the call ends NOT_FOUND: not the trailer's status)
        context.set_trailing_metadata(((STATUS_DETAILS_KEY, rich_status().SerializeToString()),))
        return context.abort(grpc.StatusCode.NOT_FOUND, 'another status')
    if how == 'trailer-str-status-details':  # (a str where grpc takes only bytes)
        context.set_trailing_metadata(((STATUS_DETAILS_KEY, RICH_MESSAGE),))
        context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        return None
    if how in BAD_TRAILERS:  # (each a trailer gRPC does not send; the handler then answers OK)
        context.set_trailing_metadata(BAD_TRAILERS[how])
        return None
    if how == 'good-trailers':
        context.set_trailing_metadata((('x-note', 'a note'), ('x-note-bin', b'\x00\xff'), ('x-raw', b'ab')))
        return None
    if how == 'abort-with-str-binary-trailer':
        return context.abort(grpc.StatusCode.NOT_FOUND, 'str trailer', (('x-note-bin', 'text'),))
    if how == 'abort-with-bad-status-details':
        return context.abort(grpc.StatusCode.INVALID_ARGUMENT, 'bad status details',
                             ((STATUS_DETAILS_KEY, b'\xff not a google.rpc.Status'),))
    if how == 'compression-after-first':
        context.set_compression(grpc.Compression.Gzip)
        return None
    if how == 'initial-metadata-after-first':
        return context.send_initial_metadata((('x-late', 'yes'),))  # awaitable on an async context
    raise AssertionError(f'no such how: {how!r}')


def _work_while_active(context: Any) -> None:
    """Work in small steps while the call runs, as a def handler should, and
    stop as soon as it has ended (60 s at most)."""
    ending = time.monotonic() + 60
    while context.is_active() and time.monotonic() < ending:
        time.sleep(0.0005)


def _after_end(how: str, context: Any) -> str:
    """Wait until the call has ended (60 s at most), then abort it
    ("abort-after-end") or send initial metadata ("metadata-after-end"):
    the name of the exception that raised, '' if none."""
    _work_while_active(context)
    try:
        if how == 'abort-after-end':
            context.abort(grpc.StatusCode.NOT_FOUND, 'after the end')
        else:
            context.send_initial_metadata((('x-late', 'yes'),))
    except Exception as error:
        return type(error).__name__
    return ''


#: Hows of def handlers that act once their call ended (see :func:`_after_end`);
#: journaled ("waiting" when they start to wait for the end, then the how).
AFTER_END = ('abort-after-end', 'metadata-after-end')


def _seen(context: Any) -> dict[str, bool]:
    return {'is_active': context.is_active(), 'cancelled': context.cancelled(), 'done': context.done()}


class StatusService(echo_pb2_grpc.StatusServiceServicer):
    """The handlers; ``journal`` (if given) takes what "context" and
    "wait-cancel" see, one dict each."""

    def __init__(self, journal: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._journal = journal

    async def Misbehave(self, request: echo_pb2.MisbehaveRequest, context: Any) -> echo_pb2.EchoReply | None:
        if request.how == 'return-none':
            return None
        if request.how == 'swallow-cancel':  # (works until cancelled, then answers all the same)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                return echo_pb2.EchoReply(text='too late')
        aborting = _misbehave(request.how, context)
        if aborting is not None:
            await aborting
        return echo_pb2.EchoReply()

    def MisbehaveSync(self, request: echo_pb2.MisbehaveRequest, context: Any) -> echo_pb2.EchoReply | None:
        if request.how == 'return-none':
            return None
        if request.how == 'context' and self._journal is not None:
            journal = self._journal
            context.add_done_callback(lambda _: journal({'event': 'seen', 'tag': request.tag,
                                                         'done_callback': True}))
            return echo_pb2.EchoReply(text=json.dumps(_seen(context)))
        if request.how == 'until-inactive':
            _work_while_active(context)
            return echo_pb2.EchoReply(text='too late')
        if request.how in AFTER_END and self._journal is not None:
            self._journal({'event': 'waiting', 'tag': request.tag})
            self._journal({'event': request.how, 'tag': request.tag, 'raised': _after_end(request.how, context)})
            return echo_pb2.EchoReply(text='too late')
        if request.how == 'wait-cancel' and self._journal is not None:
            ending = time.monotonic() + 60  # (as a def handler that works on until its call ends would)
            while context.is_active() and time.monotonic() < ending:
                time.sleep(0.01)
            self._journal({'event': 'seen', 'tag': request.tag, **_seen(context)})
            return echo_pb2.EchoReply(text='too late')
        _misbehave(request.how, context)
        return echo_pb2.EchoReply()

    async def MisbehaveStream(self, request: echo_pb2.MisbehaveRequest,
                              context: Any) -> AsyncIterator[echo_pb2.EchoReply | None]:
        yield echo_pb2.EchoReply(text='first')
        if request.how == 'return-none':
            yield None
            return
        if request.how == 'swallow-cancel':  # (a watch that ends quietly when cancelled)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                return
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
                            context: Any) -> Iterator[echo_pb2.EchoReply | None]:
        yield echo_pb2.EchoReply(text='first')
        if request.how == 'return-none':
            yield None
            return
        if request.how == 'until-inactive':
            _work_while_active(context)
            return
        if request.how in AFTER_END and self._journal is not None:
            self._journal({'event': 'waiting', 'tag': request.tag})
            self._journal({'event': request.how, 'tag': request.tag, 'raised': _after_end(request.how, context)})
            return
        if request.how == 'write':  # (a def handler's context.write(), between its yields)
            context.write(echo_pb2.EchoReply(text='written'))
            yield echo_pb2.EchoReply(text='last')
            return
        if request.how == 'yield-after-abort':
            try:
                context.abort(grpc.StatusCode.NOT_FOUND, 'stop')
            except Exception:  # (grpc's def context raises a plain Exception)
                yield echo_pb2.EchoReply(text='after-abort')
            return
        _misbehave(request.how, context)
