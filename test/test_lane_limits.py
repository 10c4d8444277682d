"""A request too large for where it has to travel fails before sending with
MessageTooLargeError (an IPCError, not a remote error), naming the size, the
limit and what to change; an explicit buffer that the fast lane passes as
shared memory still travels there."""

from __future__ import annotations

import os
from typing import Any

import grpc
import pytest

from conftest import ServerProcess
from vyra_base_ipc import IPCRemoteError, MessageTooLargeError, SharedBuffer, SyncIPCHandler

MiB = 1 << 20
FRAME = 24 * MiB  # above the default max_message_bytes of 16 MiB


@pytest.fixture(scope='module')
def frame() -> bytes:
    return os.urandom(FRAME)


def test_a_large_explicit_buffer_is_refused_before_sending_on_the_grpc_lane(
        server: ServerProcess, echo: Any, frame: bytes) -> None:
    with SharedBuffer.copy_from(frame) as buffer, \
            SyncIPCHandler(server.socket_path, echo.Stub, lane='grpc', timeout=30) as client:
        with pytest.raises(MessageTooLargeError) as refused:
            client.call_method('Inspect', echo.pb.InspectRequest(data=buffer.ref), buffers=[buffer])
    assert not isinstance(refused.value, IPCRemoteError)
    assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    message = str(refused.value)
    assert '/vyra.ipc.test.EchoService/Inspect' in message and f'over max_message_bytes ({16 * MiB})' in message
    assert 'shared memory' in message and 'raise max_message_bytes on the client and the server' in message


def test_the_same_buffer_travels_as_shared_memory_on_the_fast_lane(
        server: ServerProcess, echo: Any, frame: bytes) -> None:
    with SharedBuffer.copy_from(frame) as buffer, \
            SyncIPCHandler(server.socket_path, echo.Stub, lane='ttrpc', timeout=30) as client:
        reply = client.call_method('Inspect', echo.pb.InspectRequest(data=buffer.ref), buffers=[buffer])
    assert reply.size == FRAME and not reply.inline


def test_a_message_over_the_limit_is_refused_by_the_client_on_the_grpc_lane(
        server: ServerProcess, echo: Any) -> None:
    with SyncIPCHandler(server.socket_path, echo.Stub, lane='grpc', timeout=30) as client:
        with pytest.raises(MessageTooLargeError, match='raise max_message_bytes on the client and the server'):
            client.call_method('Echo', echo.pb.EchoRequest(payload=bytes(20 * MiB)))
