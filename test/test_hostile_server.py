"""The fast-lane clients against a hostile or broken server: a raw peer on a
real socket that answers what no correct server would. The client must raise
a clear :class:`~vyra_base_ipc.IPCError`, hold no more than its bounds, and
stay usable where the connection is still in step."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import os
from pathlib import Path
import threading
from typing import Any, Callable, Iterable, Iterator

import grpc
import pytest

from conftest import CLIENT_KINDS, fast_lane_connection
from ttrpc_peer import (
    DATA,
    NO_DATA,
    REMOTE_CLOSED,
    REQUEST,
    RESPONSE,
    SHARED,
    Peer,
    PeerServer,
    frame_bytes,
    response_envelope,
)
from vyra_base_ipc import SharedMemoryOptions, ttrpc_pb2
from vyra_base_ipc._methods import Method, MethodKind
from vyra_base_ipc.exceptions import IPCRemoteError, IPCUnavailableError
from vyra_base_ipc.ttrpc import AsyncConnection, _received
from vyra_base_ipc.ttrpc._errors import NothingSent

Script = Callable[[Peer], None]

F_ADD_SEALS, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 1033, 0x0002, 0x0004, 0x0008

#: Raw methods (bytes in, bytes out): what the server answers is the test's whole point.
UNARY = Method(name='Echo', path='/hostile.Test/Echo', kind=MethodKind.UNARY_UNARY,
               request_serializer=None, response_deserializer=None)
STREAM = Method(name='Count', path='/hostile.Test/Count', kind=MethodKind.UNARY_STREAM,
                request_serializer=None, response_deserializer=None)

# A window of 4 KiB and messages of at most 4 KiB: the bounds are small enough to flood quickly.
SMALL: dict[str, Any] = {'shared_memory': None, 'stream_window': 4096, 'max_message_bytes': 4096, 'busy_poll': 0}


@pytest.fixture
def hostile(socket_dir: Path) -> Iterator[Callable[[Script], Path]]:
    """``hostile(script)``: a 'server' running ``script`` on each connection it accepts."""
    servers: list[PeerServer] = []

    def start(script: Script) -> Path:
        servers.append(PeerServer(socket_dir / f'hostile{len(servers)}.sock', script))
        return servers[-1].path
    yield start
    for server in servers:
        server.close()


def decline_flow_control(peer: Peer, how: str) -> None:
    """Answer the client's Hello without flow control: as a plain ttrpc
    server does (unknown method), or as one of this package's that grants no window."""
    assert peer.read_frame().stream_id == 1
    if how == 'plain ttrpc':
        peer.respond(1, code=grpc.StatusCode.UNIMPLEMENTED.value[0], message='Method not found!')
    else:
        peer.respond(1, ttrpc_pb2.Hello(cancel=True, stream_window=0).SerializeToString())


def until_closed(peer: Peer) -> None:
    """Read (and drop) what the client sends until it closes the connection."""
    try:
        while True:
            peer.read_frame()
    except ConnectionError:
        pass


def flood_a_waiting_stream(peer: Peer, flood: Callable[[Peer, int], None], answer: bytes) -> None:
    """After the Hello: send the client's stream its first message, then, once
    the client's unary call came, ``flood(peer, stream_id)`` the stream and
    answer the call ``answer``: a client that has the answer has read the flood."""
    stream_id = peer.read_frame().stream_id
    peer.send(stream_id, DATA, 0, b'first')
    unary = peer.read_frame()
    flood(peer, stream_id)
    peer.respond(unary.stream_id, answer)
    until_closed(peer)


def read_one_then_call(connection: Any, answer: bytes, timeout: float,
                       measure: Callable[[], int] = lambda: 0) -> tuple[Iterator[Any], int]:
    """The client's side of :func:`flood_a_waiting_stream`: open the stream,
    take its first message, make the unary call (answered ``answer``); the
    stream, and how much ``measure()`` grew while the call waited."""
    stream = connection.stream(STREAM, b'', timeout=timeout)
    assert next(stream) == b'first'
    before = measure()
    assert connection.call(UNARY, b'', timeout=timeout) == answer
    return stream, measure() - before


def answer_every_call(peer: Peer) -> None:
    """Answer every call ``b'fine'`` until the client closes the connection."""
    try:
        while True:
            frame = peer.read_frame()
            if frame.type == REQUEST:
                peer.respond(frame.stream_id, b'fine')
    except ConnectionError:
        pass


