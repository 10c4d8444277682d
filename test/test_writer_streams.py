"""A response stream whose ``async def`` handler writes with ``await
context.write()`` instead of yielding, on both lanes of a real server process
(test/servers/writer_server.py), metrics on as by default: the gRPC lane's
observation wrapper answered what the coroutine returned (None) as a unary
response, so every such stream ended UNKNOWN "Unexpected <class 'TypeError'>:
descriptor 'SerializeToString' ... 'NoneType' object" after its messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import StartServer
from vyra_base_ipc import IPCRemoteError, SyncIPCHandler
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
