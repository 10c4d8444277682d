"""The frame decoder and envelope conversions, and the clients against a
scripted ttrpc peer on a real socket (answers no real server would give)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
import random
import threading
import tracemalloc
from typing import Any, Callable, Iterator

import grpc
import pytest

from conftest import CLIENT_KINDS, fast_lane_connection, wait_for
from ttrpc_peer import DATA, REMOTE_CLOSED, RESPONSE, Peer, PeerServer, frame_bytes
from ttrpc_peer import Frame as WireFrame
from vyra_base_ipc import ttrpc_pb2
from vyra_base_ipc._methods import stub_methods
from vyra_base_ipc.exceptions import IPCRemoteError, IPCUnavailableError
from vyra_base_ipc.ttrpc import AsyncConnection, SyncConnection
from vyra_base_ipc.ttrpc._frames import Frame, FrameDecoder, MessageType, OversizedFrame, encode_frame
from vyra_base_ipc.ttrpc._messages import (
    decode_response,
    encode_ok_response,
    encode_request,
    encode_response,
    metadata_from_wire,
    metadata_to_wire,
    ok_payload,
    ok_response_frame,
    request_payload_size,
)

CANCEL, WINDOW_UPDATE = int(MessageType.CANCEL), int(MessageType.WINDOW_UPDATE)

# -- envelopes encoded and read by hand -------------------------------------------------------

@pytest.mark.parametrize('size', [0, 1, 0x7F, 0x80, 0x3FFF, 0x4000, 70_000])
def test_hand_encoded_envelopes_are_what_protobuf_encodes(size: int) -> None:
    payload = bytes(random.Random(size).getrandbits(8) for _ in range(size))
    metadata = [ttrpc_pb2.KeyValue(key='k', value='v'), ttrpc_pb2.KeyValue(key='b-bin', value='AQ==')]
    for timeout in (0, 1, 30_000_000_000, -1):
        for items in ((), metadata):
            assert encode_request('pkg.Service', 'Method', payload, timeout, items) == ttrpc_pb2.Request(
                service='pkg.Service', method='Method', payload=payload, timeout_nano=timeout,
                metadata=items).SerializeToString()
    assert ok_response_frame(7, 0x80, payload) == encode_frame(7, 2, 0x80, encode_ok_response(payload))
    answer = encode_ok_response(payload)
    code, message, carried, details = decode_response(answer)
    assert (code, message, carried, list(details)) == (0, '', payload, [])
    # Read by hand below 16 KiB; above, left to protobuf (None).
    assert ok_payload(answer) == (payload if size < 0x4000 else None)


def test_answers_other_than_a_plain_ok_are_left_to_protobuf() -> None:
    assert ok_payload(encode_response(5, 'not found')) is None
    assert ok_payload(encode_response(0, 'ok, with words', b'x')) is None
    assert ok_payload(encode_ok_response(b'ab') + b'\x12\x01c') is None  # a second payload field: the last wins
    assert ok_payload(encode_ok_response(b'abc')[:-1]) is None  # cut short
    assert ok_payload(b'') is None  # no status field at all: protobuf reads it


# -- decoder ------------------------------------------------------------------------------------

def test_header_layout_is_big_endian_length_id_type_flags() -> None:
    assert encode_frame(0x01020304, 3, 5, b'ab') == bytes.fromhex('00000002' '01020304' '03' '05') + b'ab'


def test_frames_are_decoded_whatever_the_chunking() -> None:
    frames = [(1, 1, 0, b'first'), (3, 3, 2, b''), (3, 2, 0, b'x' * 300), (5, 0x7f, 0xff, b'\0')]
    wire = b''.join(frame_bytes(s, t, f, d) for s, t, f, d in frames)
    rng = random.Random(5)
    for _ in range(200):
        decoder = FrameDecoder(1024)
        decoded: list[Any] = []
        position = 0
        while position < len(wire):
            step = rng.randrange(1, 40)
            decoded += decoder.feed(wire[position:position + step])
            position += step
        assert [(f.stream_id, f.type, f.flags, f.data) for f in decoded] == frames
        assert not decoder.mid_frame


def test_a_large_frame_arriving_in_pieces_is_copied_out_once() -> None:
    """The read that completes a 1 MiB frame makes one copy of it (its
    ``bytes``), not a bytearray slice first and then the bytes: each copy of
    a large frame is fresh memory whose pages fault in (see _frames)."""
    size = 1 << 20
    wire = encode_frame(1, 2, 0, bytes(range(256)) * (size // 256)) + encode_frame(3, 2, 0, b'next')
    pieces = [wire[start:start + 256 * 1024] for start in range(0, len(wire), 256 * 1024)]
    decoder = FrameDecoder(2 * size)
    tracemalloc.start()  # before the buffer exists: its growth is then counted as growth
    try:
        for piece in pieces[:-1]:
            assert decoder.feed(piece) == []
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        frames = decoder.feed(pieces[-1])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(f.stream_id, len(f.data)) for f in frames] == [(1, size), (3, 4)]
    assert frames[0].data == bytes(range(256)) * (size // 256)
    assert not decoder.mid_frame and decoder.buffered == 0
    # One copy plus the buffer's growth by the last piece (bytearray
    # over-allocates by an eighth); two copies would be over 2 MiB.
    assert peak - before < 1.5 * size


def test_oversized_frame_is_reported_at_once_and_skipped_without_buffering() -> None:
    decoder = FrameDecoder(16)
    assert decoder.feed(frame_bytes(7, 1, 0, b'y' * 10, length=100)) == [OversizedFrame(7, 1, 0, 100, 16)]
    assert decoder.buffered == 0 and decoder.mid_frame
    assert decoder.feed(b'y' * 89) == []
    assert decoder.feed(b'y' + encode_frame(9, 2, 0, b'ok')) == [Frame(9, 2, 0, b'ok')]
    assert not decoder.mid_frame


@pytest.mark.parametrize('piece', [1, 3, 10, 200], ids=lambda piece: f'{piece}-byte reads')
def test_an_oversized_request_frame_comes_with_its_head_once_that_is_in_however_it_is_read(piece: int) -> None:
    # The head shows the size of the message inside (request_payload_size)
    # alike at every read boundary; other frames are reported at their header.
    decoder = FrameDecoder(16)
    decoder.request_head = 8
    envelope = encode_request('s', 'm', b'p' * 20)
    wire = encode_frame(7, 1, 0, envelope) + encode_frame(9, 3, 0, b'x' * 30) + encode_frame(11, 2, 0, b'ok')
    items: list[Any] = []
    for start in range(0, len(wire), piece):
        items += decoder.feed(wire[start:start + piece])
    assert items == [OversizedFrame(7, 1, 0, len(envelope), 16, envelope[:8]),
                     OversizedFrame(9, 3, 0, 30, 16), Frame(11, 2, 0, b'ok')]
    assert request_payload_size(items[0].head, items[0].length) == 20 and not decoder.mid_frame


def test_the_message_size_is_read_only_where_the_head_holds_it() -> None:
    envelope = encode_request('svc', 'method', b'p' * 300, 10**9)
    # 'svc' and 'method' take 13 bytes, the payload's tag one, its length two.
    assert [request_payload_size(envelope[:end], len(envelope)) for end in (5, 13, 14, 15, 16, len(envelope))] == \
        [None, None, None, None, 300, 300]
    assert request_payload_size(encode_request('svc', 'method', b''), 13) is None  # (no payload field)
    assert request_payload_size(b'\x0d\x00\x00\x00\x00\x1a\x05', 12) is None  # a 32-bit field: not a Request


def test_a_message_size_the_request_cannot_hold_is_not_taken() -> None:
    # A peer's head may claim any payload length (a varint up to 2**64 - 1):
    # only one that fits in the rest of the frame is the message's size.
    envelope = encode_request('svc', 'method', b'p' * 300)
    assert request_payload_size(envelope[:20], len(envelope)) == 300
    assert request_payload_size(envelope[:20], len(envelope) - 1) is None
    assert request_payload_size(b'\x1a' + b'\xff' * 9 + b'\x01', 5000) is None


def test_frame_at_the_limit_is_accepted() -> None:
    assert FrameDecoder(4).feed(encode_frame(1, 1, 0, b'1234')) == [Frame(1, 1, 0, b'1234')]


def test_descriptors_queue_in_arrival_order_until_a_frame_takes_them() -> None:
    decoder = FrameDecoder()
    # The descriptors of the second frame arrive with the tail of the first.
    wire = encode_frame(1, 1, 0, b'first') + encode_frame(3, 1, 0x80, b'second')
    assert decoder.feed(wire[:12]) == []
    decoder.add_fds((7, 8))  # (a read passes descriptors before its bytes are fed)
    frames = decoder.feed(wire[12:])
    assert [frame.stream_id for frame in frames] == [1, 3]
    assert decoder.queued_fds == 2
    assert decoder.take_fds(1) == [7]
    assert decoder.take_fds() == [8]


def test_taking_more_descriptors_than_arrived_names_both_counts() -> None:
    decoder = FrameDecoder()
    decoder.add_fds((5,))
    with pytest.raises(ValueError, match='announced 2 file descriptors, 1 arrived'):
        decoder.take_fds(2)
    assert decoder.queued_fds == 1


@pytest.mark.parametrize('size', [0, 1, 127, 128, 16383, 16384, 2**21 + 3])
def test_hand_encoded_ok_response_is_what_protobuf_encodes(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert encode_ok_response(payload) == encode_response(0, '', payload)


# -- metadata -----------------------------------------------------------------------------------

def test_metadata_round_trip_keeps_binary_values() -> None:
    metadata = [('X-Trace', 'abc'), ('blob-bin', b'\x00\xff'), ('x-trace', 'again')]
    wire = metadata_to_wire(metadata)
    assert [(kv.key, kv.value) for kv in wire] == [('x-trace', 'abc'), ('blob-bin', 'AP8='),
                                                   ('x-trace', 'again')]
    assert metadata_from_wire(wire) == (('x-trace', 'abc'), ('blob-bin', b'\x00\xff'), ('x-trace', 'again'))


def test_binary_metadata_value_that_is_not_base64_arrives_as_bytes() -> None:
    assert metadata_from_wire([ttrpc_pb2.KeyValue(key='a-bin', value='not base64!')]) == (
        ('a-bin', b'not base64!'),)


@pytest.mark.parametrize('metadata, message', [
    ([('k', b'bytes')], 'must be a str'),
    ([('k-bin', 5)], 'must be bytes'),
    ([(1, 'v')], 'key must be a str'),
    (['kv'], 'pairs'),
])
def test_bad_metadata_is_a_type_error_naming_the_problem(metadata: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        metadata_to_wire(metadata)



# -- clients against a scripted peer ------------------------------------------------------------

Script = Callable[[Peer], None]



def test_fields_of_an_envelope_are_counted_without_parsing_it() -> None:
    from vyra_base_ipc.ttrpc._messages import has_more_fields
    for entries in (0, 1, 255, 256, 300):
        data = ttrpc_pb2.Request(service='s', method='m', payload=bytes(70_000), timeout_nano=-1, metadata=[
            ttrpc_pb2.KeyValue(key='k' * (index % 3), value='v') for index in range(entries)]).SerializeToString()
        fields = 4 + entries
        assert has_more_fields(data, fields - 1) and not has_more_fields(data, fields)
    # Every wire type, read as protobuf reads them (fixed64, fixed32 and varints of unknown fields).
    unknown = b'\x31' + bytes(8) + b'\x3d' + bytes(4) + b'\x40' + b'\xff' * 9 + b'\x01'
    assert has_more_fields(unknown + b'\x0a\x01s', 3) and not has_more_fields(unknown + b'\x0a\x01s', 4)
    # What cannot be read is left to the parser: an 11-byte varint, a group, then 9 fields.
    for unreadable in (b'\x20' + b'\xff' * 10 + b'\x01', b'\x0b'):
        assert not has_more_fields(unreadable + b'\x2a\x00' * 9, 3)

@pytest.fixture
def scripted(socket_dir: Path) -> Iterator[Callable[[Script], Path]]:
    """``scripted(script)``: a ttrpc 'server' running ``script`` on its connection.

    Like any ttrpc server but this package's, it first answers the client's
    Hello (stream 1) as an unknown method: the script sees plain ttrpc."""
    servers: list[PeerServer] = []

    def start(script: Script) -> Path:
        def plain(peer: Peer) -> None:
            hello = peer.read_frame()
            assert (hello.stream_id, ttrpc_pb2.Request.FromString(hello.data).method) == (1, 'Hello')
            peer.respond(1, code=grpc.StatusCode.UNIMPLEMENTED.value[0], message='Method not found!')
            script(peer)
        servers.append(PeerServer(socket_dir / f'peer{len(servers)}.sock', plain))
        return servers[-1].path
    yield start
    for server in servers:
        server.close()


def test_oversized_answer_fails_only_its_call(scripted: Callable[[Script], Path], echo: Any) -> None:
    reply = echo.pb.EchoReply(text='fine').SerializeToString()

    def script(peer: Peer) -> None:
        stream_id = peer.read_frame().stream_id
        size = 1024 + 64 * 1024 + 1  # over the client's frame limit
        peer.send(stream_id, RESPONSE, 0, b'\0' * size)
        peer.respond(peer.read_frame().stream_id, reply)
    method = stub_methods(echo.Stub)['Echo']
    with SyncConnection.connect(scripted(script), max_message_bytes=1024, shared_memory=None) as connection:
        with pytest.raises(IPCRemoteError) as raised:
            connection.call(method, echo.pb.EchoRequest(), timeout=10)
        assert raised.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert connection.call(method, echo.pb.EchoRequest(), timeout=10).text == 'fine'


def test_answer_over_the_message_limit_is_refused(scripted: Callable[[Script], Path], echo: Any) -> None:
    def script(peer: Peer) -> None:
        peer.respond(peer.read_frame().stream_id, b'\x0a' + bytes([127]) + b'x' * 127)
    with SyncConnection.connect(scripted(script), max_message_bytes=100, shared_memory=None) as connection:
        with pytest.raises(IPCRemoteError, match='larger than max'):
            connection.call(stub_methods(echo.Stub)['Echo'], echo.pb.EchoRequest(), timeout=10)


@pytest.mark.asyncio
async def test_malformed_answer_is_internal(scripted: Callable[[Script], Path], echo: Any) -> None:
    def script(peer: Peer) -> None:
        stream_id = peer.read_frame().stream_id
        peer.send(stream_id, RESPONSE, 0, b'\xff\xff\xff')
    async with await AsyncConnection.connect(scripted(script), shared_memory=None) as connection:
        with pytest.raises(IPCRemoteError) as raised:
            await connection.call(stub_methods(echo.Stub)['Echo'], echo.pb.EchoRequest(), timeout=10)
    assert raised.value.code is grpc.StatusCode.INTERNAL


@pytest.mark.parametrize('client', CLIENT_KINDS)
def test_an_answer_that_does_not_parse_as_the_response_type_is_internal(
        scripted: Callable[[Script], Path], echo: Any, client: str) -> None:
    # A stub built from another version of the .proto: protobuf's
    # DecodeError escaped the fast lane; the gRPC lane says grpc's words.
    def script(peer: Peer) -> None:
        peer.respond(peer.read_frame().stream_id, b'\x0a\x02\xff\xfe')  # text = bytes that are not UTF-8
    method = stub_methods(echo.Stub)['Echo']
    with pytest.raises(IPCRemoteError) as raised:
        with fast_lane_connection(client, scripted(script), shared_memory=None) as connection:
            connection.call(method, echo.pb.EchoRequest(), timeout=10)
    assert raised.value.code is grpc.StatusCode.INTERNAL
    assert raised.value.details.startswith('Exception deserializing response!'), raised.value.details


@pytest.mark.asyncio
async def test_peer_closing_mid_call_is_unavailable(scripted: Callable[[Script], Path], echo: Any) -> None:
    def script(peer: Peer) -> None:
        peer.read_frame()
        peer.send_raw(frame_bytes(3, RESPONSE, 0, b'truncated', length=50))
    async with await AsyncConnection.connect(scripted(script), shared_memory=None) as connection:
        with pytest.raises(IPCUnavailableError, match='lost'):
            await connection.call(stub_methods(echo.Stub)['Echo'], echo.pb.EchoRequest(), timeout=10)
        assert connection.is_closed


def test_client_stream_ids_are_odd_and_increase(scripted: Callable[[Script], Path], echo: Any) -> None:
    seen: list[tuple[int, int, int]] = []

    def script(peer: Peer) -> None:
        for _ in range(3):
            frame = peer.read_frame()
            seen.append(frame[:3])
            request = ttrpc_pb2.Request.FromString(frame.data)
            assert (request.service, request.method) == ('vyra.ipc.test.EchoService', 'Echo')
            assert 0 < request.timeout_nano <= 10 * 10**9
            peer.respond(frame.stream_id, echo.pb.EchoReply().SerializeToString())
    with SyncConnection.connect(scripted(script), shared_memory=None) as connection:
        for _ in range(3):
            connection.call(stub_methods(echo.Stub)['Echo'], echo.pb.EchoRequest(), timeout=10)
    assert seen == [(3, 1, 0), (5, 1, 0), (7, 1, 0)]  # 1 was the Hello


@pytest.mark.asyncio
async def test_async_client_sends_streams_by_the_protocol(scripted: Callable[[Script], Path],
                                                          echo: Any) -> None:
    seen: list[WireFrame] = []

    def script(peer: Peer) -> None:
        while True:
            frame = peer.read_frame()
            seen.append(frame)
            if frame.type == DATA and frame.flags & REMOTE_CLOSED:
                break
        peer.respond(3, echo.pb.EchoReply(text='done').SerializeToString())
    async with await AsyncConnection.connect(scripted(script), shared_memory=None) as connection:
        reply = await connection.call(stub_methods(echo.Stub)['Collect'],
                                      [echo.pb.EchoRequest(text='a'), echo.pb.EchoRequest()], timeout=10)
    assert reply.text == 'done'
    assert [frame[:3] for frame in seen] == [(3, 1, 2), (3, 3, 0), (3, 3, 0), (3, 3, 5)]
    assert seen[2].data == b'' and seen[3].data == b''  # an empty message, then a bare close


@pytest.mark.parametrize('client', CLIENT_KINDS)
def test_a_client_gives_up_at_its_deadline_when_no_answer_comes(
        client: str, scripted: Callable[[Script], Path], echo: Any) -> None:
    from vyra_base_ipc.exceptions import IPCTimeoutError
    done = threading.Event()

    def script(peer: Peer) -> None:
        peer.read_frame()
        done.wait(30)  # never answers
    try:
        with fast_lane_connection(client, scripted(script), shared_memory=None) as connection:
            with pytest.raises(IPCTimeoutError):
                connection.call(stub_methods(echo.Stub)['Echo'], echo.pb.EchoRequest(), timeout=0.2)
            assert not connection.is_closed  # a late answer would simply be dropped
    finally:
        done.set()


@pytest.mark.parametrize('client', CLIENT_KINDS)
@pytest.mark.parametrize('leaves, deadline_flag', [
    ('call-at-its-deadline', 0x01), ('client-stream-at-its-deadline', 0x01), ('stream-at-its-deadline', 0x01),
    ('stream-at-its-idle-timeout', 0), ('stream-left-early', 0)])
def test_a_client_cancel_says_whether_it_left_because_the_deadline_passed(
        client: str, leaves: str, deadline_flag: int, socket_dir: Path, echo: Any) -> None:
    # The server ends the call DEADLINE_EXCEEDED on a CANCEL that says so,
    # CANCELLED otherwise: what its interceptors, stats and context report.
    from vyra_base_ipc.exceptions import IPCTimeoutError
    cancels: list[WireFrame] = []

    def server(peer: Peer) -> None:
        assert peer.read_frame().stream_id == 1
        peer.respond(1, ttrpc_pb2.Hello(cancel=True).SerializeToString())
        call = peer.read_frame()
        if leaves == 'stream-left-early':
            peer.send(call.stream_id, DATA, 0, echo.pb.EchoReply(text='one').SerializeToString())
        while (frame := peer.read_frame()).type != CANCEL:
            assert frame.type == DATA  # a request stream's messages and end
        cancels.append(frame)
    peers = PeerServer(socket_dir / 'cancel.sock', server)
    methods = stub_methods(echo.Stub)
    method, request = {'call-at-its-deadline': (methods['Echo'], echo.pb.EchoRequest()),
                       'client-stream-at-its-deadline': (methods['Collect'], [echo.pb.EchoRequest()])
                       }.get(leaves, (methods['Count'], echo.pb.CountRequest()))
    timeout, idle = (30, 0.1) if leaves == 'stream-at-its-idle-timeout' else (0.2, None)
    try:
        with contextlib.ExitStack() as expected:
            if leaves != 'stream-left-early':
                expected.enter_context(pytest.raises(IPCTimeoutError))
            with fast_lane_connection(client, peers.path, shared_memory=None) as connection:
                if method.kind.response_streaming:
                    # (left before the connection closes: Blocking closes a stream left on its loop)
                    for _ in connection.stream(method, request, timeout=timeout, idle_timeout=idle):
                        break
                else:
                    connection.call(method, request, timeout=timeout)
        wait_for(lambda: cancels, 10, 'the CANCEL read')
        assert (cancels[0].stream_id, cancels[0].flags) == (3, deadline_flag)
    finally:
        peers.close()


@pytest.mark.parametrize('client', CLIENT_KINDS)
def test_an_idle_timeout_bounds_the_wait_for_the_answer_to_the_hello_too(
        client: str, socket_dir: Path, echo: Any) -> None:
    # A stream without a deadline is the first call of its connection, to a
    # server that accepts but never answers: its idle timeout ends the wait
    # (it waited for ever for the answer to the Hello).
    from vyra_base_ipc.exceptions import IPCTimeoutError
    done = threading.Event()

    def silent(peer: Peer) -> None:
        assert peer.read_frame().stream_id == 1  # the Hello
        done.wait(30)
    peers = PeerServer(socket_dir / 'silent.sock', silent)
    method = stub_methods(echo.Stub)['Count']
    failures: list[BaseException] = []

    def stream() -> None:
        try:
            with fast_lane_connection(client, peers.path, shared_memory=None) as connection:
                for _ in connection.stream(method, echo.pb.CountRequest(), timeout=None, idle_timeout=0.2):
                    pass
        except BaseException as error:
            failures.append(error)
    caller = threading.Thread(target=stream, daemon=True)
    try:
        caller.start()
        caller.join(20)
        assert not caller.is_alive(), 'the stream waited for the Hello past its idle timeout'
        assert len(failures) == 1 and isinstance(failures[0], IPCTimeoutError), failures
        assert 'no message within the idle timeout of 0.2 s' in failures[0].details
    finally:
        done.set()
        peers.close()


def fd_links() -> set[str]:
    """What this process's descriptors are (``socket:[inode]``, a path ...)."""
    links = set()
    for name in os.listdir('/proc/self/fd'):
        try:
            links.add(os.readlink(f'/proc/self/fd/{name}'))
        except OSError:  # closed since it was listed
            pass
    return links