# == flow control =================================================================================

@pytest.mark.parametrize('how', ['plain ttrpc', 'no window granted'])
@pytest.mark.parametrize('client', CLIENT_KINDS)
def test_a_server_without_flow_control_cannot_make_a_stream_nobody_reads_hold_more_than_its_bound(
        client: str, how: str, hostile: Callable[[Script], Path]) -> None:
    # 2,000 messages of 1,000 bytes (2 MB) to a stream whose caller took one
    # and waits, then the answer of a unary call on the same connection: once
    # the caller has that answer, the client has read the whole flood. It
    # held it all (the asyncio client 390 MB of a 384 MB flood, measured);
    # a stream without flow control now holds 64 windows and one message at
    # most, then fails RESOURCE_EXHAUSTED (and drops the rest).
    flooded = threading.Event()

    def flood(peer: Peer, stream_id: int) -> None:
        peer.send_raw(frame_bytes(stream_id, DATA, 0, bytes(1000)) * 2000)
        peer.send(stream_id, RESPONSE, 0, ttrpc_pb2.Response(status=ttrpc_pb2.Status()).SerializeToString())
        flooded.set()

    def script(peer: Peer) -> None:
        decline_flow_control(peer, how)
        flood_a_waiting_stream(peer, flood, b'after the flood')

    path = hostile(script)
    received = 0
    limit = 64 * 4096 + 4096 + 64
    with pytest.raises(IPCRemoteError) as raised:
        with fast_lane_connection(client, path, **SMALL) as connection:
            stream, _ = read_one_then_call(connection, b'after the flood', timeout=20)
            for _ in stream:
                received += 1
    assert flooded.is_set()
    assert raised.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f'more than a stream without flow control may hold ({limit})' in raised.value.details
    assert 0 < received <= limit // 1064


# == frames out of step ===========================================================================

GARBAGE: dict[str, bytes] = {
    # An HTTP server on the socket: its first bytes read as a header of 1.2 GB
    # on stream 0x2f312e31, and the client skipped every byte after them.
    'another protocol': b'HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n',
    'an answer on a stream never opened': frame_bytes(1001, RESPONSE, 0, response_envelope(b'stray')),
    'an answer on an even stream': frame_bytes(4, RESPONSE, 0, response_envelope(b'stray')),
    'an oversized frame on a stream never opened': frame_bytes(7777, DATA, 0, length=1 << 30),
}


@pytest.mark.parametrize('garbage', list(GARBAGE))
@pytest.mark.parametrize('client', CLIENT_KINDS)
def test_a_server_out_of_step_loses_its_connection_at_once_and_a_new_one_works(
        client: str, garbage: str, hostile: Callable[[Script], Path]) -> None:
    # Every later answer of the connection was skipped or ignored: each call
    # waited for its deadline, and the connection still counted as open, so
    # the handlers never made a new one.
    connections = 0

    def script(peer: Peer) -> None:
        nonlocal connections
        connections += 1
        decline_flow_control(peer, 'plain ttrpc')
        if connections == 1:
            peer.read_frame()
            peer.send_raw(GARBAGE[garbage])
        answer_every_call(peer)

    path = hostile(script)
    with fast_lane_connection(client, path, **SMALL) as connection:
        with pytest.raises(IPCUnavailableError) as raised:
            connection.call(UNARY, b'', timeout=5)
        assert connection.is_closed
    with fast_lane_connection(client, path, **SMALL) as connection:
        assert connection.call(UNARY, b'', timeout=5) == b'fine'
    assert 'lost: the server is out of step: a frame' in raised.value.details
    assert 'on a stream this client never opened' in raised.value.details


