"""``vyra-ipc`` (``python -m vyra_base_ipc``) as a real process against real
servers, on both lanes: list, describe, call, health, ping, stats, the
errors a user makes, servers that are gone or never answer; ``ros2 ipc``
where ros2cli is installed.

The CLI gets no generated code of the test protos (its PYTHONPATH is this
process's): every message type it handles comes from server reflection.
"""

from __future__ import annotations

import ast
import base64
from concurrent import futures
import contextlib
import importlib
import json
import os
from pathlib import Path
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

from google.protobuf import any_pb2, descriptor_pb2
import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
import pytest

from conftest import ServerProcess, StartServer, make_stale_socket, wait_for
from vyra_base_ipc.cli._messages import detail_json

REPO = Path(__file__).resolve().parent.parent
EXECUTE = 'vyra.ipc.ModuleService/ExecuteCommand'
PING = '{"command": "ping"}'


def cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """``python -m vyra_base_ipc ARGS`` to its end (at most 60 s)."""
    return subprocess.run([sys.executable, '-m', 'vyra_base_ipc', *args], input=stdin, env=env,
                          capture_output=True, text=True, timeout=60)


def ok(*args: str, **options: Any) -> str:
    """``cli(...)``'s output; the test fails with its stderr unless it exited 0."""
    result = cli(*args, **options)
    assert result.returncode == 0, result.stderr
    return result.stdout


def fails(status: int, *args: str, **options: Any) -> str:
    """The one line ``cli(...)`` wrote to stderr, after checking it exited with
    ``status`` and wrote nothing else."""
    result = cli(*args, **options)
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and not result.stdout, result.stderr
    return lines[0]


def documents(text: str) -> list[Any]:
    """The JSON documents of ``text``, one after the other."""
    decoder, found, index = json.JSONDecoder(), [], 0
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        document, index = decoder.raw_decode(text, index)
        found.append(document)
    return found


def fits(text: str) -> bool:
    return all(len(line) <= 80 for line in text.splitlines())


@pytest.fixture(scope='module')
def demo(start_module_server: StartServer, module_socket_dir: Path) -> ServerProcess:
    """One test server (ModuleService, BackendService, the test services) on
    both lanes, as module ``demo`` would have it: ``demo_ipc.sock`` and
    ``demo_ipc.ttrpc.sock``."""
    return start_module_server(module_socket_dir / 'demo_ipc.sock', wait=False).wait_serving(ttrpc=True)


@pytest.fixture
def fresh(start_server: StartServer, socket_path: Path) -> ServerProcess:
    """A server of this test alone (for counts from zero)."""
    return start_server(socket_path, wait=False).wait_serving(ttrpc=True)


@pytest.fixture
def silent(socket_dir: Path) -> Iterator[Path]:
    """A socket whose 'server' accepts connections (the kernel does) and never answers."""
    with socket.socket(socket.AF_UNIX) as listening:
        path = socket_dir / 'silent_ipc.sock'
        listening.bind(str(path))
        listening.listen(64)
        yield path


# -- list -----------------------------------------------------------------------------


def test_list_shows_a_serving_server_and_a_stale_socket(demo: ServerProcess, module_socket_dir: Path,
                                                         socket_dir: Path) -> None:
    make_stale_socket(socket_dir / 'crashed_ipc.sock')
    text = ok('list', str(module_socket_dir), str(socket_dir))
    header, *rows = text.splitlines()
    assert header.split()[:4] == ['MODULE', 'STATE', 'PID', 'UID'] and fits(text), text
    serving = next(index for index, row in enumerate(rows) if row.startswith('demo '))
    assert rows[serving].split()[:4] == ['demo', 'serving', str(demo.pid), str(os.getuid())]
    assert rows[serving].endswith(str(demo.socket_path))
    assert rows[serving + 1].strip() == str(demo.ttrpc_path)
    assert 'vyra.ipc.ModuleService' in text and 'vyra.ipc.BackendService' in text
    assert next(row for row in rows if row.startswith('crashed ')).split()[:3] == ['crashed', 'stale', '-']

    listed = {entry['socket_path']: entry for entry in json.loads(ok('list', str(module_socket_dir),
                                                                     str(socket_dir), '--json'))}
    entry = listed[str(demo.socket_path)]
    assert (entry['module'], entry['state'], entry['pid'], entry['uid']) == ('demo', 'serving', demo.pid,
                                                                             os.getuid())
    assert entry['ttrpc_socket_path'] == str(demo.ttrpc_path)
    assert {'vyra.ipc.ModuleService', 'vyra.ipc.BackendService'} <= set(entry['services'])
    assert not {'grpc.health.v1.Health', 'vyra.ipc.Introspection'} & set(entry['services'])
    assert listed[str(socket_dir / 'crashed_ipc.sock')]['state'] == 'stale'
    assert listed[str(socket_dir / 'crashed_ipc.sock')]['pid'] is None


def test_list_does_not_wait_for_a_server_that_never_answers(silent: Path) -> None:
    (entry,) = json.loads(ok('list', str(silent.parent), '--json'))
    assert (entry['state'], entry['pid'], entry['detail']) == ('no answer', os.getpid(), 'within 1 s')


@contextlib.contextmanager
def answering(path: Path, greeting: bytes, then_close: bool) -> Iterator[Path]:
    """A socket whose server answers every connection with ``greeting`` (another protocol than
    gRPC's), then closes it or keeps it open."""
    kept: list[socket.socket] = []
    stop = threading.Event()

    def serve(listening: socket.socket) -> None:
        while not stop.is_set():
            try:
                connection, _ = listening.accept()
            except TimeoutError:
                continue
            with contextlib.suppress(OSError):
                connection.sendall(greeting)
                if then_close:
                    # As an HTTP server ends a connection it answered 400: its side first, reading
                    # on until the client goes. A close() at once made the client's next write fail
                    # (EPIPE) before it read the answer, now and then: 'unreachable'.
                    connection.shutdown(socket.SHUT_WR)
                    connection.settimeout(5)
                    while connection.recv(65536):
                        pass
            connection.close() if then_close else kept.append(connection)
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(path))
        listening.listen(64)
        listening.settimeout(0.1)
        server = threading.Thread(target=serve, args=(listening,))
        server.start()
        try:
            yield path
        finally:
            stop.set()
            server.join(10)
            for connection in kept:
                connection.close()


