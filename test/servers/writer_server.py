"""A real server process for test_writer_streams.py: WatchService whose
``Watch`` is a coroutine that writes its events with ``await
context.write()`` (not an async generator), on both lanes, with metrics;
with ``tag='return'`` it returns its last event instead of writing it (a
mistake).

Usage: writer_server.py SOCKET_PATH
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from vyra_ipc_test import echo_pb2
from watch_service import WatchService

from vyra_base_ipc import IPCServer, run


class WritingWatchService(WatchService):
    async def Watch(self, request: echo_pb2.WatchRequest, context: Any) -> Any:
        for index in range(request.count):
            if request.tag == 'return' and index == request.count - 1:
                return echo_pb2.WatchEvent(index=index)
            await context.write(echo_pb2.WatchEvent(index=index))
        return None


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    run(IPCServer(sys.argv[1], servicers=[WritingWatchService()]).serve())


if __name__ == '__main__':
    main()