@pytest.mark.asyncio
async def test_async_client_holds_calls_back_while_the_server_does_not_read_and_closes_at_once(
        scripted: Callable[[Script], Path], echo: Any) -> None:
    # Each call waits for the server to read again, within its deadline,
    # instead of queueing its request: what this process holds for a stuck
    # server stays bounded, and close() does not wait for it either.
    from vyra_base_ipc.exceptions import IPCTimeoutError
    done = threading.Event()
    size = 256 * 1024

    def script(peer: Peer) -> None:
        done.wait(30)  # reads nothing
    try:
        connection = await AsyncConnection.connect(scripted(script), shared_memory=None)
        method = stub_methods(echo.Stub)['Echo']
        for _ in range(40):  # 10 MiB of requests; the socket takes about 2 MiB
            with pytest.raises(IPCTimeoutError):
                await connection.call(method, echo.pb.EchoRequest(payload=bytes(size)), timeout=0.05)
        # What the transport holds: under its high-water mark and one request.
        assert connection._transport.get_write_buffer_size() <= 64 * 1024 + size + 1024
        # (Its socket by its inode, not a count of descriptors: other tests' may close meanwhile.)
        its_socket = os.readlink(f'/proc/self/fd/{connection._transport._sock.fileno()}')
        await connection.close()
        assert its_socket not in fd_links(), 'its socket is still open'
    finally:
        done.set()


