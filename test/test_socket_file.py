"""The rules of a server's socket file (vyra_base_ipc._socket_file), one set
of tests run against both servers that follow them: IPCServer (its gRPC
socket and the fast lane's beside it) and TtrpcServer, in this process, on
real sockets."""

from __future__ import annotations

import os
from pathlib import Path
import socket
import stat
from typing import Any, Callable

import pytest

from conftest import make_stale_socket
from vyra_base_ipc import IPCHandler, IPCServer, ModuleService, SocketInUseError
from vyra_base_ipc import module_service_pb2 as module_pb
from vyra_base_ipc._methods import record_servicer, stub_methods
from vyra_base_ipc.module_service_pb2_grpc import ModuleServiceStub
from vyra_base_ipc.ttrpc import AsyncConnection, TtrpcServer

pytestmark = pytest.mark.asyncio

PING = module_pb.CommandRequest(command='ping')
MakeServer = Callable[..., Any]  # (path, **options) -> IPCServer | TtrpcServer


@pytest.fixture(params=['IPCServer', 'TtrpcServer'])
def make_server(request: pytest.FixtureRequest) -> MakeServer:
    """``make_server(path, **options)``: a server of each kind, serving ModuleService."""
    if request.param == 'IPCServer':
        return lambda path, **options: IPCServer(path, servicers=[ModuleService('unit')], **options)
    return lambda path, **options: TtrpcServer(path, record_servicer(ModuleService('unit')), **options)


def socket_files(server: Any) -> list[Path]:
    """What the server publishes: its socket file, and an IPCServer's fast lane's."""
    return [server.socket_path, *filter(None, [getattr(server, 'ttrpc_socket_path', None)])]


async def ping(server: Any) -> str:
    """The answer on the server's own socket path (gRPC for an IPCServer)."""
    if isinstance(server, IPCServer):
        async with IPCHandler(server.socket_path, ModuleServiceStub, lane='grpc', timeout=10) as client:
            return (await client.call_method('ExecuteCommand', PING)).result
    async with await AsyncConnection.connect(server.socket_path) as connection:
        execute = stub_methods(ModuleServiceStub)['ExecuteCommand']
        return (await connection.call(execute, PING, timeout=10)).result


async def test_socket_files_are_the_owners_only_and_go_with_the_server(make_server: MakeServer,
                                                                       socket_path: Path) -> None:
    async with make_server(socket_path) as server:
        assert server.is_serving
        for path in socket_files(server):
            info = os.lstat(path)
            assert stat.S_ISSOCK(info.st_mode)
            assert stat.S_IMODE(info.st_mode) == 0o600
            assert info.st_uid == os.getuid()
        # No private bind directory is left beside them.
        assert sorted(socket_path.parent.iterdir()) == sorted(socket_files(server))
        assert await ping(server) == 'pong'
    assert not server.is_serving
    assert list(socket_path.parent.iterdir()) == []
    await server.stop()  # idempotent


async def test_socket_and_directory_modes_are_configurable(make_server: MakeServer, socket_dir: Path) -> None:
    path = socket_dir / 'nested' / 'b.sock'
    async with make_server(path, socket_mode=0o660, directory_mode=0o750) as server:
        for socket_file in socket_files(server):
            assert stat.S_IMODE(os.lstat(socket_file).st_mode) == 0o660
        assert stat.S_IMODE(os.lstat(path.parent).st_mode) == 0o750


async def test_missing_parent_directories_are_created_owner_only(make_server: MakeServer,
                                                                 socket_dir: Path) -> None:
    async with make_server(socket_dir / 'run' / 'module' / 'x.sock') as server:
        for directory in (socket_dir / 'run', socket_dir / 'run' / 'module'):
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert await ping(server) == 'pong'


async def test_stale_socket_file_is_replaced(make_server: MakeServer, socket_path: Path) -> None:
    make_stale_socket(socket_path)
    stale_inode = socket_path.stat().st_ino
    async with make_server(socket_path) as server:
        assert socket_path.stat().st_ino != stale_inode
        assert await ping(server) == 'pong'


async def test_live_socket_is_refused_naming_the_path_and_keeps_its_server(make_server: MakeServer,
                                                                           socket_path: Path) -> None:
    async with make_server(socket_path) as first:
        inode = socket_path.stat().st_ino
        second = make_server(socket_path)
        with pytest.raises(SocketInUseError, match='another server is listening') as error:
            await second.start()
        assert error.value.filename == str(socket_path)
        await second.stop()  # after a failed start: a no-op
        assert socket_path.stat().st_ino == inode
        assert await ping(first) == 'pong'
    assert list(socket_path.parent.iterdir()) == []


async def test_directory_at_the_path_is_an_error_naming_it(make_server: MakeServer, socket_path: Path) -> None:
    socket_path.mkdir()
    with pytest.raises(IsADirectoryError, match='is a directory') as error:
        await make_server(socket_path).start()
    assert error.value.filename == str(socket_path)
    assert list(socket_path.parent.iterdir()) == [socket_path] and socket_path.is_dir()


async def test_regular_file_at_the_path_is_an_error_and_left_alone(make_server: MakeServer,
                                                                   socket_path: Path) -> None:
    socket_path.write_text('precious')
    with pytest.raises(FileExistsError, match='not a socket') as error:
        await make_server(socket_path).start()
    assert error.value.filename == str(socket_path)
    assert socket_path.read_text() == 'precious'
    assert list(socket_path.parent.iterdir()) == [socket_path]


async def test_parent_that_is_a_file_is_an_error(make_server: MakeServer, socket_dir: Path) -> None:
    (socket_dir / 'file').write_text('')
    with pytest.raises(NotADirectoryError, match='parent is not a directory'):
        await make_server(socket_dir / 'file' / 'x.sock').start()


async def test_stop_keeps_a_socket_file_that_is_no_longer_its_own(make_server: MakeServer,
                                                                  socket_dir: Path) -> None:
    path = socket_dir / 'x.sock'
    server = make_server(path)
    await server.start()
    os.rename(path, socket_dir / 'moved.sock')  # an operator moved it away...
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))  # ...and another socket took the path
        taken = os.lstat(path).st_ino
        await server.stop()
        assert os.lstat(path).st_ino == taken
    assert sorted(p.name for p in socket_dir.iterdir()) == ['moved.sock', 'x.sock']


async def test_start_twice_is_an_error(make_server: MakeServer, socket_path: Path) -> None:
    async with make_server(socket_path) as server:
        with pytest.raises(RuntimeError, match=r'start\(\) called on a (ttrpc )?server that is serving'):
            await server.start()
