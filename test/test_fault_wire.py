"""Bad and oversized input on the wire (issue 4, guarantees 5 and 6).

Guarantee 5 writes straight to the server's socket with :mod:`socket`: random
bytes, truncated or malformed HTTP/2 frames after a valid connection preface,
and well-formed gRPC calls whose message is not valid protobuf. HTTP/2 is
encoded by hand (the few frame types needed, HPACK literals without
indexing), and the server is told ``SETTINGS_HEADER_TABLE_SIZE = 0`` so that
its answers decode without a dynamic table.

The cases come from a seeded generator; the seed is printed, and
``VYRA_IPC_FUZZ_SEED`` replays a run. ``VYRA_IPC_FUZZ_SECONDS`` bounds the
loop (default 20 s; the minimum numbers of cases always run).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
import itertools
import os
from pathlib import Path
import random
import re
import socket
import struct
import time

from google.protobuf.message import DecodeError
import grpc
from grpc_health.v1 import health_pb2
import pytest

from conftest import LONG, ServerProcess, handler_of, wait_for
from http2_peer import (
    CLIENT_SETTINGS,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PREFACE,
    RST_STREAM,
    RawConnection,
    frame,
    grpc_call,
    grpc_message,
    grpc_request_headers,
)
from vyra_base_ipc import (
    IPCError,
    IPCHandler,
    IPCRemoteError,
    MessageTooLargeError,
    SyncIPCHandler,
    module_service_pb2,
    module_service_pb2_grpc,
)

pytestmark = pytest.mark.fault

def server_fds(server: ServerProcess) -> int:
    return len(os.listdir(f'/proc/{server.pid}/fd'))


# -- HTTP/2 and gRPC by hand: test/http2_peer.py ---------------------------------------------

ECHO = '/vyra.ipc.test.EchoService/Echo'
#: HTTP/2's error code CANCEL (RFC 9113, section 7).
CANCEL = 0x8
EXECUTE_COMMAND = '/vyra.ipc.ModuleService/ExecuteCommand'


def read_until_closed(path: Path, data: bytes, timeout: float = 10.0) -> str:
    """Send ``data``, half-close, and read until the server closes.

    :returns: ``"closed"``, ``"reset"`` or ``"open"`` (still open after ``timeout``).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            return 'reset'
        except TimeoutError:
            return 'open'
    return 'closed'


# -- the cases -----------------------------------------------------------------------------

def random_bytes(rng: random.Random) -> bytes:
    size = rng.choice([rng.randrange(1, 24), rng.randrange(24, 512), rng.randrange(512, 8192)])
    garbage = rng.randbytes(size)
    if rng.random() < 0.3:  # get past the first bytes of the preface check now and then
        garbage = PREFACE[:rng.randrange(1, len(PREFACE))] + garbage
    return garbage


