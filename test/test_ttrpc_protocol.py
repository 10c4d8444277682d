"""Protocol hygiene of the ttrpc server, spoken to byte by byte over a real
socket: oversized, malformed, truncated and fuzzed frames, stream id rules,
out-of-order answers. The frames here are built by ttrpc_peer from the
specification, not with the package's own encoder.
"""

from __future__ import annotations

import os
import random
import socket
import time
from typing import Any, Iterator

import grpc
import pytest

from conftest import ServerProcess
from ttrpc_peer import (
    DATA,
    NO_DATA,
    REMOTE_CLOSED,
    REMOTE_OPEN,
    REQUEST,
    RESPONSE,
    Peer,
    frame_bytes,
    request_envelope,
)
from vyra_base_ipc import module_service_pb2 as module_pb
from vyra_base_ipc import ttrpc_pb2
from vyra_base_ipc._methods import stub_methods
from vyra_base_ipc.module_service_pb2_grpc import ModuleServiceStub
from vyra_base_ipc.ttrpc import SyncConnection

MAX_MESSAGE = 64 * 1024
LANES_SERVER_ARGS = ('--max-message-bytes', str(MAX_MESSAGE))  # for conftest's lanes
FRAME_LIMIT = MAX_MESSAGE + 64 * 1024  # plus the envelope allowance
MODULE = 'vyra.ipc.ModuleService'
ECHO = 'vyra.ipc.test.EchoService'


def ping(peer: Peer, stream_id: int) -> None:
    peer.request(stream_id, MODULE, 'ExecuteCommand', module_pb.CommandRequest(command='ping').SerializeToString())


def assert_pong(peer: Peer, stream_id: int) -> None:
    ping(peer, stream_id)
    answer_id, code, message, payload = peer.answer()[:4]
    assert (answer_id, code, message) == (stream_id, 0, '')
    assert module_pb.CommandResponse.FromString(payload).result == 'pong'


@pytest.fixture
def peer(lanes: ServerProcess) -> Iterator[Peer]:
    with Peer.connect(lanes.ttrpc_path) as connection:
        yield connection


# -- limits ------------------------------------------------------------------------------------

def test_oversized_frame_is_rejected_like_containerd_and_the_connection_stays_usable(peer: Peer) -> None:
    size = FRAME_LIMIT + 1
    peer.send(1, REQUEST, 0, b'\0' * size)
    assert peer.answer()[:4] == (
        1, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        f'message length {size} exceed maximum message size of {FRAME_LIMIT}', b'')
    assert_pong(peer, 3)


def test_a_plain_peers_request_over_the_frame_limit_is_refused_in_containerds_words(peer: Peer) -> None:
    # Only a client that agreed a Hello (this package's) has the head of such a
    # frame read for its message's size, and grpc's words (test_lane_parity.py).
    envelope = request_envelope(ECHO, 'Echo', b'x' * (FRAME_LIMIT + 1))
    peer.send(1, REQUEST, 0, envelope)
    assert peer.answer()[:4] == (
        1, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        f'message length {len(envelope)} exceed maximum message size of {FRAME_LIMIT}', b'')
    assert_pong(peer, 3)


def test_frame_at_the_limit_is_read(peer: Peer) -> None:
    # Exactly FRAME_LIMIT bytes of data: accepted as a frame (the payload then
    # exceeds the message limit, which is a separate, gRPC-like check).
    envelope = request_envelope(ECHO, 'Echo')
    payload_size = FRAME_LIMIT - len(envelope) - 4  # tag and 3-byte varint length of the payload
    envelope = request_envelope(ECHO, 'Echo', b'x' * payload_size)
    assert len(envelope) == FRAME_LIMIT
    peer.send(1, REQUEST, 0, envelope)
    assert peer.answer()[:4] == (
        1, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        f'SERVER: Received message larger than max ({payload_size} vs. {MAX_MESSAGE})', b'')
    assert_pong(peer, 3)


def test_request_message_over_the_message_limit_is_refused_as_on_grpc(lanes: ServerProcess, echo: Any) -> None:
    from vyra_base_ipc import SyncIPCHandler
    from vyra_base_ipc.exceptions import IPCRemoteError

    request = echo.pb.EchoRequest(payload=b'x' * (MAX_MESSAGE + 1))
    # Clients that would accept the message, so the servers' limits decide.
    with SyncIPCHandler(lanes.grpc_path, echo.Stub, max_message_bytes=4 * MAX_MESSAGE) as handler:
        with pytest.raises(IPCRemoteError) as via_grpc:
            handler.call_method('Echo', request)
    with SyncConnection.connect(lanes.ttrpc_path, max_message_bytes=4 * MAX_MESSAGE) as connection:
        with pytest.raises(IPCRemoteError) as via_ttrpc:
            connection.call(stub_methods(echo.Stub)['Echo'], request, timeout=10)
        assert via_ttrpc.value.code is via_grpc.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(MAX_MESSAGE) in via_ttrpc.value.details
        reply = connection.call(stub_methods(echo.Stub)['Echo'], echo.pb.EchoRequest(text='after'),
                                timeout=10)
        assert reply.text == 'after'


