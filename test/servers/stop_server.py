"""A real server process for test_stop_in_flight.py: stopped by SIGTERM with
calls in flight, it reports what was left of them. EchoService (whose
``Inspect`` cleans up when cancelled, see :class:`CleaningEchoService`),
WatchService (whose ``WatchSync`` may clean up after its call, see
:class:`CleaningWatchService`) and StatusService on both lanes.

Usage: stop_server.py SOCKET_PATH REPORT [--grace S] [--loop-thread]

By default it runs ``server.serve()`` under :func:`vyra_base_ipc.run` (which
cancels what is left on the loop once it returns). With ``--loop-thread`` it
serves as the ``ipc_server`` node does: on an ``EventLoopThread``, stopped by
``server.stop(grace)`` from the main thread at SIGTERM, then the loop thread
stopped (which cancels what is left).

Once the server has stopped, before the loop ends, it writes REPORT (JSON):
``grpc_tasks``, the names of grpc.aio's per-call tasks still pending
(coroutines ``_schedule_rpc_coro`` and ``_handle_exceptions``), and
``cleaned``, the cleanups of ``Inspect`` calls that ran to their end,
``busy_at_stop``, the handler threads running a handler when the stop
returned; then, once the handler threads are idle (10 s at most), ``busy``,
the handler threads still running a handler.
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
from typing import Any

from echo_server import EchoService
from status_service import StatusService
from watch_service import WatchService

from vyra_base_ipc import IPCServer, run
from vyra_base_ipc._handler_threads import busy_handler_threads
from vyra_base_ipc._loop_thread import EventLoopThread

_GRPC_CALL_COROUTINES = ('_schedule_rpc_coro', '_handle_exceptions')
#: Turns of the event loop an ``Inspect`` call's cleanup takes: far more than
#: a stop takes from cancelling the calls to returning (a few).
_CLEANUP_TURNS = 1000
#: The ``sleep_seconds`` of each ``Inspect`` call whose cleanup ran to its end.
CLEANED: list[float] = []


class CleaningEchoService(EchoService):
    """EchoService whose ``Inspect`` waits ``sleep_seconds`` and, when its
    call is cancelled, cleans up first, in some turns of the event loop (as a
    handler closing a connection or a file asynchronously would)."""

    async def Inspect(self, request: Any, context: Any) -> Any:
        try:
            await asyncio.sleep(request.sleep_seconds)
        except asyncio.CancelledError:
            for _ in range(_CLEANUP_TURNS):
                await asyncio.sleep(0)
            CLEANED.append(request.sleep_seconds)
            raise
        return await super().Inspect(request, context)


class CleaningWatchService(WatchService):
    """WatchService whose ``WatchSync`` with the tag ``slow-cleanup`` works
    on for ``_SYNC_CLEANUP_SECONDS`` in its thread once its call ended (as a
    ``def`` handler closing a device or flushing a file would)."""

    def WatchSync(self, request: Any, context: Any) -> Any:
        try:
            yield from super().WatchSync(request, context)
        finally:
            if request.tag == 'slow-cleanup':
                time.sleep(_SYNC_CLEANUP_SECONDS)


#: Far more than a stop whose only call is a stream takes, far less than its grace.
_SYNC_CLEANUP_SECONDS = 0.5


def grpc_tasks() -> list[str]:
    """(On the loop) grpc.aio's per-call tasks not done."""
    return sorted(task.get_name() for task in asyncio.all_tasks()
                  if getattr(task.get_coro(), '__name__', '') in _GRPC_CALL_COROUTINES)


def write_report(path: str, tasks: list[str]) -> None:
    busy_at_stop = busy_handler_threads()
    until = time.monotonic() + 10
    while busy_handler_threads() and time.monotonic() < until:
        time.sleep(0.01)
    report: dict[str, Any] = {'grpc_tasks': tasks, 'cleaned': CLEANED, 'busy_at_stop': busy_at_stop,
                              'busy': busy_handler_threads()}
    Path(path).write_text(json.dumps(report), encoding='utf-8')  # (read once the process has exited)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('socket_path')
    parser.add_argument('report')
    parser.add_argument('--grace', type=float, default=0.5)
    parser.add_argument('--loop-thread', action='store_true')
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    server = IPCServer(options.socket_path, grace_period=options.grace,
                       servicers=[CleaningEchoService(), CleaningWatchService(), StatusService()])
    if not options.loop_thread:
        async def serve() -> None:
            await server.serve()
            write_report(options.report, grpc_tasks())
        run(serve())
        return
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    loop_thread = EventLoopThread(name='stop-server')
    loop_thread.start()
    loop_thread.run(server.start())
    stopping.wait()
    loop_thread.run(server.stop(options.grace))

    async def left() -> list[str]:
        return grpc_tasks()
    write_report(options.report, loop_thread.run(left()))
    loop_thread.stop()


if __name__ == '__main__':
    main()
