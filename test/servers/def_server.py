"""A real server process for test_def_handlers.py: the gRPC lane's def
handlers under a magnifying glass. EchoService, WatchService, StatusService
(journaling what its "wait-cancel" and "...-after-end" handlers see) and
ParityService, on a gRPC socket only.

Usage: def_server.py SOCKET_PATH JOURNAL [--max-workers N] [--poll-seconds S]

``--poll-seconds``: how often a def handler's thread waiting for the event
loop looks whether its call ended (the runner's fallback; 0.1 s normally):
a long one shows whether the thread is told of the end or finds it by looking.

SIGUSR1 writes ``SOCKET_PATH.stats`` (JSON, replaced whole): after a garbage
collection, the asyncio futures and tasks of the process not done
(``pending_futures``) and the handler threads running a handler (``busy``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

from echo_server import EchoService
from parity_server import ParityService
from status_service import StatusService
from watch_service import WatchService

from vyra_base_ipc import IPCServer, _sync_context, run
from vyra_base_ipc._handler_threads import busy_handler_threads


def write_stats(path: str) -> None:
    gc.collect()
    stats = {'pending_futures': sum(1 for thing in gc.get_objects()
                                    if isinstance(thing, asyncio.Future) and not thing.done()),
             'busy': busy_handler_threads()}
    with open(f'{path}.tmp', 'w', encoding='utf-8') as file:
        json.dump(stats, file)
    os.replace(f'{path}.tmp', path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('socket_path')
    parser.add_argument('journal')
    parser.add_argument('--max-workers', type=int, default=None)
    parser.add_argument('--poll-seconds', type=float, default=None)
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if options.poll_seconds is not None:
        _sync_context._POLL_SECONDS = options.poll_seconds
    journal = open(options.journal, 'a', buffering=1, encoding='utf-8')
    lock = threading.Lock()

    def write(entry: dict[str, Any]) -> None:
        with lock:
            journal.write(json.dumps(entry) + '\n')

    server = IPCServer(options.socket_path, ttrpc=False, max_workers=options.max_workers, grace_period=1.0,
                       servicers=[EchoService(), WatchService(), StatusService(journal=write), ParityService()])

    async def serve() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, write_stats,
                                                      f'{options.socket_path}.stats')
        await server.serve()
    run(serve())


if __name__ == '__main__':
    main()
