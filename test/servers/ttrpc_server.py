"""A real server process for the fast-lane tests: the EchoService of
echo_server.py (extended with probes), ModuleService and BackendService,
served by one IPCServer (gRPC) and one TtrpcServer on a second socket, from
the same servicer objects, on the same event loop.

Usage: ttrpc_server.py GRPC_SOCKET TTRPC_SOCKET [--max-message-bytes N]
       [--grace-period S]
Prints nothing; the tests wait for both sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path
import signal
import sys
import threading
import time

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from echo_server import EchoService
from vyra_ipc_test import echo_pb2

from vyra_base_ipc import IPCServer, ModuleService
from vyra_base_ipc.demo.backend_service import BackendService
from vyra_base_ipc.ttrpc import TtrpcServer


class ProbedEchoService(EchoService):
    """EchoService with probes the tests drive through the request text.

    Whatever a handler observes about its context is recorded in
    ``observed`` and read back with the ``observed`` command of the
    ModuleService, so a test can check what the server saw even when the
    client gave up on the call.
    """

    def __init__(self) -> None:
        self.observed: dict[str, object] = {}
        self.lock = threading.Lock()

    def record(self, key: str, value: object) -> None:
        with self.lock:
            self.observed[key] = value

    async def Echo(self, request, context):
        text = request.text
        if text == 'raise':
            raise ValueError('boom')
        if text == 'none':
            return None
        if text == 'set-code':
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details('set by the handler')
            return echo_pb2.EchoReply(text='ignored')
        if text == 'catch-abort':
            try:
                await context.abort(grpc.StatusCode.INTERNAL, 'first abort')
            except grpc.aio.AbortError:
                return echo_pb2.EchoReply(text='swallowed')
        if text == 'metadata':
            pairs = [[key, value.hex() if isinstance(value, bytes) else value]
                     for key, value in context.invocation_metadata() if key != 'user-agent']
            return echo_pb2.EchoReply(text=json.dumps(pairs))
        if text.startswith('sleep:'):
            # Sleep, then record what the context says (the client may be gone).
            label, seconds = text.split(':')[1:]
            try:
                await asyncio.sleep(float(seconds))
            finally:
                self.record(label, {'time_remaining': context.time_remaining(),
                                    'is_active': context.is_active(),
                                    'cancelled': context.cancelled()})
            return echo_pb2.EchoReply(text=label)
        return await super().Echo(request, context)

    def EchoSync(self, request, context):
        text = request.text
        if text == 'raise':
            raise ValueError('boom')
        if text == 'abort':
            context.abort(grpc.StatusCode.PERMISSION_DENIED, 'not you')
        if text.startswith('sleep:'):
            label, seconds = text.split(':')[1:]
            time.sleep(float(seconds))
            self.record(label, {'time_remaining': context.time_remaining(),
                                'is_active': context.is_active(),
                                'cancelled': context.cancelled()})
            return echo_pb2.EchoReply(text=label)
        return super().EchoSync(request, context)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('grpc_socket')
    parser.add_argument('ttrpc_socket')
    parser.add_argument('--max-message-bytes', type=int, default=4 * 1024 * 1024)
    parser.add_argument('--grace-period', type=float, default=2.0)
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    echo = ProbedEchoService()
    module = ModuleService('test_module')
    module.register_command('observed', lambda parameters: json.dumps(echo.observed))
    module.register_command('parameters', lambda parameters: json.dumps(parameters, sort_keys=True))

    async def serve() -> None:
        grpc_server = IPCServer(options.grpc_socket, servicers=[echo, module, BackendService()],
                                max_message_bytes=options.max_message_bytes,
                                grace_period=options.grace_period)
        await grpc_server.start()
        ttrpc_server = TtrpcServer(options.ttrpc_socket, grpc_server.services,
                                   max_message_bytes=options.max_message_bytes,
                                   grace_period=options.grace_period)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(stop_signal, stop.set)
        try:
            await ttrpc_server.start()
            await stop.wait()
        finally:
            await ttrpc_server.stop()
            await grpc_server.stop()

    try:
        asyncio.run(serve())
    except OSError as error:
        print(f'ttrpc_server: {error}', file=sys.stderr)
        sys.exit(3)


if __name__ == '__main__':
    main()
