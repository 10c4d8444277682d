"""Greedy and broken peers hold only what ServerLimits allows (issue 15,
item 4): too many connections, too many streams on one connection, oversized
metadata, frames that stall half-way (slowloris), unfinished frames in bulk,
answers nobody reads. Each costs the offender its new connection, its new
call or its connection, and a well-behaved client on the same server keeps
being served throughout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
import socket
import threading
import time
from typing import Any, Iterator

import pytest

from conftest import ServerProcess, unchanged, wait_for
from ttrpc_peer import DATA, REMOTE_CLOSED, REMOTE_OPEN, REQUEST, RESPONSE, Peer, frame_bytes, request_envelope
from vyra_base_ipc import (
    IPCError,
    IPCHandler,
    IPCRemoteError,
    IPCTimeoutError,
    ServerLimits,
    SyncIPCHandler,
    ttrpc_pb2,
)
from vyra_base_ipc.address import default_ttrpc_socket_path

pytestmark = pytest.mark.fault

ECHO = 'vyra.ipc.test.EchoService'


def limited(start_server, path: Path, *args: str, **limits: Any) -> ServerProcess:
    return start_server(path, '--limits', json.dumps(limits), *args)


def rss_kb(pid: int) -> int:
    status = Path(f'/proc/{pid}/status').read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith('VmRSS:'))


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (EOF or reset); waits for it up to the socket's timeout."""
    try:
        return sock.recv(1) == b''
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@contextlib.contextmanager
def raw_connections(path: Path, count: int) -> Iterator[list[socket.socket]]:
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.connect(str(path))
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def test_the_limits_are_checked() -> None:
    with pytest.raises(ValueError, match='max_connections must be an int between 1 and 2147483647, not 0'):
        ServerLimits(max_connections=0)
    # Beyond what grpc core takes (an OverflowError at start(), naming nothing, before).
    with pytest.raises(ValueError, match='max_concurrent_streams must be an int between 1 and 2147483647'):
        ServerLimits(max_concurrent_streams=2**31)
    with pytest.raises(ValueError, match='frame_timeout must be a finite number'):
        ServerLimits(frame_timeout=float('inf'))
    with pytest.raises(ValueError, match='frame_timeout must be a finite number of seconds > 0 and at most 1e[+]09'):
        ServerLimits(frame_timeout=1e300)
    with pytest.raises(ValueError, match='max_queued_bytes must be an int'):
        ServerLimits(max_queued_bytes=1.5)  # type: ignore[arg-type]
    assert ('grpc.max_concurrent_streams', 1024) in ServerLimits().grpc_options()
    # grpc takes milliseconds in a C int: a tiny or huge frame_timeout still fits.
    assert ('grpc.server_handshake_timeout_ms', 1) in ServerLimits(frame_timeout=1e-6).grpc_options()
    assert ('grpc.server_handshake_timeout_ms', 2**31 - 1) in ServerLimits(frame_timeout=1e9).grpc_options()


# -- connections --------------------------------------------------------------------------

def test_connections_beyond_the_limit_are_closed_at_once_and_others_keep_being_served(
        start_server, socket_dir: Path, echo) -> None:
    server = limited(start_server, socket_dir / 'c.sock', max_connections=8)
    fast_lane = default_ttrpc_socket_path(server.socket_path)
    with SyncIPCHandler(server.socket_path, echo.Stub, lane='ttrpc') as ipc:
        assert ipc.call_method('Echo', echo.pb.EchoRequest(text='before')).text == 'before'
        with raw_connections(fast_lane, 40) as held:
            for sock in held:
                sock.settimeout(0.2)
            # The handler's own connection is one of the 8: 7 more are kept.
            wait_for(lambda: sum(closed_by_server(sock) for sock in held) >= 33, 30,
                     'the connections beyond the limit to be closed')
            assert ipc.call_method('Echo', echo.pb.EchoRequest(text='during')).text == 'during'
        assert 'connections are open already (max_connections)' in server.log()

        def accepted_again() -> bool:
            with SyncIPCHandler(server.socket_path, echo.Stub, lane='ttrpc') as other:
                return other.call_method('Echo', echo.pb.EchoRequest(text='again')).text == 'again'
        wait_for(accepted_again, 30, 'a new connection to be served once the held ones are gone')
    assert server.running()


