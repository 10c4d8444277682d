"""A server stopped with calls in flight, on either lane: a real server process
(test/servers/stop_server.py) gets SIGTERM while an ``async def`` unary call
sleeps, another one that cleans up when cancelled sleeps, a ``def`` unary
handler works, and a watch stream of each handler kind is open. Its clients
get the statuses they always got, its log stays free of ERROR lines and
tracebacks, and no call's task outlives the stop.

On the gRPC lane grpc.aio's stop() returned before its tasks of the calls it
had cancelled had ended; the end of the event loop right after cancelled
them: a handler's cleanup was cut short, and grpc's task awaiting a call's
task, cancelled once that one had ended but before it took the end, logged
"Exception not handled by _handle_exceptions ... CancelledError" and a
traceback (see ``CallTasks`` in vyra_base_ipc/_grpc_streams.py). That last
depends on the loop's last turns; the tasks left after the stop do not.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
import signal
from typing import Any, Awaitable, Callable, Mapping

import grpc
import pytest

from conftest import ServerProcess, StartServer, in_flight, wait_for
from vyra_base_ipc import IPCError, IPCHandler

SLEEP = '/vyra.ipc.test.EchoService/Sleep'
CLEANUP = '/vyra.ipc.test.EchoService/Inspect'
WORK = '/vyra.ipc.test.StatusService/MisbehaveSync'

#: What each call's client gets, on both lanes: the calls with one answer
#: are cancelled at the end of the grace, the streams end at once.
EXPECTED = {
    'sleep': ('UNAVAILABLE', 'Cancelling all calls'),
    'cleanup': ('UNAVAILABLE', 'Cancelling all calls'),
    'work': ('UNAVAILABLE', 'Cancelling all calls'),
    'watch': ('UNAVAILABLE', 'server is shutting down'),
    'watch_sync': ('UNAVAILABLE', 'server is shutting down'),
}

#: A lane's calls by name, how to read a call's status from what it raised, and how to close the client.
Calls = tuple[Mapping[str, Awaitable[Any]], Callable[[BaseException], tuple[str, str]], Callable[[], Awaitable[Any]]]


async def grpc_calls(server: ServerProcess, echo: Any, first: dict[str, asyncio.Event]) -> Calls:
    """The calls on the gRPC lane, from a plain grpc.aio client without deadlines (as grpcurl and
    clients in other languages call by default; with a deadline grpc.aio ended them in another order)."""
    pb = echo.pb
    channel = grpc.aio.insecure_channel(f'unix:{server.socket_path}')
    watches = echo.grpc.WatchServiceStub(channel)

    async def watch(method: str) -> None:
        async for _ in getattr(watches, method)(pb.WatchRequest(tag=method, count=1, hold=True)):
            first[method].set()

    calls = {
        'sleep': echo.grpc.EchoServiceStub(channel).Sleep(pb.SleepRequest(seconds=60)),
        'cleanup': echo.grpc.EchoServiceStub(channel).Inspect(pb.InspectRequest(sleep_seconds=60)),
        'work': echo.grpc.StatusServiceStub(channel).MisbehaveSync(pb.MisbehaveRequest(how='until-inactive')),
        'watch': watch('Watch'),
        'watch_sync': watch('WatchSync'),
    }

    def status(error: BaseException) -> tuple[str, str]:
        assert isinstance(error, grpc.aio.AioRpcError), error
        return error.code().name, error.details() or ''
    return calls, status, channel.close


async def fast_lane_calls(server: ServerProcess, echo: Any, first: dict[str, asyncio.Event]) -> Calls:
    """The calls on the fast lane, from this package's client."""
    pb = echo.pb
    handlers = [IPCHandler(server.socket_path, stub, lane='ttrpc') for stub in (
        echo.grpc.EchoServiceStub, echo.grpc.StatusServiceStub, echo.grpc.WatchServiceStub)]
    calls_handler, status_handler, watches = handlers

    async def watch(method: str) -> None:
        async for _ in watches.stream_method(method, pb.WatchRequest(tag=method, count=1, hold=True), timeout=None):
            first[method].set()

    calls = {
        'sleep': calls_handler.call_method('Sleep', pb.SleepRequest(seconds=60), timeout=60),
        'cleanup': calls_handler.call_method('Inspect', pb.InspectRequest(sleep_seconds=60), timeout=60),
        'work': status_handler.call_method('MisbehaveSync', pb.MisbehaveRequest(how='until-inactive'), timeout=60),
        'watch': watch('Watch'),
        'watch_sync': watch('WatchSync'),
    }

    def status(error: BaseException) -> tuple[str, str]:
        assert isinstance(error, IPCError), error
        return error.code.name, error.details
    async def close() -> None:
        for handler in handlers:
            await handler.disconnect()
    return calls, status, close