def test_list_names_a_socket_that_answers_in_another_protocol(socket_dir: Path) -> None:
    # Found: a socket whose server answered at once, but not in HTTP/2, was listed as
    # "no answer: within 1 s", as if it had said nothing.
    with answering(socket_dir / 'web_ipc.sock', b'HTTP/1.1 400 Bad Request\r\n\r\n', then_close=True), \
            answering(socket_dir / 'ssh_ipc.sock', b'SSH-2.0-OpenSSH_9.2\r\n', then_close=False):
        listed = {entry['module']: entry for entry in json.loads(ok('list', str(socket_dir), '--json'))}
    for module in ('web', 'ssh'):
        assert (listed[module]['state'], listed[module]['pid']) == ('not gRPC', os.getpid()), listed
        assert listed[module]['detail'].startswith('it answered in another protocol than HTTP/2: '), listed


def test_list_of_a_directory_it_cannot_read_says_which(socket_dir: Path) -> None:
    assert fails(1, 'list', str(socket_dir / 'nope')) == \
        f'vyra-ipc: cannot list {socket_dir / "nope"}: No such file or directory'  # (no '[Errno 2] ')


# -- describe -------------------------------------------------------------------------


def test_describe_prints_the_services_and_their_methods_call_shapes(demo: ServerProcess) -> None:
    text = ok('describe', str(demo.socket_path))
    assert 'service vyra.ipc.ModuleService {' in text and 'service vyra.ipc.BackendService {' in text
    # Each rpc with its shape as a comment beside it, or above it where that would not fit.
    lines, shape = [], ''
    for line in text.splitlines():
        code, _, comment = line.strip().partition('//')
        if code.startswith('rpc '):
            lines.append(f'{code.strip()} // {comment.strip() or shape}')
        shape = comment.strip()
    for expected in (
        'rpc Initialize(InitRequest) returns (InitResponse); // unary',
        'rpc ExecuteCommand(CommandRequest) returns (CommandResponse); // unary',
        'rpc GetData(DataRequest) returns (DataResponse); // unary',
        'rpc GetStatus(StatusRequest) returns (StatusResponse); // unary',
        'rpc ProcessData(DataRequest) returns (DataResponse); // unary',
        'rpc Count(CountRequest) returns (stream EchoReply); // server streaming',
        'rpc Collect(stream EchoRequest) returns (EchoReply); // client streaming',
        'rpc Chat(stream EchoRequest) returns (stream EchoReply); // bidirectional streaming',
    ):
        assert expected in lines, text
    assert 'grpc.health.v1' not in text and 'Introspection' not in text  # the tools' own services
    assert fits(text), text


def test_describe_a_method_prints_its_messages(demo: ServerProcess) -> None:
    text = ok('describe', str(demo.socket_path), EXECUTE)
    assert 'rpc ExecuteCommand(CommandRequest) returns (CommandResponse);  // unary' in text
    assert ('message vyra.ipc.CommandRequest {\n  string command = 1;\n'
            '  map<string, string> parameters = 2;\n}') in text
    assert 'message vyra.ipc.CommandResponse {' in text and '  int32 status_code = 1;' in text
    health = ok('describe', str(demo.socket_path), 'grpc.health.v1.Health/Check')
    assert '  HealthCheckResponse.ServingStatus status = 1;' in health  # enums, by their relative name
    assert 'enum grpc.health.v1.HealthCheckResponse.ServingStatus {' in health and 'SERVING = 1;' in health


def test_describe_as_json(demo: ServerProcess) -> None:
    whole = json.loads(ok('describe', str(demo.socket_path), '--json'))
    services = {service['name']: service for service in whole['services']}
    assert [method['name'] for method in services['vyra.ipc.ModuleService']['methods']] == \
        ['Initialize', 'ExecuteCommand', 'GetData']
    echo = services['vyra.ipc.test.EchoService']['methods']
    chat = next(method for method in echo if method['name'] == 'Chat')
    assert (chat['shape'], chat['client_streaming'], chat['server_streaming']) == \
        ('bidirectional streaming', True, True)
    method = json.loads(ok('describe', str(demo.socket_path), EXECUTE, '--json'))
    assert method['methods'][0]['path'] == '/' + EXECUTE
    request = next(item for item in method['types'] if item['name'] == 'vyra.ipc.CommandRequest')
    assert [(field['name'], field['type']) for field in request['fields']] == \
        [('command', 'string'), ('parameters', 'map<string, string>')]


def test_describe_an_unknown_symbol_lists_what_there_is(demo: ServerProcess) -> None:
    line = fails(2, 'describe', str(demo.socket_path), 'vyra.ipc.Nope')
    assert "no service, method or message 'vyra.ipc.Nope'" in line and 'vyra.ipc.ModuleService' in line
    line = fails(2, 'describe', str(demo.socket_path), 'vyra.ipc.ModuleService/Nope')
    assert line.endswith("vyra.ipc.ModuleService has no method 'Nope'; "
                         'it has: Initialize, ExecuteCommand, GetData')


# -- call -----------------------------------------------------------------------------


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_call_prints_the_answer_as_json_on_either_lane(demo: ServerProcess, lane: str) -> None:
    answer = json.loads(ok('call', str(demo.socket_path), EXECUTE, PING, '--lane', lane))
    assert answer == {'result': 'pong', 'status_code': 0}
    # The lane is the one asked for: only the fast lane tells a handler who called.
    seen = json.loads(ok('call', str(demo.socket_path), 'vyra.ipc.test.EchoService/Inspect', '{}',
                         '--lane', lane))
    assert seen['has_peer'] is (lane == 'ttrpc')


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_buffer_answered_in_shared_memory_is_shown_with_its_bytes(demo: ServerProcess, lane: str) -> None:
    # Mirror copies the buffer into one of its own: on the fast lane it comes as shared memory,
    # which the JSON showed as an empty inline_data (the bytes lost), on the gRPC lane inline.
    payload = os.urandom(3000)
    request = json.dumps({'data': {'inline_data': base64.b64encode(payload).decode()}, 'copy': True})
    answer = json.loads(ok('call', str(demo.socket_path), 'vyra.ipc.test.EchoService/Mirror', request, '--lane', lane))
    assert (base64.b64decode(answer['data']['inline_data']), answer['data']['size']) == (payload, '3000')