# -- streams on one connection ------------------------------------------------------------

@pytest.mark.asyncio
async def test_calls_beyond_the_stream_limit_of_a_connection_are_refused_on_the_fast_lane(
        start_server, socket_dir: Path, echo) -> None:
    server = limited(start_server, socket_dir / 's.sock', max_concurrent_streams=10)
    async with IPCHandler(server.socket_path, echo.Stub, lane='ttrpc', timeout=30) as ipc:
        watches = [ipc.stream_method('Count', echo.pb.CountRequest(count=1_000_000)) for _ in range(10)]
        for watch in watches:
            assert (await anext(watch)).index == 0
        with pytest.raises(IPCRemoteError) as error:
            await ipc.call_method('Echo', echo.pb.EchoRequest(text='one too many'))
        assert error.value.code.name == 'RESOURCE_EXHAUSTED'
        assert '10 calls are in flight on this connection already (max_concurrent_streams)' in str(error.value)
        await watches.pop().aclose()
        # The cancel reaches the server soon, not at once: try until it has.
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            try:
                assert (await ipc.call_method('Echo', echo.pb.EchoRequest(text='now'))).text == 'now'
                break
            except IPCRemoteError:
                assert asyncio.get_running_loop().time() < deadline, 'no call served once a stream ended'
                await asyncio.sleep(0.01)
        for watch in watches:
            await watch.aclose()
        # Another connection was never limited by this one's streams.
        async with IPCHandler(server.socket_path, echo.Stub, lane='grpc') as other:
            assert (await other.call_method('Echo', echo.pb.EchoRequest(text='x'))).text == 'x'


@pytest.mark.asyncio
async def test_the_grpc_lane_advertises_the_stream_limit(start_server, socket_dir: Path, echo) -> None:
    server = limited(start_server, socket_dir / 'h.sock', max_concurrent_streams=4)
    async with IPCHandler(server.socket_path, echo.Stub, lane='grpc', timeout=30) as ipc:
        watches = [ipc.stream_method('Count', echo.pb.CountRequest(count=1_000_000)) for _ in range(4)]
        for watch in watches:
            assert (await anext(watch)).index == 0
        # HTTP/2: the client holds a fifth stream back until one ends.
        with pytest.raises(IPCTimeoutError):
            await ipc.call_method('Echo', echo.pb.EchoRequest(text='held back'), timeout=1.0)
        await watches.pop().aclose()
        assert (await ipc.call_method('Echo', echo.pb.EchoRequest(text='now'))).text == 'now'
        for watch in watches:
            await watch.aclose()


def test_a_client_sending_a_request_stream_past_its_window_loses_that_stream(
        start_server, socket_dir: Path, echo) -> None:
    # A client under flow control may leave the handler at most the window
    # the server granted and one message unread: Absorb takes one message and
    # waits, the peer ignores the window. Messages up to 4 MiB, a window of
    # 1 MiB: the stream fails past 5 MiB (it took 8 MiB, twice the largest
    # message, before).
    server = start_server(socket_dir / 'w.sock', '--max-message-bytes', str(4 << 20))
    watch = 'vyra.ipc.test.WatchService'
    with Peer.connect(server.ttrpc_path) as peer:
        peer.request(1, 'vyra.ipc.ttrpc.Connection', 'Hello',
                     ttrpc_pb2.Hello(cancel=True, stream_window=1 << 20).SerializeToString())
        window = ttrpc_pb2.Hello.FromString(peer.answer(1).payload).stream_window
        assert window == 1 << 20
        first = echo.pb.WatchRequest(tag='past-window', count=1).SerializeToString()
        peer.request(3, watch, 'Absorb', first, flags=REMOTE_OPEN, timeout_nano=int(30e9))
        blob = echo.pb.WatchRequest(tag='past-window', payload=bytes((1 << 20) - 64)).SerializeToString()
        for _ in range(6):
            peer.send(3, DATA, 0, blob)
        answer = peer.answer(3)
        assert answer.code == 8  # RESOURCE_EXHAUSTED
        assert f'more than the window and one message the client may send ({window + (4 << 20) + 64})' \
            in answer.message
        peer.request(5, ECHO, 'Echo', echo.pb.EchoRequest(text='on').SerializeToString())
        assert echo.pb.EchoReply.FromString(peer.answer(5).payload).text == 'on'


