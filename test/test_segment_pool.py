"""Pooled shared memory (issue 18): segments reused across calls, lent to
the receiver and given back with RELEASE frames, bounded, shrinking when
idle; SharedBuffer.allocate. Real server processes and real sockets; the
pool's counters (this process's directly, the server's through
``vyra.ipc.Introspection/GetStats``) and ``/proc`` are the observables.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import hashlib
import json
import os
from pathlib import Path
import socket
import subprocess
import sys
import threading
from typing import Any, Iterator

import pytest

from conftest import LONG, NOBODY, OTHER_UID, ServerProcess, StartServer, handler_of, until, wait_for
from test_peer_credentials import as_user, needs_second_uid
from ttrpc_peer import REQUEST, RESPONSE, SHARED, Peer, PeerServer, frame_bytes, response_envelope
from vyra_base_ipc import (
    IPCHandler,
    IPCRemoteError,
    SharedBuffer,
    SharedMemoryOptions,
    SyncIPCHandler,
    configure_shared_memory_pool,
    shared_buffer,
    ttrpc_pb2,
)
from vyra_base_ipc._methods import stub_methods
from vyra_base_ipc._segment_pool import MIN_SEGMENT_BYTES, SegmentPool, new_segment, segment_pool, size_class
from vyra_base_ipc.cli._stats import lines as stats_lines
from vyra_base_ipc.introspection_pb2 import StatsRequest
from vyra_base_ipc.introspection_pb2_grpc import IntrospectionStub
from vyra_base_ipc.ttrpc import SyncConnection, _segment_link
from vyra_base_ipc.ttrpc._frames import HEADER, encode_release, released_ids
from vyra_base_ipc.ttrpc._segment_link import CACHE_ENTRIES, MAX_LENDS, SegmentLink

KiB = 1024
MiB = 1024 * KiB
THRESHOLD = 4 * KiB
OPTIONS = SharedMemoryOptions(threshold=THRESHOLD)
HELLO = ('vyra.ipc.ttrpc.Connection', 'Hello')
F_GET_SEALS = 1034
SEAL_WRITE, SEAL_FUTURE_WRITE = 0x0008, 0x0010
RELEASE = 0x12


def server_pool(server: ServerProcess) -> Any:
    """The server's SegmentPoolStats."""
    with SyncIPCHandler(server.socket_path, IntrospectionStub, lane='grpc') as handler:
        return handler.call_method('GetStats', StatsRequest()).segment_pool


def fds_of_self() -> int:
    return len(os.listdir('/proc/self/fd'))


@pytest.fixture(scope='module')
def pool_server(start_module_server: StartServer, module_socket_dir: Path) -> ServerProcess:
    """The pool's defaults; shared memory above 4 KiB."""
    return start_module_server(module_socket_dir / 'p.sock', '--shared-memory-threshold', str(THRESHOLD),
                               '--max-message-bytes', str(64 * MiB))


def drop_free(pool: SegmentPool) -> None:
    """Drop every free segment of ``pool`` now."""
    idle, pool.idle_seconds = pool.idle_seconds, -1.0
    pool.trim()
    pool.idle_seconds = idle


def settle_lends(connection: SyncConnection, echo: Any) -> None:
    """Small calls until the server gave back every lend of this end: the
    blocking client reads RELEASE frames only while it waits for an answer."""
    link = connection._core.agreement.segments
    assert link is not None
    method = stub_methods(echo.Stub)['Echo']
    wait_for(lambda: connection.call(method, echo.pb.EchoRequest(), timeout=LONG) is not None
             and link.outstanding == 0, 10, 'the server to give back every lend')


@pytest.fixture
def own_pool() -> Iterator[SegmentPool]:
    """This process's pool, emptied of free segments before and after."""
    pool = segment_pool()
    limits = pool.max_bytes, pool.max_free_bytes, pool.max_segments
    drop_free(pool)
    yield pool
    pool.max_bytes, pool.max_free_bytes, pool.max_segments = limits
    drop_free(pool)


# == reuse =======================================================================================

def test_large_messages_reuse_the_same_segments_call_after_call(
        echo: Any, pool_server: ServerProcess, own_pool: SegmentPool) -> None:
    method = stub_methods(echo.Stub)['Echo']
    server_before = server_pool(pool_server)
    client_before = dict(own_pool.stats)
    payload = os.urandom(256 * KiB)
    with SyncConnection.connect(pool_server.ttrpc_path, shared_memory=OPTIONS) as connection:
        for _ in range(20):
            assert connection.call(method, echo.pb.EchoRequest(payload=payload), timeout=LONG).payload == payload
        link = connection._core.agreement.segments
        assert link is not None  # both ends agreed on pooled segments
        # This end mapped the server's answer segments once or twice, not 20 times.
        assert link.stats['lent'] == 20 and link.stats['mapped'] <= 2
    server_after = server_pool(pool_server)
    # Each end made a segment or two and reused them; nothing was written
    # into a new memfd (that would be an exhausted pool).
    assert own_pool.stats['created'] - client_before['created'] <= 2
    assert own_pool.stats['reused'] - client_before['reused'] >= 18
    assert server_after.created - server_before.created <= 2
    assert server_after.reused - server_before.reused >= 18
    assert server_after.exhausted == server_before.exhausted
    # `vyra-ipc stats` shows it.
    with SyncIPCHandler(pool_server.socket_path, IntrospectionStub, lane='grpc') as handler:
        text = list(stats_lines(handler.call_method('GetStats', StatsRequest())))
    assert any(line.startswith('segment pool ') and f'reused {server_after.reused}' in line for line in text)


def test_a_blocking_client_gives_back_a_large_answer_once_parsed_not_with_its_next_request(
        echo: Any, pool_server: ServerProcess) -> None:
    # A client that calls once and then idles must not keep a segment of the
    # server's pool lent (the asyncio client sends from its event loop).
    payload = os.urandom(256 * KiB)
    with SyncIPCHandler(pool_server.socket_path, echo.Stub, lane='ttrpc', shared_memory=OPTIONS,
                        timeout=LONG) as handler:
        assert handler.call_method('Echo', echo.pb.EchoRequest(payload=payload)).payload == payload

        def all_free() -> bool:
            pool = server_pool(pool_server)
            return bool(pool.bytes) and pool.free_bytes == pool.bytes
        wait_for(all_free, 10, "the server's answer segment to come back while the client idles")


@pytest.mark.parametrize('kind', ['sync', 'async'])
def test_a_client_reading_a_long_stream_gives_each_large_message_back_as_it_reads(
        kind: str, echo: Any, pool_server: ServerProcess) -> None:
    # The blocking client has no event loop to send RELEASE frames from:
    # what it let go of must still leave while it reads, or the server lends
    # it a new segment per message (a quarter of its pool) for the whole stream.
    count, size = 200, 64 * KiB
    request = echo.pb.WatchRequest(count=count, size=size)
    options = {'lane': 'ttrpc', 'shared_memory': OPTIONS, 'timeout': LONG}
    before = server_pool(pool_server)
    with handler_of(kind, pool_server.socket_path, echo.grpc.WatchServiceStub, **options) as made, made as handler:
        sizes = [len(event.payload) for event in handler.stream_method('Watch', request)]
    assert sizes == [size] * count
    after = server_pool(pool_server)
    # A stream window's worth of segments, each used again and again.
    assert after.reused - before.reused >= count // 2
    assert after.created - before.created <= count // 4


