"""Lane selection in IPCHandler and SyncIPCHandler: the fast lane when its
socket answers, gRPC otherwise, the same behaviour on both (issue 6, point 2)."""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
from pathlib import Path
import re
import signal
import socket
import threading
import time
from typing import Any, AsyncIterator

import grpc
import pytest

from conftest import ServerProcess
from vyra_base_ipc import (
    MAX_SOCKET_PATH_BYTES,
    IPCError,
    IPCHandler,
    IPCRemoteError,
    IPCTimeoutError,
    IPCUnavailableError,
    SyncIPCHandler,
)


def test_auto_takes_the_fast_lane_when_it_answers(server: ServerProcess, echo) -> None:
    with SyncIPCHandler(server.socket_path, echo.Stub) as client:
        assert client.lane_in_use == 'ttrpc'
        assert client.call_method('Echo', echo.pb.EchoRequest(text='fast')).text == 'fast'
        assert client.lane_in_use == 'ttrpc'


@pytest.mark.asyncio
async def test_auto_falls_back_to_grpc_without_a_fast_lane(start_server, socket_path: Path, echo) -> None:
    start_server(socket_path, '--no-ttrpc')
    async with IPCHandler(socket_path, echo.Stub) as client:
        assert (await client.call_method('Echo', echo.pb.EchoRequest(text='slow'))).text == 'slow'
        assert client.lane_in_use == 'grpc'



@pytest.mark.asyncio
async def test_a_path_too_long_for_a_fast_lane_beside_it_is_served_to_grpc_and_auto_clients(
        start_server, socket_dir: Path, echo) -> None:
    # IPCServer(ttrpc=False) serves a path of 102 to 107 bytes, but both clients refused it
    # with a ValueError about the fast lane's socket beside it, lane='grpc' too.
    path = socket_dir / ('x' * (MAX_SOCKET_PATH_BYTES - len(f'{socket_dir}/.sock')) + '.sock')
    assert len(os.fsencode(path)) == MAX_SOCKET_PATH_BYTES
    start_server(path, '--no-ttrpc', ttrpc_path=socket_dir / 'none.sock')  # (a path the fixture may name)
    for lane in ('grpc', 'auto'):
        with SyncIPCHandler(path, echo.Stub, lane=lane) as client:
            assert client.call_method('Echo', echo.pb.EchoRequest(text=lane)).text == lane
            assert client.lane_in_use == 'grpc'
        async with IPCHandler(path, echo.Stub, lane=lane) as handler:
            assert (await handler.call_method('Echo', echo.pb.EchoRequest(text=lane))).text == lane
            assert handler.lane_in_use == 'grpc'
    # Only a client that must take the fast lane is refused, saying why.
    with pytest.raises(ValueError, match='at most 101 bytes'):
        SyncIPCHandler(path, echo.Stub, lane='ttrpc')

def test_forced_fast_lane_without_one_is_unavailable_naming_its_socket(start_server, socket_path: Path,
                                                                       echo) -> None:
    start_server(socket_path, '--no-ttrpc')
    with pytest.raises(IPCUnavailableError, match='test_ipc.ttrpc.sock'):
        SyncIPCHandler(socket_path, echo.Stub, lane='ttrpc').connect()


def test_unknown_lane_is_a_clear_error(socket_path: Path, echo) -> None:
    with pytest.raises(ValueError, match="lane must be one of auto, grpc, ttrpc, not 'fast'"):
        IPCHandler(socket_path, echo.Stub, lane='fast')


def test_fast_lane_socket_path_is_configurable(start_server, socket_dir: Path, echo) -> None:
    fast = socket_dir / 'elsewhere.sock'
    start_server(socket_dir / 'x.sock', '--ttrpc-socket-path', str(fast))
    with SyncIPCHandler(socket_dir / 'x.sock', echo.Stub, lane='ttrpc', ttrpc_socket_path=fast) as client:
        assert client.call_method('Echo', echo.pb.EchoRequest(text='moved')).text == 'moved'


@pytest.mark.asyncio
async def test_same_answers_and_errors_on_both_lanes(server: ServerProcess, echo, lane: str) -> None:
    async with IPCHandler(server.socket_path, echo.Stub, lane=lane) as client:
        assert (await client.call_method('EchoSync', echo.pb.EchoRequest(text='a'))).text == 'a'
        assert [r.index async for r in client.stream_method('Count', echo.pb.CountRequest(count=3))] \
            == [0, 1, 2]
        assert (await client.call_method('Collect', [echo.pb.EchoRequest(text=t) for t in 'xy'])).text \
            == 'x,y'
        assert [r.text async for r in client.stream_method('Chat', [echo.pb.EchoRequest(text='q')])] \
            == ['Q']
        with pytest.raises(IPCRemoteError) as error:
            await client.call_method('Fail', echo.pb.FailRequest(
                code=grpc.StatusCode.PERMISSION_DENIED.value[0], details='not you'))
        assert (error.value.code, error.value.details) == (grpc.StatusCode.PERMISSION_DENIED, 'not you')
        assert error.value.method == '/vyra.ipc.test.EchoService/Fail'
        with pytest.raises(IPCTimeoutError):
            await client.call_method('Sleep', echo.pb.SleepRequest(seconds=5), timeout=0.2)
        assert client.lane_in_use == lane


