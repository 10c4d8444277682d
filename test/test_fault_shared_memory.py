"""What a greedy or broken peer can make the fast-lane server hold through
shared memory: a Hello again, more buffers than a message carries, memfds
with holes, RELEASE frames of any length, and metadata made of empty
entries. Each is refused or bounded for that peer alone; the server serves
everyone else. Hand-written peers (``ttrpc_peer``) against a real server
process; the server's pool counters (``GetStats``), its log and the peer's
own memfds are the observables.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import LONG, ServerProcess, StartServer, wait_for
from ttrpc_peer import DATA, REMOTE_OPEN, REQUEST, SHARED, Peer, frame_bytes
from vyra_base_ipc import IPCRemoteError, SharedMemoryOptions, SyncIPCHandler, ttrpc_pb2
from vyra_base_ipc._payload import MAX_BUFFERS_PER_MESSAGE
from vyra_base_ipc._segment_pool import size_class
from vyra_base_ipc.introspection_pb2 import StatsRequest
from vyra_base_ipc.introspection_pb2_grpc import IntrospectionStub
from vyra_base_ipc.ttrpc._frames import FORGET_BIT, encode_release

pytestmark = pytest.mark.fault

MiB = 1 << 20
THRESHOLD = 4096
HELLO = ('vyra.ipc.ttrpc.Connection', 'Hello')
POOLED_HELLO = ttrpc_pb2.Hello(shared_memory=True, segment_pool=True).SerializeToString()
ECHO_SERVICE = 'vyra.ipc.test.EchoService'
F_ADD_SEALS = 1033
SEAL_SHRINK, SEAL_GROW, SEAL_WRITE, SEAL_FUTURE_WRITE = 0x0002, 0x0004, 0x0008, 0x0010
FAILED_PRECONDITION, INVALID_ARGUMENT = 9, 3
CANCEL = 0x10


@pytest.fixture(scope='module')
def server(start_module_server: StartServer, module_socket_dir: Path) -> ServerProcess:
    """Shared memory above 4 KiB, the pool's defaults."""
    return start_module_server(module_socket_dir / 'f.sock', '--shared-memory-threshold', str(THRESHOLD),
                               '--max-message-bytes', str(64 * MiB))


def server_pool(server: ServerProcess) -> Any:
    """The server's SegmentPoolStats."""
    with SyncIPCHandler(server.socket_path, IntrospectionStub, lane='grpc') as handler:
        return handler.call_method('GetStats', StatsRequest()).segment_pool


def served(server: ServerProcess, echo: Any) -> bool:
    """Whether another client still gets a large answer (in shared memory)."""
    with SyncIPCHandler(server.socket_path, echo.Stub, lane='ttrpc', timeout=LONG,
                        shared_memory=SharedMemoryOptions(threshold=THRESHOLD)) as ipc:
        return ipc.call_method('Echo', echo.pb.EchoRequest(payload=bytes(MiB))).payload == bytes(MiB)


def answers(peer: Peer, stream_id: int, echo: Any) -> bool:
    """Whether the peer's connection still serves: an Echo on ``stream_id`` comes back."""
    peer.request(stream_id, ECHO_SERVICE, 'Echo', echo.pb.EchoRequest(text='on').SerializeToString())
    return bool(echo.pb.EchoReply.FromString(peer.answer(stream_id).payload).text == 'on')


def memfd(size: int, seals: int) -> int:
    """A memfd of ``size`` bytes with holes only (nothing written), sealed."""
    fd = os.memfd_create('peer', os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, F_ADD_SEALS, seals)
    return fd


def mirror_request(echo: Any, entries: list[tuple[int, int, int]]) -> bytes:
    """A Mirror request envelope whose manifest names buffers ``(handle, size, lend)``."""
    request = echo.pb.MirrorRequest()
    request.data.handle, request.data.size = entries[0][0], entries[0][1]
    manifest = ttrpc_pb2.SharedMemoryManifest(payload=request.SerializeToString())
    for handle, size, lend in entries:
        manifest.buffers.add(handle=handle, size=size, lend=lend, segment=lend)
    return ttrpc_pb2.Request(service=ECHO_SERVICE, method='Mirror', payload=manifest.SerializeToString(),
                             timeout_nano=int(LONG * 1e9)).SerializeToString()