# -- metadata -----------------------------------------------------------------------------

@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_metadata_beyond_the_limit_is_refused_on_both_lanes(server: ServerProcess, echo, lane: str) -> None:
    huge = [(f'key-{index}', 'v' * 6) for index in range(10_000)]
    with SyncIPCHandler(server.socket_path, echo.Stub, lane=lane) as ipc:
        with pytest.raises(Exception) as error:
            ipc.call_method('Echo', echo.pb.EchoRequest(text='x'), metadata=huge)
        if lane == 'ttrpc':
            assert isinstance(error.value, IPCRemoteError) and error.value.code.name == 'RESOURCE_EXHAUSTED'
            assert 'exceeds the limit of 8192 (max_metadata_bytes)' in str(error.value)
        small = [('key', 'value')]
        assert ipc.call_method('Echo', echo.pb.EchoRequest(text='fine'), metadata=small).text == 'fine'


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_metadata_just_over_the_limit_is_refused_every_time_and_just_under_it_accepted(
        server: ServerProcess, echo, lane: str) -> None:
    # grpc core takes grpc.max_metadata_size as a soft limit: between it and
    # twice it, a random share of calls got through (31 of 40 at 9 KiB).
    def metadata(kib: int) -> list[tuple[str, str]]:
        return [(f'key-{index}', 'v' * 1000) for index in range(kib)]
    with SyncIPCHandler(server.socket_path, echo.Stub, lane=lane) as ipc:
        for _ in range(10):
            with pytest.raises(IPCRemoteError) as error:
                ipc.call_method('Echo', echo.pb.EchoRequest(text='x'), metadata=metadata(9))
            assert error.value.code.name == 'RESOURCE_EXHAUSTED'
            # The server refused the call's metadata: said so, not blamed on its answer (as before).
            assert ("the server refused the call's metadata" if lane == 'grpc'
                    else 'exceeds the limit of 8192 (max_metadata_bytes)') in error.value.details, error.value
            assert ipc.call_method('Echo', echo.pb.EchoRequest(text='ok'), metadata=metadata(7)).text == 'ok'


# -- unfinished frames --------------------------------------------------------------------

def test_a_peer_stalling_inside_a_frame_loses_its_connection(start_server, socket_dir: Path, echo) -> None:
    server = limited(start_server, socket_dir / 'l.sock', frame_timeout=1.0)
    fast_lane = default_ttrpc_socket_path(server.socket_path)
    with raw_connections(fast_lane, 150) as slow:
        for sock in slow:
            # A header announcing 1000 bytes, then 10 of them, then nothing.
            sock.sendall(frame_bytes(1, REQUEST, 0, b'x' * 1000)[:20])
            sock.settimeout(20)
        with SyncIPCHandler(server.socket_path, echo.Stub, lane='ttrpc') as ipc:
            assert ipc.call_method('Echo', echo.pb.EchoRequest(text='served')).text == 'served'
        assert all(closed_by_server(sock) for sock in slow)
    assert 'has not arrived whole (frame_timeout)' in server.log()


