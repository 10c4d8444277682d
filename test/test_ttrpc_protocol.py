"""Protocol hygiene of the ttrpc server, spoken to byte by byte over a real
socket: oversized, malformed, truncated and fuzzed frames, stream id rules,
out-of-order answers. The frames here are built with ``struct`` from the
specification, not with the package's own encoder.
"""

from __future__ import annotations

import os
from pathlib import Path
import random
import shutil
import socket
import struct
import tempfile
import time
from typing import Any, Iterator

import grpc
import pytest

from test_ttrpc_lanes import Lanes, start_lanes, stop_lanes
from vyra_base_ipc import module_service_pb2 as module_pb
from vyra_base_ipc import ttrpc_pb2
from vyra_base_ipc.methods import stub_methods
from vyra_base_ipc.ttrpc import SyncConnection
from vyra_base_ipc.module_service_pb2_grpc import ModuleServiceStub

HEADER = struct.Struct('>IIBB')
REQUEST, RESPONSE, DATA = 1, 2, 3
REMOTE_CLOSED, REMOTE_OPEN, NO_DATA = 1, 2, 4
MAX_MESSAGE = 64 * 1024          # the server runs with --max-message-bytes 65536
FRAME_LIMIT = MAX_MESSAGE + 64 * 1024  # plus the envelope allowance
MODULE = 'vyra.ipc.ModuleService'
ECHO = 'vyra.ipc.test.EchoService'