def test_a_second_hello_is_refused_and_what_the_first_agreed_still_comes_back(
        echo: Any, server: ServerProcess) -> None:
    # A second agreement would drop the first one's pooled segments: those
    # lent under it would never come back, not even when the peer goes.
    with Peer.connect(server.ttrpc_path) as peer:
        peer.request(1, *HELLO, POOLED_HELLO)
        assert ttrpc_pb2.Hello.FromString(peer.answer(1).payload).segment_pool
        peer.request(3, ECHO_SERVICE, 'Echo', echo.pb.EchoRequest(payload=bytes(2 * MiB)).SerializeToString(),
                     timeout_nano=int(LONG * 1e9))
        lent = peer.answer(3)
        assert lent.code == 0 and lent.flags & SHARED and lent.fds  # lent from the pool, never given back
        for fd in lent.fds:
            os.close(fd)
        peer.request(5, *HELLO, POOLED_HELLO)
        again = peer.answer(5)
        assert again.code == FAILED_PRECONDITION
        assert 'Hello must be the first request of a connection (stream 3 came first)' in again.message
        assert answers(peer, 7, echo)
    # The peer is gone: everything it was lent is the server's again.
    wait_for(lambda: (lambda pool: pool.bytes == pool.free_bytes)(server_pool(server)), LONG,
             'the server to hold no segment in use')
    assert served(server, echo)


def test_a_request_with_more_buffers_than_a_message_carries_is_refused_and_their_descriptors_closed(
        echo: Any, server: ServerProcess) -> None:
    count = MAX_BUFFERS_PER_MESSAGE + 1  # the most descriptors one read takes: 32
    size = size_class(1)
    fd = memfd(size, SEAL_SHRINK | SEAL_GROW | SEAL_WRITE)
    fds_before = len(os.listdir(f'/proc/{server.popen.pid}/fd'))
    try:
        with Peer.connect(server.ttrpc_path) as peer:
            peer.request(1, *HELLO, ttrpc_pb2.Hello(shared_memory=True).SerializeToString())
            peer.answer(1)
            envelope = mirror_request(echo, [(handle, size, 0) for handle in range(1, count + 1)])
            peer.send_raw(frame_bytes(3, REQUEST, SHARED, envelope), [fd] * count)
            answer = peer.answer(3)
            assert answer.code == INVALID_ARGUMENT
            assert f'{count} shared buffers; at most {MAX_BUFFERS_PER_MESSAGE} travel with a message' \
                in answer.message
            # None of them is held: the server has no more descriptors than
            # before but this connection's socket.
            assert len(os.listdir(f'/proc/{server.popen.pid}/fd')) <= fds_before + 1
            assert answers(peer, 5, echo)
    finally:
        os.close(fd)
    assert served(server, echo)


def test_a_lent_segment_with_holes_is_not_populated_by_the_server(echo: Any, server: ServerProcess) -> None:
    # Populating a memfd with holes would allocate its pages in the server,
    # on the server's event loop: a peer could ftruncate a gigabyte, write
    # nothing, and have the server spend the memory and the time.
    size = 16 * MiB
    fd = memfd(size, SEAL_SHRINK | SEAL_GROW | SEAL_FUTURE_WRITE)  # as a pooled segment
    try:
        with Peer.connect(server.ttrpc_path) as peer:
            reply = mirror_lent(peer, echo, fd, size)
            assert reply.status.code == 0
            assert ttrpc_pb2.SharedMemoryManifest.FromString(reply.payload).buffers[0].size == size
        # Mirror answered with the buffer without reading it: none of its
        # pages has memory behind it (the server's populated mapping would
        # have allocated all 4,096).
        assert os.fstat(fd).st_blocks == 0
    finally:
        os.close(fd)


def mirror_lent(peer: Peer, echo: Any, fd: int, size: int) -> Any:
    """The answer (a ttrpc Response) to a Mirror of a buffer of ``size``
    bytes that ``peer`` lends as a pooled segment (``fd``), after agreeing
    on pooled segments; the descriptors of the answer are closed."""
    peer.request(1, *HELLO, POOLED_HELLO)
    peer.answer(1)
    peer.send_raw(frame_bytes(3, REQUEST, SHARED, mirror_request(echo, [(1, size, 1)])), [fd])
    while (frame := peer.read_frame(3)).type != 2:  # RESPONSE (RELEASE frames are stream 0)
        pass
    for received in frame.fds:
        os.close(received)
    return ttrpc_pb2.Response.FromString(frame.data)

