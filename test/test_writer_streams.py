"""A response stream whose ``async def`` handler writes with ``await
context.write()`` instead of yielding, on both lanes of a real server process
(test/servers/writer_server.py), metrics on as by default: the gRPC lane's
observation wrapper answered what the coroutine returned (None) as a unary
response, so every such stream ended UNKNOWN "Unexpected <class 'TypeError'>:
descriptor 'SerializeToString' ... 'NoneType' object" after its messages."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
import fcntl
from pathlib import Path
import select
import signal
import socket
import struct
import termios
import time
from typing import Any

import grpc
import pytest

from conftest import StartServer, until, wait_for
from http2_peer import (
    ACK,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    SETTINGS,
    WINDOW_UPDATE,
    StreamResult,
    frame,
    grpc_message,
    grpc_request_headers,
    hpack_decode,
    take_frame,
)
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


class _GrpcLikePeer:
    """An HTTP/2 client of the gRPC lane that, as grpc's own client does,
    answers what it reads (PING and SETTINGS acknowledged at once, a
    WINDOW_UPDATE for each message as its application takes it) and stops at
    the first write that fails: grpc's client then drops the connection with
    whatever it had not read (its streams end "Stream removed")."""

    def __init__(self, path: Path, streams: range, request: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(str(path))
        self.results = {stream: StreamResult() for stream in streams}
        self.broken: OSError | None = None
        self.pings_after_goaway = -1  # (acknowledged; -1: no GOAWAY yet)
        # While its application is behind, the WINDOW_UPDATEs of the messages
        # read wait here.
        self.behind = False
        self.owed = b''
        self._buffer = b''
        # Windows of a MB a stream and 16 on the connection (kept so by the
        # WINDOW_UPDATEs): a stream writing fast is not held by its window.
        self._send(PREFACE + frame(SETTINGS, 0, 0, struct.pack('>HIHIHI', 0x1, 0, 0x2, 0, 0x4, 1 << 20))
                   + frame(WINDOW_UPDATE, 0, 0, struct.pack('>I', 16 << 20)) + b''.join(
                       frame(HEADERS, END_HEADERS, stream, grpc_request_headers(WATCH))
                       + frame(DATA, END_STREAM, stream, grpc_message(request)) for stream in streams))

    def ended(self) -> int:
        """How many streams have ended (read)."""
        return sum(result.ended for result in self.results.values())

    def read_until(self, done: Callable[[], bool], timeout: float = 20) -> None:
        """Read, answering each read, until ``done()``, a write fails, or the
        server closed the connection."""
        deadline = time.monotonic() + timeout
        while not done() and self.broken is None:
            assert time.monotonic() < deadline, 'timed out reading the streams'
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                return
            self._send(self._take(chunk))

    def catch_up(self) -> None:
        """Its application takes the messages read: their WINDOW_UPDATEs go out."""
        self.behind = False
        self._send(self.owed)

    def queued_ends(self) -> int:
        """How many streams' ends wait in the socket, unread (peeked)."""
        unread = struct.unpack('i', fcntl.ioctl(self.sock, termios.FIONREAD, b'\0' * 4))[0]
        queued = self.sock.recv(unread, socket.MSG_PEEK) if unread else b''
        return sum(1 for kind, flags, _, _ in _frames(self._buffer + queued)[0]
                   if kind == HEADERS and flags & END_STREAM)

    def hung_up(self) -> bool:
        """Whether the server has shut its end down (what it sent still queued or not)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLRDHUP)
        return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poller.poll(0))

    def _send(self, data: bytes) -> None:
        if data and self.broken is None and self.ended() < len(self.results):
            try:
                self.sock.sendall(data)
            except OSError as error:  # EPIPE
                self.broken = error

    def _take(self, chunk: bytes) -> bytes:
        frames, self._buffer = _frames(self._buffer + chunk)
        answers = []
        for kind, flags, stream, payload in frames:
            if kind == DATA and payload:
                self.results[stream].data += payload
                update = (frame(WINDOW_UPDATE, 0, 0, struct.pack('>I', len(payload)))
                          + frame(WINDOW_UPDATE, 0, stream, struct.pack('>I', len(payload))))
                if self.behind:
                    self.owed += update
                else:
                    answers.append(update)
            elif kind == HEADERS:
                assert flags & END_HEADERS, 'a header block in CONTINUATION frames'
                self.results[stream].headers += hpack_decode(payload)
            elif kind in (SETTINGS, PING) and not flags & ACK:
                answers.append(frame(kind, ACK, 0, payload if kind == PING else b''))
                self.pings_after_goaway += kind == PING and self.pings_after_goaway >= 0
            elif kind == GOAWAY:
                self.pings_after_goaway = max(self.pings_after_goaway, 0)
            if kind in (DATA, HEADERS) and flags & END_STREAM:
                self.results[stream].ended = True
        return b''.join(answers)


def _frames(data: bytes) -> tuple[list[tuple[int, int, int, bytes]], bytes]:
    """The whole frames at the start of ``data`` (kind, flags, stream, payload), and the rest."""
    frames = []
    while (taken := take_frame(data)) is not None:
        item, data = taken
        frames.append(item)
    return frames, data


@pytest.mark.parametrize('interval', [0.02, 1e-6], ids=['mostly waiting', 'mostly writing'])
def test_sigterm_ends_written_streams_as_shutting_down_for_a_grpc_client_behind_in_reading(
        start_server: StartServer, socket_path: Path, echo: Any, interval: float) -> None:
    # Before: grpc core shut each connection down as soon as the stop's PING
    # came back and its last call had ended (the process exited right
    # after), whether or not the client had read the streams' ends yet.
    # grpc's own client writes as its application takes messages: that write
    # failed EPIPE, and it dropped the connection with what it had not read;
    # streams ended UNAVAILABLE "Stream removed (sendmsg: Broken pipe)" (the
    # test above, 1 in 60 runs under CPU load). This client is behind so.
    server = start_server(socket_path, '30', script='writer_server.py', wait=False).wait_serving(ttrpc=True)
    peer = _GrpcLikePeer(socket_path, range(1, 21, 2),
                         echo.pb.WatchRequest(count=0, interval=interval).SerializeToString())
    with peer.sock:
        peer.read_until(lambda: all(result.data for result in peer.results.values()))
        # Its application falls behind: the messages read from here on wait
        # to be taken (some before the stop).
        peer.behind = True
        peer.read_until(lambda: bool(peer.owed))
        assert peer.broken is None, peer.broken
        server.signal(signal.SIGTERM)
        # It reads the stop's GOAWAY and answers its PING, then
        # reads nothing until every stream's end waits for it in its socket
        # and the server hung up (or a while passed, well within the
        # server's bound of a second). Then its application takes the
        # messages (their WINDOW_UPDATEs go out), and it reads on.
        peer.read_until(lambda: peer.pings_after_goaway > 0 or peer.ended() == len(peer.results))
        wait_for(lambda: peer.ended() + peer.queued_ends() == len(peer.results), 20,
                 "every stream's end queued to the client")
        behind = time.monotonic() + 0.3
        while not peer.hung_up() and time.monotonic() < behind:
            time.sleep(0.01)
        peer.catch_up()
        peer.read_until(lambda: peer.ended() == len(peer.results))
    assert peer.broken is None, (peer.broken, [stream for stream, result in peer.results.items() if not result.ended])
    ends = {stream: (result.grpc_status, result.grpc_message) for stream, result in peer.results.items()}
    assert ends == dict.fromkeys(peer.results, (grpc.StatusCode.UNAVAILABLE.value[0], 'server is shutting down'))
    assert server.wait(20) == 0, server.log()