@pytest.mark.parametrize('sent', [b'', b'PRI * HTTP/2.0\r\n'], ids=['nothing', 'half-a-preface'])
def test_a_grpc_lane_peer_that_never_finishes_its_handshake_loses_its_connection(
        start_server, socket_dir: Path, echo, sent: bytes) -> None:
    """The gRPC lane's counterpart of a stalled frame: a connection that has
    not sent HTTP/2's preface and settings within frame_timeout is closed
    (grpc's own handshake timeout is 120 s), so silent peers cannot hold the
    lane's max_connections for longer than that."""
    server = start_server(socket_dir / 'g.sock', '--limits', json.dumps({'frame_timeout': 1.0, 'max_connections': 4}),
                          wait=False)
    # Ready once its socket file is there (published last, listening), seen without connecting:
    # the usual check's connection counted as one of the 4 until grpc core had taken its close,
    # and a silent peer was then refused at once (a broken pipe at its first bytes, now and then).
    wait_for(lambda: server.socket_path.is_socket() or not server.running(), 20, 'the gRPC socket')
    assert server.running(), server.log()
    with raw_connections(server.socket_path, 4) as silent:
        for sock in silent:
            sock.sendall(sent)
            sock.settimeout(20)
        for sock in silent:
            with contextlib.suppress(ConnectionResetError):  # closed with our bytes unread
                while sock.recv(4096):
                    pass  # the server's own settings come first; then it closes (or we time out)
        with SyncIPCHandler(server.socket_path, echo.Stub, lane='grpc') as ipc:
            assert ipc.call_method('Echo', echo.pb.EchoRequest(text='served')).text == 'served'
    assert server.running()


def test_a_peer_sending_whole_frames_for_longer_than_the_frame_timeout_keeps_its_connection(
        start_server, socket_dir: Path, echo) -> None:
    """The timeout is per frame: a stream of big messages that lasts longer
    than it (40 messages, 50 ms apart: 2 s against 1 s) is not a stall."""
    server = limited(start_server, socket_dir / 'k.sock', frame_timeout=1.0)

    def requests() -> Iterator[Any]:
        for index in range(40):
            time.sleep(0.05)
            yield echo.pb.EchoRequest(text=str(index), payload=b'y' * 200_000)

    with SyncIPCHandler(server.socket_path, echo.Stub, lane='ttrpc', shared_memory=None) as ipc:
        reply = ipc.call_method('Collect', requests(), timeout=60)
        assert reply.index == 40
    assert 'frame_timeout' not in server.log()


def test_unfinished_frames_of_all_connections_are_bounded(start_server, socket_dir: Path, echo) -> None:
    limit = 4 * 1024 * 1024
    server = limited(start_server, socket_dir / 'p.sock', max_partial_bytes=limit, frame_timeout=60.0)
    fast_lane = default_ttrpc_socket_path(server.socket_path)
    with raw_connections(fast_lane, 40) as greedy:
        frame = frame_bytes(1, REQUEST, 0, b'z' * (2 << 20))
        for sock in greedy:
            # Each announces 2 MiB and sends 1.5 MiB of it (unless closed meanwhile).
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(frame[:3 << 19])
            sock.settimeout(0.2)
        closed = [False] * len(greedy)

        def held_within_the_limit() -> bool:
            for index, sock in enumerate(greedy):
                closed[index] = closed[index] or closed_by_server(sock)
            # Every connection still open holds its 1.5 MiB: together at most the limit.
            return (len(greedy) - sum(closed)) * (3 << 19) <= limit
        wait_for(held_within_the_limit, 30, 'the connections beyond the total to be closed')
        with SyncIPCHandler(server.socket_path, echo.Stub, lane='ttrpc') as ipc:
            assert ipc.call_method('Echo', echo.pb.EchoRequest(text='served')).text == 'served'
        assert not all(closed), 'the limit leaves room for some unfinished frames'
    assert '(max_partial_bytes)' in server.log()


# -- answers nobody reads -----------------------------------------------------------------

