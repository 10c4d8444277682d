"""``IPCServer.abandon()`` for a server whose event loop ended under it (an
exception escaped the loop, as in a node that hosts it): a real server on an
:class:`EventLoopThread` whose loop ends, real clients connected on each lane."""

from __future__ import annotations

import asyncio
from concurrent import futures
from pathlib import Path
import threading
from typing import Iterator

import grpc
import pytest

from conftest import LONG, wait_for
from vyra_base_ipc import IPCServer, ModuleService, SyncIPCHandler
from vyra_base_ipc import module_service_pb2 as module_pb
from vyra_base_ipc import module_service_pb2_grpc as module_grpc
from vyra_base_ipc._loop_thread import EventLoopThread
from vyra_base_ipc.exceptions import IPCError

PING = module_pb.CommandRequest(command='ping')


#: Set once a ``hold`` command runs (it never answers).
_held = threading.Event()


async def _hold(parameters: dict[str, str]) -> str:
    _held.set()
    await asyncio.Event().wait()
    return 'never'


def _end_the_loop() -> None:
    raise SystemExit(4)  # asyncio lets it out of the loop: run_forever() ends


@pytest.fixture
def ended(socket_path: Path) -> Iterator[tuple[EventLoopThread, threading.Event]]:
    """A server on a loop thread that abandons it once its loop ended, as a
    hosting node's does, and the event set then; the loop thread stopped at the end."""
    service = ModuleService('unit')
    service.register_command('hold', _hold)
    server = IPCServer(socket_path, servicers=[service])
    abandoned = threading.Event()

    def abandon(failure: BaseException) -> None:
        server.abandon()
        abandoned.set()

    loop = EventLoopThread('abandoned-server', on_failure=abandon)
    loop.start()
    try:
        loop.run(server.start(), timeout=LONG)
        yield loop, abandoned
    finally:
        loop.stop()


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_connected_clients_next_call_after_abandon_is_unavailable(
        ended: tuple[EventLoopThread, threading.Event], socket_path: Path, lane: str) -> None:
    # Found on the fast lane: the connection stayed open until the dead loop
    # was collected, and the call waited on a socket nobody read until its
    # deadline (DEADLINE_EXCEEDED). The gRPC lane's client finds the socket
    # file gone before it sends.
    loop, abandoned = ended
    with SyncIPCHandler(socket_path, module_grpc.ModuleServiceStub, lane=lane, timeout=LONG) as client:
        assert client.call_method('ExecuteCommand', PING).result == 'pong'
        loop.loop.call_soon_threadsafe(_end_the_loop)
        assert abandoned.wait(LONG)
        with pytest.raises(IPCError) as error:
            client.call_method('ExecuteCommand', PING)
    assert error.value.code is grpc.StatusCode.UNAVAILABLE, error.value


def test_a_fast_lane_call_in_flight_when_the_loop_ends_is_unavailable_once_abandoned(
        ended: tuple[EventLoopThread, threading.Event], socket_path: Path) -> None:
    # (On the gRPC lane such a call waits for its deadline: see IPCServer.abandon().)
    loop, abandoned = ended
    _held.clear()
    with SyncIPCHandler(socket_path, module_grpc.ModuleServiceStub, lane='ttrpc', timeout=LONG) as client, \
            futures.ThreadPoolExecutor(1) as caller:
        call = caller.submit(client.call_method, 'ExecuteCommand', module_pb.CommandRequest(command='hold'))
        wait_for(_held.is_set, LONG, 'the call to be handled')
        loop.loop.call_soon_threadsafe(_end_the_loop)
        with pytest.raises(IPCError) as error:
            call.result()
    assert error.value.code is grpc.StatusCode.UNAVAILABLE, error.value
    assert abandoned.wait(LONG)