@pytest.mark.parametrize('client', CLIENT_KINDS)
def test_frames_of_types_a_client_does_not_know_are_ignored_as_the_protocol_says(
        client: str, hostile: Callable[[Script], Path]) -> None:
    # A later extension's frames (or a CANCEL, which only clients send) on a call's stream
    # failed the call INTERNAL ("protocol error: got a frame of type 85"); servers ignore them.
    def script(peer: Peer) -> None:
        decline_flow_control(peer, 'plain ttrpc')
        for _ in range(2):
            frame = peer.read_frame()
            for kind in (0x55, 0x10, 0xff):
                peer.send(frame.stream_id, kind, 0, b'not for you')
            if frame.type == REQUEST and frame.flags & REMOTE_CLOSED:  # the stream
                peer.send(frame.stream_id, DATA, 0, b'one')
                peer.send(frame.stream_id, 0x55, 0, b'not for you')
                peer.send(frame.stream_id, DATA, REMOTE_CLOSED, b'two')
            else:
                peer.respond(frame.stream_id, b'fine')
        until_closed(peer)

    path = hostile(script)
    with fast_lane_connection(client, path, **SMALL) as connection:
        assert connection.call(UNARY, b'', timeout=5) == b'fine'
        assert list(connection.stream(STREAM, b'', timeout=5)) == [b'one', b'two']


# == descriptors ==================================================================================

FD_ABUSE: dict[str, tuple[bool, int, str]] = {
    # (shared memory offered, descriptors passed in one sendmsg, what the error says)
    'more than a read takes': (True, 40, 'file descriptors the peer passed were cut off (MSG_CTRUNC)'),
    'without shared memory offered': (False, 1, 'file descriptors from a peer that did not agree on shared memory'),
}


@pytest.mark.parametrize('abuse', list(FD_ABUSE))
@pytest.mark.parametrize('client', CLIENT_KINDS)
def test_descriptors_a_server_may_not_pass_lose_the_connection_naming_why(
        client: str, abuse: str, hostile: Callable[[Script], Path]) -> None:
    # The blocking client said "the server passed file descriptors that no frame claims"
    # whatever was wrong.
    offered, count, words = FD_ABUSE[abuse]

    def script(peer: Peer) -> None:
        assert peer.read_frame().stream_id == 1
        peer.respond(1, ttrpc_pb2.Hello(shared_memory=offered, cancel=True).SerializeToString())
        peer.read_frame()
        fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]
        try:
            peer.send(0, 0x55, 0, b'', fds=fds)
        finally:
            for fd in fds:
                os.close(fd)
        until_closed(peer)

    path = hostile(script)
    options = {**SMALL, 'shared_memory': SharedMemoryOptions() if offered else None}
    with pytest.raises(IPCUnavailableError) as raised:
        with fast_lane_connection(client, path, **options) as connection:
            connection.call(UNARY, b'', timeout=5)
    assert words in raised.value.details


def sealed_memfd(data: bytes = b'', hole: int = 0) -> int:
    """A memfd holding ``data``, or ``hole`` bytes all a hole (a message that costs its sender
    nothing), sealed against shrinking, growing and writing (as a sender seals it)."""
    fd = os.memfd_create('hostile', os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    if hole:
        os.ftruncate(fd, hole)
    else:
        os.write(fd, data)
    fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE)
    return fd


def send_in_shared_memory(peer: Peer, stream_id: int, size: int, contents: Iterable[bytes | None],
                          end: bool = True) -> None:
    """Send each of ``contents`` on ``stream_id`` as a message of ``size`` bytes in a sealed
    memfd of its own (``None``: all a hole), then (``end``) end the stream."""
    manifest = ttrpc_pb2.SharedMemoryManifest(payload_size=size).SerializeToString()
    for data in contents:
        fd = sealed_memfd(hole=size) if data is None else sealed_memfd(data)
        try:
            peer.send(stream_id, DATA, SHARED, manifest, fds=[fd])
        finally:
            os.close(fd)
    if end:
        peer.send(stream_id, DATA, REMOTE_CLOSED | NO_DATA)


def agree_shared_memory(peer: Peer) -> None:
    """Answer the client's Hello: shared memory, and a window of 1 MiB."""
    assert peer.read_frame().stream_id == 1
    peer.respond(1, ttrpc_pb2.Hello(shared_memory=True, cancel=True, stream_window=1 << 20).SerializeToString())


def open_fds() -> int:
    return len(os.listdir('/proc/self/fd'))