def test_a_peer_that_does_not_read_its_answers_is_closed_at_the_queue_limit(
        start_server, socket_dir: Path, echo) -> None:
    """Ten calls answered at the same moment with 900 KB each, to a peer that
    reads nothing: beyond two messages' worth the connection is closed."""
    one_mib = 1 << 20
    server = start_server(socket_dir / 'r.sock', '--max-message-bytes', str(one_mib),
                          '--limits', json.dumps({'max_queued_bytes': 1}))
    fast_lane = default_ttrpc_socket_path(server.socket_path)
    before = rss_kb(server.pid)
    with Peer.connect(fast_lane) as peer:
        request = echo.pb.InspectRequest(payload=b'q' * 900_000, sleep_seconds=0.5).SerializeToString()
        for stream_id in range(1, 21, 2):
            peer.request(stream_id, ECHO, 'Inspect', request, timeout_nano=int(30e9))
        wait_for(lambda: 'unread (limit ' in server.log(), 30, 'the non-reading peer to be closed')
        with SyncIPCHandler(server.socket_path, echo.Stub, lane='ttrpc', max_message_bytes=one_mib) as ipc:
            assert ipc.call_method('Echo', echo.pb.EchoRequest(text='served')).text == 'served'
    assert rss_kb(server.pid) - before < 64 * 1024  # not 10 answers' worth per peer, and no growth
    assert server.running()


def test_new_calls_of_a_peer_that_does_not_read_wait_and_are_all_answered_once_it_reads(
        server: ServerProcess, echo) -> None:
    """Once a stream's answers fill the socket, the server keeps the peer's
    new calls until it reads again (and stops reading at the first): then it
    answers every one of them, none lost, and finishes the stream."""
    fast_lane = default_ttrpc_socket_path(server.socket_path)
    watch = echo.pb.WatchRequest(tag='fill', count=300, size=16 * 1024)  # 4.8 MB: more than the socket holds
    reports = SyncIPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane='grpc')
    stalled = unchanged(lambda: reports.call_method('Report', echo.pb.WatchRequest(tag='fill')).sent)
    with reports, Peer.connect(fast_lane) as peer:
        peer.request(1, 'vyra.ipc.test.WatchService', 'Watch', watch.SerializeToString(), timeout_nano=int(60e9))
        wait_for(stalled, 30, 'the Watch stream to fill the socket')
        sent, rest = [], b''
        peer.sock.setblocking(False)
        for stream_id in range(3, 2 * 50_000, 2):  # until the socket takes no more
            frame = frame_bytes(stream_id, REQUEST, 0, request_envelope(
                ECHO, 'Echo', echo.pb.EchoRequest(text=str(stream_id)).SerializeToString(),
                timeout_nano=int(60e9)))
            try:
                taken = peer.sock.send(frame)
            except BlockingIOError:
                break
            sent.append(stream_id)
            if taken < len(frame):
                rest = frame[taken:]
                break
        peer.sock.settimeout(20)
        if rest:  # the rest of a frame, sent once the server reads again
            threading.Thread(target=peer.sock.sendall, args=(rest,), daemon=True).start()
        answers: dict[int, str] = {}
        watched = 0
        while len(answers) < len(sent) or watched < 300:
            got = peer.read_frame()
            if got.stream_id == 1:
                watched += got.type == DATA and not got.flags & REMOTE_CLOSED
            else:
                response = ttrpc_pb2.Response.FromString(got.data)
                assert response.status.code == 0, response.status
                answers[got.stream_id] = echo.pb.EchoReply.FromString(response.payload).text
        assert answers == {stream_id: str(stream_id) for stream_id in sent}
    assert server.running()