def mapped_kib(pid: int, name: str) -> list[int]:
    """The resident KiB of each mapping of process ``pid`` of a memfd called ``name``."""
    sizes, current = [], False
    with open(f'/proc/{pid}/smaps') as smaps:
        for line in smaps:
            if '-' in line.split(' ', 1)[0]:  # a mapping's first line: its range, ..., its path
                current = line.rstrip().endswith((f'/memfd:{name} (deleted)', f'/memfd:{name}'))
            elif current and line.startswith('Rss:'):
                sizes.append(int(line.split()[1]))
    return sizes


def test_a_lent_buffer_is_not_populated_by_the_server_before_its_handler_reads_it(
        echo: Any, server: ServerProcess) -> None:
    # Populating a buffer's mapping costs the server's event loop the page
    # tables of all of it (a GiB: a tenth of a second), whether the handler
    # reads it or not; a peer lending one memfd of its own again and again,
    # 31 to a request, each under a new segment id, blocked the server's
    # loop for two seconds a request.
    size = 16 * MiB
    fd = os.memfd_create('peer-buffer', os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, bytes(size))  # every page allocated: no holes
        fcntl.fcntl(fd, F_ADD_SEALS, SEAL_SHRINK | SEAL_GROW | SEAL_FUTURE_WRITE)  # as a pooled segment
        with Peer.connect(server.ttrpc_path) as peer:
            assert mirror_lent(peer, echo, fd, size).status.code == 0
            # Mirror answered with the buffer without reading it: the server
            # keeps its mapping for the next lend, with no page of it mapped.
            assert mapped_kib(server.pid, 'peer-buffer') == [0]
    finally:
        os.close(fd)


def test_a_release_frame_naming_more_ids_than_one_frame_carries_closes_that_connection(
        echo: Any, server: ServerProcess) -> None:
    # Such a frame does not come from this package (it splits at 8,192 ids),
    # and 16 MiB of ids would take the server's loop 0.4 s to go through.
    ids = [FORGET_BIT | segment for segment in range(1, 8194)]
    with Peer.connect(server.ttrpc_path) as peer:
        peer.request(1, *HELLO, POOLED_HELLO)
        peer.answer(1)
        peer.send_raw(encode_release(ids))
        assert peer.frames_until_closed() == []
    assert 'RELEASE frame of 8193 ids (at most 8192 in one)' in server.log()
    assert served(server, echo)


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_metadata_entries_count_32_bytes_each_beyond_their_keys_and_values_on_both_lanes(
        echo: Any, server: ServerProcess, lane: str) -> None:
    # As gRPC counts them (HPACK's entry size): empty values are not free.
    # 600 entries of one byte: 600 bytes of keys, 19,800 counted (limit 8,192;
    # gRPC refuses some calls past it and all past twice that).
    many = [(chr(97 + index % 26), '') for index in range(600)]
    with SyncIPCHandler(server.socket_path, echo.Stub, lane=lane, timeout=LONG) as ipc:
        with pytest.raises(IPCRemoteError) as error:
            ipc.call_method('Echo', echo.pb.EchoRequest(text='x'), metadata=many)
        assert error.value.code.name == 'RESOURCE_EXHAUSTED'
        if lane == 'ttrpc':
            assert ('request metadata of 600 entries, 19200 bytes or more (keys, values and 32 bytes an '
                    'entry) exceeds the limit of 8192 (max_metadata_bytes)') in str(error.value)
        fewer = many[:240]  # 7,920 counted
        assert ipc.call_method('Echo', echo.pb.EchoRequest(text='fine'), metadata=fewer).text == 'fine'


def test_metadata_of_millions_of_empty_entries_is_refused_before_protobuf_makes_an_object_of_each(
        start_server: StartServer, socket_dir: Path, echo: Any) -> None:
    # 8 M entries of two bytes fill a 16 MiB frame; protobuf's runtime makes
    # an object of each (~400 MiB) before they can be counted. Counted 32
    # bytes each at the least, more than 264 of them exceed 8 KiB anyway.
    server = start_server(socket_dir / 'entries.sock')

    def peak_mib() -> int:
        status = Path(f'/proc/{server.pid}/status').read_text()
        return int(next(line for line in status.splitlines() if line.startswith('VmHWM:')).split()[1]) >> 10
    envelope = ttrpc_pb2.Request(service=ECHO_SERVICE, method='Echo').SerializeToString() + b'\x2a\x00' * 8_000_000
    with Peer.connect(server.ttrpc_path) as peer:
        assert answers(peer, 1, echo)
        before = peak_mib()
        peer.send_raw(frame_bytes(3, REQUEST, 0, envelope))
        refused = peer.answer(3)
        assert refused.code == 8  # RESOURCE_EXHAUSTED
        assert ('request envelope of more than 264 fields: metadata of that many entries exceeds the '
                'limit of 8192 (max_metadata_bytes)') in refused.message
        assert answers(peer, 5, echo)
    assert peak_mib() - before < 128  # the frame and its copy (old code: +415 MiB)