# -- stream ids and malformed frames -------------------------------------------------------------

def test_even_stream_id_is_invalid(peer: Peer) -> None:
    ping(peer, 2)
    stream_id, code, message, _ = peer.answer()[:4]
    assert (stream_id, code) == (2, grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert 'odd' in message
    assert_pong(peer, 3)


def test_stream_ids_must_increase(peer: Peer) -> None:
    assert_pong(peer, 5)
    ping(peer, 3)
    stream_id, code, message, _ = peer.answer()[:4]
    assert (stream_id, code) == (3, grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert 'must increment' in message
    assert_pong(peer, 7)


def test_request_that_is_not_a_request_message_is_invalid(peer: Peer) -> None:
    peer.send(1, REQUEST, 0, b'\xff\xff\xff\xff garbage')
    stream_id, code, message, _ = peer.answer()[:4]
    assert (stream_id, code) == (1, grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert message.startswith('unmarshal request error')
    assert_pong(peer, 3)


def test_data_before_its_request_is_invalid(peer: Peer) -> None:
    peer.send(9, DATA, 0, b'\x0a\x01x')
    stream_id, code, _, _ = peer.answer()[:4]
    assert (stream_id, code) == (9, grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert_pong(peer, 11)


def test_data_on_a_unary_call_ends_it_with_invalid_argument(peer: Peer, echo: Any) -> None:
    peer.request(1, ECHO, 'Sleep', echo.pb.SleepRequest(seconds=30).SerializeToString(),
                 timeout_nano=int(60e9))
    peer.send(1, DATA, 0, b'')
    stream_id, code, _, _ = peer.answer()[:4]
    assert (stream_id, code) == (1, grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert_pong(peer, 3)


def test_unknown_frame_types_and_client_responses_are_ignored(peer: Peer) -> None:
    peer.send(1, 0x7f, 0xff, b'future extension')
    peer.send(1, RESPONSE, 0, b'')
    assert_pong(peer, 3)  # the first answer is the pong: nothing was sent for the others


def test_request_payload_is_the_first_message_of_a_client_stream(peer: Peer, echo: Any) -> None:
    # containerd clients may put the first message in the Request itself.
    peer.request(1, ECHO, 'Collect', echo.pb.EchoRequest(text='a').SerializeToString(),
                 flags=REMOTE_OPEN)
    peer.send(1, DATA, 0, echo.pb.EchoRequest(text='b').SerializeToString())
    peer.send(1, DATA, 0, b'')  # an empty message is a zero-length frame without NO_DATA
    peer.send(1, DATA, REMOTE_CLOSED | NO_DATA, b'')
    stream_id, code, _, payload = peer.answer()[:4]
    assert (stream_id, code) == (1, 0)
    assert echo.pb.EchoReply.FromString(payload).text == 'a,b,'


@pytest.mark.parametrize('method', ['Collect', 'ChatSync'])
def test_a_message_after_the_end_of_a_request_stream_ends_the_call_with_invalid_argument(
        peer: Peer, echo: Any, method: str) -> None:
    # The client ended its stream: a handler must not read messages it sent
    # after that (containerd's server refuses them with INVALID_ARGUMENT).
    # One write: the server reads all three frames before the handler runs.
    peer.send_raw(frame_bytes(1, REQUEST, REMOTE_OPEN, request_envelope(ECHO, method, timeout_nano=int(30e9)))
                  + frame_bytes(1, DATA, 0, echo.pb.EchoRequest(text='a').SerializeToString())
                  + frame_bytes(1, DATA, REMOTE_CLOSED, echo.pb.EchoRequest(text='b').SerializeToString())
                  + frame_bytes(1, DATA, 0, echo.pb.EchoRequest(text='late').SerializeToString()))
    frame = peer.read_frame(1)
    while frame.type == DATA and not frame.flags & REMOTE_CLOSED:  # ChatSync's answers to 'a' and 'b'
        frame = peer.read_frame(1)
    assert frame.type == RESPONSE  # not the bare close of a stream that ended well
    status = ttrpc_pb2.Response.FromString(frame.data).status
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], status
    assert 'after the end of its request stream' in status.message
    assert_pong(peer, 3)


def test_server_stream_ends_with_a_bare_close(peer: Peer, echo: Any) -> None:
    peer.request(1, ECHO, 'Count', echo.pb.CountRequest(count=2).SerializeToString(),
                 flags=REMOTE_CLOSED)
    frames = [peer.read_frame() for _ in range(3)]
    assert [(f[0], f[1], f[2]) for f in frames] == [
        (1, DATA, 0), (1, DATA, 0), (1, DATA, REMOTE_CLOSED | NO_DATA)]
    assert [echo.pb.EchoReply.FromString(f[3]).index for f in frames[:2]] == [0, 1]
    assert frames[2][3] == b''


# -- concurrency on one connection --------------------------------------------------------------

def test_answers_go_out_by_stream_id_in_the_order_calls_finish(peer: Peer, echo: Any) -> None:
    peer.request(1, ECHO, 'Sleep', echo.pb.SleepRequest(seconds=30).SerializeToString(),
                 timeout_nano=int(1e9))
    peer.request(3, ECHO, 'EchoSync', echo.pb.EchoRequest(text='fast').SerializeToString())
    ping(peer, 5)
    first, second, third = peer.answer(), peer.answer(), peer.answer()
    assert sorted([first[0], second[0]]) == [3, 5]  # the quick calls, whatever their order
    assert third[:3] == (1, grpc.StatusCode.DEADLINE_EXCEEDED.value[0], 'Deadline Exceeded')


# -- broken input affects only its connection ---------------------------------------------------

def test_truncated_frame_closes_only_its_own_connection(lanes: ServerProcess, peer: Peer) -> None:
    with Peer.connect(lanes.ttrpc_path) as other:
        other.send_raw(frame_bytes(1, REQUEST, 0, b'only part of it', length=1000))
        other.sock.shutdown(socket.SHUT_WR)
        assert other.sock.recv(1) == b''  # the server closed it
    assert_pong(peer, 1)


def _fuzz_frames(rng: random.Random, echo: Any) -> Iterator[bytes]:
    """Frames from valid to garbage, seeded."""
    methods = [(ECHO, name) for name in ('Echo', 'EchoSync', 'Count', 'Collect', 'Chat', 'Sleep', 'Fail')]
    methods += [(MODULE, 'ExecuteCommand'), (MODULE, 'GetData'), ('no.Such', 'Thing')]
    stream_id = 1
    while True:
        kind = rng.random()
        if kind < 0.4:  # a valid request with a random payload (capped: no hour-long sleeps)
            service, method = rng.choice(methods)
            if method == 'Sleep':
                payload = echo.pb.SleepRequest(seconds=rng.random() / 100).SerializeToString()
            elif method == 'Count':
                payload = echo.pb.CountRequest(count=rng.randrange(5)).SerializeToString()
            else:
                payload = rng.randbytes(rng.randrange(64))
            envelope = request_envelope(service, method, payload, timeout_nano=rng.choice([0, 10**9, -1]))
            yield frame_bytes(stream_id, REQUEST, rng.randrange(8), envelope)
            stream_id += rng.choice([2, 2, 2, 1, 0, -2])
            stream_id = max(stream_id, 1)
        elif kind < 0.55:  # data frames on live, dead or unknown streams
            data = rng.randbytes(rng.randrange(32))
            yield frame_bytes(rng.randrange(1, stream_id + 4), DATA, rng.randrange(8), data)
        elif kind < 0.75:  # a valid envelope with bits flipped
            envelope = bytearray(request_envelope(ECHO, 'Echo', rng.randbytes(16)))
            for _ in range(rng.randrange(1, 4)):
                envelope[rng.randrange(len(envelope))] ^= 1 << rng.randrange(8)
            yield frame_bytes(stream_id, REQUEST, 0, bytes(envelope))
            stream_id += 2
        elif kind < 0.85:  # random header and data of a random type
            data = rng.randbytes(rng.randrange(48))
            yield frame_bytes(rng.randrange(2**32), rng.randrange(256), rng.randrange(256), data)
        elif kind < 0.95:  # a header whose length lies (truncation, or swallowing what follows)
            data = rng.randbytes(rng.randrange(32))
            yield frame_bytes(stream_id, REQUEST, 0, data, length=rng.randrange(2**32))
        else:  # plain garbage
            yield rng.randbytes(rng.randrange(1, 64))


def test_fuzzed_frames_never_take_the_server_down(lanes: ServerProcess, echo: Any) -> None:
    rng = random.Random(0x77F1)
    witness = Peer.connect(lanes.ttrpc_path)  # opened before: must survive the others' garbage
    sent = connections = 0
    give_up = time.monotonic() + 8.0  # thousands of frames normally take ~1 s
    try:
        assert_pong(witness, 1)
        frames = _fuzz_frames(rng, echo)
        while sent < 5000 and time.monotonic() < give_up:
            fuzzer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            fuzzer.settimeout(10)
            fuzzer.connect(str(lanes.ttrpc_path))
            connections += 1
            try:
                count = rng.randrange(1, 40)
                batch = b''.join(next(frames) for _ in range(count))
                sent += count
                fuzzer.sendall(batch)
                if rng.random() < 0.8:
                    # Mostly, read what comes back until the server closes the
                    # connection: then it has dealt with every frame.
                    fuzzer.shutdown(socket.SHUT_WR)
                    fuzzer.settimeout(2)
                    try:
                        while fuzzer.recv(65536):
                            pass
                    except (TimeoutError, ConnectionResetError):
                        pass
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server closed on us: allowed
            finally:
                fuzzer.close()
        assert_pong(witness, 3)
    finally:
        witness.close()
    assert sent >= 1000, f'only {sent} fuzz frames on {connections} connections in the time budget'
    method = stub_methods(ModuleServiceStub)['ExecuteCommand']
    with SyncConnection.connect(lanes.ttrpc_path) as connection:
        assert connection.call(method, module_pb.CommandRequest(command='ping'), timeout=10).result == 'pong'
    assert os.path.exists(lanes.ttrpc_path)