def test_every_lend_comes_back_and_a_closed_connection_leaves_no_segment_in_use(
        echo: Any, pool_server: ServerProcess, own_pool: SegmentPool) -> None:
    method = stub_methods(echo.Stub)['Echo']
    with SyncConnection.connect(pool_server.ttrpc_path, shared_memory=OPTIONS) as connection:
        for size in (8 * KiB, 300 * KiB, 2 * MiB):
            connection.call(method, echo.pb.EchoRequest(payload=os.urandom(size)), timeout=LONG)
        # The blocking client gives the server's answers back with its next request.
        settle_lends(connection, echo)
    assert own_pool.total_bytes == own_pool.free_bytes  # nothing lent, nothing held
    # The server got back the answers' segments: it holds none in use either.
    wait_for(lambda: (lambda pool: pool.bytes == pool.free_bytes)(server_pool(pool_server)), 10,
             'the server to hold no segment in use')


def test_a_message_or_buffer_refused_over_a_limit_gives_its_lend_back_on_both_ends(
        echo: Any, start_server: StartServer, socket_dir: Path, own_pool: SegmentPool) -> None:
    # A lend refused before anything mapped it has no view whose end gives it
    # back: the sender's segment stayed lent (out of its pool) for as long as
    # the connection lived, one more per refused call, up to a quarter of the pool.
    server = start_server(socket_dir / 'l.sock', '--shared-memory-threshold', str(THRESHOLD),
                          '--max-message-bytes', str(2 * MiB), '--shared-memory-max-bytes', str(MiB))
    methods = stub_methods(echo.Stub)
    # Requests the server refuses: a message over its max_message_bytes, a buffer over its max_bytes.
    with SyncConnection.connect(server.ttrpc_path, shared_memory=OPTIONS, max_message_bytes=64 * MiB) as big:
        for _ in range(3):
            with pytest.raises(IPCRemoteError, match='larger than max'):
                big.call(methods['Echo'], echo.pb.EchoRequest(payload=bytes(3 * MiB)), timeout=LONG)
        with SharedBuffer.allocate(2 * MiB) as buffer:
            with pytest.raises(IPCRemoteError, match='more than the limit'):
                big.call(methods['Inspect'], echo.pb.InspectRequest(data=buffer.ref), buffers=[buffer],
                         timeout=LONG)
        settle_lends(big, echo)
        assert own_pool.total_bytes == own_pool.free_bytes
    # Answers this client refuses: a streamed message over its max_message_bytes, a buffer over its max_bytes.
    small = SharedMemoryOptions(threshold=THRESHOLD, max_bytes=128 * KiB)
    with SyncConnection.connect(server.ttrpc_path, shared_memory=small, max_message_bytes=MiB) as client:
        with pytest.raises(IPCRemoteError, match='larger than max'):
            list(client.stream(stub_methods(echo.grpc.WatchServiceStub)['Watch'],
                               echo.pb.WatchRequest(count=1, size=3 * MiB // 2), timeout=LONG))
        with SharedBuffer.copy_from(bytes(256 * KiB)) as buffer:
            with pytest.raises(IPCRemoteError, match='more than the limit'):
                client.call(methods['Mirror'], echo.pb.MirrorRequest(data=buffer.ref, copy=True),
                            buffers=[buffer], timeout=LONG, return_buffers=True)
        # (Given back with the next request: the blocking client sends RELEASE frames with its calls.)
        settle_lends(client, echo)
        wait_for(lambda: (lambda pool: pool.bytes == pool.free_bytes)(server_pool(server)), 10,
                 'the server to hold no segment lent to the connected client')


# == what a receiver can do with a lent segment ==================================================

RECEIVER = r"""
import array, json, mmap, os, socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
_, fds, _, _ = socket.recv_fds(sock, 16, 1)
fd = fds[0]
result = {}
def attempt(name, action):
    try:
        action()
        result[name] = 'allowed'
    except OSError as error:
        result[name] = error.errno
attempt('map_writable', lambda: mmap.mmap(fd, 65536, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE))
attempt('write', lambda: os.pwrite(fd, b'x', 0))
attempt('shrink', lambda: os.ftruncate(fd, 0))
attempt('grow', lambda: os.ftruncate(fd, 1 << 30))
view = mmap.mmap(fd, 65536, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
result['reads'] = view[:5].decode()
sock.sendall(json.dumps(result).encode())
"""


def test_another_process_given_a_pooled_segment_can_read_it_but_never_write_shrink_or_grow_it(
        own_pool: SegmentPool) -> None:
    with SharedBuffer.allocate(64 * KiB) as buffer:
        buffer.view()[:5] = b'hello'
        ours, theirs = socket.socketpair()
        with ours:
            child = subprocess.Popen([sys.executable, '-c', RECEIVER, str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()])
            theirs.close()
            socket.send_fds(ours, [b'x'], [buffer.fileno()])
            result = json.loads(ours.recv(4096))
        assert child.wait(LONG) == 0
        seals = fcntl.fcntl(buffer.fileno(), F_GET_SEALS)
    assert seals & SEAL_FUTURE_WRITE and not seals & SEAL_WRITE
    assert result == {'map_writable': 1, 'write': 1, 'shrink': 1, 'grow': 1, 'reads': 'hello'}  # EPERM


# == SharedBuffer.allocate =======================================================================

def test_allocated_buffer_is_written_in_place_and_reaches_the_handler_read_only(
        echo: Any, pool_server: ServerProcess, own_pool: SegmentPool) -> None:
    data = os.urandom(3 * MiB)
    with SharedBuffer.allocate(len(data)) as buffer:
        assert buffer.writable
        buffer.view()[:] = data  # the only write: straight into the shared pages
        with SyncIPCHandler(pool_server.socket_path, echo.Stub, shared_memory=OPTIONS,
                            timeout=LONG) as ipc:
            reply = ipc.call_method('Inspect', echo.pb.InspectRequest(data=buffer.ref), buffers=[buffer])
        # Sent: frozen, and the handler read the very pages, read-only.
        assert not buffer.writable and buffer.view().readonly
        assert (reply.size, reply.sha256, reply.inline, reply.read_only) == (
            len(data), hashlib.sha256(data).digest(), False, True)
        assert reply.backing_inode == os.fstat(buffer.fileno()).st_ino
        assert reply.mapping_size == size_class(len(data))


@pytest.mark.parametrize('lane, shared_memory', [('grpc', OPTIONS), ('ttrpc', None)],
                         ids=['grpc', 'ttrpc-without-shared-memory'])
def test_an_allocated_buffer_sent_inline_is_frozen_too(
        echo: Any, pool_server: ServerProcess, lane: str, shared_memory: Any) -> None:
    # Where descriptors cannot travel its bytes are copied into the message;
    # the README promises the same read-only view after sending either way.
    with SharedBuffer.allocate(4096) as buffer:
        buffer.view()[:] = b'a' * 4096
        with SyncIPCHandler(pool_server.socket_path, echo.Stub, lane=lane, shared_memory=shared_memory,
                            timeout=LONG) as ipc:
            reply = ipc.call_method('Inspect', echo.pb.InspectRequest(data=buffer.ref), buffers=[buffer])
        assert (reply.size, reply.inline) == (4096, True)
        assert not buffer.writable and buffer.view().readonly


def test_an_allocated_buffer_goes_back_to_the_pool_only_when_closed_and_given_back(
        echo: Any, pool_server: ServerProcess, own_pool: SegmentPool) -> None:
    own_pool.max_free_bytes = 64 * MiB
    with SyncConnection.connect(pool_server.ttrpc_path, shared_memory=OPTIONS) as connection:
        method = stub_methods(echo.Stub)['Mirror']
        buffer = SharedBuffer.allocate(MiB)
        buffer.view()[:4] = b'abcd'
        inode = os.fstat(buffer.fileno()).st_ino
        reply, received = connection.call(method, echo.pb.MirrorRequest(data=buffer.ref), buffers=[buffer],
                                          timeout=LONG, return_buffers=True)
        view = received.view(reply.data)
        assert bytes(view[:4]) == b'abcd'
        buffer.close()
        del reply
        received.close()
        # The answer's view still holds the server's lend, which holds this
        # end's lend to the server: the segment is not free.
        free_before = own_pool.free_bytes
        connection.call(stub_methods(echo.Stub)['Echo'], echo.pb.EchoRequest(), timeout=LONG)
        assert own_pool.free_bytes == free_before
        del view
        gc.collect()
        # Given back with the next request; the server then gives back its lend.
        settle_lends(connection, echo)
        assert own_pool.free_bytes == free_before + size_class(MiB)
        with SharedBuffer.allocate(MiB) as again:  # the same pages, reused
            assert os.fstat(again.fileno()).st_ino == inode


def test_an_open_pooled_buffer_holds_no_descriptor_beyond_its_segments(own_pool: SegmentPool) -> None:
    # A segment holds its memfd (and mmap's copy of it before Python 3.13);
    # a third per buffer took a process at 1,024 open files to EMFILE at
    # about 340 open buffers.
    before = fds_of_self()
    segment = own_pool.acquire(MiB)
    assert segment is not None
    per_segment = fds_of_self() - before
    assert per_segment == (1 if sys.version_info >= (3, 13) else 2)
    segment.unuse()
    drop_free(own_pool)
    assert fds_of_self() == before
    buffers = [SharedBuffer.allocate(MiB) for _ in range(8)]
    assert fds_of_self() - before == 8 * per_segment
    kept = buffers[0].share()  # what the library keeps of a buffer being sent
    assert fds_of_self() - before == 8 * per_segment
    buffers[0].view()  # frozen by share(): read-only, and no descriptor either
    for buffer in buffers:
        buffer.close()
    assert kept.fileno() >= 0 and bytes(kept.view()[:1]) == b'\0'  # its segment is still in use
    kept.close()
    drop_free(own_pool)
    assert fds_of_self() == before


# == bounds: a peer that never gives back ========================================================

class PoolPeer(PeerServer):
    """A hand-written server that agrees on pooled segments (it answers the
    Hello with the client's offer) and hands every request to :meth:`answer`;
    other frames (the client's RELEASE) are read and ignored."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, self._serve_forever)

    def _serve_forever(self, peer: Peer) -> None:
        try:
            while True:
                frame = peer.read_frame()
                if frame.type != REQUEST:
                    continue
                request = ttrpc_pb2.Request.FromString(frame.data)
                if (request.service, request.method) == HELLO:
                    peer.send(frame.stream_id, RESPONSE, 0, response_envelope(request.payload))
                else:
                    self.answer(peer, frame, request)
        except (ConnectionError, OSError):
            pass

    def answer(self, peer: Peer, frame: Any, request: Any) -> None:
        raise NotImplementedError


class Hoarder(PoolPeer):
    """A server that answers every request inline with an empty message and
    never sends RELEASE: its lends never come back."""

    def __init__(self, path: Path) -> None:
        self.seals: list[int] = []
        super().__init__(path)

    def answer(self, peer: Peer, frame: Any, request: Any) -> None:
        self.seals.extend(fcntl.fcntl(fd, F_GET_SEALS) for fd in frame.fds)
        for fd in frame.fds:
            os.close(fd)
        peer.send(frame.stream_id, RESPONSE, 0, response_envelope(b''))


def test_a_peer_that_never_gives_back_gets_new_memfds_once_it_holds_its_share_and_others_keep_the_pool(
        echo: Any, socket_dir: Path, pool_server: ServerProcess, own_pool: SegmentPool) -> None:
    own_pool.max_bytes = 16 * MiB  # a connection may hold a quarter: 4 MiB
    fds_before = fds_of_self()
    server = Hoarder(socket_dir / 'h.ttrpc.sock')
    try:
        method = stub_methods(echo.Stub)['Echo']
        large = echo.pb.EchoRequest(payload=bytes(MiB))
        with SyncConnection.connect(server.path, shared_memory=OPTIONS) as connection:
            exhausted = own_pool.stats['exhausted']
            for _ in range(8):
                connection.call(method, large, timeout=LONG)
                assert own_pool.total_bytes <= own_pool.max_bytes
            link = connection._core.agreement.segments
            assert link is not None and link.outstanding == 3  # 3 segments of 1.25 MiB fit in 4 MiB
            assert own_pool.stats['exhausted'] == exhausted  # the pool itself never ran out
            # Another connection is lent pooled segments while the hoarder holds its share.
            with SyncConnection.connect(pool_server.ttrpc_path, shared_memory=OPTIONS) as other:
                assert other.call(method, large, timeout=LONG).payload == large.payload
                other_link = other._core.agreement.segments
                assert other_link is not None and other_link.stats['lent'] == 1
        # Lent segments (sealed against future writes), then new memfds sealed against writes.
        requests = server.seals[-8:]
        assert [bool(seal & SEAL_FUTURE_WRITE) for seal in requests] == [True] * 3 + [False] * 5
        assert all(seal & SEAL_WRITE for seal in requests[3:])
        # The connections are gone: their lends came back, nothing is in use.
        assert own_pool.total_bytes == own_pool.free_bytes
    finally:
        server.close()
    drop_free(own_pool)
    wait_for(lambda: fds_of_self() == fds_before, 10, 'the descriptors of the test to be closed')


def test_a_peer_that_never_gives_back_small_segments_gets_new_memfds_once_it_holds_its_share_of_them(
        echo: Any, socket_dir: Path, own_pool: SegmentPool) -> None:
    own_pool.max_segments = 16  # a connection may hold a quarter: 4 segments, far below the bytes' share
    server = Hoarder(socket_dir / 'hs.ttrpc.sock')
    try:
        method = stub_methods(echo.Stub)['Echo']
        small = echo.pb.EchoRequest(payload=bytes(100 * KiB))
        with SyncConnection.connect(server.path, shared_memory=OPTIONS) as connection:
            for _ in range(6):
                connection.call(method, small, timeout=LONG)
            link = connection._core.agreement.segments
            assert link is not None and link.outstanding == 4
            assert own_pool.segments <= own_pool.max_segments
        requests = server.seals[-6:]
        assert [bool(seal & SEAL_FUTURE_WRITE) for seal in requests] == [True] * 4 + [False] * 2
    finally:
        server.close()


# == a connection that ends with lends outstanding =============================================

def ttrpc_connections(server: ServerProcess) -> int:
    """The server's open fast-lane connections."""
    with SyncIPCHandler(server.socket_path, IntrospectionStub, lane='grpc') as handler:
        stats = handler.call_method('GetStats', StatsRequest())
    return next(lane.connections for lane in stats.lanes if lane.lane == 'ttrpc')


def test_an_answer_kept_after_its_connection_closed_never_changes_while_the_server_serves_others(
        echo: Any, pool_server: ServerProcess, own_pool: SegmentPool) -> None:
    # The server lends its copy of the buffer with the answer; the client
    # disconnects holding it. The server hears the connection end but not
    # the lend come back: its segment must not serve the next client.
    method = stub_methods(echo.Stub)['Mirror']
    data = os.urandom(MiB)
    with SharedBuffer.copy_from(data) as buffer, \
            SyncConnection.connect(pool_server.ttrpc_path, shared_memory=OPTIONS) as connection:
        reply, received = connection.call(method, echo.pb.MirrorRequest(data=buffer.ref, copy=True),
                                          buffers=[buffer], timeout=LONG, return_buffers=True)
        kept = received.view(reply.data)
        retired = server_pool(pool_server).bytes
    wait_for(lambda: ttrpc_connections(pool_server) == 0, LONG, 'the server to close the connection')
    for _ in range(3):
        with SharedBuffer.copy_from(bytes(MiB)) as zeros, \
                SyncConnection.connect(pool_server.ttrpc_path, shared_memory=OPTIONS) as connection:
            reply, received = connection.call(method, echo.pb.MirrorRequest(data=zeros.ref, copy=True),
                                              buffers=[zeros], timeout=LONG, return_buffers=True)
            assert bytes(received.view(reply.data)[:4]) == bytes(4)
            received.close()
    assert hashlib.sha256(kept).digest() == hashlib.sha256(data).digest()
    # The retired segment left the server's pool accounts (it dies with the view).
    assert server_pool(pool_server).bytes <= retired
    del kept, received, reply


class Keeper(PoolPeer):
    """A server that keeps every descriptor it is sent, answers with an
    empty message, and never gives a lend back: a handler that kept a
    request's buffer."""

    def __init__(self, path: Path) -> None:
        self.kept: list[int] = []
        super().__init__(path)

    def answer(self, peer: Peer, frame: Any, request: Any) -> None:
        self.kept.extend(frame.fds)
        peer.send(frame.stream_id, RESPONSE, 0, response_envelope(b''))

    def close(self) -> None:
        super().close()
        for fd in self.kept:
            os.close(fd)


def test_a_buffer_the_peer_still_holds_when_the_connection_ends_is_never_written_again(
        echo: Any, socket_dir: Path, own_pool: SegmentPool) -> None:
    server = Keeper(socket_dir / 'k.ttrpc.sock')
    try:
        method = stub_methods(echo.Stub)['Inspect']
        with SyncConnection.connect(server.path, shared_memory=OPTIONS) as connection:
            buffer = SharedBuffer.allocate(MiB)
            buffer.view()[:] = b'A' * MiB
            connection.call(method, echo.pb.InspectRequest(data=buffer.ref), buffers=[buffer], timeout=LONG)
            buffer.close()
        for _ in range(3):  # the pool's next buffers of that size
            with SharedBuffer.allocate(MiB) as again:
                again.view()[:] = b'Z' * MiB
        (kept,) = server.kept
        assert os.pread(kept, MiB, 0) == b'A' * MiB
        assert own_pool.stats['retired'] >= 1
        assert own_pool.total_bytes == own_pool.free_bytes  # out of the accounts: nothing in use
    finally:
        server.close()


# == forged input ================================================================================

def test_a_release_of_segments_never_lent_closes_that_connection_and_the_server_serves_on(
        echo: Any, pool_server: ServerProcess) -> None:
    peer = Peer.connect(pool_server.ttrpc_path)
    try:
        peer.request(1, *HELLO, ttrpc_pb2.Hello(shared_memory=True, segment_pool=True).SerializeToString())
        answer = peer.answer(1)
        assert ttrpc_pb2.Hello.FromString(answer.payload).segment_pool
        peer.send_raw(frame_bytes(0, RELEASE, 0, (12345).to_bytes(8, 'big')))
        assert peer.frames_until_closed() == []
    finally:
        peer.close()
    assert 'RELEASE of segments not lent to the peer (lend ids 12345)' in pool_server.log()
    with SyncIPCHandler(pool_server.socket_path, echo.Stub, shared_memory=OPTIONS, timeout=LONG) as ipc:
        assert ipc.call_method('Echo', echo.pb.EchoRequest(payload=bytes(MiB))).payload == bytes(MiB)


@pytest.mark.parametrize('forgery', ['unsealed', 'larger than its size class'])
def test_a_forged_lent_segment_is_refused_and_the_connection_serves_on(
        forgery: str, echo: Any, pool_server: ServerProcess) -> None:
    request = echo.pb.EchoRequest(text='forged').SerializeToString()
    fd = os.memfd_create('forged', os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    # A sparse GiB would cost the receiver a GiB of pages if it mapped it whole.
    os.ftruncate(fd, size_class(len(request)) if forgery == 'unsealed' else 1 << 30)
    os.pwrite(fd, request, 0)
    if forgery != 'unsealed':
        fcntl.fcntl(fd, 1033, 0x0002 | 0x0004 | 0x0008)  # F_ADD_SEALS: shrink, grow, write
    peer = Peer.connect(pool_server.ttrpc_path)
    try:
        peer.request(1, *HELLO, ttrpc_pb2.Hello(shared_memory=True, segment_pool=True).SerializeToString())
        peer.answer(1)
        manifest = ttrpc_pb2.SharedMemoryManifest(payload_size=len(request), payload_lend=1)
        envelope = ttrpc_pb2.Request(service='vyra.ipc.test.EchoService', method='Echo',
                                     payload=manifest.SerializeToString()).SerializeToString()
        peer.send_raw(frame_bytes(3, REQUEST, SHARED, envelope), [fd])
        answer = peer.answer(3)
        assert answer.code == 3  # INVALID_ARGUMENT
        assert (('the memfd is not sealed against shrink, grow, write' if forgery == 'unsealed'
                 else f'a pooled segment of {1 << 30} bytes for {len(request)} announced') in answer.message)
        peer.request(5, 'vyra.ipc.test.EchoService', 'Echo', echo.pb.EchoRequest(text='ok').SerializeToString())
        assert echo.pb.EchoReply.FromString(peer.answer(5).payload).text == 'ok'
    finally:
        os.close(fd)
        peer.close()


#: A peer of another user (run with the system interpreter as that user):
#: agrees on pooled segments, asks for a large echo (the request's hex on
#: stdin), keeps the answer's descriptor and gives back a pooled lend of it;
#: once told (a line on stdin), says whether the descriptor holds the secret.
KEEPER_OF_ANOTHER_USER = r"""
import array, fcntl, os, socket, struct, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
buffered, fds = b'', []
def frame(stream_id, kind, data):
    return struct.pack('>IIBB', len(data), stream_id, kind, 0) + data
def read():
    global buffered
    while True:
        if len(buffered) >= 10:
            length, _, kind, _ = struct.unpack('>IIBB', buffered[:10])
            if len(buffered) >= 10 + length:
                buffered = buffered[10 + length:]
                return kind
        data, ancillary, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(64))
        for _, _, raw in ancillary:
            fds.extend(array.array('i', raw[:len(raw) - len(raw) % 4]))
        if not data:
            sys.exit('closed')
        buffered += data
sock.sendall(frame(1, 1, bytes.fromhex(sys.argv[2])))
read()
sock.sendall(frame(3, 1, bytes.fromhex(sys.stdin.readline())))
while read() != 2:
    pass
seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
if seals & 0x0010:  # F_SEAL_FUTURE_WRITE: a pooled segment, lend 1: given back, the descriptor kept
    sock.sendall(frame(0, 0x12, (1).to_bytes(8, 'big')))
print(seals, flush=True)
sys.stdin.readline()
print(b'SECRET' in os.pread(fds[0], 1 << 20, 0), flush=True)
"""


def test_a_peer_of_another_user_never_reads_what_the_server_sends_its_own_user_later(
        echo: Any, start_server: StartServer, open_dir: Path) -> None:
    # A member of the socket group (another uid) kept the descriptor of an
    # answer's pooled segment and gave the lend back; the server reused the
    # segment for its own user's next answer, which that peer could read.
    # Such a peer gets each answer in a new memfd sealed against writes.
    needs_second_uid()
    server = start_server(open_dir / 'u.sock', '--shared-memory-threshold', str(THRESHOLD),
                          '--socket-group', str(NOBODY))
    hello = ttrpc_pb2.Request(service=HELLO[0], method=HELLO[1], payload=ttrpc_pb2.Hello(
        shared_memory=True, segment_pool=True).SerializeToString()).SerializeToString()
    size = 100 * KiB
    request = ttrpc_pb2.Request(service='vyra.ipc.test.EchoService', method='Echo', payload=echo.pb.EchoRequest(
        payload=bytes(size)).SerializeToString()).SerializeToString()
    peer = subprocess.Popen(as_user(OTHER_UID, NOBODY, KEEPER_OF_ANOTHER_USER, str(server.ttrpc_path), hello.hex()),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={'PATH': '/usr/bin:/bin'})
    try:
        assert peer.stdin is not None and peer.stdout is not None
        peer.stdin.write(request.hex() + '\n')
        peer.stdin.flush()
        seals = int(peer.stdout.readline())
        secret = (b'SECRET' * size)[:size]  # the same size class as the other peer's answer
        with SyncIPCHandler(server.socket_path, echo.Stub, lane='ttrpc', shared_memory=OPTIONS,
                            timeout=LONG) as handler:
            for _ in range(3):
                assert handler.call_method('Echo', echo.pb.EchoRequest(payload=secret)).payload == secret
        peer.stdin.write('\n')
        peer.stdin.flush()
        assert peer.stdout.readline().strip() == 'False'
        assert seals & SEAL_WRITE  # a new memfd of its own
    finally:
        peer.kill()
        peer.communicate(timeout=LONG)


def test_a_client_that_never_gives_back_what_it_is_lent_gets_copies_once_it_holds_too_many_lends(
        echo: Any, pool_server: ServerProcess) -> None:
    # Mirror lends the client's buffer back with every answer. A client that
    # never gives those lends back must not grow the server's table of them
    # without a bound: past MAX_LENDS it is answered with copies in one-shot
    # memfds (sealed against writes), and the server serves on.
    size = MIN_SEGMENT_BYTES
    fd = os.memfd_create('hoarded', os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, 1033, 0x0002 | 0x0004 | SEAL_FUTURE_WRITE)  # F_ADD_SEALS as a pooled segment
    calls = MAX_LENDS + 4
    lends, seals = [], []
    peer = Peer.connect(pool_server.ttrpc_path)
    try:
        peer.request(1, *HELLO, ttrpc_pb2.Hello(shared_memory=True, segment_pool=True).SerializeToString())
        peer.answer(1)
        for call in range(calls):
            stream_id, handle = 3 + 2 * call, call + 1
            request = echo.pb.MirrorRequest()
            request.data.handle, request.data.size = handle, size
            manifest = ttrpc_pb2.SharedMemoryManifest(payload=request.SerializeToString())
            manifest.buffers.add(handle=handle, size=size, lend=call + 1, segment=1)
            envelope = ttrpc_pb2.Request(service='vyra.ipc.test.EchoService', method='Mirror',
                                         payload=manifest.SerializeToString()).SerializeToString()
            peer.send_raw(frame_bytes(stream_id, REQUEST, SHARED, envelope), [fd])
            while (frame := peer.read_frame()).type != RESPONSE:  # the server's RELEASE frames
                assert frame.type == RELEASE
            assert frame.stream_id == stream_id
            reply = ttrpc_pb2.SharedMemoryManifest.FromString(ttrpc_pb2.Response.FromString(frame.data).payload)
            lends.append(reply.buffers[0].lend)
            if call >= calls - 8:
                seals.append(fcntl.fcntl(frame.fds[0], F_GET_SEALS))
            for received in frame.fds:
                os.close(received)
        assert all(lends[:MAX_LENDS]) and not any(lends[MAX_LENDS:])
        assert [bool(seal & SEAL_WRITE) for seal in seals] == [False] * 4 + [True] * 4
    finally:
        peer.close()
        os.close(fd)
    with SyncIPCHandler(pool_server.socket_path, echo.Stub, lane='ttrpc', shared_memory=OPTIONS,
                        timeout=LONG) as handler:
        assert handler.call_method('Echo', echo.pb.EchoRequest(text='still here')).text == 'still here'


# == the pool itself =============================================================================

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_free_segments_are_dropped_when_idle_and_beyond_the_free_bytes_kept() -> None:
    clock = Clock()
    pool = SegmentPool(max_bytes=16 * MiB, idle_seconds=10.0, max_free_bytes=4 * MiB, clock=clock)
    first, second, third = (pool.acquire(MiB) for _ in range(3))
    assert first is not None and second is not None and third is not None
    capacity = size_class(MiB)
    assert pool.total_bytes == 3 * capacity and pool.free_bytes == 0
    for segment in (first, second, third):
        segment.unuse()
    # 3 MiB free is within the 4 MiB kept.
    assert pool.free_bytes == 3 * capacity and pool.stats['dropped'] == 0
    again = pool.acquire(MiB)
    assert again is third and pool.stats['reused'] == 1  # the last returned first
    clock.now = 5.0
    again.unuse()
    clock.now = 11.0  # first and second idle for 11 s, third for 6 s
    pool.trim()
    assert pool.stats['dropped'] == 2 and pool.total_bytes == capacity == pool.free_bytes
    big = pool.acquire(5 * MiB)  # 6 MiB: beyond what is kept free once returned
    assert big is not None
    big.unuse()
    # Beyond the 4 MiB kept free: the oldest go first, then the big one too.
    assert pool.free_bytes == 0 and pool.stats['dropped'] == 4
    pool.close()
    assert pool.total_bytes == 0 and pool.acquire(MiB) is None


def trimmers(pool: SegmentPool) -> list[threading.Thread]:
    """The idle-timer threads of ``pool``: those of other pools (the process's, other tests') are new threads each
    time they fire while free segments wait, and would come and go under a count of them all."""
    return [thread for thread in threading.enumerate() if thread.name == 'vyra-ipc-segment-trim'
            and getattr(getattr(thread, 'function', None), '__self__', None) is pool]


def test_an_idle_pool_gives_its_free_segments_back_without_being_used_again() -> None:
    # A process that stopped sending large messages: nothing calls the pool
    # any more, yet its free segments (mapped, with their descriptors) go.
    pool = SegmentPool(idle_seconds=0.2)
    held = [pool.acquire(MiB), pool.acquire(3 * MiB)]
    assert all(segment is not None for segment in held)
    for segment in held:
        segment.unuse()  # type: ignore[union-attr]
    assert pool.free_bytes == size_class(MiB) + size_class(3 * MiB)
    assert len(trimmers(pool)) == 1  # one timer, only while free segments wait
    wait_for(lambda: all(segment.fd == -1 for segment in held),  # type: ignore[union-attr]
             LONG, 'the idle pool to close its free segments')
    assert pool.stats['dropped'] == 2 and pool.total_bytes == 0
    wait_for(lambda: not trimmers(pool), LONG, 'the idle timer to end with nothing left to wait for')
    # Used again, it keeps what is busy and times out what is not.
    busy, idle = pool.acquire(MiB), pool.acquire(MiB)
    assert busy is not None and idle is not None
    idle.unuse()
    wait_for(lambda: idle.fd == -1, LONG, 'the second idle segment to go')
    assert pool.total_bytes == size_class(MiB) and pool.free_bytes == 0 and busy.fd != -1
    busy.unuse()
    pool.close()
    wait_for(lambda: not trimmers(pool), LONG, 'a closed pool to leave no timer')
    assert pool.total_bytes == 0


@pytest.fixture
def pool_settings() -> Iterator[dict[str, float]]:
    """This process's pool limits as they were, restored after the test."""
    settings = configure_shared_memory_pool()
    yield settings
    configure_shared_memory_pool(**settings)  # type: ignore[arg-type]


def test_pool_limits_are_set_by_the_public_function_and_apply_at_once(pool_settings) -> None:
    assert pool_settings == {'max_bytes': 1 << 30, 'max_free_bytes': 256 * MiB, 'idle_seconds': 10.0,
                             'max_segments': 1024}
    pool = segment_pool()
    kept = [SharedBuffer.allocate(MiB) for _ in range(3)]
    created = pool.stats['created']
    for buffer in kept:
        buffer.close()
    assert pool.free_bytes >= 3 * size_class(MiB)
    # Fewer free bytes kept: the oldest go now, without waiting for a use.
    assert configure_shared_memory_pool(max_free_bytes=size_class(MiB)) == {
        **pool_settings, 'max_free_bytes': size_class(MiB)}
    assert pool.free_bytes <= size_class(MiB)
    # No pooling: a buffer is a memfd of its own, made and dropped with it.
    configure_shared_memory_pool(max_bytes=0, max_free_bytes=0)
    exhausted = pool.stats['exhausted']
    with SharedBuffer.allocate(MiB) as buffer:
        buffer.view()[:3] = b'abc'
        assert bytes(buffer.view()[:3]) == b'abc'
    assert pool.stats['exhausted'] == exhausted + 1 and pool.stats['created'] == created
    assert pool.total_bytes == 0
    # A short idle time takes effect for segments already free.
    configure_shared_memory_pool(max_bytes=64 * MiB, max_free_bytes=64 * MiB, idle_seconds=60.0)
    SharedBuffer.allocate(MiB).close()
    assert pool.free_bytes == size_class(MiB)
    configure_shared_memory_pool(idle_seconds=0.1)
    wait_for(lambda: pool.total_bytes == 0, LONG, 'the free segment to go after the new idle time')


@pytest.mark.parametrize(('settings', 'error', 'words'), [
    ({'max_bytes': '1 GiB'}, TypeError, 'max_bytes must be a number of bytes (int), not str'),
    ({'max_free_bytes': -1}, ValueError, 'max_free_bytes must be >= 0 bytes, not -1'),
    ({'max_bytes': 1.5}, TypeError, 'max_bytes must be a number of bytes (int), not float'),
    ({'idle_seconds': float('nan')}, ValueError,
     'idle_seconds must be a number of seconds >= 0 and at most 1e+09, not nan'),
    # Past what the trim thread can wait (it died with an OverflowError).
    ({'idle_seconds': 1e300}, ValueError,
     'idle_seconds must be a number of seconds >= 0 and at most 1e+09, not 1e+300'),
    ({'idle_seconds': True}, TypeError, 'idle_seconds must be a number of seconds, not bool'),
    ({'max_segments': -2}, ValueError, 'max_segments must be >= 0 segments, not -2'),
    ({'max_segments': '1k'}, TypeError, 'max_segments must be a number of segments (int), not str'),
])
def test_invalid_pool_limits_are_refused_naming_the_limit(pool_settings, settings: dict[str, Any],
                                                          error: type[Exception], words: str) -> None:
    with pytest.raises(error) as raised:
        configure_shared_memory_pool(**settings)
    assert str(raised.value) == words
    assert configure_shared_memory_pool() == pool_settings  # nothing changed


def test_a_full_pool_never_waits_and_never_grows_past_its_bound() -> None:
    pool = SegmentPool(max_bytes=2 * MiB, max_free_bytes=2 * MiB)
    held = [pool.acquire(700 * KiB) for _ in range(3)]
    assert held[2] is None and pool.stats['exhausted'] == 1
    assert pool.total_bytes <= 2 * MiB
    for segment in held[:2]:
        assert segment is not None
        segment.unuse()
    # Room is made by dropping free segments of another size.
    bigger = pool.acquire(1536 * KiB)
    assert bigger is not None and pool.stats['dropped'] >= 1 and pool.total_bytes <= 2 * MiB
    bigger.unuse()
    pool.close()


def test_a_segment_that_can_never_fit_leaves_the_free_segments_in_the_pool() -> None:
    # A robot with a small pool and an occasional message above it: each one
    # dropped every free segment first, only to find no room all the same.
    pool = SegmentPool(max_bytes=4 * MiB, max_free_bytes=4 * MiB, max_segments=3)
    held = [pool.acquire(MiB) for _ in range(3)]
    for segment in held[:2]:
        assert segment is not None
        segment.unuse()
    assert pool.free_bytes == 2 * size_class(MiB) and pool.segments == 3
    assert pool.acquire(8 * MiB) is None  # above max_bytes, whatever is free
    assert pool.acquire(3 * MiB + MiB // 2) is None  # within max_bytes, but not beside the one in use
    assert pool.free_bytes == 2 * size_class(MiB) and pool.stats['dropped'] == 0
    assert pool.stats['exhausted'] == 2
    reused = pool.acquire(MiB)  # the free ones are still there to be reused
    assert reused is not None and pool.stats['reused'] == 1
    for segment in (reused, held[2]):
        assert segment is not None
        segment.unuse()
    pool.close()


def test_a_pool_holds_no_more_segments_than_its_bound_however_small_they_are() -> None:
    # Each segment holds two descriptors: a bound in bytes alone let small
    # segments take a process past its open-file limit.
    pool = SegmentPool(max_segments=4)
    held = [pool.acquire(KiB) for _ in range(5)]
    assert held[4] is None and pool.stats['exhausted'] == 1 and pool.segments == 4
    for segment in held[:2]:
        assert segment is not None
        segment.unuse()  # two free
    # Room is made by dropping a free segment, even for another size.
    bigger = pool.acquire(MiB)
    assert bigger is not None and pool.segments == 4 and pool.stats['dropped'] == 1
    # A retired segment leaves the count at once.
    bigger.retire()
    assert pool.segments == 3
    bigger.unuse()
    assert bigger.fd == -1 and pool.segments == 3
    for segment in held[2:4]:
        segment.unuse()  # type: ignore[union-attr]
    pool.close()
    assert pool.segments == 0 and pool.total_bytes == 0


def test_a_pool_whose_last_free_segment_of_a_size_was_taken_again_still_makes_room_and_trims() -> None:
    pool = SegmentPool(max_bytes=4 * MiB, idle_seconds=60.0)
    small, one = pool.acquire(512 * KiB), pool.acquire(MiB)
    assert small is not None and one is not None
    small.unuse()
    one.unuse()
    assert pool.acquire(MiB) is one  # the only free segment of its size, taken again
    # Room for 3 MiB is made by dropping the small one; the idle timer is set again.
    big = pool.acquire(3 * MiB)
    assert big is not None and small.fd == -1 and pool.total_bytes == 4 * MiB
    pool.configure(4 * MiB, 4 * MiB, 30.0, 16)
    big.unuse()
    one.unuse()
    pool.trim()
    assert pool.free_bytes == 4 * MiB
    pool.close()
    assert pool.total_bytes == 0


def test_a_segment_kept_and_lent_on_every_new_connection_remembers_only_the_open_ones() -> None:
    pool = SegmentPool()
    segment = pool.acquire(MiB)
    assert segment is not None
    ended = []
    for _ in range(100):  # connections that came and went, kept referenced
        link = SegmentLink()
        segment.use()
        lend_id = link.lend(segment)
        assert link.released(encode_release([lend_id])[HEADER.size:]) is None
        link.close()
        ended.append(link)
    still_open = SegmentLink()
    segment.use()
    still_open.lend(segment)
    assert len(segment.watchers) <= 8
    segment.retire()
    still_open.close()
    segment.unuse()  # destroyed: the open one heard of it while it was open
    assert segment.fd == -1 and pool.total_bytes == 0
    pool.close()


def test_lent_views_keep_their_segment_until_the_last_one_is_gone() -> None:
    pool = SegmentPool()
    with_views = pool.acquire(100)
    assert with_views is not None
    view = with_views.user_view(10, writable=True)
    part = view[2:4]
    del view
    with_views.unuse()
    assert pool.free_bytes == 0  # part still refers to it
    del part
    assert pool.free_bytes == with_views.capacity
    pool.close()


def test_threads_sending_the_same_buffer_all_lend_it(
        echo: Any, pool_server: ServerProcess, own_pool: SegmentPool) -> None:
    method = stub_methods(echo.Stub)['Inspect']
    data = os.urandom(MiB)
    digests: list[bytes] = []
    with SharedBuffer.copy_from(data) as buffer, \
            SyncConnection.connect(pool_server.ttrpc_path, shared_memory=OPTIONS) as connection:
        def send() -> None:
            for _ in range(10):
                reply = connection.call(method, echo.pb.InspectRequest(data=buffer.ref), buffers=[buffer],
                                        timeout=LONG)
                digests.append(reply.sha256)
        threads = [threading.Thread(target=send) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(LONG)
        assert digests == [hashlib.sha256(data).digest()] * 40
        link = connection._core.agreement.segments
        assert link is not None and link.stats['lent'] == 40
        settle_lends(connection, echo)


def segment_mappings() -> int:
    """Mappings of pooled segments in this process (its own and its peers')."""
    with open('/proc/self/maps') as maps:
        return sum('/memfd:vyra-ipc-segment' in line for line in maps)


def test_segments_the_owner_dropped_are_unmapped_by_the_receiver(
        echo: Any, start_server: StartServer, socket_path: Path, own_pool: SegmentPool) -> None:
    # This server keeps no free segment: each answer's segment dies once given
    # back, and the server names it gone in its next RELEASE frame.
    server = start_server(socket_path, '--shared-memory-threshold', str(THRESHOLD), '--pool-free-bytes', '0')
    own_pool.max_free_bytes = 0
    method = stub_methods(echo.Stub)['Echo']
    before = segment_mappings()
    with SyncConnection.connect(server.ttrpc_path, shared_memory=OPTIONS) as connection:
        for _ in range(CACHE_ENTRIES + 4):
            connection.call(method, echo.pb.EchoRequest(payload=os.urandom(64 * KiB)), timeout=LONG)
        settle_lends(connection, echo)
        link = connection._core.agreement.segments
        assert link is not None and link.stats['mapped'] == CACHE_ENTRIES + 4  # a new segment each time
        # Without the server's word, the dead segments would stay mapped up to CACHE_ENTRIES.
        assert segment_mappings() - before <= 1


def test_an_answer_with_the_requests_own_buffer_is_read_through_the_owners_mapping(
        echo: Any, pool_server: ServerProcess, own_pool: SegmentPool) -> None:
    method = stub_methods(echo.Stub)['Mirror']
    with SyncConnection.connect(pool_server.ttrpc_path, shared_memory=OPTIONS) as connection, \
            SharedBuffer.allocate(2 * MiB) as buffer:
        buffer.view()[:3] = b'own'
        before = segment_mappings()
        for _ in range(5):
            reply, received = connection.call(method, echo.pb.MirrorRequest(data=buffer.ref), buffers=[buffer],
                                              timeout=LONG, return_buffers=True)
            view = received.view(reply.data)
            assert bytes(view[:3]) == b'own' and view.readonly
            # No new mapping: the view is of this process's own pages.
            assert segment_mappings() == before
            del view, reply, received
        link = connection._core.agreement.segments
        assert link is not None and link.stats['mapped'] == 0


@pytest.mark.parametrize('method, later', [('Mirror', False), ('Mirror', True), ('MirrorSync', False)],
                         ids=['async-def', 'async-def-awaiting', 'def'])
@pytest.mark.parametrize('kind', ['sync', 'async'])
def test_an_answer_with_the_requests_buffer_brings_its_lend_back_so_the_next_call_takes_the_same_segment(
        kind: str, method: str, later: bool, echo: Any, pool_server: ServerProcess,
        own_pool: SegmentPool) -> None:
    # The server used to hold the request's lend until the client gave the
    # answer's back: a loop's next call then took another segment while the
    # last one waited for its RELEASE (two segments in turn, twice the cache).
    size, calls = 2 * MiB, 10
    options = {'lane': 'ttrpc', 'shared_memory': OPTIONS, 'timeout': LONG}
    before = dict(own_pool.stats)
    free_after_each: list[int] = []

    def prepare(number: int) -> SharedBuffer:
        buffer = SharedBuffer.allocate(size)
        buffer.view()[0] = number
        return buffer

    def read(number: int, reply: Any, received: Any) -> None:
        view = shared_buffer(reply.data, received)
        assert len(view) == size and view[0] == number

    if kind == 'sync':
        with SyncIPCHandler(pool_server.socket_path, echo.Stub, **options) as handler:
            for number in range(calls):
                with prepare(number) as buffer:
                    read(number, *handler.call_method(method, echo.pb.MirrorRequest(data=buffer.ref, later=later),
                                                      buffers=[buffer], return_buffers=True))
                # Back in the pool with no other call to read a RELEASE frame.
                free_after_each.append(own_pool.free_bytes)
    else:
        async def loop() -> None:
            async with IPCHandler(pool_server.socket_path, echo.Stub, **options) as handler:
                for number in range(calls):
                    with prepare(number) as buffer:
                        read(number, *await handler.call_method(
                            method, echo.pb.MirrorRequest(data=buffer.ref, later=later), buffers=[buffer],
                            return_buffers=True))
                    free_after_each.append(own_pool.free_bytes)
        asyncio.run(loop())
    assert free_after_each == [size_class(size)] * calls
    assert own_pool.stats['created'] - before['created'] == 1
    assert own_pool.stats['reused'] - before['reused'] == calls - 1


def test_a_large_request_is_given_back_with_its_answer(
        echo: Any, pool_server: ServerProcess, own_pool: SegmentPool) -> None:
    # The server parses a request from the client's segment before its
    # handler runs; the RELEASE leaves in the same write as the answer of a
    # handler that answers at once, so the blocking client, which reads only
    # while it waits for an answer, has its segment back when the call returns.
    method = stub_methods(echo.Stub)['Echo']
    payload = os.urandom(256 * KiB)
    capacity = size_class(echo.pb.EchoRequest(payload=payload).ByteSize())
    before = dict(own_pool.stats)
    free_after_each: list[int] = []
    with SyncConnection.connect(pool_server.ttrpc_path, shared_memory=OPTIONS) as connection:
        for _ in range(5):
            reply = connection.call(method, echo.pb.EchoRequest(payload=payload), timeout=LONG)
            assert reply.payload == payload
            free_after_each.append(own_pool.free_bytes)
    assert free_after_each == [capacity] * 5
    assert own_pool.stats['created'] - before['created'] == 1


class Returner(PoolPeer):
    """A server that gives back the lend of a request's segment at once and
    then lends that very segment back to the client as its answer (it kept
    the descriptor): what a hostile peer could do."""

    def answer(self, peer: Peer, frame: Any, request: Any) -> None:
        manifest = ttrpc_pb2.SharedMemoryManifest.FromString(request.payload)
        peer.send_raw(frame_bytes(0, RELEASE, 0, manifest.payload_lend.to_bytes(8, 'big')))
        answer = ttrpc_pb2.SharedMemoryManifest(payload_size=manifest.payload_size, payload_lend=7)
        peer.send(frame.stream_id, RESPONSE, SHARED, response_envelope(answer.SerializeToString()), frame.fds)
        for fd in frame.fds:
            os.close(fd)


def test_a_segment_lent_back_after_its_lend_came_back_is_mapped_like_any_other(
        echo: Any, socket_dir: Path, own_pool: SegmentPool) -> None:
    server = Returner(socket_dir / 'r.ttrpc.sock')
    try:
        request = echo.pb.EchoRequest(payload=os.urandom(100 * KiB))
        with SyncConnection.connect(server.path, shared_memory=OPTIONS) as connection:
            reply = connection.call(stub_methods(echo.Stub)['Echo'], request, timeout=LONG)
            assert reply.payload == request.payload
            link = connection._core.agreement.segments
            assert link is not None and link.stats['mapped'] == 1  # not read through this end's mapping
            del reply
            gc.collect()
            # The segment is back in the pool once, not twice.
            capacity = size_class(request.ByteSize())
            assert own_pool.free_bytes == capacity
            first, second = own_pool.acquire(request.ByteSize()), own_pool.acquire(request.ByteSize())
            assert first is not None and second is not None and first is not second
            first.unuse()
            second.unuse()
    finally:
        server.close()


def test_a_message_parsed_from_shared_memory_keeps_no_reference_to_it(echo: Any) -> None:
    # Why a transparent message's segment can go back as soon as the view it
    # was parsed from is gone: protobuf copies the bytes out.
    data = echo.pb.EchoRequest(payload=b'A' * 100_000).SerializeToString()
    pool = SegmentPool()
    segment = pool.acquire(len(data), data)
    assert segment is not None
    view = segment.user_view(len(data), writable=False)
    message = echo.pb.EchoRequest.FromString(view)
    del view
    segment.view[10:20] = b'Z' * 10  # the owner writes the segment again
    assert message.payload == b'A' * 100_000
    segment.unuse()
    pool.close()


def test_a_lend_given_back_wakes_the_event_loop_only_from_another_thread() -> None:
    # On the loop's own thread (a call ending there) the RELEASE frame is
    # queued with call_soon(); call_soon_threadsafe() would also write to the
    # loop's self-pipe and cost it one more turn. From another thread (a
    # `def` handler's worker) the loop must be woken, or the lend waits for
    # the connection's next frame.
    class CountingLoop(asyncio.SelectorEventLoop):
        threadsafe_calls = 0

        def call_soon_threadsafe(self, *args: Any, **kwargs: Any) -> Any:
            self.threadsafe_calls += 1
            return super().call_soon_threadsafe(*args, **kwargs)

    segment = new_segment(64)  # the peer's, as far as the link knows
    link = SegmentLink()
    sent: list[bytes] = []

    async def main(loop: CountingLoop) -> None:
        link.attach(loop, sent.append)
        views = [link.receive(segment.fd, 64, 5, 0, 'a lend on the loop thread')]
        views.clear()  # its last reference, on the loop's thread
        await until(lambda: sent, LONG, 'the RELEASE frame of lend 5')
        assert loop.threadsafe_calls == 0
        views.append(link.receive(segment.fd, 64, 6, 0, 'a lend on another thread'))
        worker = threading.Thread(target=views.clear)
        worker.start()
        worker.join(LONG)
        await until(lambda: len(sent) == 2, LONG, 'the RELEASE frame of lend 6')
        assert loop.threadsafe_calls == 1

    loop = CountingLoop()
    try:
        loop.run_until_complete(main(loop))
    finally:
        loop.close()
        segment.destroy()
    assert [released_ids(frame[HEADER.size:]) for frame in sent] == [(5,), (6,)]


def test_a_buffer_sent_on_to_another_peer_keeps_its_lend_but_one_sent_back_to_its_owner_does_not() -> None:
    # Sent on, the owner must not write the segment before the other peer
    # gave it back; sent back, the owner reads it through its own mapping.
    segment = new_segment(64)  # the peer's, as far as the links know
    from_owner, to_other = SegmentLink(), SegmentLink()
    try:
        view = from_owner.receive(segment.fd, 64, 5, 0, 'a buffer to send on')
        on = to_other.lend(view)
        del view
        assert from_owner.release_frame() == b''  # held for the other peer
        assert to_other.released(encode_release([on])[HEADER.size:]) is None
        assert released_ids(from_owner.release_frame()[HEADER.size:]) == (5,)

        view = from_owner.receive(segment.fd, 64, 6, 0, 'a buffer to send back')
        assert from_owner.lend(view)
        del view
        assert released_ids(from_owner.release_frame()[HEADER.size:]) == (6,)
        assert from_owner.outstanding == 1  # until the owner gives that one back
    finally:
        from_owner.close()
        to_other.close()
        segment.destroy()


def test_a_buffer_sent_on_stays_held_from_its_owner_when_the_other_peer_leaves_without_giving_it_back() -> None:
    # A relay: a buffer lent by A, sent on to C. If the relay's connection to
    # C ends while C holds it, A must not get it back (A would write the
    # segment under C): it stays held until the connection to A ends, where
    # A retires it.
    segment = new_segment(64)  # A's, as far as the links know
    from_owner, to_other = SegmentLink(), SegmentLink()
    try:
        view = from_owner.receive(segment.fd, 64, 5, 0, 'a buffer to send on')
        to_other.lend(view)
        del view
        to_other.close()  # C left without giving it back
        gc.collect()
        assert from_owner.release_frame() == b''  # still held for C
        assert from_owner.stats['returned'] == 0
        from_owner.close()
        assert from_owner.release_frame() == b''  # nobody to tell any more
    finally:
        from_owner.close()
        segment.destroy()


@pytest.mark.parametrize('attached', [False, True], ids=['blocking-client', 'event-loop'])
def test_a_mapping_left_unused_is_dropped_without_another_lend_to_check_it(
        attached: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # A blocking client reads nothing while it does not call (the owner's
    # FORGET of a segment included): its cached mappings must still go once
    # unused, or the pages of segments their owner dropped stay allocated.
    # On an event loop the same runs as a loop timer.
    monkeypatch.setattr(_segment_link, 'CACHE_IDLE_SECONDS', 0.2)
    segment = new_segment(64)  # the peer's, as far as the link knows
    segment.view[:5] = b'hello'
    link = SegmentLink()

    async def scenario() -> None:
        if attached:
            link.attach(asyncio.get_running_loop(), lambda frame: None)
        before = segment_mappings()  # (the owner's own mapping among them)
        kept = link.receive(segment.fd, 64, 1, 7, 'a lend kept')
        link.receive(segment.fd, 64, 2, 7, 'a lend given back at once')  # the same mapping
        assert segment_mappings() == before + 1 and link.stats['reused'] == 1
        await until(lambda: not link._mappings, LONG, 'the idle mapping to leave the cache')
        # A view still referenced keeps its mapping; the last one unmaps it.
        assert bytes(kept[:5]) == b'hello' and segment_mappings() == before + 1
        del kept
        assert segment_mappings() == before

    try:
        asyncio.run(scenario())
    finally:
        link.close()
        segment.destroy()


def test_a_buffer_is_copied_into_a_new_memfd_only_while_the_peer_reads_what_it_was_sent(
        own_pool: SegmentPool) -> None:
    # Without pooled segments agreed, a pooled buffer travels as a copy in a
    # new memfd: MemfdGate lets a megabyte of them go, then waits until the
    # peer's end of the socket has read everything.
    from vyra_base_ipc._payload import SharedMemoryError
    from vyra_base_ipc.ttrpc._shared_memory import MemfdGate
    from vyra_base_ipc.ttrpc._transport import unread_in_socket
    ours, peers = socket.socketpair()
    gate = MemfdGate(MiB, lambda: unread_in_socket(ours.fileno()))
    try:
        with SharedBuffer.allocate(MiB) as buffer:
            ours.send(b'frame')  # what the copy's frame would be
            fd, lend, _ = buffer.lend_to(None, gate)
            os.close(fd)
            assert lend == 0
            with pytest.raises(SharedMemoryError, match='the peer has not read the new memfds sent to it'):
                buffer.lend_to(None, gate)
            assert peers.recv(16) == b'frame'
            fd, _, _ = buffer.lend_to(None, gate)
            os.close(fd)
    finally:
        ours.close()
        peers.close()