def test_with_the_fast_lane_off_a_fast_lane_call_fails_and_says_why(start_server: StartServer,
                                                                     socket_path: Path) -> None:
    server = start_server(socket_path, '--no-ttrpc')
    answer = json.loads(ok('call', str(server.socket_path), EXECUTE, PING, '--lane', 'grpc'))
    assert answer['result'] == 'pong'
    line = fails(1, 'call', str(server.socket_path), EXECUTE, PING, '--lane', 'ttrpc')
    assert line.startswith('vyra-ipc: UNAVAILABLE: ') and str(server.ttrpc_path) in line


def test_call_streams_one_document_per_message_and_reads_stdin_and_files(demo: ServerProcess,
                                                                        tmp_path: Path) -> None:
    counted = documents(ok('call', str(demo.socket_path), 'vyra.ipc.test.EchoService/Count', '-',
                           '--timeout', '0', stdin='count: 3'))
    assert [document['text'] for document in counted] == ['item 0', 'item 1', 'item 2']
    assert len({tuple(document) for document in counted}) == 1  # the same keys, in the same order
    request = tmp_path / 'request.yaml'
    request.write_text('command: ping\n')
    assert json.loads(ok('call', str(demo.socket_path), EXECUTE, f'@{request}'))['result'] == 'pong'
    collected = json.loads(ok('call', str(demo.socket_path), 'vyra.ipc.test.EchoService/Collect',
                              '[{"text": "a"}, {"text": "b"}]'))
    assert (collected['text'], collected['index']) == ('a,b', 2)
    chat = documents(ok('call', str(demo.socket_path), 'vyra.ipc.test.EchoService/Chat',
                        '[{text: x}, {text: y}]'))
    assert [document['text'] for document in chat] == ['X', 'Y']


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_stream_past_its_timeout_says_how_to_go_without_one(demo: ServerProcess, lane: str) -> None:
    result = cli('call', str(demo.socket_path), 'vyra.ipc.test.WatchService/Watch', 'interval: 0.2',
                 '--timeout', '1', '--lane', lane)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result
    # It named the client's API (stream_method(..., timeout=None)), not the option of this command.
    assert result.stderr.startswith('vyra-ipc: DEADLINE_EXCEEDED: the stream from ') and result.stderr.endswith(
        'did not end within --timeout 1 s (Deadline Exceeded; --timeout 0: a stream without one)\n'), \
        result.stderr
    events = documents(result.stdout)  # those that came before, as they came
    assert [event['index'] for event in events] == list(range(len(events)))


def test_call_sends_the_metadata_given_on_either_lane(start_server: StartServer, socket_dir: Path) -> None:
    # The probing server answers Echo('metadata') with the metadata it received.
    server = start_server(socket_dir / 'probe_ipc.sock', str(socket_dir / 'other.sock'),
                          script='ttrpc_server.py', wait=False).wait_serving(ttrpc=True)
    for lane in ('grpc', 'ttrpc'):
        answer = json.loads(ok('call', str(server.socket_path), 'vyra.ipc.test.EchoService/Echo',
                               '{"text": "metadata"}', '--metadata', 'X-Trace=abc', '-m', 'tenant=a=b',
                               '-m', 'token-bin=aGVsbG8=', '-m', 'raw-bin=_-8', '--lane', lane))
        received = json.loads(answer['text'])
        assert ['x-trace', 'abc'] in received and ['tenant', 'a=b'] in received, (lane, received)
        # A -bin value is base64 (either alphabet, padding optional), as grpcurl takes it; the
        # server saw the bytes (in hex here), not the text given.
        assert ['token-bin', b'hello'.hex()] in received and ['raw-bin', 'ffef'] in received, (lane, received)
    assert fails(2, 'call', str(server.socket_path), 'vyra.ipc.test.EchoService/Echo', '{}', '-m', 'k-bin=no!') == \
        """vyra-ipc: error: --metadata: the value of 'k-bin' (a key ending in "-bin" carries bytes) must be """ \
        "base64, not 'no!'"


@pytest.mark.parametrize('request_text, message', [
    ('{"command": ', 'the request is not valid JSON: Expecting value: line 1 column 13'),
    ('command: [ping', "the request is neither JSON nor YAML: expected ',' or ']'"),
    ('{"comand": "ping"}', 'has no field named "comand"'),
    ('{"command": 5}', 'the request is not a vyra.ipc.CommandRequest: Failed to parse command field'),
    ('[1, 2]', 'the request must be an object of vyra.ipc.CommandRequest fields, not [1, 2]'),
    # A key given twice: json and PyYAML kept the last one, and the call went out with it.
    ('{"command": "ping", "command": "stop"}', "the request gives the key 'command' twice"),
    ('command: ping\nparameters: {a: b, a: c}', "the request gives the key 'a' (line 2, column 20) twice"),
    # Nested deeper than Python's recursion limit: json's and PyYAML's RecursionError was a traceback.
    ('[' * 50000, 'the request is nested too deeply to read'),
    ('- ' * 5000 + 'x', 'the request is nested too deeply to read'),
])
def test_a_bad_request_is_named_and_exits_2(demo: ServerProcess, request_text: str, message: str) -> None:
    line = fails(2, 'call', str(demo.socket_path), EXECUTE, request_text)
    assert line.startswith('vyra-ipc: error: ') and message in line, line


def test_a_request_that_is_no_object_is_shown_only_in_part(demo: ServerProcess) -> None:
    # 1 KB of YAML aliases is a list of a million strings: the error showed all of it (megabytes
    # on one line; with a few aliases more, gigabytes of memory and no end).
    aliases = ['- &a0 [x, x, x, x, x, x, x, x, x, x]']
    aliases += [f'- &a{level} [{", ".join([f"*a{level - 1}"] * 10)}]' for level in range(1, 6)]
    line = fails(2, 'call', str(demo.socket_path), EXECUTE, '\n'.join(aliases))
    assert line.startswith('vyra-ipc: error: the request must be an object of vyra.ipc.CommandRequest fields, '
                           'not [["x", "x", "x"'), line[:300]
    assert len(line) < 400 and line.endswith('…'), len(line)


def test_a_yaml_merge_key_may_be_overridden(demo: ServerProcess) -> None:
    answer = ok('call', str(demo.socket_path), EXECUTE, '<<: {command: stop}\ncommand: ping')
    assert json.loads(answer)['result'] == 'pong'


