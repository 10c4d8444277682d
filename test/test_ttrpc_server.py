"""TtrpcServer's socket lifecycle and shutdown, in this process, on real sockets."""

from __future__ import annotations

import asyncio
from concurrent import futures
import os
from pathlib import Path
import socket
import stat
from typing import Any

import grpc
import pytest

from vyra_base_ipc.exceptions import IPCUnavailableError, SocketInUseError
from vyra_base_ipc.methods import record_servicer, stub_methods
from vyra_base_ipc.ttrpc import AsyncConnection, SyncConnection, TtrpcServer, ttrpc_socket_path


@pytest.fixture
def servicer(echo: Any) -> Any:
    class Servicer(echo.grpc.EchoServiceServicer):
        def __init__(self) -> None:
            self.ended: list[tuple[bool, float | None]] = []

        async def Echo(self, request: Any, context: Any) -> Any:
            return echo.pb.EchoReply(text=request.text)

        async def Sleep(self, request: Any, context: Any) -> Any:
            context.add_done_callback(
                lambda ctx: self.ended.append((ctx.cancelled(), ctx.time_remaining())))
            await asyncio.sleep(request.seconds)
            return echo.pb.SleepReply(time_remaining=context.time_remaining() or 0.0, was_active=True)
    return Servicer()


def server_for(path: Path, servicer: Any, **kwargs: Any) -> TtrpcServer:
    return TtrpcServer(path, record_servicer(servicer), **kwargs)


@pytest.mark.asyncio
async def test_socket_file_gets_its_mode_and_is_removed_on_stop(socket_dir: Path, servicer: Any,
                                                                echo: Any) -> None:
    path = socket_dir / 'a.ttrpc.sock'
    server = server_for(path, servicer)
    await server.start()
    try:
        info = os.lstat(path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert [p.name for p in socket_dir.iterdir()] == ['a.ttrpc.sock']  # no private dir left
        async with await AsyncConnection.connect(path) as connection:
            reply = await connection.call(stub_methods(echo.Stub)['Echo'], echo.pb.EchoRequest(text='x'),
                                          timeout=10)
        assert reply.text == 'x'
    finally:
        await server.stop()
    assert not path.exists()
    await server.stop()  # idempotent


@pytest.mark.asyncio
async def test_custom_socket_mode(socket_dir: Path, servicer: Any) -> None:
    path = socket_dir / 'nested' / 'b.sock'
    async with server_for(path, servicer, socket_mode=0o660, directory_mode=0o750):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
        assert stat.S_IMODE(os.lstat(path.parent).st_mode) == 0o750


@pytest.mark.asyncio
async def test_live_socket_is_never_taken_over(socket_dir: Path, servicer: Any, echo: Any) -> None:
    path = socket_dir / 'c.sock'
    async with server_for(path, servicer):
        second = server_for(path, servicer)
        with pytest.raises(SocketInUseError):
            await second.start()
        await second.stop()
        async with await AsyncConnection.connect(path) as connection:
            reply = await connection.call(stub_methods(echo.Stub)['Echo'], echo.pb.EchoRequest(text='first'),
                                          timeout=10)
        assert reply.text == 'first'
    assert not path.exists()


@pytest.mark.asyncio
async def test_stale_socket_file_is_replaced(socket_dir: Path, servicer: Any) -> None:
    path = socket_dir / 'd.sock'
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    async with server_for(path, servicer):
        SyncConnection.connect(path).close()


@pytest.mark.asyncio
async def test_file_that_is_not_a_socket_is_left_alone(socket_dir: Path, servicer: Any) -> None:
    path = socket_dir / 'e.sock'
    path.write_text('not a socket')
    with pytest.raises(FileExistsError):
        await server_for(path, servicer).start()
    assert path.read_text() == 'not a socket'
    assert [p.name for p in socket_dir.iterdir()] == ['e.sock']


@pytest.mark.asyncio
async def test_stop_keeps_a_socket_that_is_no_longer_ours(socket_dir: Path, servicer: Any) -> None:
    path = socket_dir / 'f.sock'
    server = server_for(path, servicer)
    await server.start()
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))
    try:
        await server.stop()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        other.close()


@pytest.mark.asyncio
async def test_start_twice_is_an_error(socket_dir: Path, servicer: Any) -> None:
    async with server_for(socket_dir / 'g.sock', servicer) as server:
        with pytest.raises(RuntimeError):
            await server.start()


@pytest.mark.asyncio
async def test_in_flight_calls_finish_within_the_grace_period(socket_dir: Path, servicer: Any,
                                                              echo: Any) -> None:
    path = socket_dir / 'h.sock'
    server = server_for(path, servicer)
    await server.start()
    methods = stub_methods(echo.Stub)
    connection = await AsyncConnection.connect(path)
    try:
        in_flight = asyncio.ensure_future(connection.call(
            methods['Sleep'], echo.pb.SleepRequest(seconds=0.3), timeout=30))
        await asyncio.sleep(0)  # the request is written
        while not server._active:
            await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(server.stop(grace=30))
        while not server._stopping:
            await asyncio.sleep(0)
        with pytest.raises(IPCUnavailableError, match='shutting down'):
            await connection.call(methods['Echo'], echo.pb.EchoRequest(), timeout=10)
        assert (await in_flight).was_active is True
        await stopping
        [(cancelled, remaining)] = servicer.ended
        assert cancelled is False and 0 < remaining < 30
    finally:
        await connection.close()


@pytest.mark.asyncio
async def test_calls_past_the_grace_period_are_cancelled(socket_dir: Path, servicer: Any, echo: Any) -> None:
    path = socket_dir / 'i.sock'
    server = server_for(path, servicer)
    await server.start()
    async with await AsyncConnection.connect(path) as connection:
        in_flight = asyncio.ensure_future(connection.call(
            stub_methods(echo.Stub)['Sleep'], echo.pb.SleepRequest(seconds=60), timeout=120))
        while not server._active:
            await asyncio.sleep(0.01)
        await server.stop(grace=0.1)
        with pytest.raises(IPCUnavailableError):
            await in_flight
    assert len(servicer.ended) == 1 and servicer.ended[0][0] is True  # the handler saw it cancelled


@pytest.mark.asyncio
async def test_a_given_executor_is_not_shut_down(socket_dir: Path, servicer: Any) -> None:
    with futures.ThreadPoolExecutor(1) as executor:
        async with server_for(socket_dir / 'j.sock', servicer, executor=executor):
            pass
        assert executor.submit(lambda: 42).result(timeout=10) == 42


def test_a_service_registered_twice_is_refused(socket_dir: Path, servicer: Any) -> None:
    with pytest.raises(ValueError, match='twice'):
        TtrpcServer(socket_dir / 'k.sock', record_servicer(servicer) + record_servicer(servicer))


def test_default_fast_lane_path_is_beside_the_grpc_socket() -> None:
    assert ttrpc_socket_path('/tmp/demo_ipc.sock') == Path('/tmp/demo_ipc.ttrpc.sock')
    assert ttrpc_socket_path('/run/x/api') == Path('/run/x/api.ttrpc.sock')
    with pytest.raises(ValueError, match='107 bytes'):
        ttrpc_socket_path('/tmp/' + 'x' * 95 + '.sock')
