"""A real server process for the tests: EchoService, ModuleService and
BackendService on one socket. Prints nothing; the tests wait for the socket.

Usage: echo_server.py SOCKET_PATH [--max-message-bytes N] [--grace-period S]
       [--max-workers N] [--maximum-concurrent-rpcs N] [--socket-group G]
       [--ttrpc-socket-path PATH | --no-ttrpc]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import grpc

from vyra_base_ipc import IPCServer, ModuleService
from vyra_base_ipc.demo.backend_service import BackendService
from vyra_ipc_test import echo_pb2, echo_pb2_grpc


class EchoService(echo_pb2_grpc.EchoServiceServicer):
    async def Echo(self, request, context):
        return echo_pb2.EchoReply(text=request.text, payload=request.payload)

    def EchoSync(self, request, context):
        return echo_pb2.EchoReply(text=request.text, payload=request.payload)

    async def Count(self, request, context):
        for index in range(request.count):
            yield echo_pb2.EchoReply(text=f'item {index}', index=index)

    async def Collect(self, request_iterator, context):
        texts = [request.text async for request in request_iterator]
        return echo_pb2.EchoReply(text=','.join(texts), index=len(texts))

    async def Chat(self, request_iterator, context):
        index = 0
        async for request in request_iterator:
            yield echo_pb2.EchoReply(text=request.text.upper(), index=index)
            index += 1

    def ChatSync(self, request_iterator, context):
        for index, request in enumerate(request_iterator):
            yield echo_pb2.EchoReply(text=request.text.upper(), index=index)

    async def Sleep(self, request, context):
        await asyncio.sleep(request.seconds)
        return echo_pb2.SleepReply(time_remaining=context.time_remaining() or 0.0,
                                   was_active=not context.cancelled())

    async def Fail(self, request, context):
        code = next(code for code in grpc.StatusCode if code.value[0] == request.code)
        await context.abort(code, request.details)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('socket_path')
    parser.add_argument('--max-message-bytes', type=int, default=None)
    parser.add_argument('--grace-period', type=float, default=2.0)
    parser.add_argument('--max-workers', type=int, default=None)
    parser.add_argument('--maximum-concurrent-rpcs', type=int, default=None)
    parser.add_argument('--socket-group', default=None)
    parser.add_argument('--ttrpc-socket-path', default=None)
    parser.add_argument('--no-ttrpc', dest='ttrpc', action='store_false')
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    kwargs = {}
    if options.max_message_bytes is not None:
        kwargs['max_message_bytes'] = options.max_message_bytes
    server = IPCServer(
        options.socket_path,
        servicers=[EchoService(), ModuleService('test_module'), BackendService()],
        grace_period=options.grace_period,
        max_workers=options.max_workers,
        maximum_concurrent_rpcs=options.maximum_concurrent_rpcs,
        socket_group=options.socket_group,
        ttrpc=options.ttrpc,
        ttrpc_socket_path=options.ttrpc_socket_path,
        **kwargs,
    )
    try:
        asyncio.run(server.serve())
    except OSError as error:
        print(f'echo_server: {error}', file=sys.stderr)
        sys.exit(3)


if __name__ == '__main__':
    main()