def bad_frames(rng: random.Random, echo) -> bytes:
    """A valid preface and SETTINGS, then something broken."""
    start = PREFACE + CLIENT_SETTINGS
    choice = rng.randrange(4)
    if choice == 0:     # a valid call, cut short anywhere
        call = grpc_call(1, ECHO, grpc_message(echo.pb.EchoRequest(text='cut').SerializeToString()))
        return start + call[:rng.randrange(len(call))]
    if choice == 1:     # a frame cut short: in its header, or before its payload is complete
        length = rng.randrange(1, 16384)
        header = struct.pack('>I', length)[1:] + bytes([rng.randrange(10), rng.randrange(256)])
        stream_id = struct.pack('>I', rng.randrange(2**32))
        if rng.random() < 0.2:
            return start + header + stream_id[:rng.randrange(4)]
        return start + header + stream_id + rng.randbytes(rng.randrange(length))
    if choice == 2:     # a complete frame of any type with a random payload
        return start + frame(rng.randrange(256), rng.randrange(256), rng.randrange(2**31),
                             rng.randbytes(rng.randrange(64)))
    # a HEADERS frame whose header block is garbage (HPACK decoding fails)
    return start + frame(HEADERS, END_STREAM | END_HEADERS, 1, rng.randbytes(rng.randrange(1, 128)))


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint."""
    out = bytearray()
    while value >= 0x80:
        out.append(0x80 | (value & 0x7f))
        value >>= 7
    out.append(value)
    return bytes(out)


def invalid_protobuf(rng: random.Random, message_type: type) -> bytes:
    """Bytes that ``message_type`` refuses to parse: a valid message, then a
    defect no parser may accept."""
    valid = b''
    if rng.random() < 0.5:
        if message_type is module_service_pb2.CommandRequest:
            valid = message_type(command=rng.choice(['ping', 'status', 'x' * rng.randrange(50)]),
                                 parameters={'k': 'v'}).SerializeToString()
        else:
            valid = message_type(text='t' * rng.randrange(50), payload=rng.randbytes(rng.randrange(50))
                                 ).SerializeToString()
    field = rng.randrange(1, 2**10)
    not_utf8 = rng.choice([b'\xff', b'\xc3\x28', b'a\xed\xa0\x80'])
    defects = [
        b'\x0a' + varint(len(not_utf8)) + not_utf8,                                 # field 1, a string, not UTF-8
        b'\x0a' + varint(rng.randrange(5, 1000)) + rng.randbytes(rng.randrange(4)),  # length beyond the end
        varint(field << 3) + b'\x80' * rng.randrange(1, 9),                          # varint cut short
        varint(field << 3 | rng.choice([6, 7])) + rng.randbytes(rng.randrange(8)),   # wire types 6 and 7
        b'\x00' + rng.randbytes(rng.randrange(4)),                                   # field number 0
        varint(field << 3 | 4),                                                      # end of a group never begun
        varint(field << 3) + b'\xff' * 10 + b'\x01',                                 # an 11-byte varint
    ]
    if message_type is module_service_pb2.CommandRequest:
        defects.append(b'\x12\x04\x0a\x02\xff\xfe')  # a map key that is not UTF-8
    return valid + rng.choice(defects)


def grpc_framing_defect(rng: random.Random, body: bytes) -> tuple[bytes, tuple[tuple[bytes, bytes], ...]]:
    """A gRPC message whose envelope is wrong around an already invalid body,
    and the extra headers that go with it."""
    choice = rng.randrange(4)
    if choice == 3:  # the request stream ends in the middle of the message
        return grpc_message(body, length=len(body) + 1 + rng.randrange(64)), ()
    if choice == 0:  # compressed, but no grpc-encoding
        return grpc_message(body, compressed=True), ()
    if choice == 1:  # "gzip" that is not gzip
        return grpc_message(body, compressed=True), ((b'grpc-encoding', b'gzip'),)
    return grpc_message(body) + grpc_message(body), ()  # two requests for a unary method


@dataclass
class FuzzReport:
    seed: int
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)
    statuses: dict[int | str, int] = field(default_factory=dict)
    bad_answers: list[str] = field(default_factory=list)

    def count(self, category: str, outcome: str) -> None:
        per = self.outcomes.setdefault(category, {})
        per[outcome] = per.get(outcome, 0) + 1

    def total(self, category: str) -> int:
        return sum(self.outcomes.get(category, {}).values())


def fuzz_invalid_calls(path: Path, rng: random.Random, echo, report: FuzzReport, calls: int) -> None:
    """``calls`` well-formed gRPC calls with invalid messages, as streams of one connection."""
    streams = {}
    with RawConnection(path) as connection:
        connection.send(PREFACE + CLIENT_SETTINGS)
        batch = b''
        for number in range(calls):
            stream = 2 * number + 1
            method, message_type = rng.choice([(ECHO, echo.pb.EchoRequest),
                                               (EXECUTE_COMMAND, module_service_pb2.CommandRequest)])
            body = invalid_protobuf(rng, message_type)
            try:
                message_type.FromString(body)
            except DecodeError:
                pass
            else:
                raise AssertionError(f'seed {report.seed}: case {body!r} parses; the generator is wrong')
            framing = rng.random() < 0.2
            envelope, headers = grpc_framing_defect(rng, body) if framing else (grpc_message(body), ())
            streams[stream] = ('framing' if framing else 'protobuf', method, body)
            batch += grpc_call(stream, method, envelope, *headers)
        connection.send(batch)
        results = connection.results(set(streams))
    for stream, (kind, method, body) in streams.items():
        result = results[stream]
        category = f'invalid {kind}'
        if not result.ended:
            report.count(category, 'no answer')
            report.bad_answers.append(f'{method} {body!r}: no answer')
            continue
        report.count(category, 'answered')
        # A server may reset a stream after its trailers; the status counts.
        status = result.grpc_status if result.grpc_status is not None else f'RST_STREAM {result.reset}'
        report.statuses[status] = report.statuses.get(status, 0) + 1
        if result.data or status == 0:
            report.bad_answers.append(f'{method} {body!r}: status {status}, data {result.data[:40]!r}, '
                                      f'headers {result.headers}')
        if kind == 'protobuf':
            report.count('decode status', f'{status} {result.grpc_message[:70]}')


# -- guarantee 5 ---------------------------------------------------------------------------

#: Cases per category when time allows, and the minimum that always runs.
TARGET = {'random bytes': 4000, 'bad frames': 4000, 'invalid calls': 8000}
MINIMUM = {'random bytes': 200, 'bad frames': 200, 'invalid calls': 400}
CALLS_PER_CONNECTION = 50


def test_garbage_on_the_wire_never_reaches_a_handler_and_the_server_stays_up(
        start_fault_server, socket_path: Path, echo) -> None:
    server, journal = start_fault_server(socket_path)
    seed = int(os.environ.get('VYRA_IPC_FUZZ_SEED', random.SystemRandom().randrange(2**32)))
    seconds = float(os.environ.get('VYRA_IPC_FUZZ_SECONDS', '20'))
    print(f'fuzz seed {seed} (replay with VYRA_IPC_FUZZ_SEED={seed})')
    rng = random.Random(seed)
    report = FuzzReport(seed)

    with SyncIPCHandler(socket_path, echo.Stub, timeout=LONG) as client:
        client.call_method('Echo', echo.pb.EchoRequest(text='alive 0'))
        fds_before = server_fds(server)
        deadline = time.monotonic() + seconds
        checks = 0
        for iteration in itertools.count():
            done = {'random bytes': report.total('random bytes'), 'bad frames': report.total('bad frames'),
                    'invalid calls': report.total('invalid protobuf') + report.total('invalid framing')}
            if all(done[c] >= TARGET[c] for c in TARGET):
                break
            if time.monotonic() > deadline and all(done[c] >= MINIMUM[c] for c in MINIMUM):
                break
            if done['random bytes'] < TARGET['random bytes']:
                report.count('random bytes', read_until_closed(socket_path, random_bytes(rng)))
            if done['bad frames'] < TARGET['bad frames']:
                report.count('bad frames', read_until_closed(socket_path, bad_frames(rng, echo)))
            if done['invalid calls'] < TARGET['invalid calls'] and iteration % 25 == 0:
                fuzz_invalid_calls(socket_path, rng, echo, report, CALLS_PER_CONNECTION)
            if iteration % 100 == 99:
                checks += 1
                assert server.popen.poll() is None, f'seed {seed}: server died:\n{server.log()}'
                reply = client.call_method('Echo', echo.pb.EchoRequest(text=f'alive {checks}'))
                assert reply.text == f'alive {checks}', f'seed {seed}'

        print(f'fuzz seed {seed}: {report.outcomes}')
        print(f'fuzz statuses: {report.statuses}')
        assert not report.bad_answers, f'seed {seed}: answered like a valid call:\n' + '\n'.join(
            report.bad_answers[:10])
        # Every invalid call got an answer: none was dropped silently.
        for kind in ('invalid protobuf', 'invalid framing'):
            assert report.outcomes.get(kind, {}).keys() <= {'answered'}, (seed, report.outcomes)
        # Afterwards: the server answers the client that was connected all along,
        # and a new one, and has closed every garbage connection.
        assert client.call_method('Echo', echo.pb.EchoRequest(text='after')).text == 'after'
    with SyncIPCHandler(socket_path, module_service_pb2_grpc.ModuleServiceStub, timeout=LONG) as module:
        reply = module.call_method('ExecuteCommand', module_service_pb2.CommandRequest(command='ping'))
        assert reply.result == 'pong'
    wait_for(lambda: server_fds(server) <= fds_before, 20,
             f'the server to close the garbage connections (fds {server_fds(server)}, before {fds_before})')
    assert server.popen.poll() is None

    # What the handlers saw: only the probes of this test, never garbage.
    seen = journal.events()
    echo_texts = [echo.pb.EchoRequest.FromString(data).text for _, method, data in seen if method == 'Echo']
    commands = [module_service_pb2.CommandRequest.FromString(data).command
                for _, method, data in seen if method == 'ExecuteCommand']
    assert echo_texts == [f'alive {i}' for i in range(checks + 1)] + ['after'], f'seed {seed}'
    assert commands == ['ping'], f'seed {seed}'
    assert {method for _, method, _ in seen} <= {'Echo', 'ExecuteCommand'}


def invalid_calls(rng: random.Random, echo, count: int) -> list[tuple[str, type, bytes]]:
    calls = []
    for _ in range(count):
        method, message_type = rng.choice([(ECHO, echo.pb.EchoRequest),
                                           (EXECUTE_COMMAND, module_service_pb2.CommandRequest)])
        calls.append((method, message_type, invalid_protobuf(rng, message_type)))
    return calls


def test_invalid_protobuf_is_answered_invalid_argument_naming_the_message_type(
        start_fault_server, socket_path: Path, echo) -> None:
    start_fault_server(socket_path)
    calls = invalid_calls(random.Random(4), echo, 40)
    with RawConnection(socket_path) as connection:
        connection.send(PREFACE + CLIENT_SETTINGS + b''.join(
            grpc_call(2 * number + 1, method, grpc_message(body))
            for number, (method, _, body) in enumerate(calls)))
        results = connection.results({2 * number + 1 for number in range(len(calls))})
    for number, (_, message_type, body) in enumerate(calls):
        result = results[2 * number + 1]
        assert result.grpc_status == grpc.StatusCode.INVALID_ARGUMENT.value[0], (body, result)
        assert message_type.DESCRIPTOR.full_name in result.grpc_message, (body, result)


#: A method of each tool every server serves, and its request message.
TOOLS = {
    '/grpc.health.v1.Health/Check': 'grpc.health.v1.HealthCheckRequest',
    '/grpc.health.v1.Health/Watch': 'grpc.health.v1.HealthCheckRequest',
    '/vyra.ipc.Introspection/GetStats': 'vyra.ipc.StatsRequest',
    '/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo': 'grpc.reflection.v1alpha.ServerReflectionRequest',
}


def test_a_request_to_a_tool_that_does_not_decode_is_invalid_argument_and_logs_nothing(
        server: ServerProcess) -> None:
    # Before: the tools were served as grpc.aio serves any servicer, UNKNOWN
    # "Unexpected <class 'DecodeError'>" with an ERROR and its traceback in
    # the server's log for each such request (any peer could fill the log),
    # where the fast lane answered INVALID_ARGUMENT as for a module's own service.
    with RawConnection(server.socket_path) as connection:
        connection.send(PREFACE + CLIENT_SETTINGS + b''.join(
            grpc_call(2 * number + 1, method, grpc_message(b'\xff\xff')) for number, method in enumerate(TOOLS)))
        results = connection.results({2 * number + 1 for number in range(len(TOOLS))})
    for number, (method, message_type) in enumerate(TOOLS.items()):
        result = results[2 * number + 1]
        assert result.grpc_status == grpc.StatusCode.INVALID_ARGUMENT.value[0], (method, result)
        assert result.grpc_message.startswith(f'{method}: the request is not a valid {message_type}'), result
    assert 'DecodeError' not in server.log(), server.log()


def send_unary_calls_without_a_complete_request(connection: RawConnection, method: str, body: bytes) -> None:
    """Calls 1 (headers and END_STREAM, no message) and 3 (a message one byte
    short), neither with a grpc-timeout header: no deadline ends them."""
    no_message = frame(HEADERS, END_HEADERS | END_STREAM, 1, grpc_request_headers(method))
    cut_short = grpc_call(3, method, grpc_message(body, length=len(body) + 1))
    connection.send(PREFACE + CLIENT_SETTINGS + no_message + cut_short)


def test_unary_calls_without_a_complete_request_hold_no_slot_of_maximum_concurrent_rpcs(
        start_fault_server, socket_path: Path, echo) -> None:
    # Before: grpc.aio's own limit counted them while they stayed open
    # (grpc.aio answered them with nothing), and with two of them a
    # connection held every slot of maximum_concurrent_rpcs=2 for as long as
    # it lived: every new call on the gRPC lane got RESOURCE_EXHAUSTED.
    _, journal = start_fault_server(socket_path, '--maximum-concurrent-rpcs', '2')
    with RawConnection(socket_path, timeout=10) as connection:
        send_unary_calls_without_a_complete_request(
            connection, ECHO, echo.pb.EchoRequest(text='cut short').SerializeToString())
        # A complete call after them on the connection: once it is answered
        # (served, or refused while their tasks still ran), the server has them.
        connection.send(grpc_call(5, ECHO, grpc_message(echo.pb.EchoRequest(text='after').SerializeToString())))
        assert connection.results({5})[5].ended
        with SyncIPCHandler(socket_path, echo.Stub, timeout=LONG, lane='grpc') as client:
            def served() -> bool:
                try:
                    return client.call_method('Echo', echo.pb.EchoRequest(text='x')).text == 'x'
                except IPCRemoteError as error:
                    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED, error
                    return False
            wait_for(served, LONG, 'a call on the gRPC lane served beside the two open ones')
    # Neither open call reached its handler: only the complete ones did.
    texts = {echo.pb.EchoRequest.FromString(data).text for _, _, data in journal.events()}
    assert texts in ({'x'}, {'after', 'x'}), texts


#: Methods that take one request, by handler shape: the server script, the
#: method, a request of it.
ONE_REQUEST_METHODS = {
    'async def': ('echo_server.py', ECHO, lambda pb: pb.EchoRequest(text='cut short')),
    'def': ('echo_server.py', '/vyra.ipc.test.EchoService/EchoSync', lambda pb: pb.EchoRequest(text='cut short')),
    'async generator': ('echo_server.py', '/vyra.ipc.test.EchoService/Count', lambda pb: pb.CountRequest(count=2)),
    'coroutine writing a stream': ('writer_server.py', '/vyra.ipc.test.WatchService/Watch',
                                   lambda pb: pb.WatchRequest(count=2)),
    'a tool (health)': ('echo_server.py', '/grpc.health.v1.Health/Check',
                        lambda pb: health_pb2.HealthCheckRequest(service='')),
}


@pytest.mark.parametrize('shape', ONE_REQUEST_METHODS)
def test_a_call_of_a_method_taking_one_request_that_never_sends_it_whole_is_answered_unimplemented(
        start_server, socket_path: Path, echo, shape: str) -> None:
    # Before: grpc.aio (_handle_unary_unary_rpc, _handle_unary_stream_rpc)
    # sent no status at all when the request stream of such a method ended
    # without a complete message (it took that for a cancellation): the call
    # stayed open until the client's deadline (none without grpc-timeout) or
    # the connection's end.
    script, path, request = ONE_REQUEST_METHODS[shape]
    body = request(echo.pb).SerializeToString()
    server = start_server(socket_path, script=script)
    with RawConnection(socket_path, timeout=10) as connection:
        send_unary_calls_without_a_complete_request(connection, path, body)
        results = connection.results({1, 3})  # waits up to the socket timeout for answers
        # The connection serves on: the same call, complete.
        connection.send(grpc_call(5, path, grpc_message(body)))
        after = connection.results({5})[5]
    for result in results.values():
        assert result.ended and result.grpc_status == grpc.StatusCode.UNIMPLEMENTED.value[0], results
        assert result.grpc_message == f'"{path}" requires exactly one request message.', results
    assert after.ended and after.grpc_status == 0, after
    assert 'ERROR' not in server.log(), server.log()


def test_a_unary_call_that_never_sends_its_request_whole_reaches_no_handler(
        start_fault_server, socket_path: Path, echo) -> None:
    _, journal = start_fault_server(socket_path)
    with RawConnection(socket_path, timeout=10) as connection:
        send_unary_calls_without_a_complete_request(
            connection, ECHO, echo.pb.EchoRequest(text='cut short').SerializeToString())
        assert all(result.ended for result in connection.results({1, 3}).values())
        connection.send(grpc_call(5, ECHO, grpc_message(echo.pb.EchoRequest(text='after').SerializeToString())))
        assert connection.results({5})[5].grpc_status == 0
    assert [(event, echo.pb.EchoRequest.FromString(data).text) for event, _, data in journal.events()] == [
        ('begin', 'after')]


def test_unary_calls_cancelled_before_their_request_are_let_go_without_an_error(
        start_fault_server, socket_path: Path, echo) -> None:
    # Reading the request of a method that takes one (above) must still take
    # a call its client cancels before sending it (RST_STREAM CANCEL) for
    # what it is, with nothing logged, as grpc.aio did: 100 of them, each
    # cancelled once a complete call after it was answered (so that its
    # handler is most likely waiting for the request by then).
    server, journal = start_fault_server(socket_path)
    body = grpc_message(echo.pb.EchoRequest(text='served').SerializeToString())
    with RawConnection(socket_path, timeout=10) as connection:
        connection.send(PREFACE + CLIENT_SETTINGS)
        for number in range(100):
            cancelled, served = 4 * number + 1, 4 * number + 3
            connection.send(frame(HEADERS, END_HEADERS, cancelled, grpc_request_headers(ECHO))
                            + grpc_call(served, ECHO, body))
            assert connection.results({served})[served].grpc_status == 0
            connection.send(frame(RST_STREAM, 0, cancelled, struct.pack('>I', CANCEL)))
        connection.send(grpc_call(401, ECHO, body))
        assert connection.results({401})[401].grpc_status == 0
    assert journal.count('begin', 'Echo') == 101
    assert server.stop() == 0
    assert not re.search(r'ERROR|WARNING|Traceback|Exception', server.log()), server.log()


# -- guarantee 6: oversized messages -------------------------------------------------------

#: The configured limit in these tests (the default is 16 MiB).
LIMIT = 64 * 1024


def echo_request_of_size(echo, size: int):
    """An EchoRequest whose serialized size is exactly ``size`` bytes."""
    for length in range(size - 6, size):
        request = echo.pb.EchoRequest(payload=b'x' * length)
        if request.ByteSize() == size:
            return request
    raise AssertionError(f'no EchoRequest of {size} bytes')


def collect_requests_for_reply_of_size(echo, size: int) -> Iterator:
    """Requests to ``Collect`` whose joined reply is exactly ``size`` bytes,
    while each request stays well under :data:`LIMIT`."""
    for length in range(size - 8, size):
        if echo.pb.EchoReply(text='a' * length, index=2).ByteSize() == size:
            first = length // 2
            return iter([echo.pb.EchoRequest(text='a' * first),
                         echo.pb.EchoRequest(text='a' * (length - first - 1))])
    raise AssertionError(f'no EchoReply of {size} bytes')


def call_in_turn(kind: str, path: Path, echo, method: str, requests: list,
                 **handler_kwargs: object) -> list[object]:
    """Make the calls one after another over one handler (one channel) of
    ``kind``; each outcome is the reply or the :class:`IPCError`."""
    outcomes: list[object] = []
    with handler_of(kind, path, echo.Stub, timeout=LONG, **handler_kwargs) as handler, handler as client:
        for request in requests:
            try:
                outcomes.append(client.call_method(method, request))
            except IPCError as error:
                outcomes.append(error)
    return outcomes


def assert_resource_exhausted(outcome: object, size: int, refused_by: type = IPCRemoteError) -> None:
    assert isinstance(outcome, refused_by), repr(outcome)
    assert outcome.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    # The message says how large the message was and what the limit is.
    assert str(size) in outcome.details and str(LIMIT) in outcome.details, outcome.details


@pytest.mark.parametrize('kind', ['sync', 'async'])
def test_request_one_byte_over_the_server_limit_is_resource_exhausted(
        start_fault_server, socket_path: Path, echo, kind: str, lane: str) -> None:
    server, journal = start_fault_server(socket_path, '--max-message-bytes', str(LIMIT))
    at_limit, over = echo_request_of_size(echo, LIMIT), echo_request_of_size(echo, LIMIT + 1)
    outcomes = call_in_turn(kind, socket_path, echo, 'Echo',
                            [at_limit, over, echo.pb.EchoRequest(text='after')], lane=lane)
    assert outcomes[0].payload == at_limit.payload
    assert_resource_exhausted(outcomes[1], LIMIT + 1)
    assert outcomes[2].text == 'after'  # the same channel, still usable
    # The handler saw the request at the limit and the next one, never the oversized one.
    assert [len(data) for _, _, data in journal.events()] == [LIMIT, len(b'\n\x05after')]
    assert server.popen.poll() is None


@pytest.mark.parametrize('kind', ['sync', 'async'])
def test_reply_one_byte_over_the_client_limit_is_resource_exhausted(
        start_server, socket_path: Path, echo, kind: str, lane: str) -> None:
    server = start_server(socket_path)  # the server's limit is the default 16 MiB
    outcomes = call_in_turn(kind, socket_path, echo, 'Collect', [
        collect_requests_for_reply_of_size(echo, LIMIT),
        collect_requests_for_reply_of_size(echo, LIMIT + 1),
        iter([echo.pb.EchoRequest(text='after')]),
    ], max_message_bytes=LIMIT, lane=lane)
    assert outcomes[0].ByteSize() == LIMIT
    assert_resource_exhausted(outcomes[1], LIMIT + 1)
    assert outcomes[2].text == 'after'
    assert server.popen.poll() is None


@pytest.mark.parametrize('kind', ['sync', 'async'])
def test_request_over_the_client_own_limit_is_refused_before_it_is_sent(
        start_fault_server, socket_path: Path, echo, kind: str, lane: str) -> None:
    _, journal = start_fault_server(socket_path)  # the server would accept it
    outcomes = call_in_turn(kind, socket_path, echo, 'Echo', [
        echo_request_of_size(echo, LIMIT + 1), echo.pb.EchoRequest(text='after')],
        max_message_bytes=LIMIT, lane=lane)
    # The client's own refusal, the same on both lanes: not a remote error.
    assert_resource_exhausted(outcomes[0], LIMIT + 1, refused_by=MessageTooLargeError)
    assert 'raise max_message_bytes on the client and the server' in str(outcomes[0])
    assert 'nothing was sent' in outcomes[0].details
    assert outcomes[1].text == 'after'
    assert [echo.pb.EchoRequest.FromString(data).text for _, _, data in journal.events()] == ['after']


@pytest.mark.asyncio
async def test_oversized_message_in_a_stream_ends_that_stream_only(
        start_fault_server, socket_path: Path, echo, lane: str) -> None:
    await asyncio.to_thread(start_fault_server, socket_path, '--max-message-bytes', str(LIMIT))
    requests = [echo.pb.EchoRequest(text='small'), echo_request_of_size(echo, LIMIT + 1),
                echo.pb.EchoRequest(text='never')]
    async with IPCHandler(socket_path, echo.Stub, timeout=LONG, lane=lane) as client:
        replies = []
        with pytest.raises(IPCRemoteError) as error:
            async for reply in client.stream_method('Chat', iter(requests)):
                replies.append(reply.text)
        assert replies in ([], ['SMALL'])  # the first reply may or may not beat the error
        assert_resource_exhausted(error.value, LIMIT + 1)
        assert (await client.call_method('Echo', echo.pb.EchoRequest(text='after'))).text == 'after'


def test_a_grpc_client_given_the_fast_lane_socket_is_turned_away_at_once_and_told_why(
        server: ServerProcess, echo) -> None:
    # The HTTP/2 preface read as a ttrpc header announces a 1.3 GB frame:
    # the server waited frame_timeout for it, saying nothing. It closes the
    # connection at once now, naming the mistake in its log (grpc's client
    # connects again and again until its deadline all the same).
    server.wait_serving(ttrpc=True)
    with pytest.raises(IPCError) as error:
        with SyncIPCHandler(server.ttrpc_path, echo.Stub, lane='grpc', timeout=2) as wrong:
            wrong.call_method('Echo', echo.pb.EchoRequest())
    assert error.value.code is grpc.StatusCode.UNAVAILABLE, error.value
    wait_for(lambda: 'an HTTP/2 (gRPC) client on the fast-lane socket: give it the gRPC socket' in server.log(),
             10, 'the server to name the mistake')