@pytest.mark.parametrize('client', CLIENT_KINDS)
def test_a_server_sending_past_the_window_fails_that_stream_and_it_is_cancelled(
        client: str, socket_dir: Path, echo: Any) -> None:
    # 40 messages of 1 KiB in one write against a window of 4 KiB and
    # messages of at most 4 KiB: the client keeps what came within the window
    # and one message, fails the call, drops the rest and cancels it.
    cancelled = threading.Event()

    def flood(peer: Peer) -> None:
        assert peer.read_frame().stream_id == 1
        peer.respond(1, ttrpc_pb2.Hello(cancel=True, stream_window=4096).SerializeToString())
        call = peer.read_frame()
        message = echo.pb.EchoReply(payload=bytes(1000)).SerializeToString()
        peer.send_raw(b''.join(frame_bytes(call.stream_id, DATA, 0, message) for _ in range(40)))
        while (frame := peer.read_frame()).type != CANCEL:
            assert frame.type == WINDOW_UPDATE
        assert frame.stream_id == call.stream_id
        cancelled.set()
    server = PeerServer(socket_dir / 'flood.sock', flood)
    count = stub_methods(echo.Stub)['Count']
    options: dict[str, Any] = {'shared_memory': None, 'stream_window': 4096, 'max_message_bytes': 4096,
                               'busy_poll': 0}
    received = 0
    try:
        with pytest.raises(IPCRemoteError) as raised:
            with fast_lane_connection(client, server.path, **options) as connection:
                for _ in connection.stream(count, echo.pb.CountRequest(), timeout=10):
                    received += 1
        assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 'more than the window and one message it may send (8256)' in raised.value.details
        assert 0 < received < 9  # a message counts its 1,005 bytes and 64: 7 of them
        assert cancelled.wait(10)
    finally:
        server.close()


