"""The same servicers answer identically on the gRPC lane and the ttrpc lane.

One real server process (conftest's ``lanes``) serves the same
servicer objects on both sockets; every call is made on both lanes and the
outcomes (response messages, or error class, status code and details) must
be equal.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Callable

import grpc
import pytest

from conftest import ServerProcess
from ttrpc_peer import REQUEST, Peer
from vyra_base_ipc import IPCHandler, SyncIPCHandler, ttrpc_pb2
from vyra_base_ipc import module_service_pb2 as module_pb
from vyra_base_ipc import module_service_pb2_grpc as module_grpc
from vyra_base_ipc._methods import Method, MethodKind, stub_methods
from vyra_base_ipc.exceptions import IPCError, IPCRemoteError
from vyra_base_ipc.ttrpc import AsyncConnection, SyncConnection


def outcome(call: Callable[[], Any]) -> Any:
    """What a call gives, comparable across lanes."""
    try:
        result = call()
    except IPCError as error:
        return (type(error).__name__, error.code, error.details, error.method)
    if isinstance(result, list):
        return [message.SerializeToString(deterministic=True) for message in result]
    return result.SerializeToString(deterministic=True)


async def async_outcome(call: Callable[[], Any]) -> Any:
    try:
        result = await call()
    except IPCError as error:
        return (type(error).__name__, error.code, error.details, error.method)
    if isinstance(result, list):
        return [message.SerializeToString(deterministic=True) for message in result]
    return result.SerializeToString(deterministic=True)


# name -> (service, method, request factory taking the test proto module).
# Factories, because request iterators are consumed by a call.
CASES: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    'unary async handler': ('echo', 'Echo', lambda pb: pb.EchoRequest(text='hello', payload=bytes(range(64)))),
    'unary def handler': ('echo', 'EchoSync', lambda pb: pb.EchoRequest(text='hi', payload=b'\0' * 100)),
    'empty request': ('echo', 'Echo', lambda pb: pb.EchoRequest()),
    'handler raises (async)': ('echo', 'Echo', lambda pb: pb.EchoRequest(text='raise')),
    'handler raises (def)': ('echo', 'EchoSync', lambda pb: pb.EchoRequest(text='raise')),
    'handler returns None': ('echo', 'Echo', lambda pb: pb.EchoRequest(text='none')),
    'handler sets a code': ('echo', 'Echo', lambda pb: pb.EchoRequest(text='set-code')),
    'first abort wins': ('echo', 'Echo', lambda pb: pb.EchoRequest(text='catch-abort')),
    'abort in def handler': ('echo', 'EchoSync', lambda pb: pb.EchoRequest(text='abort')),
    'server streaming': ('echo', 'Count', lambda pb: pb.CountRequest(count=5)),
    'server streaming, no items': ('echo', 'Count', lambda pb: pb.CountRequest(count=0)),
    'client streaming': ('echo', 'Collect', lambda pb: iter([pb.EchoRequest(text=t) for t in 'abc'])),
    'client streaming, empty messages': ('echo', 'Collect', lambda pb: iter([pb.EchoRequest()] * 3)),
    'client streaming, no items': ('echo', 'Collect', lambda pb: iter([])),
    'bidi streaming': ('echo', 'Chat', lambda pb: iter([pb.EchoRequest(text=t) for t in 'xyz'])),
    'bidi streaming, no items': ('echo', 'Chat', lambda pb: iter([])),
    'ModuleService command': ('module', 'ExecuteCommand',
                              lambda pb: module_pb.CommandRequest(command='ping')),
    'ModuleService parameters': ('module', 'ExecuteCommand', lambda pb: module_pb.CommandRequest(
        command='parameters', parameters={'a': '1', 'ü': 'ß'})),
    'ModuleService unknown command': ('module', 'ExecuteCommand',
                                      lambda pb: module_pb.CommandRequest(command='nope')),
    'ModuleService unknown data key': ('module', 'GetData', lambda pb: module_pb.DataRequest(key='nope')),
}
for _code in grpc.StatusCode:
    if _code is not grpc.StatusCode.OK:
        CASES[f'status {_code.name}'] = ('echo', 'Fail', lambda pb, code=_code: pb.FailRequest(
            code=code.value[0], details=f'details of {code.name}'))


def stub_for(echo: Any, service: str) -> type:
    return echo.Stub if service == 'echo' else module_grpc.ModuleServiceStub


@pytest.mark.parametrize('case', CASES)
def test_sync_clients_get_the_same_outcome_on_both_lanes(lanes: ServerProcess, echo: Any, case: str) -> None:
    service, method_name, make_request = CASES[case]
    stub = stub_for(echo, service)

    def request() -> Any:
        return make_request(echo.pb)
    method = stub_methods(stub)[method_name]
    with SyncIPCHandler(lanes.grpc_path, stub, timeout=10) as handler, \
            SyncConnection.connect(lanes.ttrpc_path) as connection:
        if method.kind.response_streaming:
            via_grpc = outcome(lambda: list(handler.stream_method(method_name, request())))
            via_ttrpc = outcome(lambda: list(connection.stream(method, request(), timeout=10)))
        else:
            via_grpc = outcome(lambda: handler.call_method(method_name, request()))
            via_ttrpc = outcome(lambda: connection.call(method, request(), timeout=10))
    assert via_ttrpc == via_grpc


@pytest.mark.asyncio
@pytest.mark.parametrize('case', CASES)
async def test_async_clients_get_the_same_outcome_on_both_lanes(lanes: ServerProcess, echo: Any, case: str) -> None:
    service, method_name, make_request = CASES[case]
    stub = stub_for(echo, service)

    def request() -> Any:
        return make_request(echo.pb)
    method = stub_methods(stub)[method_name]

    async def collect(iterator: Any) -> list[Any]:
        return [item async for item in iterator]
    async with IPCHandler(lanes.grpc_path, stub, timeout=10) as handler, \
            await AsyncConnection.connect(lanes.ttrpc_path) as connection:
        if method.kind.response_streaming:
            via_grpc = await async_outcome(lambda: collect(handler.stream_method(method_name, request())))
            via_ttrpc = await async_outcome(lambda: collect(connection.stream(method, request(), timeout=10)))
        else:
            via_grpc = await async_outcome(lambda: handler.call_method(method_name, request()))
            via_ttrpc = await async_outcome(lambda: connection.call(method, request(), timeout=10))
    assert via_ttrpc == via_grpc


def test_outcomes_cover_errors_and_responses(lanes: ServerProcess, echo: Any) -> None:
    # Guards the comparison above against comparing two identical failures.
    method = stub_methods(echo.Stub)['Echo']
    with SyncConnection.connect(lanes.ttrpc_path) as connection:
        reply = connection.call(method, echo.pb.EchoRequest(text='t', payload=b'p'), timeout=10)
        assert (reply.text, reply.payload) == ('t', b'p')
        with pytest.raises(IPCRemoteError) as raised:
            connection.call(method, echo.pb.EchoRequest(text='raise'), timeout=10)
    assert raised.value.code is grpc.StatusCode.UNKNOWN
    assert raised.value.details == "Unexpected <class 'ValueError'>: boom"


def test_metadata_reaches_the_handler_alike_on_both_lanes(lanes: ServerProcess, echo: Any) -> None:
    # An upper-case key is sent lower-case on both (it failed on the gRPC lane: INTERNAL).
    metadata = [('X-Trace', 'abc'), ('x-token-bin', b'\x00\xff\x10'), ('x-trace', 'second')]
    method = stub_methods(echo.Stub)['Echo']
    with SyncIPCHandler(lanes.grpc_path, echo.Stub, timeout=10) as handler, \
            SyncConnection.connect(lanes.ttrpc_path) as connection:
        via_grpc = handler.call_method('Echo', echo.pb.EchoRequest(text='metadata'), metadata=metadata)
        via_ttrpc = connection.call(method, echo.pb.EchoRequest(text='metadata'), metadata=metadata,
                                    timeout=10)
    assert json.loads(via_ttrpc.text) == json.loads(via_grpc.text) == [
        ['x-trace', 'abc'], ['x-token-bin', '00ff10'], ['x-trace', 'second']]


@pytest.mark.parametrize('metadata, message', [
    ([('bad key', 'v')], r"metadata key 'bad key': gRPC allows only 0-9, a-z"),
    ([('', 'v')], r"metadata key '': gRPC allows only"),
    ([('k', 'café')], r"metadata value of 'k' must be printable ASCII \(a key ending in \"-bin\" carries"),
    ([('k', 'a\nb')], r"metadata value of 'k' must be printable ASCII"),
])
@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_metadata_grpc_does_not_allow_is_a_value_error_naming_it_on_both_lanes(
        lanes: Any, echo: Any, lane: str, metadata: Any, message: str) -> None:
    # Before: sent as it was on the fast lane; INTERNAL "Invalid metadata" on
    # the gRPC lane, as if from the server, naming nothing.
    with SyncIPCHandler(lanes.grpc_path, echo.Stub, lane=lane, timeout=10) as handler:
        with pytest.raises(ValueError, match=message):
            handler.call_method('Echo', echo.pb.EchoRequest(), metadata=metadata)
        assert handler.call_method('Echo', echo.pb.EchoRequest(text='fine')).text == 'fine'


def test_a_raw_peers_reserved_metadata_never_reaches_a_handler_as_on_grpc(lanes: ServerProcess,
                                                                          echo: Any) -> None:
    # Keys a gRPC server takes for itself, sent past this package's clients:
    # on the gRPC lane by grpc itself, on the fast lane by a raw ttrpc peer.
    # Before, a fast-lane handler saw them all, with the peer's values.
    forged = [('grpc-timeout', '1n'), ('grpc-status', '0'), ('grpc-message', 'forged'),
              ('grpc-encoding', 'identity'), ('grpc-trace-bin', 'AQ=='), ('te', 'forged'),
              ('content-type', 'text/forged'), ('Grpc-Timeout', '1n'), (':path', '/forged')]
    kept = [('x-ok', 'yes'), ('host', 'peer')]
    with Peer.connect(lanes.ttrpc_path) as peer:
        envelope = ttrpc_pb2.Request(
            service='vyra.ipc.test.EchoService', method='Echo', timeout_nano=10 * 10**9,
            payload=echo.pb.EchoRequest(text='metadata').SerializeToString(),
            metadata=[ttrpc_pb2.KeyValue(key=key, value=value) for key, value in [*forged, *kept]])
        peer.send(1, REQUEST, 0, envelope.SerializeToString())
        answer = peer.answer(1)
    assert answer.code == 0, answer.message
    via_ttrpc = json.loads(echo.pb.EchoReply.FromString(answer.payload).text)
    # A plain grpc channel sends what it is given (pseudo-headers aside: grpc refuses those).
    with grpc.insecure_channel(f'unix:{lanes.grpc_path}') as channel:
        call = channel.unary_unary('/vyra.ipc.test.EchoService/Echo',
                                   request_serializer=echo.pb.EchoRequest.SerializeToString,
                                   response_deserializer=echo.pb.EchoReply.FromString)
        reply = call(echo.pb.EchoRequest(text='metadata'), timeout=10,
                     metadata=[(key, base64.b64decode(value) if key.endswith('-bin') else value)
                               for key, value in [*forged, *kept] if not key.startswith(':') and key.islower()])
    via_grpc = json.loads(reply.text)
    assert via_ttrpc == [['x-ok', 'yes'], ['host', 'peer']]
    assert sorted(via_grpc) == sorted(via_ttrpc)  # (grpc puts host first)


@pytest.mark.parametrize('key', ['X-Up', 'bad key', ''])
def test_a_raw_peers_metadata_key_grpc_calls_illegal_fails_the_call_as_on_grpc(lanes: ServerProcess, echo: Any,
                                                                            key: str) -> None:
    # This package's clients never send such a key; a raw peer's reached a
    # fast-lane handler (the call succeeded) where grpc refuses the call.
    import http2_peer as h2

    body = echo.pb.EchoRequest(text='metadata').SerializeToString()
    with Peer.connect(lanes.ttrpc_path) as peer:
        envelope = ttrpc_pb2.Request(service='vyra.ipc.test.EchoService', method='Echo', timeout_nano=10 * 10**9,
                                     payload=body, metadata=[ttrpc_pb2.KeyValue(key=key, value='v')])
        peer.send(1, REQUEST, 0, envelope.SerializeToString())
        answer = peer.answer(1)
    if key:  # (HPACK cannot carry an empty name to the gRPC lane)
        with h2.RawConnection(lanes.grpc_path, timeout=10) as connection:
            connection.send(h2.PREFACE + h2.CLIENT_SETTINGS
                            + h2.grpc_call(1, '/vyra.ipc.test.EchoService/Echo', body, (key.encode(), b'v')))
            result = connection.results({1})[1]
        assert (result.grpc_status, result.grpc_message) == (grpc.StatusCode.INTERNAL.value[0],
                                                             f'Illegal header key: {key}')
    assert (answer.code, answer.message) == (grpc.StatusCode.INTERNAL.value[0], f'Illegal header key: {key}')


@pytest.mark.asyncio
async def test_unknown_method_is_unimplemented_as_on_grpc(lanes: ServerProcess, echo: Any) -> None:
    known = stub_methods(echo.Stub)['Echo']
    for path in ('/vyra.ipc.test.EchoService/NoSuchMethod', '/no.such.Service/Echo'):
        missing = Method('Missing', path, MethodKind.UNARY_UNARY, known.request_serializer,
                         known.response_deserializer)
        channel = grpc.aio.insecure_channel(f'unix:{lanes.grpc_path}')
        try:
            with pytest.raises(grpc.RpcError) as via_grpc:
                await channel.unary_unary(path, request_serializer=known.request_serializer)(
                    echo.pb.EchoRequest(), timeout=10)
        finally:
            await channel.close()
        async with await AsyncConnection.connect(lanes.ttrpc_path) as connection:
            with pytest.raises(IPCRemoteError) as via_ttrpc:
                await connection.call(missing, echo.pb.EchoRequest(), timeout=10)
        assert via_ttrpc.value.code is via_grpc.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert via_ttrpc.value.details == via_grpc.value.details()
        assert via_ttrpc.value.method == path


@pytest.mark.asyncio
@pytest.mark.parametrize('method_name', ['Echo', 'EchoSync', 'Count', 'Collect', 'Chat'])
async def test_undecodable_request_is_answered_alike(lanes: ServerProcess, echo: Any, method_name: str) -> None:
    known = stub_methods(echo.Stub)[method_name]
    raw = Method(known.name, known.path, known.kind, None, known.response_deserializer)  # bytes as they are
    garbage = b'\xff\xff\xff\xff'
    request: Any = iter([garbage]) if known.kind.request_streaming else garbage
    channel = grpc.aio.insecure_channel(f'unix:{lanes.grpc_path}')
    try:
        call = getattr(channel, known.kind.value)(known.path, response_deserializer=known.response_deserializer)
        with pytest.raises(grpc.RpcError) as via_grpc:
            result = call(request, timeout=10)
            if known.kind.response_streaming:
                async for _ in result:
                    pass
            else:
                await result
    finally:
        await channel.close()
    request = iter([garbage]) if known.kind.request_streaming else garbage
    async with await AsyncConnection.connect(lanes.ttrpc_path) as connection:
        with pytest.raises(IPCRemoteError) as via_ttrpc:
            if known.kind.response_streaming:
                async for _ in connection.stream(raw, request, timeout=10):
                    pass
            else:
                await connection.call(raw, request, timeout=10)
    assert via_ttrpc.value.code is via_grpc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert via_ttrpc.value.details == via_grpc.value.details()
    assert 'vyra.ipc.test.' in via_ttrpc.value.details
