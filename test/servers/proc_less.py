"""A server and both clients in one process, for test_without_proc.py: an
IPCServer with a socket group, called by IPCHandler and SyncIPCHandler on both
lanes (a 2 MiB request too: shared memory on the fast lane), then stopped.
Prints what it saw as one JSON line: whether ``/proc/self/fd`` exists, each
socket file's mode, group and type, the replies, the gRPC-lane connections
the server counted while one client was connected there, and what is left in
the socket's directory after the stop.

Usage: proc_less.py SOCKET_PATH GROUP
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from typing import Any

from vyra_base_ipc import IPCHandler, IPCServer, ModuleService, SyncIPCHandler
from vyra_base_ipc import module_service_pb2 as pb
from vyra_base_ipc.module_service_pb2_grpc import ModuleServiceStub

PING = pb.CommandRequest(command='ping')


def blocking(path: str) -> list[str]:
    replies = []
    for lane in ('grpc', 'ttrpc'):
        with SyncIPCHandler(path, ModuleServiceStub, lane=lane, timeout=10) as module:
            replies.append(module.call_method('ExecuteCommand', PING).result)
    return replies


async def main(path: str, group: str) -> dict[str, Any]:
    server = IPCServer(path, servicers=[ModuleService('unit')], socket_group=group)
    await server.start()
    try:
        files = {}
        for name in (server.socket_path, server.ttrpc_socket_path):
            info = os.lstat(name)
            files[os.path.basename(name)] = [stat.S_IMODE(info.st_mode), info.st_gid, stat.S_ISSOCK(info.st_mode)]
        replies: list[str] = []
        for lane in ('grpc', 'ttrpc'):
            async with IPCHandler(path, ModuleServiceStub, lane=lane, timeout=10) as module:
                reply = await module.call_method('ExecuteCommand', PING)
                if lane == 'grpc':
                    grpc_connections = await asyncio.to_thread(server.count_grpc_connections)
                large = await module.call_method('ExecuteCommand', pb.CommandRequest(
                    command='ping', parameters={'pad': 'x' * (2 << 20)}))
                replies += [reply.result, large.result, str(module.lane_in_use)]
        replies += await asyncio.to_thread(blocking, path)
    finally:
        await server.stop()
    return {'proc': os.path.isdir('/proc/self/fd'), 'files': files, 'replies': replies,
            'grpc_connections': grpc_connections,
            'left': sorted(os.listdir(os.path.dirname(path)))}


if __name__ == '__main__':
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))))
