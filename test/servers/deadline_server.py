"""A real server process for test_def_handlers.py: a ``def`` handler that
aborts its call just as grpc ends it at its deadline, on the gRPC lane only.

Usage: deadline_server.py SOCKET_PATH JOURNAL

``StatusService/MisbehaveSync`` (any ``how``) holds the server's event loop
(a callback that waits), waits until its call's deadline has passed
(``time_remaining()`` is 0), calls ``context.abort(NOT_FOUND)`` from a
second thread, and lets the loop go once that abort waits for the loop. So
the abort runs on the loop before grpc's end of the call at its deadline
(grpc core's word of it comes through a socket the loop reads only after
what is queued for it), whether or not grpc core had ended the call by
then. It journals (one JSON line, ``"event": "aborted"``) the ``tag`` and
the name of the exception the abort raised.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from typing import Any, Callable

import grpc
from vyra_ipc_test import echo_pb2, echo_pb2_grpc

from vyra_base_ipc import IPCServer, run

#: How long any wait here may take at most (a test that fails must not hang).
_AT_MOST = 30.0


def _wait(condition: Callable[[], bool]) -> None:
    until = time.monotonic() + _AT_MOST
    while not condition() and time.monotonic() < until:
        time.sleep(0.001)


class AbortAtDeadline(echo_pb2_grpc.StatusServiceServicer):
    def __init__(self, journal: Callable[[dict[str, Any]], None]) -> None:
        self.journal = journal
        self.loop: asyncio.AbstractEventLoop | None = None

    def MisbehaveSync(self, request: echo_pb2.MisbehaveRequest, context: Any) -> echo_pb2.EchoReply:
        assert self.loop is not None
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            held.set()
            release.wait(_AT_MOST)
        self.loop.call_soon_threadsafe(hold)
        held.wait(_AT_MOST)
        _wait(lambda: context.time_remaining() == 0)
        raised = []

        def abort() -> None:
            try:
                context.abort(grpc.StatusCode.NOT_FOUND, 'at the deadline')
            except BaseException as error:
                raised.append(type(error).__name__)
        aborting = threading.Thread(target=abort)
        aborting.start()
        # (the SyncContext's own mark: it waits for the loop, the abort queued there)
        _wait(lambda: context._waiting is not None or not aborting.is_alive())
        release.set()
        aborting.join(_AT_MOST)
        self.journal({'event': 'aborted', 'tag': request.tag, 'raised': raised[0] if raised else ''})
        return echo_pb2.EchoReply(text='too late')


def main() -> None:
    socket_path, journal_path = sys.argv[1:3]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    journal = open(journal_path, 'a', buffering=1, encoding='utf-8')
    lock = threading.Lock()

    def write(entry: dict[str, Any]) -> None:
        with lock:
            journal.write(json.dumps(entry) + '\n')

    servicer = AbortAtDeadline(write)
    server = IPCServer(socket_path, ttrpc=False, grace_period=1.0, servicers=[servicer])

    async def serve() -> None:
        servicer.loop = asyncio.get_running_loop()
        await server.serve()
    run(serve())


if __name__ == '__main__':
    main()