def test_a_request_that_is_not_utf8_or_has_no_stdin_names_where_it_came_from(demo: ServerProcess,
                                                                           tmp_path: Path) -> None:
    path, latin1 = str(demo.socket_path), 'command: p\xe9ng\n'.encode('latin-1')
    request = tmp_path / 'latin1.yaml'
    request.write_bytes(latin1)
    assert fails(2, 'call', path, EXECUTE, f'@{request}') == \
        f'vyra-ipc: error: the request from {request} is not UTF-8 text: byte 0xe9 at offset 10'
    piped = subprocess.run([sys.executable, '-m', 'vyra_base_ipc', 'call', path, EXECUTE, '-'], input=latin1,
                           capture_output=True, timeout=60)
    assert (piped.returncode, piped.stderr.decode()) == \
        (2, 'vyra-ipc: error: the request from stdin is not UTF-8 text: byte 0xe9 at offset 10\n')
    # Started with its stdin closed, '-' has nothing to read (it was an AttributeError's traceback).
    closed = subprocess.run(['sh', '-c', 'exec "$0" "$@" <&-', sys.executable, '-m', 'vyra_base_ipc', 'call', path,
                             EXECUTE, '-'], capture_output=True, text=True, timeout=60)
    assert (closed.returncode, closed.stderr) == \
        (2, "vyra-ipc: error: '-' reads the request from stdin, but there is no stdin (it is closed)\n")
    assert fails(2, 'call', path, EXECUTE, '@') == \
        'vyra-ipc: error: @FILE reads the request from a file: give its name after the @'


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_failed_call_shows_the_status_details_the_server_sent_one_line_each(demo: ServerProcess, lane: str) -> None:
    # As grpcurl shows them: the google.rpc types known here, as JSON with their "@type".
    result = cli('call', str(demo.socket_path), 'vyra.ipc.test.StatusService/Misbehave',
                 '{"how": "abort-with-rich-status"}', '--lane', lane)
    assert (result.returncode, result.stdout) == (1, '')
    code, *details = result.stderr.splitlines()
    assert code == 'vyra-ipc: INVALID_ARGUMENT: rich status'
    assert [json.loads(line.removeprefix('vyra-ipc: detail: ')) for line in details] == [
        {'@type': 'type.googleapis.com/google.rpc.BadRequest',
         'field_violations': [{'field': 'how', 'description': 'asked to fail'}]},
        {'@type': 'type.googleapis.com/google.rpc.ErrorInfo', 'reason': 'ASKED', 'domain': 'vyra.ipc.test',
         'metadata': {'k': 'ü'}}]
    assert all(line.startswith('vyra-ipc: detail: {') for line in details), details


def test_a_status_detail_of_a_type_unknown_here_shows_its_type_and_bytes() -> None:
    unknown = any_pb2.Any(type_url='type.googleapis.com/my_arm.JointFault', value=b'\x08\x03')
    assert json.loads(detail_json(unknown)) == {'@type': 'type.googleapis.com/my_arm.JointFault', 'value': 'CAM='}
    garbled = any_pb2.Any(type_url='type.googleapis.com/google.rpc.ErrorInfo', value=b'\xff\xff')
    assert json.loads(detail_json(garbled)) == {'@type': 'type.googleapis.com/google.rpc.ErrorInfo',
                                                'value': base64.b64encode(b'\xff\xff').decode()}


def test_unknown_methods_bad_options_and_failed_calls_say_so(demo: ServerProcess, tmp_path: Path) -> None:
    path = str(demo.socket_path)
    assert fails(2, 'call', path, 'vyra.ipc.ModuleService/Execute', '{}').endswith(
        "vyra.ipc.ModuleService has no method 'Execute'; it has: Initialize, ExecuteCommand, GetData")
    assert "the server has no service 'vyra.ipc.Nope'; it has: grpc.health.v1.Health" in \
        fails(2, 'call', path, 'vyra.ipc.Nope/Run', '{}')
    assert fails(1, 'call', path, 'vyra.ipc.ModuleService/GetData', '{"key": "nope"}') == \
        "vyra-ipc: NOT_FOUND: no data item 'nope'; available: config, status"
    assert 'cannot read the request from ' + str(tmp_path / 'none.json') in \
        fails(2, 'call', path, EXECUTE, f'@{tmp_path / "none.json"}')
    assert "--metadata takes KEY=VALUE, not 'trace'" in fails(2, 'call', path, EXECUTE, PING, '-m', 'trace')
    assert "--metadata: metadata value of 'k' must be printable ASCII" in \
        fails(2, 'call', path, EXECUTE, PING, '-m', 'k=v\u00e9', '--lane', 'grpc')
    assert 'only for methods that stream their answers; ExecuteCommand answers once' in \
        fails(2, 'call', path, EXECUTE, PING, '--timeout', '0')
    assert 'must be more than 0 seconds' in cli('ping', path, '--timeout', '0').stderr
    # Past 2**63 ns grpc gave up at once, and the CLI said the server had not answered within 1e+10 s.
    assert 'must be a finite number of seconds >= 0 and at most 1e+09, not 1e10' in \
        cli('ping', path, '--timeout', '1e10').stderr


def test_a_service_without_its_method_or_a_method_without_its_service_says_what_to_give(
        demo: ServerProcess) -> None:
    # Both were "the server has no service 'vyra.ipc'" (or ''): the name split at its last dot.
    path = str(demo.socket_path)
    assert fails(2, 'call', path, 'vyra.ipc.ModuleService', PING) == (
        'vyra-ipc: error: vyra.ipc.ModuleService is a service; give SERVICE/METHOD, one of: '
        'vyra.ipc.ModuleService/Initialize, vyra.ipc.ModuleService/ExecuteCommand, vyra.ipc.ModuleService/GetData')
    assert fails(2, 'call', path, 'ExecuteCommand', PING) == \
        "vyra-ipc: error: 'ExecuteCommand' names no service; give SERVICE/METHOD: " + EXECUTE
    assert fails(2, 'call', path, 'Nope', PING).startswith(
        "vyra-ipc: error: 'Nope' names no service; give SERVICE/METHOD; the server has: grpc.health.v1.Health, ")
    assert json.loads(ok('call', path, EXECUTE.replace('/', '.'), PING))['result'] == 'pong'


def test_a_missing_or_stale_server_is_named(socket_dir: Path) -> None:
    missing = socket_dir / 'gone_ipc.sock'
    assert fails(1, 'call', str(missing), EXECUTE, PING) == \
        f"vyra-ipc: UNAVAILABLE: socket '{missing}' does not exist (is the IPC server running?)"
    make_stale_socket(missing)
    for verb in (('call', str(missing), EXECUTE, PING), ('describe', str(missing)), ('health', str(missing)),
                 ('stats', str(missing))):
        assert f"no server answers on '{missing}': the socket file is there but no server is listening" in \
            fails(1, *verb)