def test_non_reading_peers_of_endless_streams_hold_bounded_memory(start_server, socket_dir: Path,
                                                                  echo) -> None:
    server = start_server(socket_dir / 'n.sock')
    fast_lane = default_ttrpc_socket_path(server.socket_path)
    before = rss_kb(server.pid)
    peers = [Peer.connect(fast_lane) for _ in range(40)]
    try:
        for peer in peers:
            # No Hello, so no flow control: only the socket's back-pressure holds the stream.
            peer.request(1, ECHO, 'Count', echo.pb.CountRequest(count=2_000_000).SerializeToString())
        with SyncIPCHandler(server.socket_path, echo.Stub, lane='ttrpc') as ipc:
            for index in range(200):
                assert ipc.call_method('Echo', echo.pb.EchoRequest(text=str(index))).text == str(index)
        assert rss_kb(server.pid) - before < 64 * 1024
    finally:
        for peer in peers:
            peer.close()
    assert server.running()


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_two_thousand_held_connections_leave_the_server_serving(start_server, socket_dir: Path, echo,
                                                                 lane: str) -> None:
    import resource

    server = start_server(socket_dir / 't.sock')
    target = server.socket_path if lane == 'grpc' else default_ttrpc_socket_path(server.socket_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2_200:
        pytest.skip(f'this process may open only {hard} descriptors')
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2_200), hard))
    held: list[socket.socket] = []
    try:
        with SyncIPCHandler(server.socket_path, echo.Stub, lane=lane) as ipc:
            assert ipc.call_method('Echo', echo.pb.EchoRequest(text='before')).text == 'before'
            for _ in range(2_000):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                held.append(sock)
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):  # the backlog is full: not accepted
                    sock.connect(str(target))
            for index in range(50):
                assert ipc.call_method('Echo', echo.pb.EchoRequest(text=str(index))).text == str(index)
            # The server holds no more than max_connections of them (its
            # descriptors: those, its own few dozen, and the served client's).
            assert len(os.listdir(f'/proc/{server.pid}/fd')) < ServerLimits().max_connections + 100
        assert server.running()
    finally:
        for sock in held:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def served_again() -> bool:
        with SyncIPCHandler(server.socket_path, echo.Stub, lane=lane) as other:
            try:
                return other.call_method('Echo', echo.pb.EchoRequest(text='after')).text == 'after'
            except IPCError:
                return False
    wait_for(served_again, 30, 'a new client to be served once the held connections are gone')


def test_a_call_without_deadline_from_another_peer_ends_after_max_call_duration(
        start_server, socket_dir: Path, echo) -> None:
    """A unary call that arrives with no deadline (timeout_nano 0, as
    containerd's clients may send) is bounded; a watch stream without
    deadline is not (it lives as long as its client)."""
    server = limited(start_server, socket_dir / 'd.sock', max_call_duration=1.0)
    fast_lane = default_ttrpc_socket_path(server.socket_path)
    with SyncIPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane='ttrpc') as ipc, \
            Peer.connect(fast_lane) as peer:
        watch = ipc.stream_method('Watch', echo.pb.WatchRequest(tag='long', interval=0.02), timeout=None)
        next(watch)
        peer.request(1, ECHO, 'Sleep', echo.pb.SleepRequest(seconds=60).SerializeToString())
        answer = peer.answer(1)
        ended = time.monotonic()
        assert answer.code == 4, answer  # DEADLINE_EXCEEDED
        # The watch goes on past the moment the unary call was cut off.
        while next(watch).sent_at <= ended:
            pass
        watch.close()


@pytest.mark.asyncio
async def test_a_rapid_reset_burst_leaves_other_clients_served(server: ServerProcess, echo) -> None:
    """HTTP/2 rapid reset (CVE-2023-44487): streams opened and reset at once,
    thousands in a burst on one connection, while another client calls."""
    import grpc

    channel = grpc.aio.insecure_channel(f'unix:{server.socket_path}')
    stub = echo.Stub(channel)
    try:
        async with IPCHandler(server.socket_path, echo.Stub, lane='grpc') as other:
            assert (await other.call_method('Echo', echo.pb.EchoRequest(text='before'))).text == 'before'
            for burst in range(5):
                calls = [stub.Sleep(echo.pb.SleepRequest(seconds=30), timeout=60) for _ in range(1000)]
                await asyncio.sleep(0)
                for call in calls:
                    call.cancel()
                text = f'during {burst}'
                assert (await other.call_method('Echo', echo.pb.EchoRequest(text=text))).text == text
    finally:
        await channel.close()
    assert server.running()