@pytest.mark.parametrize('client', CLIENT_KINDS)
def test_shared_buffers_on_streamed_messages_are_refused_without_holding_their_descriptors(
        client: str, hostile: Callable[[Script], Path]) -> None:
    # No peer sends a streamed message with buffers (attach_buffers copies them inline there),
    # but the clients took them: 20 messages of 31 one-byte buffers to a stream whose caller
    # did not read made the client hold 620 descriptors and mappings (a flood of them, its
    # whole RLIMIT_NOFILE: 18,610 of 20,000 for 300 messages, measured).
    manifest = ttrpc_pb2.SharedMemoryManifest()
    for handle in range(1, 32):
        manifest.buffers.add(handle=handle, size=1)

    def flood(peer: Peer, stream_id: int) -> None:
        for _ in range(20):
            fds = [sealed_memfd(b'x') for _ in range(31)]
            try:
                peer.send(stream_id, DATA, SHARED, manifest.SerializeToString(), fds=fds)
            finally:
                for fd in fds:
                    os.close(fd)

    def script(peer: Peer) -> None:
        agree_shared_memory(peer)
        flood_a_waiting_stream(peer, flood, b'after them')

    path = hostile(script)
    options = {**SMALL, 'shared_memory': SharedMemoryOptions()}
    with pytest.raises(IPCRemoteError) as raised:
        with fast_lane_connection(client, path, **options) as connection:
            stream, held = read_one_then_call(connection, b'after them', timeout=10, measure=open_fds)
            assert held < 31, f'{held} descriptors held for messages not read'
            list(stream)
    assert raised.value.code is grpc.StatusCode.INTERNAL
    assert '31 shared buffers with a streamed message' in raised.value.details


def mappings() -> int:
    with open('/proc/self/maps') as maps:
        return sum(1 for _ in maps)


@pytest.mark.parametrize('client', CLIENT_KINDS)
def test_small_streamed_messages_in_shared_memory_are_copied_out_not_kept_mapped(
        client: str, hostile: Callable[[Script], Path]) -> None:
    # A window counts a message at its size (and 64 bytes), not at the page and the mapping a
    # message in shared memory costs: 2,000 one-byte messages each in a memfd of its own, well
    # within a 1 MiB window, made the client hold 2,000 mappings (one stream of them 20,000, a
    # third of vm.max_map_count, past which nothing in the process can map memory).
    count = 2000

    def flood(peer: Peer, stream_id: int) -> None:
        send_in_shared_memory(peer, stream_id, 1, (bytes([index % 256]) for index in range(count)))

    def script(peer: Peer) -> None:
        agree_shared_memory(peer)
        flood_a_waiting_stream(peer, flood, b'after them')

    path = hostile(script)
    options = {**SMALL, 'shared_memory': SharedMemoryOptions(), 'stream_window': 1 << 20}
    expected = [bytes([index % 256]) for index in range(count)]
    with fast_lane_connection(client, path, **options) as connection:
        stream, held = read_one_then_call(connection, b'after them', timeout=10, measure=mappings)
        assert held < 100, f'{held} mappings held for messages not read'
        assert [bytes(message) for message in stream] == expected


def next_request(peer: Peer) -> Any:
    """The next request frame (the client's CANCEL, WINDOW_UPDATE and RELEASE frames before it skipped)."""
    while True:
        frame = peer.read_frame()
        if frame.type == REQUEST:
            return frame


@pytest.fixture
def held_before() -> int:
    """The mappings this process counts for unread stream messages as the test starts, once
    what earlier tests of the process left to the garbage collector is collected (which the
    collector would otherwise do during the test, moving the count under it)."""
    gc.collect()
    return _received.held_in_process.count


#: The bound on mappings a connection's unread messages hold, lowered for the tests (2,048 by default).
HELD_BOUND = 50
#: The bound on those of the whole process, lowered likewise (16,384 by default): two connections,
#: each within its own bound, pass it together.
PROCESS_HELD_BOUND = 60