def test_a_fast_lane_socket_given_as_target_is_refused_naming_the_grpc_socket(demo: ServerProcess) -> None:
    # Every verb begins on the gRPC lane (reflection, health, stats), which a
    # fast lane's socket does not speak: it would only say it closed.
    fast, grpc_path = demo.ttrpc_path, demo.socket_path
    for verb in (('describe',), ('call', EXECUTE, PING), ('health',), ('ping', '--count', '1'), ('stats',)):
        assert fails(2, verb[0], str(fast), *verb[1:]) == (
            f"vyra-ipc: error: '{fast}' is the socket of a fast lane; give the gRPC socket, '{grpc_path}' "
            '(--lane ttrpc calls the fast lane beside it)')


@pytest.mark.parametrize('verb', [('describe',), ('call', EXECUTE, PING),
                                  ('call', EXECUTE, PING, '--lane', 'ttrpc'), ('health',), ('stats',)])
def test_no_command_waits_for_a_server_that_never_answers(silent: Path, verb: tuple[str, ...]) -> None:
    line = fails(1, verb[0], str(silent), *verb[1:], '--timeout', '1')
    assert line.startswith(('vyra-ipc: DEADLINE_EXCEEDED: ', 'vyra-ipc: UNAVAILABLE: ')), line
    assert str(silent) in line


def test_call_takes_messages_as_large_as_the_server_allows_when_told(
        start_server: StartServer, socket_dir: Path, tmp_path: Path) -> None:
    path = socket_dir / 'large_ipc.sock'
    start_server(path, '--max-message-bytes', str(24 << 20), wait=False).wait_serving(ttrpc=True)
    payload = os.urandom(17 << 20)  # beyond the 16 MiB a client allows by default
    request = tmp_path / 'large.json'
    request.write_text(json.dumps({'payload': base64.b64encode(payload).decode()}))
    echo = 'vyra.ipc.test.EchoService/Echo'
    line = fails(1, 'call', str(path), echo, f'@{request}', '--lane', 'grpc')
    assert line.startswith('vyra-ipc: RESOURCE_EXHAUSTED: the request is 17825797 bytes, over '
                           'max_message_bytes (16777216)'), line
    for lane in ('grpc', 'ttrpc'):
        answer = json.loads(ok('call', str(path), echo, f'@{request}', '--lane', lane,
                               '--max-message-bytes', str(24 << 20)))
        assert base64.b64decode(answer['payload']) == payload
    assert 'must be a number of bytes from 1 to 2147483647' in cli('call', str(path), echo,
                                                                 '--max-message-bytes', '0').stderr


def _descriptor_of(kind: str) -> bytes:
    """What a broken server sends as the file of service x.Y."""
    if kind == 'garbage':
        return b'\xff\xff\xff not a FileDescriptorProto'
    if kind == 'depends-on-itself':  # upb's pool recursed on it until the C stack overflowed: SIGSEGV
        file = descriptor_pb2.FileDescriptorProto(name='broken.proto', package='x', dependency=['broken.proto'])
        file.message_type.add(name='Request')
        file.service.add(name='Y').method.add(name='M', input_type='.x.Request', output_type='.x.Request')
        return file.SerializeToString()
    file = descriptor_pb2.FileDescriptorProto(name='broken.proto', package='x', dependency=['missing.proto'])
    file.message_type.add(name='Request').field.add(name='part', number=1, type=11, label=1,
                                                    type_name='.elsewhere.Missing')
    file.service.add(name='Y').method.add(name='M', input_type='.x.Request', output_type='.x.Request')
    return file.SerializeToString()


@contextlib.contextmanager
def describing(path: Path, services: list[str], file: bytes, answers: str = 'files', delay: float = 0.0,
               methods: dict[str, Any] | None = None) -> Iterator[Path]:
    """A gRPC server (in this process) on ``path``, serving, whose reflection
    lists ``services`` and answers every other question with ``file`` (a
    serialized FileDescriptorProto, made by hand: anything a server may send);
    with ``answers`` 'error' every question with error 13 instead, with
    'nothing' none (its stream ends). Each answer waits ``delay`` seconds
    first. ``methods`` serves service x.Y's methods: name -> handler of
    serialized requests, returning serialized answers."""
    def reflect(requests: Any, context: Any) -> Iterator[Any]:
        for asked in requests:
            time.sleep(delay)  # (a slow server, where a test asks for one)
            answer = reflection_pb2.ServerReflectionResponse(original_request=asked)
            if answers == 'nothing':
                return
            if answers == 'error':
                answer.error_response.error_code, answer.error_response.error_message = 13, 'broken'
            elif asked.HasField('list_services'):
                for name in services:
                    answer.list_services_response.service.add(name=name)
            else:
                answer.file_descriptor_response.file_descriptor_proto.append(file)
            yield answer
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        'grpc.reflection.v1alpha.ServerReflection', {'ServerReflectionInfo': grpc.stream_stream_rpc_method_handler(
            reflect, reflection_pb2.ServerReflectionRequest.FromString,
            reflection_pb2.ServerReflectionResponse.SerializeToString)}),))
    if methods:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler('x.Y', {
            name: grpc.unary_unary_rpc_method_handler(handler) for name, handler in methods.items()}),))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(f'unix:{path}')
    server.start()
    try:
        yield path
    finally:
        server.stop(None)


def test_names_and_messages_from_servers_and_socket_files_are_shown_escaped(socket_dir: Path) -> None:
    # Found: a socket file's name, the services and files a server named, and its error
    # messages were written raw: an escape sequence in one retitled, cleared or recoloured
    # the terminal of whoever ran vyra-ipc, and a bidi override reordered what followed.
    evil = '\x1b]0;owned\x07\x1b[2J\u202e'
    shown = '\\u001b]0;owned\\u0007\\u001b[2J\\u202e'
    file = descriptor_pb2.FileDescriptorProto(name=f'x{evil}.proto', package='x', syntax='proto3')
    file.message_type.add(name='R')
    file.service.add(name='Y').method.add(name='M', input_type='.x.R', output_type='.x.R')

    def refuse(request: bytes, context: Any) -> bytes:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, f'no {evil} way')
    with describing(socket_dir / f'e{evil}_ipc.sock', ['x.Y', f'y{evil}'], file.SerializeToString(),
                    methods={'M': refuse}) as path:
        listed = ok('list', str(socket_dir))
        described = ok('describe', str(path), 'x.Y', '--timeout', '10')
        refused = fails(1, 'call', str(path), 'x.Y/M', '{}', '--timeout', '10', '--lane', 'grpc')
        as_json = json.loads(ok('list', str(socket_dir), '--json'))
    for text in (listed, described, refused):
        assert not set(text) & {'\x1b', '\x07', '\u202e'}, repr(text)
    assert f'e{shown}_ipc.sock' in listed and f'y{shown}' in listed, listed
    assert f'// x{shown}.proto' in described, described
    assert refused == f'vyra-ipc: FAILED_PRECONDITION: no {shown} way', refused
    # In JSON the escapes are JSON's: the names read back as they are.
    assert as_json[0]['socket_path'] == str(path) and f'y{evil}' in as_json[0]['services'], as_json


