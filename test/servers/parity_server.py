"""A real server process for the lane parity audit (test_lane_parity.py):
ParityService (parity.proto) and EchoService, served by one IPCServer on its
gRPC socket and its fast lane.

Usage: parity_server.py SOCKET_PATH [--max-message-bytes N] [--shared-memory-threshold N] [--no-metrics]

Each ParityService handler does what its request's ``how`` says once it has
sent ``count`` messages (response streams) or taken every request (request
streams; the first request's ``how`` counts, and a bidirectional handler
answers each request first):

- ``reply``: answer ``ParityReply(text='done', index=count)`` with ``size``
  bytes of payload (a stream: end, sending that first if ``size``);
- ``echo``: answer with the request as the server parsed it, serialized again
  (unknown fields kept), in the reply's payload;
- ``abort`` / ``abort-status``: ``abort(code, details)``, ``abort_with_status``;
- ``set``: ``set_code(code)``, ``set_details(details)``, then answer;
  ``set-none``: the same, answering None; ``set-code-only``,
  ``set-details-only``: only one of them, then answer;
- ``raise-...``: raise (see :data:`RAISES`);
- ``return-none``, ``return-wrong-type`` (a ParityRequest), ``return-str``:
  answer that (a stream yields it);
- ``write``: a stream sends its ``count`` messages (each with ``size`` bytes
  of payload) with ``context.write()`` instead, and ends;
- ``details-then-abort``: ``set_details(details)``, then ``abort(code)``;
- ``context``: answer what the context tells, as JSON in ``text``;
  ``context-api``: which methods of grpc's two contexts it has.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import sys
from typing import Any, AsyncIterator, Iterator

from echo_server import EchoService
import grpc
from vyra_ipc_test import parity_pb2, parity_pb2_grpc

from vyra_base_ipc import IPCServer, SharedMemoryOptions, run


class _Status(collections.namedtuple('_Status', ('code', 'details', 'trailing_metadata')), grpc.Status):
    """A :class:`grpc.Status` (an abstract class)."""


class PlainRpcError(grpc.RpcError):
    """A grpc.RpcError of the handler's own, without code() or details()."""


