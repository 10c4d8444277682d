"""gRPC's richer error model on both lanes: a handler ends its call with a
``google.rpc.Status`` (``abort_with_status(rpc_status.to_status(...))``, or
its ``grpc-status-details-bin`` trailer and a code), and every client reads
its details: ours as ``IPCError.status_details``, a plain grpc channel with
``rpc_status.from_call``, containerd's Go client from the fast lane's
``Response.status`` (StatusService in test/servers/status_service.py)."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
import re
import subprocess
import sys
from typing import Any

from google.rpc import error_details_pb2
import grpc
from grpc_status import rpc_status
import pytest

from conftest import LANES, ServerProcess, StartServer
from servers.rich_status import RICH_MESSAGE, rich_status
from vyra_base_ipc import IPCError, IPCHandler, IPCRemoteError, SyncIPCHandler

UNARY = ('Misbehave', 'MisbehaveSync')
STREAMS = ('MisbehaveStream', 'MisbehaveStreamSync')
RICH_HOWS = ('abort-with-rich-status', 'trailer-rich-status')


@pytest.fixture(autouse=True)
def fresh_log_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's log limits with no kind seen: the gRPC lane's warnings
    are this client's, limited (a test's first of a kind is logged at once)."""
    from vyra_base_ipc import _log_limit

    monkeypatch.setattr(_log_limit, '_kinds', {})


@pytest.fixture(scope='module')
def server(start_module_server: StartServer, module_socket_dir: Path) -> ServerProcess:
    """One echo server (both lanes) for the tests of this module."""
    return start_module_server(module_socket_dir / 'e.sock').wait_serving(ttrpc=True)


def call(ipc: SyncIPCHandler, echo: Any, method: str, how: str) -> tuple[list[str], IPCError]:
    """Call ``method`` doing ``how``: the stream's messages before its error, and the error."""
    received: list[str] = []
    with pytest.raises(IPCError) as raised:
        if method in STREAMS:
            for reply in ipc.stream_method(method, echo.pb.MisbehaveRequest(how=how)):
                received.append(reply.text)
        else:
            ipc.call_method(method, echo.pb.MisbehaveRequest(how=how))
    return received, raised.value


async def call_async(ipc: IPCHandler, echo: Any, method: str, how: str) -> tuple[list[str], IPCError]:
    """:func:`call` with the asyncio client."""
    received: list[str] = []
    with pytest.raises(IPCError) as raised:
        if method in STREAMS:
            async for reply in ipc.stream_method(method, echo.pb.MisbehaveRequest(how=how)):
                received.append(reply.text)
        else:
            await ipc.call_method(method, echo.pb.MisbehaveRequest(how=how))
    return received, raised.value


def assert_rich(received: list[str], error: IPCError, method: str) -> None:
    """``error`` is the rich status of status_service.rich_status(), whole."""
    assert type(error) is IPCRemoteError, error
    assert (error.code, error.details) == (grpc.StatusCode.INVALID_ARGUMENT, RICH_MESSAGE)
    assert list(error.status_details) == list(rich_status().details)
    bad_request, error_info = error_details_pb2.BadRequest(), error_details_pb2.ErrorInfo()
    assert error.status_details[0].Unpack(bad_request) and error.status_details[1].Unpack(error_info)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [('how', 'asked to fail')]
    assert (error_info.reason, dict(error_info.metadata)) == ('ASKED', {'k': 'ü'})
    assert received == (['first'] if method in STREAMS else [])


@pytest.mark.parametrize('lane', LANES)
@pytest.mark.parametrize('method', UNARY + STREAMS)
@pytest.mark.parametrize('how', RICH_HOWS)
def test_the_blocking_client_gets_the_status_details_a_handler_ended_its_call_with(
        server: ServerProcess, echo: Any, lane: str, method: str, how: str) -> None:
    with SyncIPCHandler(server.socket_path, echo.grpc.StatusServiceStub, lane=lane) as ipc:
        assert_rich(*call(ipc, echo, method, how), method)
        assert ipc.lane_in_use == lane


@pytest.mark.asyncio
@pytest.mark.parametrize('lane', LANES)
@pytest.mark.parametrize('method', UNARY + STREAMS)
@pytest.mark.parametrize('how', RICH_HOWS)
async def test_the_asyncio_client_gets_the_status_details_a_handler_ended_its_call_with(
        server: ServerProcess, echo: Any, lane: str, method: str, how: str) -> None:
    async with IPCHandler(server.socket_path, echo.grpc.StatusServiceStub, lane=lane) as ipc:
        assert_rich(*await call_async(ipc, echo, method, how), method)
        assert ipc.lane_in_use == lane