@pytest.fixture(params=['garbage', 'missing-dependency', 'depends-on-itself'])
def misdescribed(request: pytest.FixtureRequest, socket_dir: Path) -> Iterator[tuple[Path, str]]:
    """A server whose reflection lists service x.Y, then describes it with a
    file that does not parse, or that needs a file it never sends; with the
    error protobuf then raises."""
    with describing(socket_dir / 'broken_ipc.sock', ['x.Y'], _descriptor_of(request.param)) as path:
        yield path, {'garbage': 'DecodeError', 'missing-dependency': 'TypeError',
                     'depends-on-itself': 'TypeError: its files depend on themselves'}[request.param]


def test_a_server_describing_itself_with_unusable_descriptors_is_named_without_a_traceback(
        misdescribed: tuple[Path, str]) -> None:
    path, error = misdescribed
    for verb in (('describe',), ('describe', 'x.Y'), ('call', 'x.Y/M', '{}')):
        line = fails(1, verb[0], str(path), *verb[1:], '--timeout', '10')
        assert line.startswith('vyra-ipc: INTERNAL: the server described x.Y with descriptors that cannot be '
                               f'used (server reflection): {error}: '), line


@pytest.mark.parametrize(('answers', 'details'), [
    ('error', 'it answered with error 13: broken'),
    ('nothing', 'the server ended the reflection stream without an answer to the question asked'),
])
def test_a_server_whose_reflection_answers_an_error_or_nothing_is_named_and_listed(
        socket_dir: Path, answers: str, details: str) -> None:
    # grpcio-reflection asserts both away: an AssertionError's or StopIteration's traceback, for
    # `list` too (one such server among those of a directory, and none was listed).
    with describing(socket_dir / 'odd_ipc.sock', ['x.Y'], b'', answers) as path:
        for verb in (('describe',), ('call', 'x.Y/M', '{}')):
            assert fails(1, verb[0], str(path), *verb[1:], '--timeout', '10') == \
                f"vyra-ipc: INTERNAL: server reflection of '{path}': {details}"
        [entry] = json.loads(ok('list', str(socket_dir), '--json'))
        assert (entry['module'], entry['state'], entry['services']) == ('odd', 'serving', [])


def test_a_service_listed_but_not_described_by_reflection_is_named(socket_dir: Path) -> None:
    # As a gRPC server lists a service whose descriptors its reflection does not have (one
    # served by a generic handler): describe ended in KeyError's traceback, call in exit status 2.
    file = descriptor_pb2.FileDescriptorProto(name='x.proto', package='x', syntax='proto3')
    file.message_type.add(name='R')
    file.service.add(name='Y').method.add(name='M', input_type='.x.R', output_type='.x.R')
    with describing(socket_dir / 'gone_ipc.sock', ['x.Gone', 'x.Y'], file.SerializeToString()) as path:
        for verb in (('describe',), ('describe', 'x.Gone'), ('call', 'x.Gone/M', '{}')):
            assert fails(1, verb[0], str(path), *verb[1:], '--timeout', '10') == \
                'vyra-ipc: INTERNAL: the server lists the service x.Gone, but its reflection does not describe it'
        assert 'rpc M(R) returns (R);' in ok('describe', str(path), 'x.Y', '--timeout', '10')


def test_one_timeout_covers_the_call_and_the_reading_of_reflection_before_it(socket_dir: Path) -> None:
    # Found: reading the reflection had --timeout, then the call a fresh --timeout: a
    # command took up to twice as long as it said. The handler reports the deadline it got.
    file = descriptor_pb2.FileDescriptorProto(name='x.proto', package='x', syntax='proto3')
    file.message_type.add(name='Left').field.add(name='seconds', number=1, type=1, label=1)  # double
    service = file.service.add(name='Y')
    for name in ('M', 'Never'):
        service.method.add(name=name, input_type='.x.Left', output_type='.x.Left')
    delay = 0.5

    def left(request: bytes, context: Any) -> bytes:
        return b'\x09' + struct.pack('<d', context.time_remaining())

    def never(request: bytes, context: Any) -> bytes:
        ended = threading.Event()
        context.add_callback(ended.set)  # the call ended: its deadline passed
        ended.wait(60)
        return b''
    with describing(socket_dir / 'slow_ipc.sock', ['x.Y'], file.SerializeToString(), delay=delay,
                    methods={'M': left, 'Never': never}) as path:
        answer = json.loads(ok('call', str(path), 'x.Y/M', '{}', '--timeout', '30', '--lane', 'grpc'))
        # At least one answer of the reflection took its delay out of the 30 s.
        assert 0 < answer['seconds'] <= 30 - delay, answer
        line = fails(1, 'call', str(path), 'x.Y/Never', '{}', '--timeout', '2', '--lane', 'grpc')
        assert re.fullmatch(r"vyra-ipc: DEADLINE_EXCEEDED: no answer from '.*' within --timeout 2 s, of which "
                            r"reading the server's reflection took \d+\.\d\d s \(Deadline Exceeded\)", line), line


def test_describe_shows_a_service_without_methods(socket_dir: Path) -> None:
    # `service Empty {}` is valid .proto; describing it was "error: max() arg is an empty sequence".
    file = descriptor_pb2.FileDescriptorProto(name='x.proto', package='x', syntax='proto3')
    file.message_type.add(name='R')
    file.service.add(name='Empty')
    file.service.add(name='Y').method.add(name='M', input_type='.x.R', output_type='.x.R')
    with describing(socket_dir / 'empty_ipc.sock', ['x.Empty', 'x.Y'], file.SerializeToString()) as path:
        assert ok('describe', str(path), 'x.Empty', '--timeout', '10') == '// x.proto\nservice x.Empty {\n}\n'
        text = ok('describe', str(path), '--timeout', '10')
        assert 'service x.Empty {\n}' in text and 'rpc M(R) returns (R);' in text, text
        assert fails(2, 'call', str(path), 'x.Empty/M', '--timeout', '10') == \
            "vyra-ipc: error: x.Empty has no method 'M'; it has none"
        assert fails(2, 'call', str(path), 'x.Empty', '--timeout', '10') == \
            'vyra-ipc: error: x.Empty is a service; give SERVICE/METHOD (it has no methods)'