@pytest.mark.parametrize('client', CLIENT_KINDS)
def test_a_client_sends_no_more_new_memfds_to_a_server_that_does_not_read_than_two_messages_worth(
        client: str, socket_dir: Path, echo: Any) -> None:
    # A request in a new memfd (no pooled segment agreed) travels in a frame
    # of a few bytes: without a bound, each call to a stuck server would
    # leave one more in its socket. Past two messages (of at most 2 MiB
    # here) not read, requests go inline, where the socket holds them back.
    from vyra_base_ipc import SharedMemoryOptions
    from vyra_base_ipc.exceptions import IPCError
    done = threading.Event()
    arrived: list[WireFrame] = []

    def stuck(peer: Peer) -> None:
        assert peer.read_frame().stream_id == 1
        peer.respond(1, ttrpc_pb2.Hello(shared_memory=True).SerializeToString())  # no pooled segments
        done.wait(30)
        arrived.extend(peer.frames_until_closed())
    server = PeerServer(socket_dir / 'stuck.sock', stuck)
    echo_method = stub_methods(echo.Stub)['Echo']
    request = echo.pb.EchoRequest(payload=bytes(1 << 20))
    options: dict[str, Any] = {'shared_memory': SharedMemoryOptions(threshold=4096),
                               'max_message_bytes': 2 << 20, 'busy_poll': 0}
    try:
        with fast_lane_connection(client, server.path, **options) as connection:
            for _ in range(10):
                with pytest.raises(IPCError):
                    connection.call(echo_method, request, timeout=0.05)
        done.set()
        server.close()
        memfds = sum(len(frame.fds) for frame in arrived)
        assert 1 <= memfds <= 4  # 4 MiB of them, then inline (the old clients: 10)
    finally:
        done.set()
        for frame in arrived:
            for fd in frame.fds:
                os.close(fd)