@pytest.mark.parametrize('method', UNARY + STREAMS)
@pytest.mark.parametrize('how', RICH_HOWS)
def test_a_plain_grpc_channel_reads_the_same_status_with_rpc_status(
        server: ServerProcess, echo: Any, method: str, how: str) -> None:
    # The reference: grpc's own client and grpc_status, against the server's gRPC lane.
    with grpc.insecure_channel(f'unix:{server.socket_path}') as channel:
        stub = echo.grpc.StatusServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            answer = getattr(stub, method)(echo.pb.MisbehaveRequest(how=how), timeout=30)
            if method in STREAMS:
                list(answer)
    status = rpc_status.from_call(raised.value)
    assert status == rich_status()


@pytest.mark.parametrize('lane', LANES)
@pytest.mark.parametrize('method', UNARY + STREAMS)
def test_a_status_details_trailer_that_is_no_status_leaves_the_call_its_code_and_words(
        server: ServerProcess, echo: Any, lane: str, method: str, caplog: pytest.LogCaptureFixture) -> None:
    with SyncIPCHandler(server.socket_path, echo.grpc.StatusServiceStub, lane=lane) as ipc:
        with caplog.at_level(logging.WARNING, logger='vyra_base_ipc'):
            _, error = call(ipc, echo, method, 'abort-with-bad-status-details')
        assert_rich(*call(ipc, echo, 'Misbehave', 'abort-with-rich-status'), 'Misbehave')  # (served on)
    assert (type(error), error.code, error.details, error.status_details) == (
        IPCRemoteError, grpc.StatusCode.INVALID_ARGUMENT, 'bad status details', ())
    # grpc sends the trailer as it is: the gRPC lane's client says it could not read it; the
    # fast lane's server, which reads it to carry its details, says so in its log.
    said = (caplog.text if lane == 'grpc' else server.log())
    assert f'/vyra.ipc.test.StatusService/{method}: grpc-status-details-bin is not a google.rpc.Status' in said


#: Hows that set the rich trailer but end the call with another status, and that status.
OTHER_STATUS = {'trailer-rich-status-then-raise': (grpc.StatusCode.UNKNOWN,
                                                   "Unexpected <class 'ValueError'>: after the rich trailer"),
                'trailer-rich-status-then-abort': (grpc.StatusCode.NOT_FOUND, 'another status')}


@pytest.mark.parametrize('lane', LANES)
@pytest.mark.parametrize('method', UNARY + STREAMS)
@pytest.mark.parametrize('how', OTHER_STATUS)
def test_a_status_trailer_the_call_did_not_end_with_gives_no_status_details(
        server: ServerProcess, echo: Any, lane: str, method: str, how: str, caplog: pytest.LogCaptureFixture) -> None:
    # A handler that set the trailer and then raised, or aborted with another
    # status: its details are not those of the call's status, which grpc's
    # reader (rpc_status.from_call) refuses. Neither lane's client gives them.
    with SyncIPCHandler(server.socket_path, echo.grpc.StatusServiceStub, lane=lane) as ipc:
        with caplog.at_level(logging.WARNING, logger='vyra_base_ipc'):
            received, error = call(ipc, echo, method, how)
    assert (error.code, error.details, error.status_details) == (*OTHER_STATUS[how], ())
    assert received == (['first'] if method in STREAMS else [])
    said = (caplog.text if lane == 'grpc' else server.log())
    assert f'/vyra.ipc.test.StatusService/{method}: grpc-status-details-bin holds a google.rpc.Status of code 3' \
        in said


@pytest.mark.parametrize('how', OTHER_STATUS)
def test_a_plain_grpc_channel_refuses_a_status_trailer_the_call_did_not_end_with(
        server: ServerProcess, echo: Any, how: str) -> None:
    # The reference for the test above.
    with grpc.insecure_channel(f'unix:{server.socket_path}') as channel:
        with pytest.raises(grpc.RpcError) as raised:
            echo.grpc.StatusServiceStub(channel).Misbehave(echo.pb.MisbehaveRequest(how=how), timeout=30)
    assert (raised.value.code(), raised.value.details()) == OTHER_STATUS[how]
    with pytest.raises(ValueError, match="doesn't match status"):
        rpc_status.from_call(raised.value)


@pytest.mark.parametrize('lane', LANES)
@pytest.mark.parametrize('method', UNARY + STREAMS)
@pytest.mark.parametrize('how, key', [('trailer-str-status-details', 'grpc-status-details-bin'),
                                      ('abort-with-str-binary-trailer', 'x-note-bin')])