def test_types_nested_deeper_than_pythons_stack_are_described_or_refused_without_a_traceback(
        socket_dir: Path) -> None:
    # x.M0 holds an x.M1, ..., x.M2999: describing walked them recursively (RecursionError's
    # traceback), and so does protobuf building their classes for a call.
    file = descriptor_pb2.FileDescriptorProto(name='x.proto', package='x', syntax='proto3')
    depth = 3000
    for index in range(depth):
        message = file.message_type.add(name=f'M{index}')
        if index + 1 < depth:
            message.field.add(name='next', number=1, type=11, label=1, type_name=f'.x.M{index + 1}')
    file.service.add(name='Y').method.add(name='M', input_type='.x.M0', output_type='.x.M0')
    with describing(socket_dir / 'deep_ipc.sock', ['x.Y'], file.SerializeToString()) as path:
        text = ok('describe', str(path), 'x.Y/M', '--timeout', '20')
        assert text.count('message x.M') == depth and text.rstrip().endswith('message x.M2999 {\n}'), text[-300:]
        described = json.loads(ok('describe', str(path), 'x.Y/M', '--json', '--timeout', '20'))
        assert [entry['name'] for entry in described['types']] == [f'x.M{index}' for index in range(depth)]
        line = fails(1, 'call', str(path), 'x.Y/M', '{}', '--timeout', '20')
        assert line.startswith('vyra-ipc: INTERNAL: the server described x.M0 with descriptors that cannot be '
                               'used (server reflection): RecursionError: '), line


# -- health, ping, stats --------------------------------------------------------------


def test_health_of_the_server_and_of_a_service(demo: ServerProcess) -> None:
    path = str(demo.socket_path)
    assert json.loads(ok('health', path, '--json', '--lane', 'grpc')) == \
        {'socket_path': path, 'service': '', 'status': 'SERVING', 'lane': 'grpc'}
    assert ok('health', path, 'vyra.ipc.ModuleService').startswith('vyra.ipc.ModuleService: SERVING')
    assert fails(1, 'health', path, 'vyra.ipc.Nope') == (
        f"vyra-ipc: NOT_FOUND: the server at '{path}' has no health status for 'vyra.ipc.Nope' "
        '(a service it does not serve)')


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_ping_reports_percentiles_and_a_histogram(demo: ServerProcess, lane: str) -> None:
    text = ok('ping', str(demo.socket_path), '--count', '50', '--lane', lane)
    first, summary, *histogram = text.splitlines()
    assert first == f'50 health checks of {demo.socket_path} on the {lane} lane'
    assert summary.startswith('p50 ') and ' p99 ' in summary and ' max ' in summary
    assert sum(int(line.split()[-1]) for line in histogram) == 50 and fits(text) and '\r' not in text
    report = json.loads(ok('ping', str(demo.socket_path), '-c', '20', '--json', '--lane', lane))
    assert report['lane'] == lane and report['count'] == 20
    assert report['min_us'] <= report['p50_us'] <= report['p99_us'] <= report['max_us']
    assert sum(bucket['count'] for bucket in report['histogram']) == 20


