"""Errors in words that say what happened, the same on both lanes: a server
killed with SIGKILL, a timeout (which one, how long), a method the server
lacks (which services it has) and a command parameter the request lacks
(INVALID_ARGUMENT, naming it), an answer that does not parse as the
response type (INTERNAL), a shared buffer over an end's max_bytes (which
end). Real servers in real processes, both lanes, both clients; size limits
of messages are in test_lane_limits.py and test_lane_parity.py."""

from __future__ import annotations

from pathlib import Path
import signal
from typing import Any, Callable

import grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.reflection_pb2_grpc import ServerReflectionStub
import pytest

from conftest import LANES, ServerProcess, StartServer, call_through, make_stale_socket
from vyra_base_ipc import (
    ClientCall,
    ClientInterceptor,
    IPCRemoteError,
    IPCTimeoutError,
    IPCUnavailableError,
    SharedBuffer,
    SharedMemoryOptions,
    SyncIPCHandler,
)
from vyra_base_ipc import (
    module_service_pb2 as module_pb,
)
from vyra_base_ipc import (
    module_service_pb2_grpc as module_pb_grpc,
)
from vyra_base_ipc._methods import stub_methods

KINDS = ('sync', 'async')
ECHO_SERVICES = ('vyra.ipc.BackendService', 'vyra.ipc.ModuleService', 'vyra.ipc.test.EchoService',
                 'vyra.ipc.test.StatusService', 'vyra.ipc.test.WatchService')


@pytest.fixture(scope='module')
def echo_server(start_module_server: StartServer, module_socket_dir: Path) -> ServerProcess:
    """One echo server (both lanes) for the tests of this module."""
    return start_module_server(module_socket_dir / 'e.sock').wait_serving(ttrpc=True)


def stream(kind: str, path: Path, stub: type, method: str, request: Any, **options: Any) -> Any:
    """Read a whole stream through a new handler of ``kind`` (5 s unless
    ``timeout`` says otherwise); the replies, or the error."""
    return call_through(kind, path, stub, method, request, whole_stream=True,
                        **{'timeout': 5.0, **options})


# -- a server that went away --------------------------------------------------------------------

@pytest.mark.parametrize('lane', ['grpc', 'ttrpc', 'auto'])
def test_calls_after_the_server_was_killed_say_no_server_is_listening(
        start_server: StartServer, socket_path: Path, echo: Any, lane: str) -> None:
    server = start_server(socket_path).wait_serving(ttrpc=True)
    with SyncIPCHandler(socket_path, echo.Stub, lane=lane) as before:
        assert before.call_method('Echo', echo.pb.EchoRequest(text='up')).text == 'up'
        server.signal(signal.SIGKILL)
        server.wait()
        assert socket_path.is_socket() and server.ttrpc_path.is_socket()  # left behind, as after a crash
        # The connection it had: lost, or refused when made anew.
        broken = call_once(before, echo)
    assert isinstance(broken, IPCUnavailableError), repr(broken)
    assert 'went away' in broken.details
    assert str(server.ttrpc_path) in broken.details or str(socket_path) in broken.details
    assert 'failed to connect to all addresses' not in str(broken)
    # A handler made now: its connect is refused.
    named = server.ttrpc_path if lane == 'ttrpc' else socket_path
    for kind in KINDS:
        error = call_through(kind, socket_path, echo.Stub, 'Echo', echo.pb.EchoRequest(), lane=lane)
        assert isinstance(error, IPCUnavailableError), repr(error)
        assert error.details == (f'no server answers on {str(named)!r}: the socket file is there but no '
                                 'server is listening (the server went away, or has not started yet)')
        assert error.method == '/vyra.ipc.test.EchoService/Echo'


@pytest.mark.parametrize('what', ['a regular file', 'a directory'])
@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_socket_path_that_is_no_socket_says_so(socket_path: Path, echo: Any, lane: str, what: str) -> None:
    # connect() is refused there as where nobody listens; before, the words
    # were "the socket file is there but no server is listening".
    named = socket_path.with_suffix('.ttrpc.sock') if lane == 'ttrpc' else socket_path
    if what == 'a directory':
        named.mkdir()
    else:
        named.write_text('not a socket')
    for kind in KINDS:
        error = call_through(kind, socket_path, echo.Stub, 'Echo', echo.pb.EchoRequest(), lane=lane)
        assert isinstance(error, IPCUnavailableError), repr(error)
        assert error.details == f'{str(named)!r} is {what}, not a socket: is the socket path right?'