@pytest.mark.asyncio
async def test_a_grpc_call_without_deadline_ends_after_max_call_duration(start_server, socket_dir: Path,
                                                                         echo) -> None:
    """The same bound on the gRPC lane, for another peer's call (a bare grpc.aio
    stub sends no deadline unless told), an ``async def`` handler's and a
    ``def`` handler's (told that its call ended: it works while it is active,
    60 s at most); a call with a deadline is its own."""
    import grpc

    server = limited(start_server, socket_dir / 'g.sock', max_call_duration=1.0)
    channel = grpc.aio.insecure_channel(f'unix:{server.socket_path}')
    try:
        stub = echo.Stub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Sleep(echo.pb.SleepRequest(seconds=60))
        assert error.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert '(max_call_duration)' in (error.value.details() or '')
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await asyncio.wait_for(echo.grpc.StatusServiceStub(channel).MisbehaveSync(
                echo.pb.MisbehaveRequest(how='until-inactive')), 30)
        assert error.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert '(max_call_duration)' in (error.value.details() or '')
        reply = await stub.Sleep(echo.pb.SleepRequest(seconds=1.5), timeout=30)
        assert reply.time_remaining > 0
    finally:
        await channel.close()


def test_twenty_thousand_calls_on_one_fast_lane_connection_hold_at_most_the_stream_limit(
        start_server, socket_dir: Path, echo) -> None:
    """20,000 streams on one connection were all accepted before; now 1024 run
    and the rest are refused at once, and other clients are served."""
    server = start_server(socket_dir / 'm.sock')
    fast_lane = default_ttrpc_socket_path(server.socket_path)
    watch = echo.pb.WatchRequest(tag='many', interval=30).SerializeToString()
    with Peer.connect(fast_lane, timeout=60) as peer:
        requests = b''.join(frame_bytes(stream_id, REQUEST, 0, request_envelope(
            'vyra.ipc.test.WatchService', 'Watch', watch, timeout_nano=int(120e9)))
            for stream_id in range(1, 40_000, 2))
        # Sent while the answers are read: a peer that does not read is not read from.
        sender = threading.Thread(target=peer.send_raw, args=(requests,), daemon=True)
        sender.start()
        refused = 0
        while refused < 20_000 - ServerLimits().max_concurrent_streams:
            frame = peer.read_frame()
            if frame.type == RESPONSE:
                answer = ttrpc_pb2.Response.FromString(frame.data)
                assert answer.status.code == 8, answer  # RESOURCE_EXHAUSTED
                refused += 1
        sender.join(timeout=60)
        assert not sender.is_alive()
        with SyncIPCHandler(server.socket_path, echo.Stub, lane='ttrpc') as ipc:
            assert ipc.call_method('Echo', echo.pb.EchoRequest(text='served')).text == 'served'
    assert server.running()


@pytest.mark.asyncio
async def test_twenty_thousand_streams_on_one_grpc_connection_leave_the_server_bounded(
        start_server, socket_dir: Path, echo) -> None:
    """20,000 streams on one HTTP/2 connection were all accepted before; now
    the server advertises 1024 and the client holds the rest back."""
    import grpc

    server = start_server(socket_dir / 'w.sock')
    before = rss_kb(server.pid)
    channel = grpc.aio.insecure_channel(f'unix:{server.socket_path}')
    calls = []
    try:
        stub = echo.grpc.WatchServiceStub(channel)
        request = echo.pb.WatchRequest(tag='many', interval=30)
        calls = [stub.Watch(request, timeout=120) for _ in range(20_000)]
        # The first streams are served (a first message each)...
        for call in calls[:10]:
            assert (await call.read()).index == 0
        async with IPCHandler(server.socket_path, echo.Stub, lane='grpc') as other:
            assert (await other.call_method('Echo', echo.pb.EchoRequest(text='served'))).text == 'served'
        # ...and the server holds at most the limit of them.
        # (1024 watches cost ~25 MB here; 20,000 would cost about 20 times that.)
        assert rss_kb(server.pid) - before < 100 * 1024
    finally:
        for call in calls:
            call.cancel()
        await channel.close()
    assert server.running()