@pytest.mark.parametrize('size', [100 * 1024, 2 << 20], ids=['100 KiB', '2 MiB'])
@pytest.mark.parametrize('scope', ['connection', 'process'])
@pytest.mark.parametrize('client', CLIENT_KINDS)
def test_unread_streams_hold_no_more_mappings_than_the_bound_of_their_connection_and_process(
        client: str, scope: str, size: int, hostile: Callable[[Script], Path],
        monkeypatch: pytest.MonkeyPatch, held_before: int) -> None:
    # A stream holds at most its window of messages over 64 KiB, each a mapping (272 by default),
    # but a server could fill ~240 streams of one connection that nobody reads and take the
    # process to vm.max_map_count (65,530), past which nothing in it can map memory; so could
    # some 32 connections (to many servers, or many to one) each within its bound. Past the
    # connection's bound, or the process's, a message under 1 MiB is copied out (its mapping let
    # go); a larger one fails its stream RESOURCE_EXHAUSTED, and the connection's other calls go
    # on. The streams read or left, the process's count is back where it was.
    monkeypatch.setattr(_received, 'MAX_HELD_MAPPINGS', HELD_BOUND)
    bound = HELD_BOUND
    if scope == 'process':
        monkeypatch.setattr(_received, 'MAX_PROCESS_HELD_MAPPINGS', held_before + PROCESS_HELD_BOUND)
        bound = PROCESS_HELD_BOUND
    limit = held_before + bound if scope == 'process' else bound
    copied = size < 1 << 20
    # Messages to the first stream (within the bounds), to the second (past one of them: on the
    # first one's connection past its bound, or on another connection within its own).
    within, past = 45, 100 if scope == 'connection' else 45

    def message(index: int) -> bytes:
        return bytes([index % 256]) * size

    def send_messages(peer: Peer, stream_id: int, count: int) -> None:
        send_in_shared_memory(peer, stream_id, size, (message(index) if copied else None for index in range(count)))

    def serve(counts: list[int], third: bool) -> Script:
        """A connection's script: a stream for each of ``counts``, then a unary call; the
        streams their counts of messages, the call its answer; then (``third``) once more."""
        def script(peer: Peer) -> None:
            assert peer.read_frame().stream_id == 1
            peer.respond(1, ttrpc_pb2.Hello(shared_memory=True, cancel=True,
                                            stream_window=1 << 30).SerializeToString())
            streams = []
            for _ in counts:
                streams.append(next_request(peer).stream_id)
                peer.send(streams[-1], DATA, 0, b'first')
            unary = next_request(peer)
            for stream_id, count in zip(streams, counts, strict=True):
                send_messages(peer, stream_id, count)
            peer.respond(unary.stream_id, b'after them')
            if third:  # once the first two were read (or left)
                stream_id = next_request(peer).stream_id
                peer.send(stream_id, DATA, 0, b'first')
                unary = next_request(peer)
                send_messages(peer, stream_id, within)  # all before the client reads them: counted unread
                peer.respond(unary.stream_id, b'after them')
            until_closed(peer)
        return script

    paths = ([hostile(serve([within, past], True))] if scope == 'connection'
             else [hostile(serve([within], True)), hostile(serve([past], False))])
    options = {**SMALL, 'shared_memory': SharedMemoryOptions(), 'stream_window': 1 << 30,
               'max_message_bytes': 4 << 20}

    def check(messages: list[bytes], count: int = within) -> None:  # (one of 2 MiB is a hole: only sized)
        assert [len(each) for each in messages] == [size] * count
        if copied:
            assert [bytes(each) for each in messages] == [message(index) for index in range(count)]

    def check_second(messages: list[bytes], error: IPCRemoteError | None) -> None:
        if copied:  # copied out past the bound: all of them
            assert error is None
            assert [bytes(each) for each in messages] == [message(index) for index in range(past)]
        else:  # those within the bound, then the stream fails
            assert len(messages) == bound - within
            assert error is not None and error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f'past its limit of {limit} mappings' in error.details

    with contextlib.ExitStack() as connections:
        connected = [connections.enter_context(fast_lane_connection(client, path, **options)) for path in paths]
        one, two = connected[0], connected[-1]
        first = one.stream(STREAM, b'', timeout=20)
        assert next(first) == b'first'
        second = two.stream(STREAM, b'', timeout=20)
        assert next(second) == b'first'
        before = mappings()
        assert one.call(UNARY, b'', timeout=20) == b'after them'
        if two is not one:
            assert two.call(UNARY, b'', timeout=20) == b'after them'
        held = mappings() - before
        assert held <= bound + 20, f'{held} mappings held for messages not read'
        check([next(first) for _ in range(5)], 5)
        first.close()  # the 40 messages it did not read let go
        received: list[bytes] = []
        try:
            received.extend(second)
            failure = None
        except IPCRemoteError as error:
            failure = error
        check_second(received, failure)
        del received
        assert _received.held_in_process.count == held_before, 'mappings counted for streams read or left'
        third = one.stream(STREAM, b'', timeout=20)
        assert next(third) == b'first'
        assert one.call(UNARY, b'', timeout=20) == b'after them'
        check(list(third))  # those read or left no longer count
        assert _received.held_in_process.count == held_before, 'mappings counted for streams read or left'


