"""A real server process for test_writer_streams.py: WatchService whose
``Watch`` is a coroutine that writes its events with ``await
context.write()`` (not an async generator), on both lanes, with metrics;
with ``tag='return'`` it returns its last event instead of writing it (a
mistake); with ``count=0`` it writes one every ``interval`` seconds (0.01 if
0) until the call ends; with ``tag='swallow'`` the same, but it catches
the cancellation that ends it and returns (``Converse`` too, an async
generator that yields so, its first request's ``tag`` saying).

Usage: writer_server.py SOCKET_PATH [GRACE_PERIOD]
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, AsyncIterator

from vyra_ipc_test import echo_pb2
from watch_service import WatchService

from vyra_base_ipc import IPCServer, run


class WritingWatchService(WatchService):
    async def Watch(self, request: echo_pb2.WatchRequest, context: Any) -> Any:
        if request.tag == 'swallow':
            try:
                for index in range(1 << 30):
                    await context.write(echo_pb2.WatchEvent(index=index))
                    await asyncio.sleep(request.interval or 0.01)
            except asyncio.CancelledError:
                return None  # (swallowed: a handler's own choice)
        if not request.count:
            index = 0
            while True:
                await context.write(echo_pb2.WatchEvent(index=index))
                index += 1
                await asyncio.sleep(request.interval or 0.01)
        for index in range(request.count):
            if request.tag == 'return' and index == request.count - 1:
                return echo_pb2.WatchEvent(index=index)
            await context.write(echo_pb2.WatchEvent(index=index))
        return None

    async def Converse(self, request_iterator: Any, context: Any) -> AsyncIterator[echo_pb2.WatchEvent]:
        async for request in request_iterator:
            if request.tag != 'swallow':
                async for event in super().Converse(_and(request, request_iterator), context):
                    yield event
                return
            try:
                for index in range(1 << 30):
                    yield echo_pb2.WatchEvent(index=index)
                    await asyncio.sleep(request.interval or 0.01)
            except asyncio.CancelledError:
                return  # (swallowed)


async def _and(first: Any, rest: Any) -> AsyncIterator[Any]:
    yield first
    async for request in rest:
        yield request


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    grace = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    run(IPCServer(sys.argv[1], servicers=[WritingWatchService()], grace_period=grace).serve())


if __name__ == '__main__':
    main()