def test_a_request_whose_manifest_cannot_be_read_closes_that_connection(echo: Any, server: ServerProcess) -> None:
    # How many of the descriptors that came are the frame's is unknown: kept
    # queued, they would be taken by the connection's next request.
    fd = memfd(size_class(1), SEAL_SHRINK | SEAL_GROW | SEAL_WRITE)
    try:
        with Peer.connect(server.ttrpc_path) as peer:
            peer.request(1, *HELLO, ttrpc_pb2.Hello(shared_memory=True).SerializeToString())
            peer.answer(1)
            envelope = ttrpc_pb2.Request(service=ECHO_SERVICE, method='Echo', payload=b'\xff\xff').SerializeToString()
            peer.send_raw(frame_bytes(3, REQUEST, SHARED, envelope), [fd])
            refused = peer.frames_until_closed()
            assert [frame.stream_id for frame in refused] == [3]
            assert b'malformed shared-memory manifest' in refused[0].data
    finally:
        os.close(fd)
    assert 'malformed shared-memory manifest' in server.log()
    assert served(server, echo)


def test_shared_buffers_held_by_calls_are_bounded_per_connection_and_come_back_as_calls_end(
        start_server: StartServer, socket_dir: Path, echo: Any) -> None:
    # Each buffer holds a descriptor and a mapping until its call ends: 8 for
    # the server, a quarter of them (2) for one connection.
    server = start_server(socket_dir / 'held.sock', '--limits', json.dumps({'max_held_buffers': 8}))
    size = size_class(1)
    fd = memfd(size, SEAL_SHRINK | SEAL_GROW | SEAL_WRITE)

    def hold(peer: Peer, stream_id: int, buffers: int) -> None:
        # WatchService/Hold waits until cancelled; its request brings the buffers.
        manifest = ttrpc_pb2.SharedMemoryManifest(payload=echo.pb.WatchRequest(tag='held').SerializeToString())
        for handle in range(1, buffers + 1):
            manifest.buffers.add(handle=handle, size=size)
        envelope = ttrpc_pb2.Request(service='vyra.ipc.test.WatchService', method='Hold',
                                     payload=manifest.SerializeToString(),
                                     timeout_nano=int(LONG * 1e9)).SerializeToString()
        peer.send_raw(frame_bytes(stream_id, REQUEST, SHARED, envelope), [fd] * buffers)

    try:
        with Peer.connect(server.ttrpc_path) as peer:
            peer.request(1, *HELLO, ttrpc_pb2.Hello(shared_memory=True, cancel=True).SerializeToString())
            peer.answer(1)
            hold(peer, 3, 2)
            hold(peer, 5, 1)
            refused = peer.answer(5)
            assert refused.code == 8  # RESOURCE_EXHAUSTED
            assert ('the server holds 2 shared buffers of requests, 2 of them for this connection: 1 more '
                    'would pass its limit (8, a quarter for one connection: max_held_buffers)') in refused.message
            assert answers(peer, 7, echo)
            peer.send(3, CANCEL, 0)  # the call ends: its buffers are no longer held
            hold(peer, 9, 2)  # taken: the next one is refused again
            hold(peer, 11, 1)
            assert peer.answer(11).code == 8
    finally:
        os.close(fd)


