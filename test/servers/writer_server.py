"""A real server process for test_writer_streams.py: WatchService whose
``Watch`` is a coroutine that writes its events with ``await
context.write()`` (not an async generator), on both lanes, with metrics;
with ``tag='return'`` it returns its last event instead of writing it (a
mistake); with ``count=0`` it writes one every ``interval`` seconds (0.01 if
0) until the call ends.

Usage: writer_server.py SOCKET_PATH [GRACE_PERIOD]
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from vyra_ipc_test import echo_pb2
from watch_service import WatchService

from vyra_base_ipc import IPCServer, run


class WritingWatchService(WatchService):
    async def Watch(self, request: echo_pb2.WatchRequest, context: Any) -> Any:
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


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    grace = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    run(IPCServer(sys.argv[1], servicers=[WritingWatchService()], grace_period=grace).serve())


if __name__ == '__main__':
    main()