@pytest.mark.asyncio
@pytest.mark.parametrize('method', ['Misbehave', 'MisbehaveSync'])
async def test_a_handlers_own_timeout_error_on_a_grpc_call_without_deadline_is_answered_as_an_exception(
        start_server, socket_dir: Path, echo, method: str) -> None:
    """Before: the bound took any TimeoutError for its own, and answered a
    handler's at once DEADLINE_EXCEEDED 'the call came without a deadline
    and ran for 3600 s (max_call_duration)', unlogged; grpc.aio (and a call
    with a deadline) answers UNKNOWN with the exception's words."""
    import grpc

    server = start_server(socket_dir / 't.sock')
    channel = grpc.aio.insecure_channel(f'unix:{server.socket_path}')
    try:
        call = getattr(echo.grpc.StatusServiceStub(channel), method)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await asyncio.wait_for(call(echo.pb.MisbehaveRequest(how='raise-timeout')), 30)
        assert (error.value.code(), error.value.details()) == (
            grpc.StatusCode.UNKNOWN, "Unexpected <class 'TimeoutError'>: a timeout of its own")
    finally:
        await channel.close()
    assert 'Unexpected [TimeoutError] raised by servicer method' in server.log()


@pytest.mark.asyncio
async def test_a_handler_that_answers_after_its_cancellation_at_max_call_duration_still_ends_deadline_exceeded(
        start_server, socket_dir: Path, echo) -> None:
    """Before: an async def handler that caught the bound's cancellation and
    answered ended its call OK, with that answer, as if the bound had not
    passed; the fast lane, and grpc at a deadline, end it DEADLINE_EXCEEDED."""
    import grpc

    server = limited(start_server, socket_dir / 's.sock', max_call_duration=1.0)
    channel = grpc.aio.insecure_channel(f'unix:{server.socket_path}')
    try:
        stub = echo.grpc.StatusServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await asyncio.wait_for(stub.Misbehave(echo.pb.MisbehaveRequest(how='swallow-cancel')), 30)
        assert error.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert '(max_call_duration)' in (error.value.details() or '')
    finally:
        await channel.close()


@pytest.mark.parametrize('method', ['Echo', 'EchoSync'])
def test_a_grpc_call_without_deadline_whose_request_never_comes_whole_ends_after_max_call_duration(
        start_server, socket_dir: Path, echo, method: str) -> None:
    """Before: the request of a method taking one was read before the bound
    began, without one: a peer that sent the call's headers and none or part
    of its message, and kept the stream open, held the call (and a slot of
    maximum_concurrent_rpcs) for as long as its connection lived."""
    import http2_peer as h2

    server = limited(start_server, socket_dir / 'r.sock', max_call_duration=1.0)
    path = f'/{ECHO}/{method}'
    message = h2.grpc_message(echo.pb.EchoRequest(text='never whole').SerializeToString())
    with h2.RawConnection(server.socket_path, timeout=30) as connection:
        connection.send(h2.PREFACE + h2.CLIENT_SETTINGS
                        + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, h2.grpc_request_headers(path))
                        + h2.frame(h2.HEADERS, h2.END_HEADERS, 3, h2.grpc_request_headers(path))
                        + h2.frame(h2.DATA, 0, 3, message[:-1]))
        results = connection.results({1, 3})
    for result in results.values():
        assert result.ended and result.grpc_status == 4, results  # DEADLINE_EXCEEDED
        assert result.grpc_message.endswith('(max_call_duration)'), results
    assert 'ERROR' not in server.log(), server.log()
