"""Bounds found by measurement (a soak of every call shape on both lanes,
sampling fds, threads, mappings and per-peer state in both processes): what
grew with the number of calls, held to a bound that does not grow with it.

Counted, not timed: each test repeats a thing more often than the bound it
checks could absorb, then asserts the bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import LANES, ServerProcess, wait_for
from vyra_base_ipc import SyncIPCHandler

pytestmark = pytest.mark.fault

#: Threads for def handlers in the server, shared by both lanes.
WORKERS = 2
#: Streams left, one after the other: more than there are worker threads.
LEFT_STREAMS = 3 * WORKERS


@pytest.mark.parametrize('lane', LANES)
def test_def_stream_handlers_whose_clients_left_give_their_worker_threads_back(
        start_server: Callable[..., ServerProcess], socket_path: Path, echo: Any, lane: str) -> None:
    """Each stream left holds a worker thread only until its handler ends:
    more streams are left than there are threads, each starts, each handler
    ends, and a def call is answered on both lanes after them (the threads
    are shared: before, two left gRPC-lane streams stopped every def
    handler of the server, fast lane included, for good: grpc.aio ran a def
    stream handler through an asyncio.Queue(maxsize=1) that nobody read once
    the client left, its thread waiting in Queue.put for ever)."""
    server = start_server(socket_path, '--max-workers', str(WORKERS))
    reports = SyncIPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane='ttrpc', timeout=10)
    try:
        with SyncIPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane, timeout=10) as ipc:
            for number in range(LEFT_STREAMS):
                stream = ipc.stream_method('WatchSync', echo.pb.WatchRequest(tag=f'left-{number}', interval=0.001))
                assert next(stream).index == 0  # it started: a worker thread was free
                stream.close()

        def every_handler_ended() -> bool:
            return all(reports.call_method('Report', echo.pb.WatchRequest(tag=f'left-{number}')).ended
                       for number in range(LEFT_STREAMS))
        wait_for(every_handler_ended, 20, f'the handlers of {LEFT_STREAMS} left WatchSync streams to end')
        for answering in LANES:
            with SyncIPCHandler(server.socket_path, echo.grpc.EchoServiceStub, lane=answering, timeout=10) as ipc:
                assert ipc.call_method('EchoSync', echo.pb.EchoRequest(text=answering)).text == answering
    finally:
        reports.disconnect()
