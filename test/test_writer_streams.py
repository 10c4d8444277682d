"""A response stream whose ``async def`` handler writes with ``await
context.write()`` instead of yielding, on both lanes of a real server process
(test/servers/writer_server.py), metrics on as by default: the gRPC lane's
observation wrapper answered what the coroutine returned (None) as a unary
response, so every such stream ended UNKNOWN "Unexpected <class 'TypeError'>:
descriptor 'SerializeToString' ... 'NoneType' object" after its messages."""

from __future__ import annotations

import asyncio
from pathlib import Path
import signal
from typing import Any

import grpc
import pytest

from conftest import StartServer, until
from vyra_base_ipc import IPCHandler, IPCRemoteError, IPCUnavailableError, SyncIPCHandler
from vyra_base_ipc import introspection_pb2 as introspection
from vyra_base_ipc import introspection_pb2_grpc as introspection_grpc

WATCH = '/vyra.ipc.test.WatchService/Watch'


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_stream_written_with_context_write_ends_ok_and_is_observed_ok(
        start_server: StartServer, socket_path: Path, echo: Any, lane: str) -> None:
    server = start_server(socket_path, script='writer_server.py', wait=False).wait_serving(ttrpc=True)
    with SyncIPCHandler(socket_path, echo.grpc.WatchServiceStub, lane=lane, timeout=10) as client:
        events = list(client.stream_method('Watch', echo.pb.WatchRequest(count=3)))
    assert [event.index for event in events] == [0, 1, 2]
    with SyncIPCHandler(socket_path, introspection_grpc.IntrospectionStub, lane=lane, timeout=10) as client:
        stats = client.call_method('GetStats', introspection.StatsRequest())
    watch = next(entry for entry in stats.methods if entry.method == WATCH and entry.lane == lane)
    assert (watch.calls, dict(watch.errors)) == (1, {})
    assert 'ERROR' not in server.log(), server.log()


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_stream_handler_that_returns_a_message_fails_unknown_saying_it_is_not_sent(
        start_server: StartServer, socket_path: Path, echo: Any, lane: str) -> None:
    # grpc.aio drops what such a coroutine returns: the stream ended OK
    # without its last message, and nothing said why.
    server = start_server(socket_path, script='writer_server.py', wait=False).wait_serving(ttrpc=True)
    events = []
    with SyncIPCHandler(socket_path, echo.grpc.WatchServiceStub, lane=lane, timeout=10) as client:
        with pytest.raises(IPCRemoteError) as failed:
            for event in client.stream_method('Watch', echo.pb.WatchRequest(count=3, tag='return')):
                events.append(event.index)
    assert events == [0, 1]
    assert (failed.value.code, failed.value.details) == (
        grpc.StatusCode.UNKNOWN, "Unexpected <class 'TypeError'>: the handler of /vyra.ipc.test.WatchService/Watch "
        'returned vyra.ipc.test.WatchEvent: a response-stream handler yields its responses (or writes them '
        'with context.write()); what it returns is not sent')
    assert 'the handler of /vyra.ipc.test.WatchService/Watch returned' in server.log()


@pytest.mark.asyncio
@pytest.mark.parametrize('interval', [0.02, 1e-6], ids=['mostly waiting', 'mostly writing'])
@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
async def test_sigterm_ends_open_written_streams_at_once_as_shutting_down(
        start_server: StartServer, socket_path: Path, echo: Any, lane: str, interval: float) -> None:
    # Before: on the gRPC lane only async generator handlers were ended at
    # once; a coroutine writing with context.write() got the grace period,
    # then was cut off (CANCELLED after the grace, not told why). The stop
    # finds each handler waiting for its next event, or inside a write.
    grace = 30.0
    server = start_server(socket_path, str(grace), script='writer_server.py', wait=False).wait_serving(ttrpc=True)
    outcomes: list[BaseException | None] = []
    received = [0] * 10

    async def follow(ipc: IPCHandler, index: int) -> None:
        try:
            async for _ in ipc.stream_method('Watch', echo.pb.WatchRequest(count=0, interval=interval), timeout=None):
                received[index] += 1
            outcomes.append(None)
        except BaseException as error:  # noqa: B036 - recorded and asserted below
            outcomes.append(error)
    async with IPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane) as ipc:
        watches = [asyncio.ensure_future(follow(ipc, index)) for index in range(10)]
        await until(lambda: all(received), 20, 'the 10 written streams to flow')
        server.signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.wait, grace / 2)  # (raises if it waits for the grace)
        await asyncio.wait_for(asyncio.gather(*watches), 10)
    assert code == 0, server.log()
    assert len(outcomes) == 10
    for outcome in outcomes:
        assert isinstance(outcome, IPCUnavailableError), outcome
        assert outcome.details == 'server is shutting down', outcome
    assert 'ERROR' not in server.log(), server.log()


@pytest.mark.asyncio
@pytest.mark.parametrize('method', ['Watch', 'Converse'], ids=['written', 'yielded'])
@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
async def test_a_stream_whose_handler_swallows_the_stops_cancellation_still_ends_shutting_down(
        start_server: StartServer, socket_path: Path, echo: Any, lane: str, method: str) -> None:
    # Before: on the gRPC lane the handler's return after the stop's
    # cancellation ended the stream OK, as if it were complete; grpc.aio
    # and the fast lane end it UNAVAILABLE.
    server = start_server(socket_path, '30', script='writer_server.py', wait=False).wait_serving(ttrpc=True)
    received = 0
    request = echo.pb.WatchRequest(tag='swallow', interval=0.01)

    async def requests() -> Any:
        yield request
        await asyncio.Event().wait()  # (the request stream stays open)

    async def follow(ipc: IPCHandler) -> None:
        nonlocal received
        responses = ipc.stream_method(method, request if method == 'Watch' else requests(), timeout=None)
        async for _ in responses:
            received += 1
    async with IPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane) as ipc:
        watch = asyncio.ensure_future(follow(ipc))
        await until(lambda: received or watch.done(), 20, 'the stream to flow')
        server.signal(signal.SIGTERM)
        with pytest.raises(IPCUnavailableError) as ended:
            await asyncio.wait_for(watch, 20)
    assert ended.value.details == 'server is shutting down'
    assert server.wait(20) == 0, server.log()
    assert 'ERROR' not in server.log(), server.log()
