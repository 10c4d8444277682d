"""The echo server of the tests, with a journal of what its handlers saw.

Every request that reaches a handler of ``Echo``, ``EchoSync``, ``Sleep`` or
``ModuleService.ExecuteCommand`` is appended to the journal file as one line
``<event> <method> <request bytes as hex>``, where ``<event>`` is ``begin``,
and for ``Sleep`` also ``end`` or ``cancelled``. The fault tests read it to
know that a call is in flight on the server (not merely sent), and to prove
that garbage on the wire never reached a handler as a request.

With ``--start-gate PATH`` the process imports everything, creates
``PATH.<pid>.waiting``, then waits for ``PATH`` to appear before it starts the
server: several servers started that way race for the socket path within a
millisecond of each other.

Usage: fault_server.py SOCKET_PATH --journal PATH [--start-gate PATH]
       [the options of echo_server.py]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path
import sys
import time
from typing import Any

# The tests run with PYTHONSAFEPATH set, which keeps this script's own
# directory off sys.path; echo_server.py beside it holds the shared servicer.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from echo_server import EchoService

from vyra_base_ipc import IPCServer, ModuleService
from vyra_base_ipc.demo.backend_service import BackendService


class Journal:
    """Appends one line per event; ``O_APPEND`` writes of one line are atomic,
    so the handler threads and the event loop may write concurrently."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def write(self, event: str, method: str, request: Any) -> None:
        os.write(self._fd, f'{event} {method} {request.SerializeToString().hex()}\n'.encode())


class JournaledEchoService(EchoService):
    def __init__(self, journal: Journal) -> None:
        self._journal = journal

    async def Echo(self, request, context):
        self._journal.write('begin', 'Echo', request)
        return await super().Echo(request, context)

    def EchoSync(self, request, context):
        self._journal.write('begin', 'EchoSync', request)
        return super().EchoSync(request, context)

    async def Sleep(self, request, context):
        self._journal.write('begin', 'Sleep', request)
        try:
            reply = await super().Sleep(request, context)
        except asyncio.CancelledError:
            self._journal.write('cancelled', 'Sleep', request)
            raise
        self._journal.write('end', 'Sleep', request)
        return reply


class JournaledModuleService(ModuleService):
    def __init__(self, journal: Journal) -> None:
        super().__init__('test_module')
        self._journal = journal

    async def ExecuteCommand(self, request, context):
        self._journal.write('begin', 'ExecuteCommand', request)
        return await super().ExecuteCommand(request, context)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('socket_path')
    parser.add_argument('--journal', required=True)
    parser.add_argument('--start-gate', default=None)
    parser.add_argument('--max-message-bytes', type=int, default=None)
    parser.add_argument('--grace-period', type=float, default=2.0)
    parser.add_argument('--max-workers', type=int, default=None)
    parser.add_argument('--maximum-concurrent-rpcs', type=int, default=None)
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    journal = Journal(options.journal)
    kwargs = {}
    if options.max_message_bytes is not None:
        kwargs['max_message_bytes'] = options.max_message_bytes
    server = IPCServer(
        options.socket_path,
        servicers=[JournaledEchoService(journal), JournaledModuleService(journal), BackendService()],
        grace_period=options.grace_period,
        max_workers=options.max_workers,
        maximum_concurrent_rpcs=options.maximum_concurrent_rpcs,
        **kwargs,
    )
    if options.start_gate is not None:
        Path(f'{options.start_gate}.{os.getpid()}.waiting').touch()
        while not os.path.exists(options.start_gate):
            time.sleep(0.001)
    try:
        asyncio.run(server.serve())
    except OSError as error:
        print(f'fault_server: {error}', file=sys.stderr)
        sys.exit(3)


if __name__ == '__main__':
    main()