def test_a_str_under_a_binary_trailer_key_fails_the_handler_at_once_on_both_lanes(
        server: ServerProcess, echo: Any, lane: str, method: str, how: str, key: str) -> None:
    # grpc.aio could then send no status at all: the call waited for its
    # deadline on the gRPC lane (for ever without one); the fast lane answered.
    with SyncIPCHandler(server.socket_path, echo.grpc.StatusServiceStub, lane=lane, timeout=60) as ipc:
        received, error = call(ipc, echo, method, how)
        assert_rich(*call(ipc, echo, 'Misbehave', 'abort-with-rich-status'), 'Misbehave')  # (served on)
    assert (error.code, error.details, error.status_details) == (
        grpc.StatusCode.UNKNOWN, f"Unexpected <class 'TypeError'>: Binary metadata key=\"{key}\" expected bytes, "
        "got <class 'str'>", ())
    assert received == (['first'] if method in STREAMS else [])


#: What a handler's set_trailing_metadata() of a trailer gRPC does not send raises, by how.
BAD_TRAILER_ERRORS = {
    'trailer-upper-key': "ValueError'>: trailing metadata key 'X-Note': gRPC allows only 0-9, a-z, \"_\", \"-\" "
                         'and "." in a key',
    'trailer-space-in-key': "ValueError'>: trailing metadata key 'x note': gRPC allows only 0-9, a-z, \"_\", "
                            '"-" and "." in a key',
    'trailer-non-ascii-value': "ValueError'>: trailing metadata value of 'x-note' must be printable ASCII (a key "
                               "ending in \"-bin\" carries any bytes), not 'caf\u00e9'",
    'trailer-newline-in-value': "ValueError'>: trailing metadata value of 'x-note' must be printable ASCII (a key "
                                "ending in \"-bin\" carries any bytes), not 'two\\nlines'",
    'trailer-int-value': "TypeError'>: Invalid trailing metadata type, expected Tuple[Tuple[str, Union[str, "
                         "bytes]]...]: (('x-note', 5),)",
    'trailer-not-a-pair': "TypeError'>: Invalid trailing metadata type, expected Tuple[Tuple[str, Union[str, "
                          "bytes]]...]: (('x-note',),)",
}


@pytest.mark.parametrize('lane', LANES)
@pytest.mark.parametrize('method', UNARY + STREAMS)
@pytest.mark.parametrize('how', list(BAD_TRAILER_ERRORS))
def test_a_trailer_grpc_does_not_send_fails_the_handler_where_it_is_set_on_both_lanes(
        server: ServerProcess, echo: Any, lane: str, method: str, how: str) -> None:
    # grpc.aio ended the call INTERNAL "Invalid metadata" once the handler had
    # answered (a key or value it does not allow), and the fast lane answered
    # OK: a servicer tested on the fast lane failed where the gRPC lane took over.
    with SyncIPCHandler(server.socket_path, echo.grpc.StatusServiceStub, lane=lane, timeout=60) as ipc:
        received, error = call(ipc, echo, method, how)
    assert (error.code, error.details) == (grpc.StatusCode.UNKNOWN, f"Unexpected <class '{BAD_TRAILER_ERRORS[how]}")
    assert received == (['first'] if method in STREAMS else [])


@pytest.mark.parametrize('lane', LANES)
@pytest.mark.parametrize('method', UNARY + STREAMS)
def test_trailers_grpc_sends_leave_the_call_ok_on_both_lanes(
        server: ServerProcess, echo: Any, lane: str, method: str) -> None:
    with SyncIPCHandler(server.socket_path, echo.grpc.StatusServiceStub, lane=lane, timeout=60) as ipc:
        request = echo.pb.MisbehaveRequest(how='good-trailers')
        if method in STREAMS:
            assert [reply.text for reply in ipc.stream_method(method, request)] == ['first']
        else:
            assert ipc.call_method(method, request) == echo.pb.EchoReply()


