"""A server out of file descriptors (issue 4, guarantee 7 on the fast lane).

When ``accept()`` fails for lack of descriptors, the connection stays in the
listen backlog and the listening socket stays readable: a server that simply
retried would spin its event loop. The fast lane pauses accepting for a
second instead, keeps serving the clients it has, and accepts again once
descriptors are free.
"""

from __future__ import annotations

import logging
from pathlib import Path
import resource

import pytest

from conftest import wait_for
from vyra_base_ipc import IPCTimeoutError, IPCUnavailableError, ServerLimits
from vyra_base_ipc._methods import stub_methods
from vyra_base_ipc.address import default_ttrpc_socket_path
from vyra_base_ipc.ttrpc import SyncConnection

pytestmark = pytest.mark.fault

#: Enough for the server to start (gRPC included), few enough to run out.
NOFILE = 96


def test_fast_lane_out_of_descriptors_keeps_serving_and_accepts_again(
        start_server, socket_dir: Path, echo) -> None:
    path = socket_dir / 'nofile.sock'
    server = start_server(path, script='limited_server.py', env={'VYRA_TEST_NOFILE': str(NOFILE)})
    fast_path = default_ttrpc_socket_path(path)
    echo_method = stub_methods(echo.Stub)['Echo']

    def ping(connection: SyncConnection, text: str, timeout: float = 10.0) -> str:
        return connection.call(echo_method, echo.pb.EchoRequest(text=text), timeout=timeout).text

    first = SyncConnection.connect(fast_path)
    held: list[SyncConnection] = []
    try:
        assert ping(first, 'first') == 'first'
        # Each accepted connection takes one of the server's descriptors: fill them up.
        while True:
            assert len(held) < NOFILE, 'the server never ran out of descriptors'
            connection = SyncConnection.connect(fast_path)
            try:
                ping(connection, 'fill', timeout=1.0)
            except IPCTimeoutError:  # connected to the backlog, never accepted
                connection.close()
                break
            held.append(connection)
        assert ping(first, 'still served') == 'still served'
        # A descriptor the server has no room for is cut off (MSG_CTRUNC): the
        # connection goes, named why, instead of blaming the client for a
        # frame without its descriptor (INVALID_ARGUMENT, before).
        with pytest.raises(IPCUnavailableError):
            first.call(echo_method, echo.pb.EchoRequest(payload=bytes(1 << 20)), timeout=10)
        assert 'cut off (MSG_CTRUNC)' in server.log()
        for connection in held[:8]:
            connection.close()
        del held[:8]

        def accepted_again() -> bool:
            with SyncConnection.connect(fast_path) as connection:
                try:
                    return ping(connection, 'again', timeout=0.5) == 'again'
                except (IPCTimeoutError, IPCUnavailableError):
                    return False
        wait_for(accepted_again, 15.0, 'the fast lane accepting again')
        # Paused, not spinning: a retrying loop would have logged thousands of times.
        warnings = server.log().count('cannot accept connections')
        assert 1 <= warnings <= 30, f'{warnings} accept failures logged'
        assert server.popen.poll() is None
    finally:
        first.close()
        for connection in held:
            connection.close()


@pytest.mark.parametrize('nofile', [1024, None], ids=['1024', 'as-is'])
def test_a_server_whose_open_file_limit_is_below_its_limits_says_so_at_start(
        start_server, socket_dir: Path, nofile: int | None) -> None:
    path = socket_dir / 'warn.sock'
    if nofile is None:
        server = start_server(path)
    else:
        server = start_server(path, script='limited_server.py', env={'VYRA_TEST_NOFILE': str(nofile)})
    server.wait_listening(path)
    needed = ServerLimits().descriptors_needed(lanes=2)
    short = resource.getrlimit(resource.RLIMIT_NOFILE)[0] < needed if nofile is None else True
    warned = [line for line in server.log().splitlines() if '(RLIMIT_NOFILE)' in line]
    if short:
        assert len(warned) == 1, server.log()
        assert f'may open {nofile or resource.getrlimit(resource.RLIMIT_NOFILE)[0]} files' in warned[0]
        assert f'hold {needed}: 2 x 1024 connections (max_connections per lane)' in warned[0]
        assert 'lower those ServerLimits' in warned[0]
    else:
        assert warned == [], warned


@pytest.mark.asyncio
async def test_the_open_file_limit_warning_is_written_before_the_socket_appears(socket_dir: Path) -> None:
    """Whoever sees the socket (a test, a supervisor reading the log) finds
    the warning said: before, it came after the socket, and a test reading
    the log as the socket appeared missed it on a busy machine."""
    from vyra_base_ipc import IPCServer

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        pytest.skip('no open-file limit to fall short of')
    path = socket_dir / 'early.sock'
    socket_there: list[bool] = []

    class Witness(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if '(RLIMIT_NOFILE)' in record.getMessage():
                socket_there.append(path.exists())

    witness = Witness()
    logging.getLogger('vyra_base_ipc').addHandler(witness)
    try:
        server = IPCServer(path, limits=ServerLimits(max_connections=soft))  # 2 lanes: twice what it may open
        await server.start()
        await server.stop(0)
    finally:
        logging.getLogger('vyra_base_ipc').removeHandler(witness)
    assert socket_there == [False]