@pytest.mark.parametrize('now', ['a stale socket', 'a regular file'])
def test_a_socket_path_that_appeared_since_the_last_call_is_described_as_it_is_now(
        socket_path: Path, echo: Any, now: str) -> None:
    # grpc keeps the reason of its last connection attempt through its
    # reconnect backoff (about 1 s); before, a file that appeared meanwhile
    # was still said not to exist, also to new handlers (one channel).
    for kind in KINDS:
        error = call_through(kind, socket_path, echo.Stub, 'Echo', echo.pb.EchoRequest(), lane='grpc')
        assert 'does not exist' in error.details, repr(error)
    if now == 'a stale socket':
        make_stale_socket(socket_path)
        expected = (f'no server answers on {str(socket_path)!r}: the socket file is there but no '
                    'server is listening (the server went away, or has not started yet)')
    else:
        socket_path.write_text('not a socket')
        expected = f'{str(socket_path)!r} is a regular file, not a socket: is the socket path right?'
    for kind in KINDS:
        error = call_through(kind, socket_path, echo.Stub, 'Echo', echo.pb.EchoRequest(), lane='grpc')
        assert isinstance(error, IPCUnavailableError), repr(error)
        assert error.details == expected


def call_once(handler: SyncIPCHandler, echo: Any) -> Any:
    try:
        return handler.call_method('Echo', echo.pb.EchoRequest(text='down'))
    except Exception as error:
        return error


# -- timeouts: which, and how long ---------------------------------------------------------------

class HandlerContext:
    """What call_method(parent=...) reads of a calling handler's context."""

    def time_remaining(self) -> float:
        return 0.25


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('lane', LANES)
def test_a_timeout_says_which_timeout_and_how_long(echo_server: ServerProcess, echo: Any, lane: str,
                                                   kind: str) -> None:
    path, sleep = echo_server.socket_path, echo.pb.SleepRequest(seconds=30)
    # Which server: the socket of the lane the call took.
    server = repr(str(echo_server.ttrpc_path if lane == 'ttrpc' else path))
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: call_through(kind, path, echo.Stub, 'Sleep', sleep, lane=lane, timeout=0.3),
         f"no answer from {server} within the call's timeout of 0.3 s (Deadline Exceeded)"),
        (lambda: call_through(kind, path, echo.Stub, 'Sleep', sleep, lane=lane, parent=HandlerContext()),
         f"no answer from {server} within the calling handler's remaining deadline of 0.25 s (Deadline Exceeded)"),
        (lambda: stream(kind, path, echo.Stub, 'Count', echo.pb.CountRequest(count=10**9), lane=lane, timeout=0.3),
         f"the stream from {server} did not end within the call's timeout of 0.3 s (Deadline Exceeded; "
         'stream_method(..., timeout=None): a stream without one)'),
    ]
    for attempt, details in cases:
        error = attempt()
        assert isinstance(error, IPCTimeoutError), repr(error)
        assert error.details == details
        assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED and error.method.startswith('/vyra.ipc.test.')


@pytest.mark.parametrize('lane', LANES)
def test_the_handlers_default_timeout_is_named_with_its_length(echo_server: ServerProcess, echo: Any,
                                                                lane: str) -> None:
    with SyncIPCHandler(echo_server.socket_path, echo.Stub, lane=lane, timeout=0.3) as handler:
        with pytest.raises(IPCTimeoutError) as error:
            handler.call_method('Sleep', echo.pb.SleepRequest(seconds=30))
    server = echo_server.ttrpc_path if lane == 'ttrpc' else echo_server.socket_path
    assert str(error.value) == ("/vyra.ipc.test.EchoService/Sleep: DEADLINE_EXCEEDED: "
                                f"no answer from {str(server)!r} within the call's timeout of 0.3 s "
                                "(Deadline Exceeded)")


def test_a_servers_own_deadline_exceeded_keeps_its_words(start_server: StartServer, socket_dir: Path,
                                                          echo: Any) -> None:
    # A relay that gives its downstream call 0.3 s: the downstream timeout,
    # in the relay's words, reaches the caller whose own deadline is far off.
    downstream = start_server(socket_dir / 'down.sock')
    relay = start_server(socket_dir / 'relay.sock', str(downstream.socket_path), '0.3', script='relay_server.py')
    error = call_through('sync', relay.socket_path, echo.Stub, 'Sleep', echo.pb.SleepRequest(seconds=30), timeout=30)
    assert isinstance(error, IPCTimeoutError), repr(error)
    assert error.details == (f"downstream: no answer from {str(downstream.ttrpc_path)!r} within the call's "
                             "timeout of 0.3 s (Deadline Exceeded)")


