"""A server on an :class:`EventLoopThread` that abandons itself once its loop
ended (``IPCServer.abandon()``), as a node hosting its server does, for
test_abandon.py. Its ModuleService answers ``ping``; ``end_loop`` lets
``sys.exit()`` out of a callback on the loop, which ends it; ``hold``
never answers. Its EchoService holds calls too: ``EchoSync`` (a ``def``
handler) until SIGTERM, ``Count`` after its first reply for ever. Each
held call appends a line to HELD_PATH once it is handled. Once abandoned
it prints the line ``ABANDONED`` and lives on (its connections must not
close by its exit) until SIGTERM.

A process of its own: grpc.aio's state of a server whose loop died stays
with the process (later event loops of a test process were kept alive).

Usage: abandoning_server.py SOCKET_PATH HELD_PATH
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
import signal
import sys
import threading

from echo_server import EchoService
from exiting_server import LoopEnder
from vyra_ipc_test import echo_pb2

from vyra_base_ipc import IPCServer
from vyra_base_ipc._loop_thread import EventLoopThread

#: The line printed once abandon() has returned (the loop thread's own log
#: line of its end, which names the thread, comes before it).
ABANDONED = 'ABANDONED'


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    socket_path, held = sys.argv[1], Path(sys.argv[2])

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())

    def handled() -> None:
        with open(held, 'a') as file:
            file.write('held\n')

    async def hold(parameters: dict[str, str]) -> str:
        handled()
        await asyncio.Event().wait()
        return 'never'

    class Holder(EchoService):
        def EchoSync(self, request, context):
            handled()
            done.wait()
            return echo_pb2.EchoReply(text='released')

        async def Count(self, request, context):
            yield echo_pb2.EchoReply(text='item 0')
            handled()
            await asyncio.Event().wait()

    service = LoopEnder()
    service.register_command('hold', hold)
    server = IPCServer(socket_path, servicers=[service, Holder()])

    def abandon(failure: BaseException) -> None:
        server.abandon()
        print(ABANDONED, flush=True)

    loop = EventLoopThread('server-loop', on_failure=abandon)
    loop.start()
    loop.run(server.start(), timeout=30)
    done.wait()


if __name__ == '__main__':
    main()