def on_a_terminal(*args: str) -> tuple[int, str]:
    """``cli(...)`` with its stdout on a pseudo-terminal: exit status and what it showed."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, '-m', 'vyra_base_ipc', *args], stdout=terminal,
                               stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    os.close(terminal)
    shown = b''
    deadline = time.monotonic() + 60
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, 'the CLI did not finish within 60 s'
            if select.select([controller], [], [], left)[0]:
                try:
                    data = os.read(controller, 65536)
                except OSError:  # EIO: the CLI closed the terminal (exited)
                    break
                if not data:
                    break
                shown += data
        return process.wait(timeout=20), shown.decode()
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_long_ping_draws_a_progress_bar_on_a_terminal_and_erases_it(demo: ServerProcess) -> None:
    status, shown = on_a_terminal('ping', str(demo.socket_path), '--count', '1000', '--lane', 'ttrpc')
    assert status == 0, shown
    assert '\rping [' in shown and '] 1000/1000' in shown
    assert '\r' + ' ' * 79 + '\r1000 health checks' in shown  # erased before the report


def test_a_module_name_resolves_as_the_clients_do(demo: ServerProcess, socket_dir: Path) -> None:
    env = {**os.environ, 'VYRA_IPC_SOCKET': str(demo.socket_path)}
    assert ok('health', 'some_module', env=env).startswith('server: SERVING')
    assert 'invalid module name' in fails(2, 'health', 'Not-A-Module')


def test_stats_shows_the_calls_just_made(fresh: ServerProcess) -> None:
    path = str(fresh.socket_path)
    for lane in ('grpc', 'grpc', 'ttrpc'):
        ok('call', path, EXECUTE, PING, '--lane', lane)
    fails(1, 'call', path, 'vyra.ipc.ModuleService/GetData', '{"key": "nope"}', '--lane', 'ttrpc')
    stats = json.loads(ok('stats', path, '--json'))
    counted = {(entry['method'], entry['lane']): (int(entry['calls']), entry['errors'])
               for entry in stats['methods']}
    assert counted == {('/' + EXECUTE, 'grpc'): (2, {}), ('/' + EXECUTE, 'ttrpc'): (1, {}),
                       ('/vyra.ipc.ModuleService/GetData', 'ttrpc'): (1, {'NOT_FOUND': '1'})}
    text = ok('stats', path, '--lane', 'grpc')
    lines = text.splitlines()
    execute = lines.index(EXECUTE)
    assert lines[execute + 1].split()[:3] == ['grpc', '2', '0'] and lines[execute + 2].split()[:3] == \
        ['ttrpc', '1', '0']
    get_data = lines.index('vyra.ipc.ModuleService/GetData')
    assert lines[get_data + 1].split()[:2] == ['ttrpc', '1'] and lines[get_data + 1].endswith('NOT_FOUND 1')
    assert {line.split()[0] for line in lines[1:4]} == {'LANE', 'grpc', 'ttrpc'} and fits(text), text


# -- help -----------------------------------------------------------------------------


def test_every_help_fits_80_columns_and_explains_only_what_its_verb_takes() -> None:
    from vyra_base_ipc.cli import VERBS

    env = {**os.environ, 'COLUMNS': '80'}
    for verb in ('', *VERBS):
        text = ok(*filter(None, [verb, '--help']), env=env)
        assert fits(text), text  # the verbs' descriptions were given raw, up to 128 columns
        assert ('TARGET' in text) is (verb != 'list'), text  # list takes DIRs, not a TARGET
        assert 'Exit status: 0 done, 1 the call or the server failed, 2 the command is wrong.' in \
            ' '.join(text.split()), text


def test_version_names_this_package_and_what_a_bug_report_needs_with_it() -> None:
    from importlib import metadata
    import platform

    from google import protobuf

    try:
        version = metadata.version('vyra_base_ipc')
    except metadata.PackageNotFoundError:  # imported from the source tree (.ci/other-pythons)
        version = '(vyra_base_ipc not installed)'
    assert ok('--version') == (f'vyra-ipc {version} (grpcio {grpc.__version__}, '
                               f'protobuf {protobuf.__version__}, Python {platform.python_version()})\n')


# -- output to a reader that left, interrupts -----------------------------------------


def to_a_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """``cli(...)`` with its stdout a pipe whose reader has gone (``| head -1``
    once head has left), buffered as Python buffers a pipe by default."""
    env = {key: value for key, value in os.environ.items() if key != 'PYTHONUNBUFFERED'}
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run([sys.executable, '-m', 'vyra_base_ipc', *args], stdout=writer, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, env=env, text=True, timeout=60)
    finally:
        os.close(writer)


@pytest.mark.parametrize('verb', [('describe',), ('call', EXECUTE, PING), ('health',), ('ping', '-c', '3'),
                                  ('stats',), ('call', 'vyra.ipc.test.EchoService/Count', 'count: 3')])
def test_a_reader_that_left_gets_no_traceback(demo: ServerProcess, verb: tuple[str, ...]) -> None:
    # Written at exit, the buffered output met the closed pipe where no handler
    # saw it: "Exception ignored ... BrokenPipeError" and exit status 120.
    result = to_a_closed_pipe(verb[0], str(demo.socket_path), *verb[1:])
    assert (result.returncode, result.stderr) == (1, ''), result
    listed = to_a_closed_pipe('list', str(demo.socket_path.parent))
    assert (listed.returncode, listed.stderr) == (1, ''), listed


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
@pytest.mark.parametrize('method, timeout', [('Watch', '0'), ('Hold', '60')])
def test_ctrl_c_during_a_stream_or_a_waiting_call_exits_130_without_a_traceback(
        demo: ServerProcess, lane: str, method: str, timeout: str) -> None:
    path, tag = str(demo.socket_path), f'interrupted-{method}-{lane}'
    # Watch streams one event per 0.2 s without end; Hold answers never.
    process = subprocess.Popen([sys.executable, '-m', 'vyra_base_ipc', 'call', path,
                                f'vyra.ipc.test.WatchService/{method}', f'{{tag: {tag}, interval: 0.2}}'
                                if method == 'Watch' else f'tag: {tag}', '--timeout', timeout, '--lane', lane],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        report = f'tag: {tag}'
        wait_for(lambda: json.loads(ok('call', path, 'vyra.ipc.test.WatchService/Report', report))['started'],
                 30, f'the server to run {method}')
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert (process.returncode, err) == (130, ''), (out, err)
    assert ok('health', path).startswith('server: SERVING')


# -- ros2 ipc -------------------------------------------------------------------------


def _setup_entry_points() -> dict[str, list[str]]:
    tree = ast.parse((REPO / 'setup.py').read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, 'id', None) == 'setup')
    keyword = next(keyword for keyword in call.keywords if keyword.arg == 'entry_points')
    return ast.literal_eval(keyword.value)


def test_ros2_ipc_has_the_verbs_of_vyra_ipc() -> None:
    from vyra_base_ipc.cli import VERBS

    entry_points = _setup_entry_points()
    assert entry_points['ros2cli.command'] == ['ipc = vyra_base_ipc.cli.ros2.command:IpcCommand']
    verbs = dict(line.replace(' ', '').split('=') for line in entry_points['ros2ipc.verb'])
    assert sorted(verbs) == sorted(VERBS)
    source = ast.parse((REPO / 'vyra_base_ipc/cli/ros2/verb.py').read_text())
    classes = {node.name: next(statement.value.value for statement in node.body
                               if isinstance(statement, ast.Assign) and statement.targets[0].id == 'VERB')
               for node in source.body if isinstance(node, ast.ClassDef) and node.name != 'VerbExtension'}
    assert {name: target.rpartition(':')[2] for name, target in verbs.items()} == \
        {verb: name for name, verb in classes.items()}


def test_ros2_ipc_runs_where_ros2cli_is_installed(demo: ServerProcess, module_socket_dir: Path) -> None:
    try:
        importlib.import_module('ros2cli.command')
    except ModuleNotFoundError:
        # Without ros2cli, only its extension modules fail to import, for that reason alone.
        importlib.import_module('vyra_base_ipc.cli.ros2')
        with pytest.raises(ModuleNotFoundError) as missing:
            importlib.import_module('vyra_base_ipc.cli.ros2.command')
        assert missing.value.name == 'ros2cli'
        pytest.skip('ros2cli is not installed here (it is not on the package index): ros2 ipc cannot run')
    ros2 = [sys.executable, '-c', 'import sys; from ros2cli.cli import main; sys.exit(main())', 'ipc']
    listed = subprocess.run([*ros2, 'list', str(module_socket_dir), '--json'], capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert [entry['state'] for entry in json.loads(listed.stdout)] == ['serving']
    called = subprocess.run([*ros2, 'call', 'demo', EXECUTE, 'command: ping'], capture_output=True, text=True,
                            timeout=60, env={**os.environ, 'VYRA_IPC_SOCKET': str(demo.socket_path)})
    assert called.returncode == 0 and json.loads(called.stdout)['result'] == 'pong', called.stderr
    unknown = subprocess.run([*ros2, 'call', str(demo.socket_path), 'vyra.ipc.ModuleService/Nope'],
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and unknown.stderr.startswith('ros2 ipc call: error: ')