@pytest.mark.parametrize('how', RICH_HOWS)
def test_containerds_go_client_reads_the_fast_lanes_status_details(
        go_client: Path, server: ServerProcess, how: str) -> None:
    result = subprocess.run([str(go_client), str(server.ttrpc_path), 'misbehave', how], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, f'Go client failed:\n{result.stdout}\n{result.stderr}'
    answer = json.loads(result.stdout)
    assert (answer['error_code'], answer['error_message']) == (grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                                               RICH_MESSAGE)
    assert answer['error_details'] == [
        {'type_url': detail.type_url, 'value': base64.b64encode(detail.value).decode()}
        for detail in rich_status().details]


def test_an_error_named_for_its_method_keeps_its_status_details() -> None:
    error = IPCRemoteError(grpc.StatusCode.INVALID_ARGUMENT, 'x', status_details=rich_status().details)
    named = error.for_method('/vyra.ipc.test.StatusService/Misbehave')
    assert (named.method, named.status_details) == ('/vyra.ipc.test.StatusService/Misbehave', error.status_details)


def told(lines: list[str]) -> int:
    """How many records ``lines`` stand for: each, and the ``[N more like
    this in the last S s]`` it says were held back."""
    return sum(1 + int(match.group(1)) if (match := re.search(r'\[(\d+) more like this in the last', line))
               else 1 for line in lines)


@pytest.mark.parametrize('lane', LANES)
def test_a_handler_sending_a_bad_status_trailer_on_every_call_is_logged_once_then_counted(
        start_server: StartServer, socket_path: Path, echo: Any, lane: str, caplog: pytest.LogCaptureFixture) -> None:
    """200 calls of a handler whose grpc-status-details-bin is no
    google.rpc.Status: one warning and at most a summary telling all 200 (the
    log had one a call, at the caller's rate), and another method's at once.
    The fast lane's server says it (and tells what it held when it stops), the
    gRPC lane's client (which tells it with the next of its kind once 10 s
    are over: here at once, as a stopping server does)."""
    from vyra_base_ipc._log_limit import flush_held

    server = start_server(socket_path).wait_serving(ttrpc=True)
    with SyncIPCHandler(socket_path, echo.grpc.StatusServiceStub, lane=lane) as ipc:
        with caplog.at_level(logging.WARNING, logger='vyra_base_ipc'):
            for _ in range(200):
                _, error = call(ipc, echo, 'Misbehave', 'abort-with-bad-status-details')
                assert (error.code, error.status_details) == (grpc.StatusCode.INVALID_ARGUMENT, ())
            _, error = call(ipc, echo, 'MisbehaveSync', 'abort-with-bad-status-details')  # another method
            assert (error.code, error.status_details) == (grpc.StatusCode.INVALID_ARGUMENT, ())
            flush_held()
    assert server.stop() == 0
    said = (caplog.text if lane == 'grpc' else server.log()).splitlines()
    problem = 'grpc-status-details-bin is not a google.rpc.Status'
    flooded = [line for line in said if f'/vyra.ipc.test.StatusService/Misbehave: {problem}' in line]
    assert len(flooded) <= 2 and told(flooded) == 200, flooded[:5]
    assert '[198 more like this in the last' in flooded[-1], flooded
    assert len([line for line in said if f'/vyra.ipc.test.StatusService/MisbehaveSync: {problem}' in line]) == 1


#: A client process that calls Misbehave (its status trailer is no google.rpc.Status) ``argv[3]``
#: times on the gRPC lane, where our client warns of it, then exits without telling anything more.
CLIENT_THEN_EXIT = """
import logging, sys
sys.path.insert(0, sys.argv[2])
logging.basicConfig(level=logging.WARNING, format='%(message)s')
from vyra_ipc_test import echo_pb2, echo_pb2_grpc
from vyra_base_ipc import IPCError, SyncIPCHandler
with SyncIPCHandler(sys.argv[1], echo_pb2_grpc.StatusServiceStub, lane='grpc') as ipc:
    for _ in range(int(sys.argv[3])):
        try:
            ipc.call_method('Misbehave', echo_pb2.MisbehaveRequest(how='abort-with-bad-status-details'))
        except IPCError:
            pass
print('called')
"""


def test_a_client_exiting_tells_the_warnings_it_held_back(server: ServerProcess, test_protos_dir: Path) -> None:
    # Found: our gRPC-lane client tells held warnings with the next of their kind once 10 s are
    # over, or from its loop's timer; a process exiting before either told only the first of 20.
    result = subprocess.run([sys.executable, '-c', CLIENT_THEN_EXIT, str(server.socket_path),
                             str(test_protos_dir), '20'], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == 'called\n', result.stderr
    problem = '/vyra.ipc.test.StatusService/Misbehave: grpc-status-details-bin is not a google.rpc.Status'
    said = [line for line in result.stderr.splitlines() if problem in line]
    assert told(said) == 20, said
    assert len(said) == 2 and '[18 more like this in the last' in said[-1], said