def test_sync_client_same_answers_and_errors_on_both_lanes(server: ServerProcess, echo, lane: str) -> None:
    with SyncIPCHandler(server.socket_path, echo.Stub, lane=lane, timeout=0.3) as client:
        assert client.call_method('Echo', echo.pb.EchoRequest(text='b')).text == 'b'
        assert [r.index for r in client.stream_method('Count', echo.pb.CountRequest(count=2))] == [0, 1]
        with pytest.raises(IPCTimeoutError):  # the default deadline, on either lane
            client.call_method('Sleep', echo.pb.SleepRequest(seconds=5))
        assert client.lane_in_use == lane


@pytest.mark.asyncio
async def test_fast_lane_wait_for_ready_waits_for_the_server(start_server, socket_path: Path, echo) -> None:
    client = IPCHandler(socket_path, echo.Stub, lane='ttrpc', wait_for_ready=True, timeout=20)
    connecting = asyncio.create_task(client.connect())
    await asyncio.sleep(0)  # connect() now waits for a server that is not there yet
    await asyncio.to_thread(start_server, socket_path)
    await connecting
    assert (await client.call_method('Echo', echo.pb.EchoRequest(text='late'))).text == 'late'
    await client.disconnect()


def test_restarted_server_is_reachable_again_on_the_fast_lane(start_server, socket_path: Path, echo) -> None:
    first = start_server(socket_path)
    with SyncIPCHandler(socket_path, echo.Stub) as client:
        assert client.call_method('Echo', echo.pb.EchoRequest(text='before')).text == 'before'
        first.signal(signal.SIGKILL)
        first.wait()
        with pytest.raises(IPCUnavailableError):
            client.call_method('Echo', echo.pb.EchoRequest())
        threading.Event().wait(3.0)  # an outage
        start_server(socket_path)
        reply = client.call_method('Echo', echo.pb.EchoRequest(text='after'), wait_for_ready=True,
                                   timeout=1.0)
        assert reply.text == 'after'
        assert client.lane_in_use == 'ttrpc'


class _SlowGreeting:
    """A Unix-socket relay to ``target`` that holds back the server's first
    bytes (its HTTP/2 SETTINGS) for ``delay`` seconds: a server that is busy
    when a client connects."""

    def __init__(self, path: Path, target: Path, delay: float) -> None:
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(8)
        self._target, self._delay = target, delay
        self._sockets: list[socket.socket] = [self._listener]
        #: Connections on which the client sent something (is_listening()'s
        #: probes send nothing).
        self.used = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(str(self._target))
            self._sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, 0.0), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, self._delay), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, delay: float) -> None:
        try:
            data = source.recv(65536)
            if data and not delay:
                self.used += 1
            time.sleep(delay)  # the relay's own behaviour, not a wait in the test
            while data:
                sink.sendall(data)
                data = source.recv(65536)
        except OSError:
            pass

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()


@pytest.mark.parametrize('wait_for_ready', [False, True])
def test_a_server_slow_to_greet_is_waited_for_within_the_deadline(
        server: ServerProcess, socket_dir: Path, echo, wait_for_ready: bool) -> None:
    """A server that sends its HTTP/2 SETTINGS 0.5 s after the connection
    (busy, on a loaded machine) is no reason to fail a 5 s call UNAVAILABLE,
    nor to give up on the connection and make another."""
    relay = _SlowGreeting(socket_dir / 'slow.sock', server.socket_path, delay=0.5)
    try:
        with SyncIPCHandler(socket_dir / 'slow.sock', echo.Stub, lane='grpc', timeout=5.0) as client:
            reply = client.call_method('Echo', echo.pb.EchoRequest(text='late'),
                                       wait_for_ready=wait_for_ready)
        assert reply.text == 'late'
        assert relay.used == 1
    finally:
        relay.close()