#: Messages of 100 KiB (over STREAMED_COPY_BELOW: kept mapped, counted) flooding a stream nobody reads.
KEPT_SIZE, KEPT_COUNT = 100 * 1024, 10


def flood_kept(peer: Peer, stream_id: int, end: bool = True) -> None:
    send_in_shared_memory(peer, stream_id, KEPT_SIZE, (b'K' * KEPT_SIZE for _ in range(KEPT_COUNT)), end)


@pytest.mark.parametrize('client', CLIENT_KINDS)
def test_a_lost_connections_stream_gives_what_it_had_received_then_the_error(
        client: str, hostile: Callable[[Script], Path], held_before: int) -> None:
    # A connection lost gives its streams an error after the messages they had received. The
    # asyncio client's stream failed UNAVAILABLE before them, once half its window was taken
    # after the loss (the fifth here): it sent the WINDOW_UPDATE due, and a send on a connection
    # gone raises. The blocking client sends none then, as neither sends a CANCEL. Those
    # messages stay mapped, and counted in the process, until the caller takes them.
    held_in_process = _received.held_in_process

    def script(peer: Peer) -> None:
        agree_shared_memory(peer)
        stream_id = peer.read_frame().stream_id
        peer.send(stream_id, DATA, 0, b'first')
        unary = next_request(peer)
        flood_kept(peer, stream_id, end=False)
        peer.respond(unary.stream_id, b'after them')
        # (gone, the stream not ended: PeerServer closes the connection)

    path = hostile(script)
    options = {**SMALL, 'shared_memory': SharedMemoryOptions(), 'stream_window': 1 << 20, 'max_message_bytes': 1 << 20}
    with fast_lane_connection(client, path, **options) as connection:
        stream, _ = read_one_then_call(connection, b'after them', timeout=10)
        assert held_in_process.count - held_before == KEPT_COUNT
        received = [bytes(next(stream)) for _ in range(KEPT_COUNT)]
        assert received == [b'K' * KEPT_SIZE] * KEPT_COUNT
        held = held_in_process.count - held_before
        assert held == 0, f'{held} mappings counted, none held'
        with pytest.raises(IPCUnavailableError):
            next(stream)


def test_an_asyncio_connection_collected_with_a_stream_nobody_left_gives_back_its_count(
        hostile: Callable[[Script], Path], held_before: int) -> None:
    # A stream's finally lets go of what it holds. One whose loop was closed without closing
    # its async generators (loop.close() without shutdown_asyncgens(), as code running a loop
    # per task may) never runs it: its messages go with it, but the process's count kept
    # them for good, each such stream nearer the bound past which every message in shared
    # memory is copied or refused. The connection collected gives its count back.
    held_in_process = _received.held_in_process

    def script(peer: Peer) -> None:
        agree_shared_memory(peer)
        flood_a_waiting_stream(peer, flood_kept, b'after them')

    path = hostile(script)
    loop = asyncio.new_event_loop()
    connection = loop.run_until_complete(AsyncConnection.connect(
        path, shared_memory=SharedMemoryOptions(), stream_window=1 << 20, busy_poll=0))
    stream = connection.stream(STREAM, b'', timeout=10)

    async def first(iterator: Any) -> Any:  # (iterated in the loop first: the loop's to finalize, as usual)
        return await iterator.__anext__()
    assert loop.run_until_complete(first(stream)) == b'first'
    assert loop.run_until_complete(connection.call(UNARY, b'', timeout=10)) == b'after them'
    assert held_in_process.count - held_before == KEPT_COUNT
    loop.run_until_complete(connection.close())
    loop.close()  # the stream not closed: its finally never runs
    del stream, connection
    gc.collect()
    held = held_in_process.count - held_before
    assert held == 0, f'{held} mappings counted, none held'