@contextlib.contextmanager
def one_busy_worker(server: ServerProcess, echo: Any, name: str, deadline: float, sleep: float
                    ) -> Iterator[tuple[Peer, Callable[[int], None]]]:
    """A peer (shared memory agreed) of ``server`` (one handler thread),
    whose stream 3 keeps that thread asleep for ``sleep`` seconds, and a
    function sending on a stream an ``EchoSync`` call with ``deadline``
    whose request (text ``name``) is in a sealed memfd called ``name``: such
    calls wait in the thread's queue."""
    body = echo.pb.EchoRequest(text=name, payload=bytes(2 * THRESHOLD)).SerializeToString()
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, body)
    fcntl.fcntl(fd, F_ADD_SEALS, SEAL_SHRINK | SEAL_GROW | SEAL_WRITE)
    manifest = ttrpc_pb2.SharedMemoryManifest(payload_size=len(body)).SerializeToString()
    envelope = ttrpc_pb2.Request(service=ECHO_SERVICE, method='EchoSync', payload=manifest,
                                 timeout_nano=int(deadline * 1e9)).SerializeToString()
    try:
        with Peer.connect(server.ttrpc_path) as peer:
            peer.request(1, *HELLO, ttrpc_pb2.Hello(shared_memory=True).SerializeToString())
            peer.answer(1)
            asleep = echo.pb.InspectRequest(sleep_seconds=sleep).SerializeToString()
            peer.request(3, ECHO_SERVICE, 'InspectSync', asleep, timeout_nano=int(LONG * 1e9))
            yield peer, lambda stream_id: peer.send_raw(frame_bytes(stream_id, REQUEST, SHARED, envelope), [fd])
    finally:
        os.close(fd)


def test_def_calls_waiting_for_a_worker_with_requests_in_shared_memory_count_as_held_buffers(
        start_server: StartServer, socket_dir: Path, echo: Any) -> None:
    # Such a request waits in the handler threads' queue with its mapping
    # (before Python 3.13 a descriptor too): a peer sending one memfd again
    # and again while the threads were busy made the server hold one of
    # each per call of every connection, far past max_held_buffers.
    server = start_server(socket_dir / 'q.sock', '--max-workers', '1',
                          '--limits', json.dumps({'max_held_buffers': 8}))
    with one_busy_worker(server, echo, 'queued', LONG, sleep=3) as (peer, call):
        for stream_id in (5, 7, 9):
            call(stream_id)
        refused = peer.answer(9)  # before the sleeping handler returns
        assert refused.code == 8  # RESOURCE_EXHAUSTED
        assert 'for this connection: 1 more would pass its limit (8, a quarter' in refused.message
        for stream_id in (3, 5, 7):  # the others are served once the thread is free
            assert peer.answer(stream_id).code == 0
        call(11)  # held no more
        assert echo.pb.EchoReply.FromString(peer.answer(11).payload).text == 'queued'


def test_def_calls_that_end_before_a_worker_takes_them_let_go_of_their_requests_shared_memory(
        start_server: StartServer, socket_dir: Path, echo: Any) -> None:
    # Ended (its deadline, its client's CANCEL) while it waited for a handler
    # thread, a call's request stayed mapped in that thread's queue until a
    # thread was free, no longer counted as held: calls with short deadlines
    # made the server hold a mapping (and a descriptor) each, without bound.
    server = start_server(socket_dir / 'e.sock', '--max-workers', '1',
                          '--limits', json.dumps({'max_held_buffers': 8}))
    # The one handler thread sleeps far past the calls' deadlines.
    with one_busy_worker(server, echo, 'late-request', 0.1, sleep=5) as (peer, call):
        for stream_id in (5, 7, 9, 11):
            call(stream_id)
            assert peer.answer(stream_id).code == 4  # DEADLINE_EXCEEDED, while the thread sleeps
        assert mapped_kib(server.pid, 'late-request') == []
        assert peer.answer(3).code == 0


def test_descriptors_no_frame_claims_close_their_connection_after_the_frame_timeout(
        start_server: StartServer, socket_dir: Path, echo: Any) -> None:
    # They came with a frame that does not claim them; the peer goes on
    # calling, but no frame takes a descriptor: after frame_timeout the
    # connection is closed, not held with its descriptors for its life.
    server = start_server(socket_dir / 'fds.sock', '--limits', json.dumps({'frame_timeout': 0.5}))
    fd = memfd(size_class(1), SEAL_SHRINK | SEAL_GROW | SEAL_WRITE)
    request = echo.pb.EchoRequest(text='on').SerializeToString()
    calls = 0
    try:
        with Peer.connect(server.ttrpc_path, timeout=LONG) as peer:
            peer.request(1, *HELLO, ttrpc_pb2.Hello(shared_memory=True).SerializeToString())
            peer.answer(1)
            peer.send_raw(frame_bytes(3, REQUEST, 0, ttrpc_pb2.Request(
                service=ECHO_SERVICE, method='Echo', payload=request).SerializeToString()), [fd, fd])
            assert echo.pb.EchoReply.FromString(peer.answer(3).payload).text == 'on'
            with pytest.raises(ConnectionError):
                while calls < 1_000_000:  # (about 20 s of calls; the timeout is 0.5 s)
                    calls += 1
                    peer.request(3 + 2 * calls, ECHO_SERVICE, 'Echo', request)
                    peer.answer(3 + 2 * calls)
    finally:
        os.close(fd)
    assert calls > 1  # calls went on, and did not keep the connection
    assert '2 file descriptors not claimed by any frame for 0.5 s (frame_timeout)' in server.log()
    assert served(server, echo)


