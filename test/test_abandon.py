"""``IPCServer.abandon()`` for a server whose event loop ended under it (an
exception escaped the loop, as in a node that hosts it): a real server
process whose loop ends (test/servers/abandoning_server.py), real clients
connected on each lane."""

from __future__ import annotations

from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import LONG, ServerProcess, StartServer, wait_for
from vyra_base_ipc import SyncIPCHandler
from vyra_base_ipc import module_service_pb2 as module_pb
from vyra_base_ipc import module_service_pb2_grpc as module_grpc
from vyra_base_ipc.exceptions import IPCError

PING = module_pb.CommandRequest(command='ping')


@pytest.fixture
def held(tmp_path: Path) -> Path:
    """The file the server touches once it handles a ``hold`` command."""
    return tmp_path / 'held'


@pytest.fixture
def server(start_server: StartServer, socket_path: Path, held: Path) -> ServerProcess:
    return start_server(socket_path, str(held), script='abandoning_server.py', wait=False).wait_serving(ttrpc=True)


def end_the_loop(server: ServerProcess) -> None:
    """Let ``sys.exit()`` out of a callback on the server's loop, and wait until it has abandoned the server."""
    with SyncIPCHandler(server.socket_path, module_grpc.ModuleServiceStub, lane='ttrpc', timeout=LONG) as ender:
        ender.call_method('ExecuteCommand', module_pb.CommandRequest(command='end_loop'))
    # The line abandon() is followed by, not just any line naming it: the
    # loop thread logs its end before abandon() runs, and a call made then
    # on the gRPC lane still found its socket file (the server dead).
    wait_for(lambda: 'ABANDONED' in server.log().splitlines() or not server.running(), LONG,
             'the server to be abandoned')
    assert server.running(), server.log()  # (its exit would close the connections all the same)


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_connected_clients_next_call_after_abandon_is_unavailable(server: ServerProcess, lane: str) -> None:
    # Found on the fast lane: the connection stayed open until the dead loop
    # was collected, and the call waited on a socket nobody read until its
    # deadline (DEADLINE_EXCEEDED). The gRPC lane's client finds the socket
    # file gone before it sends.
    with SyncIPCHandler(server.socket_path, module_grpc.ModuleServiceStub, lane=lane, timeout=LONG) as client:
        assert client.call_method('ExecuteCommand', PING).result == 'pong'
        end_the_loop(server)
        with pytest.raises(IPCError) as error:
            client.call_method('ExecuteCommand', PING)
    assert error.value.code is grpc.StatusCode.UNAVAILABLE, error.value


def test_a_fast_lane_call_in_flight_when_the_loop_ends_is_unavailable_once_abandoned(
        server: ServerProcess, held: Path) -> None:
    # (On the gRPC lane such a call waits for its deadline: see IPCServer.abandon().)
    hold: Any = module_pb.CommandRequest(command='hold')
    with SyncIPCHandler(server.socket_path, module_grpc.ModuleServiceStub, lane='ttrpc', timeout=LONG) as client, \
            futures.ThreadPoolExecutor(1) as caller:
        call = caller.submit(client.call_method, 'ExecuteCommand', hold)
        wait_for(held.exists, LONG, 'the call to be handled')
        end_the_loop(server)
        with pytest.raises(IPCError) as error:
            call.result()
    assert error.value.code is grpc.StatusCode.UNAVAILABLE, error.value
