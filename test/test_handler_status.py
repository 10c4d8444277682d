"""What a handler's context does to the status of its call, the same on both
lanes, as grpc.aio does it: a code set before an exception, a status given
as a number, messages yielded after an abort the handler caught
(StatusService in test/servers/status_service.py, served by the echo server)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from conftest import LANES, ServerProcess
from vyra_base_ipc import IPCRemoteError, SyncIPCHandler

UNARY = ['Misbehave', 'MisbehaveSync']
STREAMS = ['MisbehaveStream', 'MisbehaveStreamSync']
EXPECTED = {
    'set-code-then-raise': (grpc.StatusCode.NOT_FOUND, "Unexpected <class 'ValueError'>: after set_code"),
    'abort-with-number': (grpc.StatusCode.NOT_FOUND, 'aborted with 5'),
    'set-code-number': (grpc.StatusCode.NOT_FOUND, 'set to 5'),
    'abort-with-status': (grpc.StatusCode.NOT_FOUND, 'aborted with a status'),
    'yield-after-abort': (grpc.StatusCode.NOT_FOUND, 'stop'),
    # What gRPC refuses once the response headers went (with the first
    # message): the fast lane, which has none to send, refuses it too.
    'compression-after-first': (
        grpc.StatusCode.UNKNOWN, "Unexpected <class 'RuntimeError'>: "
        'Compression setting must be specified before sending initial metadata'),
    'initial-metadata-after-first': (
        grpc.StatusCode.UNKNOWN, "Unexpected <class 'grpc._cython.cygrpc.UsageError'>: "
        'Send initial metadata failed: already sent'),
}


def cases(methods: list[str], hows: list[str]) -> list[Any]:
    return [pytest.param(lane, method, how, id=f'{lane}-{method}-{how}')
            for lane in LANES for method in methods for how in hows]


@pytest.mark.parametrize('lane, method, how',
                         cases(UNARY, ['set-code-then-raise', 'abort-with-number', 'set-code-number',
                                       'abort-with-status']))
def test_a_unary_handler_gets_the_status_grpc_aio_gives(server: ServerProcess, echo: Any,
                                                        lane: str, method: str, how: str) -> None:
    with SyncIPCHandler(server.socket_path, echo.grpc.StatusServiceStub, lane=lane) as ipc:
        with pytest.raises(IPCRemoteError) as raised:
            ipc.call_method(method, echo.pb.MisbehaveRequest(how=how))
    assert (raised.value.code, raised.value.details) == EXPECTED[how]


@pytest.mark.parametrize('lane, method, how', cases(STREAMS, list(EXPECTED)))
def test_a_stream_handler_gets_the_status_grpc_aio_gives_and_nothing_follows_an_abort(
        server: ServerProcess, echo: Any, lane: str, method: str, how: str) -> None:
    received: list[str] = []
    with SyncIPCHandler(server.socket_path, echo.grpc.StatusServiceStub, lane=lane) as ipc:
        with pytest.raises(IPCRemoteError) as raised:
            for reply in ipc.stream_method(method, echo.pb.MisbehaveRequest(how=how)):
                received.append(reply.text)
    assert (raised.value.code, raised.value.details) == EXPECTED[how]
    assert received == ['first']  # (the fast lane sent 'after-abort' too)


@pytest.mark.parametrize('lane', LANES)
def test_a_def_stream_handler_may_write_with_context_write(server: ServerProcess, echo: Any, lane: str) -> None:
    # grpc.aio's context of a def handler has no write(): the call failed UNKNOWN on the gRPC lane.
    with SyncIPCHandler(server.socket_path, echo.grpc.StatusServiceStub, lane=lane) as ipc:
        replies = [reply.text for reply in ipc.stream_method('MisbehaveStreamSync',
                                                             echo.pb.MisbehaveRequest(how='write'))]
    assert replies == ['first', 'written', 'last']