def test_a_client_that_does_not_read_gets_answers_inline_once_new_memfds_worth_the_queue_limit_wait_for_it(
        start_server: StartServer, socket_dir: Path, echo: Any) -> None:
    # Without pooled segments each large message is a new memfd in a frame
    # of a few bytes: the socket's flow control would let thousands wait
    # unread. Past queue_limit of them (here about 4 MiB: two messages of at
    # most 2 MiB) until the client has read, messages go inline, where flow
    # control holds the stream.
    server = start_server(socket_dir / 'unread.sock', '--max-message-bytes', str(2 * MiB),
                          '--shared-memory-threshold', str(THRESHOLD),
                          '--limits', json.dumps({'max_queued_bytes': MiB}))

    def lane() -> Any:
        with SyncIPCHandler(server.socket_path, IntrospectionStub, lane='grpc') as handler:
            stats = handler.call_method('GetStats', StatsRequest())
        return next(lane for lane in stats.lanes if lane.lane == 'ttrpc')

    with Peer.connect(server.ttrpc_path, timeout=LONG) as peer:
        peer.request(1, *HELLO, ttrpc_pb2.Hello(shared_memory=True).SerializeToString())  # no pool
        peer.answer(1)
        watch = echo.pb.WatchRequest(tag='unread', size=MiB, count=40).SerializeToString()
        peer.request(3, 'vyra.ipc.test.WatchService', 'Watch', watch, timeout_nano=int(LONG * 1e9))
        wait_for(lambda: lane().inline_bytes_sent >= MiB, LONG, 'a message to go inline')
        shared = lane().shared_memory_bytes_sent
        assert 2 * MiB <= shared <= 5 * MiB  # (the old server sent all 40 in new memfds)


def test_streamed_requests_in_shared_memory_waiting_for_their_handler_count_in_the_connections_share(
        start_server: StartServer, socket_dir: Path, echo: Any) -> None:
    # However small, each waits with a mapping (and before Python 3.13 a
    # descriptor): the window's bytes do not bound them. Absorb takes one
    # message and waits; the connection's quarter of 8 is 2.
    server = start_server(socket_dir / 'streamed.sock', '--shared-memory-threshold', str(THRESHOLD),
                          '--limits', json.dumps({'max_held_buffers': 8}))
    message = echo.pb.WatchRequest(tag='streamed', count=1).SerializeToString()
    manifest = ttrpc_pb2.SharedMemoryManifest(payload_size=len(message)).SerializeToString()
    fds = []
    try:
        with Peer.connect(server.ttrpc_path) as peer:
            peer.request(1, *HELLO, ttrpc_pb2.Hello(shared_memory=True, stream_window=1 << 20).SerializeToString())
            peer.answer(1)
            peer.request(3, 'vyra.ipc.test.WatchService', 'Absorb', message, flags=REMOTE_OPEN,
                         timeout_nano=int(LONG * 1e9))
            for _ in range(3):  # the handler reads none of them: it waits
                fd = os.memfd_create('streamed', os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                fds.append(fd)
                os.write(fd, message)
                fcntl.fcntl(fd, F_ADD_SEALS, SEAL_SHRINK | SEAL_GROW | SEAL_WRITE)
                peer.send_raw(frame_bytes(3, DATA, SHARED, manifest), [fd])
            answer = peer.answer(3)
            assert answer.code == 8  # RESOURCE_EXHAUSTED
            assert ("this connection's calls hold 0 shared buffers and 2 streamed requests in shared memory "
                    'not read yet: no more (a quarter of max_held_buffers)') in answer.message
            assert answers(peer, 5, echo)
    finally:
        for fd in fds:
            os.close(fd)