class Peer:
    """A hand-driven ttrpc client connection."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(str(path))

    def close(self) -> None:
        self.sock.close()

    def frame(self, stream_id: int, message_type: int, flags: int, data: bytes) -> None:
        self.sock.sendall(HEADER.pack(len(data), stream_id, message_type, flags) + data)

    def request(self, stream_id: int, service: str, method: str, payload: bytes = b'', *,
                timeout_nano: int = 0, flags: int = 0) -> None:
        envelope = ttrpc_pb2.Request(service=service, method=method, payload=payload,
                                     timeout_nano=timeout_nano).SerializeToString()
        self.frame(stream_id, REQUEST, flags, envelope)

    def ping(self, stream_id: int) -> None:
        self.request(stream_id, MODULE, 'ExecuteCommand',
                     module_pb.CommandRequest(command='ping').SerializeToString())

    def read_exactly(self, size: int) -> bytes:
        chunks = []
        while size:
            chunk = self.sock.recv(size)
            if not chunk:
                raise ConnectionError('server closed the connection')
            chunks.append(chunk)
            size -= len(chunk)
        return b''.join(chunks)

    def read_frame(self) -> tuple[int, int, int, bytes]:
        length, stream_id, message_type, flags = HEADER.unpack(self.read_exactly(HEADER.size))
        return stream_id, message_type, flags, self.read_exactly(length)

    def response(self) -> tuple[int, int, str, bytes]:
        """The next frame, which must be a Response: (stream id, code, message, payload)."""
        stream_id, message_type, _, data = self.read_frame()
        assert message_type == RESPONSE, f'expected a response, got type {message_type}'
        response = ttrpc_pb2.Response.FromString(data)
        return stream_id, response.status.code, response.status.message, response.payload

    def assert_pong(self, stream_id: int) -> None:
        self.ping(stream_id)
        answer_id, code, message, payload = self.response()
        assert (answer_id, code, message) == (stream_id, 0, '')
        assert module_pb.CommandResponse.FromString(payload).result == 'pong'


@pytest.fixture(scope='module')
def lanes(test_protos_dir: Path) -> Iterator[Lanes]:
    directory = Path(tempfile.mkdtemp(prefix='ttp-', dir='/tmp'))
    popen = start_lanes(test_protos_dir, directory, '--max-message-bytes', str(MAX_MESSAGE))
    yield Lanes(directory / 'g.sock', directory / 't.sock')
    stop_lanes(popen)
    log = (directory / 'server.log').read_text()
    shutil.rmtree(directory, ignore_errors=True)
    assert popen.returncode == 0, log
    # Whatever was thrown at it, the server's own machinery never failed.
    trouble = [line for line in log.splitlines()
               if line.startswith(('ERROR:asyncio', 'WARNING:asyncio', 'ERROR:vyra_base_ipc.ttrpc._server',
                                   'ERROR:vyra_base_ipc.ttrpc._connection', 'ERROR:vyra_base_ipc.ttrpc._dispatch'))
               and 'raised by servicer method' not in line]
    assert not trouble, log


@pytest.fixture
def peer(lanes: Lanes) -> Iterator[Peer]:
    connection = Peer(lanes.ttrpc_path)
    yield connection
    connection.close()


# -- limits ------------------------------------------------------------------------------------

def test_oversized_frame_is_rejected_like_containerd_and_the_connection_stays_usable(peer: Peer) -> None:
    size = FRAME_LIMIT + 1
    peer.frame(1, REQUEST, 0, b'\0' * size)
    assert peer.response() == (
        1, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        f'message length {size} exceed maximum message size of {FRAME_LIMIT}', b'')
    peer.assert_pong(3)


def test_frame_at_the_limit_is_read(peer: Peer) -> None:
    # Exactly FRAME_LIMIT bytes of data: accepted as a frame (the payload then
    # exceeds the message limit, which is a separate, gRPC-like check).
    envelope = ttrpc_pb2.Request(service=ECHO, method='Echo').SerializeToString()
    payload_size = FRAME_LIMIT - len(envelope) - 4  # tag and 3-byte varint length of the payload
    envelope = ttrpc_pb2.Request(service=ECHO, method='Echo', payload=b'x' * payload_size).SerializeToString()
    assert len(envelope) == FRAME_LIMIT
    peer.frame(1, REQUEST, 0, envelope)
    assert peer.response() == (
        1, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        f'Received message larger than max ({payload_size} vs. {MAX_MESSAGE})', b'')
    peer.assert_pong(3)


def test_request_message_over_the_message_limit_is_refused_as_on_grpc(lanes: Lanes, echo: Any) -> None:
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
    peer.ping(2)
    stream_id, code, message, _ = peer.response()
    assert (stream_id, code) == (2, grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert 'odd' in message
    peer.assert_pong(3)


def test_stream_ids_must_increase(peer: Peer) -> None:
    peer.assert_pong(5)
    peer.ping(3)
    stream_id, code, message, _ = peer.response()
    assert (stream_id, code) == (3, grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert 'must increment' in message
    peer.assert_pong(7)


def test_request_that_is_not_a_request_message_is_invalid(peer: Peer) -> None:
    peer.frame(1, REQUEST, 0, b'\xff\xff\xff\xff garbage')
    stream_id, code, message, _ = peer.response()
    assert (stream_id, code) == (1, grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert message.startswith('unmarshal request error')
    peer.assert_pong(3)


def test_data_before_its_request_is_invalid(peer: Peer) -> None:
    peer.frame(9, DATA, 0, b'\x0a\x01x')
    stream_id, code, _, _ = peer.response()
    assert (stream_id, code) == (9, grpc.StatusCode.INVALID_ARGUMENT.value[0])
    peer.assert_pong(11)


def test_data_on_a_unary_call_ends_it_with_invalid_argument(peer: Peer, echo: Any) -> None:
    peer.request(1, ECHO, 'Sleep', echo.pb.SleepRequest(seconds=30).SerializeToString(),
                 timeout_nano=int(60e9))
    peer.frame(1, DATA, 0, b'')
    stream_id, code, _, _ = peer.response()
    assert (stream_id, code) == (1, grpc.StatusCode.INVALID_ARGUMENT.value[0])
    peer.assert_pong(3)


def test_unknown_frame_types_and_client_responses_are_ignored(peer: Peer) -> None:
    peer.frame(1, 0x7f, 0xff, b'future extension')
    peer.frame(1, RESPONSE, 0, b'')
    peer.assert_pong(3)  # the first answer is the pong: nothing was sent for the others


def test_request_payload_is_the_first_message_of_a_client_stream(peer: Peer, echo: Any) -> None:
    # containerd clients may put the first message in the Request itself.
    peer.request(1, ECHO, 'Collect', echo.pb.EchoRequest(text='a').SerializeToString(),
                 flags=REMOTE_OPEN)
    peer.frame(1, DATA, 0, echo.pb.EchoRequest(text='b').SerializeToString())
    peer.frame(1, DATA, 0, b'')  # an empty message is a zero-length frame without NO_DATA
    peer.frame(1, DATA, REMOTE_CLOSED | NO_DATA, b'')
    stream_id, code, _, payload = peer.response()
    assert (stream_id, code) == (1, 0)
    assert echo.pb.EchoReply.FromString(payload).text == 'a,b,'


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
    peer.ping(5)
    first, second, third = peer.response(), peer.response(), peer.response()
    assert sorted([first[0], second[0]]) == [3, 5]  # the quick calls, whatever their order
    assert third[:3] == (1, grpc.StatusCode.DEADLINE_EXCEEDED.value[0], 'Deadline Exceeded')


# -- broken input affects only its connection ---------------------------------------------------

def test_truncated_frame_closes_only_its_own_connection(lanes: Lanes, peer: Peer) -> None:
    other = Peer(lanes.ttrpc_path)
    try:
        other.sock.sendall(HEADER.pack(1000, 1, REQUEST, 0) + b'only part of it')
        other.sock.shutdown(socket.SHUT_WR)
        assert other.sock.recv(1) == b''  # the server closed it
    finally:
        other.close()
    peer.assert_pong(1)


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
            envelope = ttrpc_pb2.Request(service=service, method=method, payload=payload,
                                         timeout_nano=rng.choice([0, 10**9, -1])).SerializeToString()
            yield HEADER.pack(len(envelope), stream_id, REQUEST, rng.randrange(8)) + envelope
            stream_id += rng.choice([2, 2, 2, 1, 0, -2])
            stream_id = max(stream_id, 1)
        elif kind < 0.55:  # data frames on live, dead or unknown streams
            data = rng.randbytes(rng.randrange(32))
            yield HEADER.pack(len(data), rng.randrange(1, stream_id + 4), DATA, rng.randrange(8)) + data
        elif kind < 0.75:  # a valid envelope with bits flipped
            envelope = bytearray(ttrpc_pb2.Request(service=ECHO, method='Echo',
                                                   payload=rng.randbytes(16)).SerializeToString())
            for _ in range(rng.randrange(1, 4)):
                envelope[rng.randrange(len(envelope))] ^= 1 << rng.randrange(8)
            yield HEADER.pack(len(envelope), stream_id, REQUEST, 0) + bytes(envelope)
            stream_id += 2
        elif kind < 0.85:  # random header and data of a random type
            data = rng.randbytes(rng.randrange(48))
            yield HEADER.pack(len(data), rng.randrange(2**32), rng.randrange(256), rng.randrange(256)) + data
        elif kind < 0.95:  # a header whose length lies (truncation, or swallowing what follows)
            data = rng.randbytes(rng.randrange(32))
            yield HEADER.pack(rng.randrange(2**32), stream_id, REQUEST, 0) + data
        else:  # plain garbage
            yield rng.randbytes(rng.randrange(1, 64))


def test_fuzzed_frames_never_take_the_server_down(lanes: Lanes, echo: Any) -> None:
    rng = random.Random(0x77F1)
    witness = Peer(lanes.ttrpc_path)  # opened before: must survive the others' garbage
    sent = connections = 0
    give_up = time.monotonic() + 8.0  # thousands of frames normally take ~1 s
    try:
        witness.assert_pong(1)
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
        witness.assert_pong(3)
    finally:
        witness.close()
    assert sent >= 1000, f'only {sent} fuzz frames on {connections} connections in the time budget'
    method = stub_methods(ModuleServiceStub)['ExecuteCommand']
    with SyncConnection.connect(lanes.ttrpc_path) as connection:
        assert connection.call(method, module_pb.CommandRequest(command='ping'), timeout=10).result == 'pong'
    assert os.path.exists(lanes.ttrpc_path)