# -- a method the server does not have ----------------------------------------------------------

def mismatched_stub(echo: Any) -> type:
    """A stub with methods the echo server lacks: one in a service it has,
    two (unary, server-streaming) in a service it has not."""
    request, reply = echo.pb.EchoRequest, echo.pb.EchoReply

    class MismatchedStub:
        def __init__(self, channel: Any) -> None:
            options = {'request_serializer': request.SerializeToString, 'response_deserializer': reply.FromString}
            self.Shout = channel.unary_unary('/vyra.ipc.test.EchoService/Shout', **options)
            self.Move = channel.unary_unary('/my_arm.ArmService/Move', **options)
            self.Follow = channel.unary_stream('/my_arm.ArmService/Follow', **options)
    return MismatchedStub


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('lane', LANES)
def test_unimplemented_says_which_services_the_server_has(echo_server: ServerProcess, echo: Any, lane: str,
                                                          kind: str) -> None:
    stub, path, request = mismatched_stub(echo), echo_server.socket_path, echo.pb.EchoRequest()
    where = f'the server on {str(path)!r}'
    missing_method = call_through(kind, path, stub, 'Shout', request, lane=lane)
    missing_service = call_through(kind, path, stub, 'Move', request, lane=lane)
    missing_stream = stream(kind, path, stub, 'Follow', request, lane=lane)
    for error in (missing_method, missing_service, missing_stream):
        assert isinstance(error, IPCRemoteError) and error.code is grpc.StatusCode.UNIMPLEMENTED, repr(error)
    assert missing_method.details == (f'{where} serves vyra.ipc.test.EchoService but has no method Shout '
                                      '(is it built from another version of the .proto?)')
    services = ', '.join(ECHO_SERVICES)
    for error, name in ((missing_service, 'Move'), (missing_stream, 'Follow')):
        assert error.method == f'/my_arm.ArmService/{name}'
        assert error.details == (f'{where} has no service my_arm.ArmService; it serves {services} '
                                 '(the wrong socket, or a server without this service?)')



@pytest.mark.parametrize('kind', KINDS)
def test_reflection_asked_on_the_fast_lane_is_said_to_be_on_the_grpc_lane_only(echo_server: ServerProcess,
                                                                              kind: str) -> None:
    # The fast lane serves no reflection: it said "serves ...ServerReflection but has no
    # method ServerReflectionInfo (is it built from another version of the .proto?)".
    asked = [reflection_pb2.ServerReflectionRequest(list_services='')]
    path = echo_server.socket_path
    error = stream(kind, path, ServerReflectionStub, 'ServerReflectionInfo', asked, lane='auto')
    assert isinstance(error, IPCRemoteError) and error.code is grpc.StatusCode.UNIMPLEMENTED, repr(error)
    assert error.details == (f'the server on {str(path)!r} serves grpc.reflection.v1alpha.ServerReflection '
                             "on its gRPC lane only: call it with lane='grpc'")
    (answer,) = stream(kind, path, ServerReflectionStub, 'ServerReflectionInfo', asked, lane='grpc')
    assert 'vyra.ipc.test.EchoService' in [service.name for service in answer.list_services_response.service]

# -- an answer that does not parse as the response type ----------------------------------------

def other_version_stub(echo: Any) -> type:
    """EchoService's stub as another version of the .proto would build it:
    its methods of every call shape answer MirrorReply, whose field 1 is a
    message where EchoReply's is text (an EchoReply does not parse as one)."""
    methods = stub_methods(echo.Stub)

    class OtherVersionStub:
        def __init__(self, channel: Any) -> None:
            for name in ('Echo', 'Collect', 'Count', 'Chat'):
                method = methods[name]
                setattr(self, name, getattr(channel, method.kind.value)(
                    method.path, request_serializer=method.request_serializer,
                    response_deserializer=echo.pb.MirrorReply.FromString))
    return OtherVersionStub