class RelayedRpcError(grpc.RpcError):
    """A grpc.RpcError as a downstream call raises it: with code() and details()."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.NOT_FOUND

    def details(self) -> str:
        return 'downstream says not found'


class Unprintable(Exception):
    """An exception whose str() raises."""

    def __str__(self) -> str:
        raise RuntimeError('no words for it')


#: What ``raise-<name>`` raises.
RAISES: dict[str, Any] = {
    'value': lambda details: ValueError(details),
    'key': lambda details: KeyError(details),
    'rpc-error': lambda details: PlainRpcError(details),
    'relayed-rpc-error': lambda details: RelayedRpcError(details),
    'unprintable': lambda details: Unprintable(),
    'abort-error': lambda details: grpc.aio.AbortError(details),
    'timeout': lambda details: TimeoutError(details),
    'cancelled': lambda details: asyncio.CancelledError(details),
    # No Exception, or none an asyncio future takes (test_lane_parity: def handlers only).
    'stop-iteration': lambda details: StopIteration(details),
    'generator-exit': lambda details: GeneratorExit(details),
    'base-exception': lambda details: BaseException(details),
    'system-exit': lambda details: SystemExit(details),
    'keyboard-interrupt': lambda details: KeyboardInterrupt(details),
}


#: What a context may have: grpc.ServicerContext's and grpc.aio.ServicerContext's methods.
CONTEXT_API = sorted({name for kind in (grpc.ServicerContext, grpc.aio.ServicerContext) for name in dir(kind)
                      if not name.startswith('_')})


def _code(number: int) -> Any:
    """The status of ``number``; a number no status has stays a number."""
    return next((code for code in grpc.StatusCode if code.value[0] == number), number)


def _seen(context: Any) -> str:
    """What the handler sees of its call, as JSON (what grpc.aio's contexts
    have: an ``async def`` handler's has no ``is_active()`` there)."""
    remaining = context.time_remaining()
    return json.dumps({
        'time_remaining': None if remaining is None else remaining > 0,
        'peer': context.peer(),
        'metadata': sorted([key, value if isinstance(value, str) else value.hex()]
                           for key, value in context.invocation_metadata() if key != 'user-agent'),
        'code': None if context.code() is None else str(context.code()),
        'details': context.details(),
        'cancelled': context.cancelled(),
        'done': context.done(),
    }, sort_keys=True)


def _end(request: parity_pb2.ParityRequest, context: Any, count: int) -> tuple[Any, Any]:
    """Do what ``request.how`` says: ``(answer, awaitable)``: the answer the
    handler gives, and an abort to await (async handlers) or None."""
    how = request.how
    reply = parity_pb2.ParityReply(text='done', index=count, payload=b'p' * request.size)
    if how == 'reply':
        return reply, None
    if how == 'echo':
        return parity_pb2.ParityReply(text='echo', payload=request.SerializeToString()), None
    if how == 'context':
        return parity_pb2.ParityReply(text=_seen(context)), None
    if how == 'context-api':
        return parity_pb2.ParityReply(text=' '.join(name for name in CONTEXT_API if hasattr(context, name))), None
    if how == 'details-then-abort':
        context.set_details(request.details)
        return None, context.abort(_code(request.code))
    if how == 'abort':
        return None, context.abort(_code(request.code), request.details)
    if how == 'abort-status':
        return None, context.abort_with_status(_Status(_code(request.code), request.details, ()))
    if how in ('set', 'set-none', 'set-code-only'):
        context.set_code(_code(request.code))
    if how in ('set', 'set-none', 'set-details-only'):
        context.set_details(request.details)
    if how.startswith('set'):
        return None if how == 'set-none' else reply, None
    if how.startswith('raise-'):
        raise RAISES[how[len('raise-'):]](request.details)
    if how == 'return-none':
        return None, None
    if how == 'return-wrong-type':
        return parity_pb2.ParityRequest(how='wrong'), None
    if how == 'return-str':
        return 'not a message', None
    raise AssertionError(f'no such how: {how!r}')


def _item(index: int, size: int = 0) -> parity_pb2.ParityReply:
    return parity_pb2.ParityReply(text=f'item {index}', index=index, payload=b'p' * size)


class ParityService(parity_pb2_grpc.ParityServiceServicer):
    async def Unary(self, request: Any, context: Any) -> Any:
        answer, aborting = _end(request, context, 0)
        if aborting is not None:
            await aborting
        return answer

    def UnarySync(self, request: Any, context: Any) -> Any:
        return _end(request, context, 0)[0]

    async def ServerStream(self, request: Any, context: Any) -> AsyncIterator[Any]:
        for index in range(request.count):
            if request.how == 'write':
                await context.write(_item(index, request.size))
            else:
                yield _item(index)
        if request.how != 'write':
            async for answer in self._last(request, context, request.count):
                yield answer

    def ServerStreamSync(self, request: Any, context: Any) -> Iterator[Any]:
        for index in range(request.count):
            if request.how == 'write':
                context.write(_item(index, request.size))
            else:
                yield _item(index)
        if request.how != 'write':
            yield from self._last_sync(request, context, request.count)

    async def ClientStream(self, requests: Any, context: Any) -> Any:
        taken = [request async for request in requests]
        return await self.Unary(_first(taken), context) if taken else parity_pb2.ParityReply(text='none')

    def ClientStreamSync(self, requests: Any, context: Any) -> Any:
        taken = list(requests)
        return self.UnarySync(_first(taken), context) if taken else parity_pb2.ParityReply(text='none')

    async def Bidi(self, requests: Any, context: Any) -> AsyncIterator[Any]:
        taken = []
        async for request in requests:
            yield _item(len(taken))
            taken.append(request)
        async for answer in self._last(_first(taken), context, len(taken)):
            yield answer

    def BidiSync(self, requests: Any, context: Any) -> Iterator[Any]:
        taken = []
        for request in requests:
            yield _item(len(taken))
            taken.append(request)
        yield from self._last_sync(_first(taken), context, len(taken))

    @staticmethod
    async def _last(request: Any, context: Any, count: int) -> AsyncIterator[Any]:
        """What a stream ends with: ``how``'s answer, yielded unless it is
        a plain reply (the stream then just ends)."""
        answer, aborting = _end(request, context, count)
        if aborting is not None:
            await aborting
        if _yields(request):
            yield answer

    @staticmethod
    def _last_sync(request: Any, context: Any, count: int) -> Iterator[Any]:
        answer = _end(request, context, count)[0]
        if _yields(request):
            yield answer


def _yields(request: Any) -> bool:
    """Whether a stream sends what ``how`` answers: not a plain reply (but
    one with a payload) or one after a set_code()."""
    return request.how not in ('reply', 'set', 'set-code-only', 'set-details-only') or bool(request.size)


def _first(taken: list[Any]) -> Any:
    """The request that says what to do: the first; a stream of none just ends."""
    return taken[0] if taken else parity_pb2.ParityRequest(how='reply')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('socket_path')
    parser.add_argument('--max-message-bytes', type=int, default=None)
    parser.add_argument('--shared-memory-threshold', type=int, default=None,
                        help='answers of more bytes go in shared memory on the fast lane')
    parser.add_argument('--no-metrics', dest='metrics', action='store_false')
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    kwargs: dict[str, Any] = {}
    if options.max_message_bytes is not None:
        kwargs['max_message_bytes'] = options.max_message_bytes
    if options.shared_memory_threshold is not None:
        kwargs['shared_memory'] = SharedMemoryOptions(threshold=options.shared_memory_threshold)
    server = IPCServer(options.socket_path, servicers=[ParityService(), EchoService()], grace_period=1.0,
                       metrics=options.metrics, **kwargs)
    run(server.serve())


if __name__ == '__main__':
    main()