@pytest.mark.parametrize('server_reads_again', [True, False], ids=['reads-again', 'never-reads'])
def test_a_blocking_stream_left_while_its_sender_waits_for_the_server_to_read_frees_the_connection(
        server_reads_again: bool, scripted: Callable[[Script], Path], echo: Any) -> None:
    # A request stream without deadline to a plain ttrpc server (no flow
    # control) that stops reading: its sender waits for room in the socket
    # holding the send lock. Once its caller leaves, it ends the frame it
    # began if the server reads again, or the connection breaks (the frames
    # are out of step); it no longer blocks every later sender for ever.
    from vyra_base_ipc.exceptions import IPCTimeoutError
    left, done = threading.Event(), threading.Event()
    data_frames: list[int] = []
    reply = echo.pb.EchoReply(text='fine').SerializeToString()

    def script(peer: Peer) -> None:
        stream_id = peer.read_frame().stream_id
        if not (left.wait(30) and server_reads_again):
            done.wait(30)
            return
        while (frame := peer.read_frame()).stream_id == stream_id:  # whole frames, then the next call
            data_frames.append(len(frame.data))
        peer.respond(frame.stream_id, reply)

    # One message is more than the socket holds (a send buffer of 2 MiB, and at most 1 MiB a read
    # the peer took with each of its frames): the sender is always blocked inside its first frame.
    # With messages of 256 KiB, how much the peer's reads took decided where the socket filled up,
    # and now and then it filled up just as a frame ended: the sender then left with nothing begun
    # and the connection in step, as it should, but not the case this test is about.
    def requests() -> Iterator[Any]:
        while True:
            yield echo.pb.EchoRequest(payload=bytes(8 << 20))

    def senders() -> list[threading.Thread]:
        """The request-stream senders started since the test began (one an earlier test left, blocked in
        its caller's iterator, would stay for good)."""
        return [thread for thread in threading.enumerate() if thread.name.startswith('ttrpc-send-')
                and thread not in earlier]
    earlier = set(threading.enumerate())
    methods = stub_methods(echo.Stub)
    try:
        with SyncConnection.connect(scripted(script), shared_memory=None, busy_poll=0,
                                    max_message_bytes=16 << 20) as connection:
            with pytest.raises(IPCTimeoutError, match='idle timeout'):
                for _ in connection.stream(methods['Chat'], requests(), idle_timeout=1):  # (the sender began)
                    pass
            left.set()
            sender = senders()
            assert len(sender) == 1
            sender[0].join(15)
            assert not sender[0].is_alive(), 'the sender of a stream left still blocks'
            if server_reads_again:
                assert connection.call(methods['Echo'], echo.pb.EchoRequest(), timeout=10).text == 'fine'
                assert data_frames and not connection.is_closed
            else:
                assert connection.is_closed
                with pytest.raises(IPCUnavailableError, match='a frame could not be sent in time'):
                    connection.call(methods['Echo'], echo.pb.EchoRequest(), timeout=10)
    finally:
        done.set()