def _fail_every_way(server: ServerProcess, echo, lane: str, request: Any, times: int,
                    **options: Any) -> list[tuple[str, grpc.StatusCode, str]]:
    """Call Fail with ``request`` ``times`` times with each client on ``lane``:
    every (client, code, details) raised."""
    seen = []
    with SyncIPCHandler(server.socket_path, echo.Stub, lane=lane, **options) as client:
        for _ in range(times):
            with pytest.raises(IPCRemoteError) as error:
                client.call_method('Fail', request)
            seen.append(('sync', error.value.code, error.value.details))

    async def calls() -> None:
        async with IPCHandler(server.socket_path, echo.Stub, lane=lane, **options) as client:
            for _ in range(times):
                with pytest.raises(IPCRemoteError) as error:
                    await client.call_method('Fail', request)
                seen.append(('async', error.value.code, error.value.details))
    asyncio.run(calls())
    return seen


@pytest.mark.parametrize('size', [9_000, 20_000, 100_000])
def test_long_status_details_arrive_whole_on_both_lanes(server: ServerProcess, echo, lane: str,
                                                         size: int) -> None:
    # Over grpc core's default bounds on the metadata a client takes (8 KiB
    # soft: a random share of 9 KB details failed RESOURCE_EXHAUSTED; 16 KiB
    # hard: all of 20 KB), as the fast lane carries them.
    details = ''.join(chr(ord('a') + index % 26) for index in range(size))
    request = echo.pb.FailRequest(code=grpc.StatusCode.FAILED_PRECONDITION.value[0], details=details)
    seen = _fail_every_way(server, echo, lane, request, 20)
    expected = [(client, grpc.StatusCode.FAILED_PRECONDITION, details) for client in ('sync', 'async')
                for _ in range(20)]
    assert [(client, code, text[:80], len(text)) for client, code, text in seen] \
        == [(client, code, text[:80], len(text)) for client, code, text in expected]
    assert seen == expected


def test_status_details_beyond_the_clients_bound_are_a_clear_error_on_both_lanes(
        server: ServerProcess, echo, lane: str) -> None:
    # A client takes an answer's details up to its max_message_bytes and the
    # fast lane's envelope allowance (64 KiB), on either lane; beyond, RESOURCE_EXHAUSTED.
    options = {'max_message_bytes': 64 * 1024, 'timeout': 20.0}
    fits = echo.pb.FailRequest(code=grpc.StatusCode.FAILED_PRECONDITION.value[0], details='f' * 1000, repeat=120)
    assert {(code, len(text)) for _, code, text in _fail_every_way(server, echo, lane, fits, 2, **options)} \
        == {(grpc.StatusCode.FAILED_PRECONDITION, 120_000)}
    beyond = echo.pb.FailRequest(code=grpc.StatusCode.FAILED_PRECONDITION.value[0], details='b' * 1000,
                                 repeat=140)
    seen = _fail_every_way(server, echo, lane, beyond, 2, **options)
    assert {code for _, code, _ in seen} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    for _, _, text in seen:
        assert re.search(r'\b1400\d\d\b', text) and len(text) < 500, text  # its size, not the details


@pytest.mark.asyncio
async def test_a_bidi_call_the_server_refuses_while_requests_flow_gets_its_status(
        start_server, socket_path: Path, tmp_path: Path, echo) -> None:
    # The server refuses the call (an interceptor's CallRejected) while the
    # request stream, which never ends, is being written: a write fails under
    # it, and grpc.aio then sets the call's status to INTERNAL "Internal error
    # from Core" (over the server's or before it). IPCHandler took that for a
    # lost connection in about half of these calls; the blocking client never did.
    start_server(socket_path, str(tmp_path / 'journal.jsonl'), script='observed_server.py')

    async def endless() -> AsyncIterator[Any]:
        for index in itertools.count():
            yield echo.pb.EchoRequest(text=f'request {index}')

    seen = collections.Counter()
    async with IPCHandler(socket_path, echo.Stub, lane='grpc', timeout=20.0) as client:
        for _ in range(100):
            with pytest.raises(IPCError) as error:
                async for _ in client.stream_method('Chat', endless(), metadata=[('x-deny', 'no')]):
                    pass
            seen[(type(error.value).__name__, error.value.code, error.value.details)] += 1
            with pytest.raises(IPCError) as error:
                await client.call_method('Collect', endless(), metadata=[('x-deny', 'no')])
            seen[(type(error.value).__name__, error.value.code, error.value.details)] += 1
    assert seen == {('IPCRemoteError', grpc.StatusCode.PERMISSION_DENIED, 'denied: no'): 200}
    with SyncIPCHandler(socket_path, echo.Stub, lane='grpc', timeout=20.0) as sync_client:
        for _ in range(20):
            with pytest.raises(IPCRemoteError) as sync_error:
                list(sync_client.stream_method('Chat', (echo.pb.EchoRequest() for _ in itertools.count()),
                                               metadata=[('x-deny', 'no')]))
            assert (sync_error.value.code, sync_error.value.details) \
                == (grpc.StatusCode.PERMISSION_DENIED, 'denied: no')
