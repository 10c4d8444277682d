"""EchoService whose handlers leave by ``sys.exit()`` or KeyboardInterrupt
when asked, in each shape: text ``exit`` or ``interrupt`` (Echo, EchoSync,
and each message of Chat and ChatSync), count -1 or -2 (Count, after a first
answer). Asked nothing, they echo as usual. Prints nothing; the tests wait
for the sockets.

``LoopEnder`` (for ipc_server's ``servicers`` parameter) is a ModuleService
whose command ``end_loop`` lets ``sys.exit()`` out of a callback on the
server's event loop, where no handler guard can catch it: the loop ends.

Usage: exiting_server.py SOCKET_PATH
"""

from __future__ import annotations

import asyncio
import logging
import sys

from echo_server import EchoService
from vyra_ipc_test import echo_pb2

from vyra_base_ipc import IPCServer, ModuleService, command, run


def leave_if_asked(how: str) -> None:
    if how == 'exit':
        sys.exit(3)
    if how == 'interrupt':
        raise KeyboardInterrupt


class ExitingEchoService(EchoService):
    async def Echo(self, request, context):
        leave_if_asked(request.text)
        return await super().Echo(request, context)

    def EchoSync(self, request, context):
        leave_if_asked(request.text)
        return super().EchoSync(request, context)

    async def Count(self, request, context):
        yield echo_pb2.EchoReply(text='item 0')
        leave_if_asked({-1: 'exit', -2: 'interrupt'}.get(request.count, ''))

    async def Chat(self, request_iterator, context):
        async for request in request_iterator:
            leave_if_asked(request.text)
            yield echo_pb2.EchoReply(text=request.text.upper())

    def ChatSync(self, request_iterator, context):
        for request in request_iterator:
            leave_if_asked(request.text)
            yield echo_pb2.EchoReply(text=request.text.upper())


class LoopEnder(ModuleService):
    def __init__(self) -> None:
        super().__init__('ender')

    @command()
    async def end_loop(self, parameters: dict[str, str]) -> str:
        asyncio.get_running_loop().call_soon(sys.exit, 4)
        return 'ending the loop'


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    run(IPCServer(sys.argv[1], servicers=[ExitingEchoService()]).serve())


if __name__ == '__main__':
    main()