class EndRecorder(ClientInterceptor):
    """Records the status each call ended with, as a client interceptor sees it."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, str | None, str]] = []

    def call_ended(self, call: ClientCall, code: grpc.StatusCode, details: str, duration: float) -> None:
        self.ended.append((call.method.rpartition('/')[2], call.lane, code.name))


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('lane', LANES)
def test_an_answer_that_does_not_parse_as_the_response_type_is_internal(
        echo_server: ServerProcess, echo: Any, lane: str, kind: str) -> None:
    # grpc.aio logs the DecodeError and gives None, as a response and as a
    # stream's message: the call looked OK. grpc's blocking channel, and the
    # fast lane, say INTERNAL 'Exception deserializing response!'.
    stub, path, recorder = other_version_stub(echo), echo_server.socket_path, EndRecorder()
    options = {'lane': lane, 'interceptors': [recorder], 'timeout': 10.0}
    text = [echo.pb.EchoRequest(text='x')]
    answers = {
        'Echo': call_through(kind, path, stub, 'Echo', text[0], **options),
        'Collect': call_through(kind, path, stub, 'Collect', text, **options),
        'Count': stream(kind, path, stub, 'Count', echo.pb.CountRequest(count=3), **options),
        'Chat': stream(kind, path, stub, 'Chat', text, **options),
    }
    for name, error in answers.items():
        assert isinstance(error, IPCRemoteError), f'{name}: {error!r}'
        assert error.code is grpc.StatusCode.INTERNAL, f'{name}: {error!r}'
        assert error.details.startswith('Exception deserializing response!'), f'{name}: {error!r}'
        assert error.method == f'/vyra.ipc.test.EchoService/{name}'
    assert recorder.ended == [(name, lane, 'INTERNAL') for name in answers]


# -- a command parameter the request lacks ------------------------------------------------------

@pytest.mark.parametrize('lane', LANES)
def test_a_missing_command_parameter_is_invalid_argument_naming_it(
        start_server: StartServer, socket_path: Path, lane: str) -> None:
    start_server(socket_path, script='command_server.py').wait_serving(ttrpc=True)
    with SyncIPCHandler(socket_path, module_pb_grpc.ModuleServiceStub, lane=lane) as handler:
        def run(command: str, **parameters: str) -> tuple[int, str]:
            answer = handler.call_method('ExecuteCommand',
                                         module_pb.CommandRequest(command=command, parameters=parameters))
            return answer.status_code, answer.result
        assert run('move', x='1.5') == (0, 'moved to 1.5')
        assert run('move', y='2') == (grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                      "move: missing parameter 'x' (given: y)")
        assert run('move') == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "move: missing parameter 'x' (given: none)")
        # A KeyError of the handler's own is its bug, not the caller's mistake.
        code, result = run('broken', x='1')
        assert code == grpc.StatusCode.INTERNAL.value[0] and "KeyError('calibration')" in result


# -- a shared buffer over an end's limit (the fast lane's own: the gRPC lane carries buffers inline) ---

KiB = 1024


@pytest.mark.parametrize('kind', KINDS)
def test_a_shared_buffer_over_max_bytes_says_which_end_refused_it(
        start_server: StartServer, socket_path: Path, echo: Any, kind: str) -> None:
    # As grpc's words for a message over a limit: "SERVER:" or "CLIENT:".
    # Before, both ends said the same, and the client's own refusal read like the server's.
    server = start_server(socket_path, '--shared-memory-threshold', str(KiB),
                          '--shared-memory-max-bytes', str(64 * KiB)).wait_serving(ttrpc=True)
    cases = [  # (the method, the buffer's size, the end that refuses it, its max_bytes, what it names)
        ('Inspect', 128 * KiB, 'SERVER', 64 * KiB, 'the request of /vyra.ipc.test.EchoService/Inspect'),
        ('Mirror', 32 * KiB, 'CLIENT', 16 * KiB, 'the response'),
    ]
    for method, size, end, max_bytes, what in cases:
        with SharedBuffer.copy_from(bytes(size)) as buffer:
            request = getattr(echo.pb, f'{method}Request')(data=buffer.ref)
            if method == 'Mirror':
                request.copy = True  # (answered with a buffer of its own)
            error = call_through(kind, server.socket_path, echo.Stub, method, request, buffers=[buffer],
                                 lane='ttrpc', timeout=10.0,
                                 shared_memory=SharedMemoryOptions(threshold=KiB, max_bytes=max_bytes))
        assert isinstance(error, IPCRemoteError) and error.code is grpc.StatusCode.RESOURCE_EXHAUSTED, repr(error)
        assert error.details.startswith(f'{end}: {what}, shared buffer 0 (0x'), error.details
        assert error.details.endswith(f'): {size} bytes is more than the limit of {max_bytes} '
                                      '(SharedMemoryOptions.max_bytes)'), error.details