def test_a_blocking_stream_left_as_another_thread_reads_its_last_message_keeps_no_count(
        hostile: Callable[[Script], Path]) -> None:
    # SyncConnection's caller leaving a stream looked, without the state lock, whether the stream
    # was still routed or held mappings. Its last message (DATA ending the stream, in shared
    # memory) is forgotten by the core and counted in one lock hold of the thread reading for
    # another call: a look between the two saw neither, and the count (1 here) stayed with the
    # connection for good; enough such leaves would make it copy or refuse every message in
    # shared memory. Driven here at that very moment: the reader counts once the caller left.
    from vyra_base_ipc.ttrpc._received import HeldMappings
    size = 100 * 1024  # (over STREAMED_COPY_BELOW: kept mapped, counted)

    def script(peer: Peer) -> None:
        agree_shared_memory(peer)
        stream_id = peer.read_frame().stream_id
        peer.send(stream_id, DATA, 0, b'first')
        unary = next_request(peer)
        manifest = ttrpc_pb2.SharedMemoryManifest(payload_size=size).SerializeToString()
        fd = sealed_memfd(b'L' * size)
        try:
            peer.send(stream_id, DATA, SHARED | REMOTE_CLOSED, manifest, fds=[fd])
        finally:
            os.close(fd)
        peer.respond(unary.stream_id, b'after it')
        until_closed(peer)

    reading, left = threading.Event(), threading.Event()

    class LeftWhileCounting(HeldMappings):
        def hold(self, stream: Any, frame: Any) -> Any:
            if frame.flags & REMOTE_CLOSED:  # (the reader holds the state lock: the caller leaves now)
                reading.set()
                left.wait(2)  # (after the fix the caller's leave waits for this lock: not left by then)
            return super().hold(stream, frame)

    path = hostile(script)
    options = {**SMALL, 'shared_memory': SharedMemoryOptions(), 'stream_window': 1 << 20, 'max_message_bytes': size}
    with fast_lane_connection('sync', path, **options) as connection:
        connection._core.held = LeftWhileCounting()
        stream = connection.stream(STREAM, b'', timeout=10)
        assert next(stream) == b'first'
        answers: list[bytes] = []
        reader = threading.Thread(target=lambda: answers.append(connection.call(UNARY, b'', timeout=10)))
        reader.start()
        assert reading.wait(10), 'the last message never came'
        stream.close()
        left.set()
        reader.join(10)
        assert answers == [b'after it']
        assert connection._core.held.count == 0, f'{connection._core.held.count} mappings counted, none held'


def test_an_asyncio_call_waiting_to_write_on_a_connection_retired_and_lost_is_to_go_again(
        hostile: Callable[[Script], Path]) -> None:
    # A call waits before it sends while the server does not read what the connection wrote
    # (drain). The connection is retired meanwhile (its server stopping; a call in flight keeps
    # it open) and then lost: nothing of the waiting call was sent, so it is to go again over a
    # new connection (NothingSent), as the blocking client's call waiting for the send lock
    # does; it failed UNAVAILABLE for good, "lost: Connection reset by peer".
    let_go = threading.Event()

    def script(peer: Peer) -> None:
        assert peer.read_frame().stream_id == 1
        peer.respond(1, ttrpc_pb2.Hello(cancel=True, stream_window=4096).SerializeToString())
        peer.respond(next_request(peer).stream_id, b'fine')
        let_go.wait(20)  # reading nothing more, then gone

    path = hostile(script)

    async def scenario() -> list[Any]:
        connection = await AsyncConnection.connect(path, shared_memory=None, max_message_bytes=32 << 20, busy_poll=0)
        try:
            assert await connection.call(UNARY, b'', timeout=10) == b'fine'
            # (more than the socket takes: the client sets its send buffer to wmem_max, 4 MiB here)
            unread = asyncio.ensure_future(connection.call(UNARY, b'x' * (16 << 20), timeout=10))
            for _ in range(1000):  # (the loop writes what the socket takes, then pauses: a few turns)
                if connection._protocol.write_paused:
                    break
                await asyncio.sleep(0.01)
            assert connection._protocol.write_paused, 'the server read 16 MiB it was not to read'
            waiting = asyncio.ensure_future(connection.call(UNARY, b'', timeout=10))
            for _ in range(1000):
                if connection._protocol._drain_waiters:  # (it waits to write now)
                    break
                await asyncio.sleep(0.01)
            assert connection._protocol._drain_waiters, 'the second call did not wait to write'
            connection.retire()  # the unread call in flight: kept open for it
            assert connection._protocol.error is None
            let_go.set()
            return await asyncio.gather(unread, waiting, return_exceptions=True)
        finally:
            await connection.close()

    unread, waiting = asyncio.run(scenario())
    assert isinstance(unread, IPCUnavailableError) and not isinstance(unread, NothingSent), repr(unread)
    assert isinstance(waiting, NothingSent), repr(waiting)
