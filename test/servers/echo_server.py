"""A real server process for the tests: EchoService, ModuleService and
BackendService on one socket. Prints nothing; the tests wait for the socket.

Usage: echo_server.py SOCKET_PATH [--max-message-bytes N] [--grace-period S]
       [--max-workers N] [--maximum-concurrent-rpcs N] [--socket-group G]
       [--ttrpc-socket-path PATH | --no-ttrpc]
       [--shared-memory-threshold N] [--shared-memory-max-bytes N | --no-shared-memory]
       [--pool-bytes N] [--pool-free-bytes N]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
import time

import grpc
from mappings import mapping_of
from status_service import StatusService
from vyra_ipc_test import echo_pb2, echo_pb2_grpc
from watch_service import WatchService

from vyra_base_ipc import (
    DEFAULT_BUSY_POLL,
    IPCServer,
    ModuleService,
    ServerLimits,
    SharedBuffer,
    SharedMemoryOptions,
    attach_buffers,
    peer_credentials,
    received_buffer,
    run,
    shared_buffer,
)
from vyra_base_ipc._segment_pool import segment_pool
from vyra_base_ipc.demo.backend_service import BackendService


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
        await context.abort(code, request.details * max(1, request.repeat))

    async def Inspect(self, request, context):
        await context.send_initial_metadata(())  # a coroutine in grpc.aio: on the fast lane too
        if request.sleep_seconds:
            await asyncio.sleep(request.sleep_seconds)
        if request.fail_code:
            await context.abort(_code(request.fail_code), f'failing with {request.fail_code} as asked')
        return inspect(request, context)

    def InspectSync(self, request, context):
        if request.sleep_seconds:
            time.sleep(request.sleep_seconds)
        if request.fail_code:
            context.abort(_code(request.fail_code), f'failing with {request.fail_code} as asked')
        return inspect(request, context)

    async def Mirror(self, request, context):
        if request.later:
            await asyncio.sleep(0)
        return mirror(request, context)

    def MirrorSync(self, request, context):
        return mirror(request, context)


def mirror(request: echo_pb2.MirrorRequest, context) -> echo_pb2.MirrorReply:
    """Answer with the received buffer itself, or with a copy of it."""
    if request.copy:
        with SharedBuffer.copy_from(shared_buffer(request.data, context)) as copy:
            return attach_buffers(context, echo_pb2.MirrorReply(data=copy.ref), copy)
    received = received_buffer(request.data, context)
    return attach_buffers(context, echo_pb2.MirrorReply(data=received.ref), received)


def _code(number: int) -> grpc.StatusCode:
    return next(code for code in grpc.StatusCode if code.value[0] == number)


def inspect(request: echo_pb2.InspectRequest, context) -> echo_pb2.InspectReply:
    """What the handler sees of ``request.data``: digest, and the mapping of
    this process that holds its first byte (the proof of zero-copy)."""
    reply = echo_pb2.InspectReply(pid=os.getpid(), payload=request.payload)
    peer = peer_credentials(context)
    if peer is not None:
        reply.has_peer = True
        reply.peer_pid, reply.peer_uid, reply.peer_gid = peer.pid, peer.uid, peer.gid
        reply.peer_groups.extend(sorted(peer.groups or ()))
    if not request.HasField('data'):
        return reply
    view = shared_buffer(request.data, context)  # raises if the buffer did not come with the call
    reply.has_data = True
    reply.size = len(view)
    reply.sha256 = hashlib.sha256(view).digest()
    reply.inline = bool(request.data.inline_data)
    reply.read_only = view.readonly
    if len(view) and (mapping := mapping_of(view)) is not None:
        reply.backing = mapping.path
        reply.backing_inode = mapping.inode
        reply.mapping_size = mapping.end - mapping.start
    return reply


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('socket_path')
    parser.add_argument('--max-message-bytes', type=int, default=None)
    parser.add_argument('--grace-period', type=float, default=2.0)
    parser.add_argument('--max-workers', type=int, default=None)
    parser.add_argument('--maximum-concurrent-rpcs', type=int, default=None)
    parser.add_argument('--socket-group', default=None,
                        type=lambda group: int(group) if group.isdigit() else group)  # a name or a gid
    parser.add_argument('--ttrpc-socket-path', default=None)
    parser.add_argument('--no-ttrpc', dest='ttrpc', action='store_false')
    parser.add_argument('--shared-memory-threshold', type=int, default=None)
    parser.add_argument('--shared-memory-max-bytes', type=int, default=None)
    parser.add_argument('--no-shared-memory', dest='shared_memory', action='store_false')
    parser.add_argument('--pool-bytes', type=int, default=None,
                        help="bound of the process's pool of shared-memory segments")
    parser.add_argument('--pool-free-bytes', type=int, default=None,
                        help='free segments the pool keeps (0: none, every segment dies when returned)')
    parser.add_argument('--limits', default=None, help='ServerLimits fields as JSON')
    parser.add_argument('--config-dir', action='append', default=None,
                        help="a directory ModuleService's Initialize may read (repeatable)")
    parser.add_argument('--busy-poll', type=float, default=DEFAULT_BUSY_POLL,
                        help='seconds the event loop polls before it sleeps (0: plain asyncio loop)')
    options = parser.parse_args()
    if options.pool_bytes is not None:
        segment_pool().max_bytes = options.pool_bytes
    if options.pool_free_bytes is not None:
        segment_pool().max_free_bytes = options.pool_free_bytes
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    kwargs = {}
    if options.limits is not None:
        kwargs['limits'] = ServerLimits(**json.loads(options.limits))
    if options.max_message_bytes is not None:
        kwargs['max_message_bytes'] = options.max_message_bytes
    if not options.shared_memory:
        kwargs['shared_memory'] = None
    else:
        shared = {name: value for name, value in (('threshold', options.shared_memory_threshold),
                                                  ('max_bytes', options.shared_memory_max_bytes))
                  if value is not None}
        if shared:
            kwargs['shared_memory'] = SharedMemoryOptions(**shared)
    module = ModuleService('test_module', config_dirs=options.config_dir)
    # For clients that know only ModuleService (the Go client): an answer of any size.
    module.register_command('repeat', lambda parameters: parameters['text'] * int(parameters.get('times', '1')))
    # An answer of any size once the server's stop has begun (its first step removes the socket file).
    async def repeat_at_stop(parameters: dict[str, str]) -> str:
        while os.path.exists(options.socket_path):
            await asyncio.sleep(0.01)
        return parameters['text'] * int(parameters.get('times', '1'))
    module.register_command('repeat-at-stop', repeat_at_stop)
    # A def command that blocks (for I/O that never returns).
    module.register_command('block', lambda parameters: time.sleep(float(parameters['seconds'])) or 'woke')
    server = IPCServer(
        options.socket_path,
        servicers=[EchoService(), WatchService(), StatusService(), module, BackendService()],
        grace_period=options.grace_period,
        max_workers=options.max_workers,
        maximum_concurrent_rpcs=options.maximum_concurrent_rpcs,
        socket_group=options.socket_group,
        ttrpc=options.ttrpc,
        ttrpc_socket_path=options.ttrpc_socket_path,
        **kwargs,
    )
    try:
        run(server.serve(), busy_poll=options.busy_poll)
    except OSError as error:
        print(f'echo_server: {error}', file=sys.stderr)
        sys.exit(3)


if __name__ == '__main__':
    main()