async def stop_with_calls_in_flight(server: ServerProcess, lane: str, echo: Any) -> dict[str, tuple[str, str]]:
    """Start the calls, wait until each runs, SIGTERM the server: what each call's client got."""
    first = {'Watch': asyncio.Event(), 'WatchSync': asyncio.Event()}
    calls, status, close = await (grpc_calls if lane == 'grpc' else fast_lane_calls)(server, echo, first)
    running = {name: asyncio.ensure_future(call) for name, call in calls.items()}
    try:
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in first.values())), 20)
        for method in (SLEEP, CLEANUP, WORK):
            await asyncio.to_thread(wait_for, lambda method=method: in_flight(server, lane, method) == 1, 20,
                                    f'{method} running')
        server.signal(signal.SIGTERM)
        seen = {}
        for name, call in running.items():
            with pytest.raises((grpc.aio.AioRpcError, IPCError)) as ended:
                await asyncio.wait_for(call, 20)
            seen[name] = status(ended.value)
        return seen
    finally:
        for call in running.values():
            call.cancel()
        await close()


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
@pytest.mark.parametrize('how', ['serve', 'loop-thread'])
def test_a_stop_with_calls_in_flight_logs_no_error_and_leaves_no_task(
        start_server: StartServer, socket_path: Path, tmp_path: Path, echo: Any, lane: str, how: str) -> None:
    report = tmp_path / 'report.json'
    server = start_server(socket_path, str(report), *(['--loop-thread'] if how == 'loop-thread' else []),
                          script='stop_server.py', wait=False).wait_serving(ttrpc=True)
    seen = asyncio.run(stop_with_calls_in_flight(server, lane, echo))
    assert server.wait() == 0, server.log()
    log = server.log()
    assert seen == EXPECTED, log
    assert 'ERROR' not in log and 'Traceback' not in log, log
    assert 'stopped' in log  # (the whole log: the stop was logged)
    left = json.loads(report.read_text())
    # grpc's per-call tasks had ended before the loop could cancel them, the cleanup of a
    # cancelled handler too (the end of the loop cut it short); the def handlers, told that their
    # calls ended, had returned when the stop did (the process's exit cut their cleanup short).
    assert left == {'grpc_tasks': [], 'cleaned': [60.0], 'busy_at_stop': [], 'busy': []}, log


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_stop_waits_within_the_grace_for_def_handlers_told_that_their_calls_ended(
        start_server: StartServer, socket_path: Path, tmp_path: Path, echo: Any, lane: str) -> None:
    # Before: the stop ended a def stream handler's call at once, told it so,
    # and returned without waiting for its thread: the process exited with the
    # handler's cleanup half done (its threads are daemon threads). It now
    # waits for them as long as for cancelled async handlers (grace + 1 s).
    report = tmp_path / 'report.json'
    server = start_server(socket_path, str(report), '--grace', '30', script='stop_server.py',
                          wait=False).wait_serving(ttrpc=True)

    async def watch_then_stop() -> BaseException:
        async with IPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane) as ipc:
            flowing = asyncio.Event()

            async def watch() -> None:
                request = echo.pb.WatchRequest(tag='slow-cleanup', count=1, hold=True)
                async for _ in ipc.stream_method('WatchSync', request, timeout=None):
                    flowing.set()
            watching = asyncio.ensure_future(watch())
            await asyncio.wait_for(flowing.wait(), 20)
            server.signal(signal.SIGTERM)
            with pytest.raises(IPCError) as ended:
                await asyncio.wait_for(watching, 20)
            return ended.value
    ended = asyncio.run(watch_then_stop())
    assert server.wait() == 0, server.log()
    assert getattr(ended, 'details', None) == 'server is shutting down', ended
    left = json.loads(report.read_text())
    assert left['busy_at_stop'] == [], server.log()
    assert 'ERROR' not in server.log(), server.log()
