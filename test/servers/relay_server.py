"""A server whose EchoService.Sleep relays to another IPC server's Sleep with
its own limit, passing its context on (deadline propagation).

Usage: relay_server.py SOCKET_PATH DOWNSTREAM_SOCKET_PATH LIMIT_SECONDS
"""

from __future__ import annotations

import asyncio
import sys

from echo_server import EchoService
import grpc
from vyra_ipc_test import echo_pb2_grpc

from vyra_base_ipc import IPCHandler, IPCServer, IPCTimeoutError


class RelayService(EchoService):
    def __init__(self, downstream: IPCHandler, limit: float) -> None:
        self.downstream = downstream
        self.limit = limit

    async def Sleep(self, request, context):
        try:
            return await self.downstream.call_method('Sleep', request, timeout=self.limit, parent=context)
        except IPCTimeoutError as error:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f'downstream: {error.details}')


async def main(path: str, downstream_path: str, limit: float) -> None:
    async with IPCHandler(downstream_path, echo_pb2_grpc.EchoServiceStub, timeout=30) as downstream:
        await IPCServer(path, servicers=[RelayService(downstream, limit)]).serve()


if __name__ == '__main__':
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
