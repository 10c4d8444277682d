"""Interceptors and metrics, on both lanes, against a real server process
(test/servers/observed_server.py): what a server interceptor sees, a
refusal with PERMISSION_DENIED, the counters read over the socket through
``vyra.ipc.Introspection``, and client interceptors of both clients."""

from __future__ import annotations

import asyncio
import functools
import json
import os
from pathlib import Path
import signal
import time
from typing import Any, Callable

from google.protobuf import any_pb2
from google.rpc import error_details_pb2
import grpc
import pytest

from conftest import LANES, ServerProcess, StartServer, call_through, until, wait_for
from http2_peer import CLIENT_SETTINGS, PREFACE, RawConnection, grpc_call, grpc_message
from ttrpc_peer import Peer
from vyra_base_ipc import (
    CallRejected,
    ClientCall,
    ClientInterceptor,
    IPCHandler,
    IPCRemoteError,
    IPCServer,
    IPCTimeoutError,
    IPCUnavailableError,
    ServerCall,
    ServerInterceptor,
    SyncIPCHandler,
    ttrpc_pb2,
)
from vyra_base_ipc import backend_service_pb2 as backend_pb
from vyra_base_ipc import backend_service_pb2_grpc as backend_grpc
from vyra_base_ipc import introspection_pb2 as introspection
from vyra_base_ipc import introspection_pb2_grpc as introspection_grpc
from vyra_base_ipc import module_service_pb2 as module_pb
from vyra_base_ipc import module_service_pb2_grpc as module_grpc

SHARED_MEMORY_SIZE = 2 * 1024 * 1024  # above the default shared-memory threshold


class Observed:
    """The observed server, its journal, and clients on either lane."""

    def __init__(self, server: ServerProcess, journal: Path) -> None:
        self.server = server
        self.journal = journal

    def client(self, stub: type, lane: str) -> SyncIPCHandler:
        return SyncIPCHandler(self.server.socket_path, stub, lane=lane, timeout=10)

    def entries(self) -> list[dict[str, Any]]:
        if not self.journal.exists():
            return []
        return [json.loads(line) for line in self.journal.read_text().splitlines()]

    def ended(self, method: str, lane: str, count: int = 1) -> list[dict[str, Any]]:
        """The journal's ``ended`` entries of ``method`` on ``lane``, once
        there are ``count`` (call_ended runs after the answer went out)."""
        def found() -> list[dict[str, Any]]:
            return [entry for entry in self.entries() if entry['event'] == 'ended'
                    and entry['method'] == method and entry['lane'] == lane]
        wait_for(lambda: len(found()) >= count, 10, f'{count} ended {method} on {lane} in the journal')
        return found()

    def stats(self, lane: str) -> introspection.Stats:
        with self.client(introspection_grpc.IntrospectionStub, lane) as client:
            return client.call_method('GetStats', introspection.StatsRequest())  # type: ignore[no-any-return]

    def method_stats(self, method: str, lane: str, calls: int) -> introspection.MethodStats:
        """The counters of ``method`` on ``lane`` once ``calls`` calls ended."""
        found: list[introspection.MethodStats] = []

        def counted() -> bool:
            found[:] = [entry for entry in self.stats(lane).methods
                        if entry.method == method and entry.lane == lane]
            return bool(found) and found[0].calls >= calls
        wait_for(counted, 10, f'{calls} calls of {method} on {lane} counted')
        return found[0]


def start_observed(start_server: StartServer, socket_path: Path, tmp_path: Path, *args: str) -> Observed:
    journal = tmp_path / 'journal.jsonl'
    server = start_server(socket_path, str(journal), *args, script='observed_server.py', wait=False)
    return Observed(server.wait_serving(ttrpc=True), journal)


@pytest.fixture
def observed(start_server: StartServer, socket_path: Path, tmp_path: Path) -> Observed:
    return start_observed(start_server, socket_path, tmp_path)


ECHO = '/vyra.ipc.test.EchoService/Echo'
ECHO_SYNC = '/vyra.ipc.test.EchoService/EchoSync'
FAIL = '/vyra.ipc.test.EchoService/Fail'
INSPECT_SYNC = '/vyra.ipc.test.EchoService/InspectSync'
SLEEP = '/vyra.ipc.test.EchoService/Sleep'
COUNT = '/vyra.ipc.test.EchoService/Count'
EXECUTE = '/vyra.ipc.ModuleService/ExecuteCommand'


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_an_interceptor_refuses_a_call_with_permission_denied_and_its_handler_never_runs(
        observed: Observed, echo: Any, lane: str) -> None:
    count = module_pb.CommandRequest(command='count')
    with observed.client(module_grpc.ModuleServiceStub, lane) as client:
        with pytest.raises(IPCRemoteError) as refused:
            client.call_method('ExecuteCommand', count, metadata=(('x-deny', 'no robots today'),))
        assert refused.value.code is grpc.StatusCode.PERMISSION_DENIED
        assert 'denied: no robots today' in str(refused.value)
        # The same client without the metadata is served, and the command
        # counts its first run: the refused call never reached it.
        assert client.call_method('ExecuteCommand', count).result == '1'
    denied, served = observed.ended(EXECUTE, lane, 2)[:2]
    assert (denied['code'], denied['details']) == ('PERMISSION_DENIED', 'denied: no robots today')
    assert served['code'] == 'OK'
    stats = observed.method_stats(EXECUTE, lane, 2)
    assert dict(stats.errors) == {'PERMISSION_DENIED': 1}


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_an_interceptor_refuses_a_call_with_the_status_details_it_gives(observed: Observed, lane: str) -> None:
    count = module_pb.CommandRequest(command='count')
    with observed.client(module_grpc.ModuleServiceStub, lane) as client:
        with pytest.raises(IPCRemoteError) as refused:
            client.call_method('ExecuteCommand', count, metadata=(('x-deny', 'with-error-info'),))
    assert (refused.value.code, refused.value.details) == (grpc.StatusCode.PERMISSION_DENIED,
                                                           'denied: with-error-info')
    info = error_details_pb2.ErrorInfo()
    assert len(refused.value.status_details) == 1 and refused.value.status_details[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == ('DENIED', 'vyra.ipc.test', {'by': 'gatekeeper'})


def test_a_refusal_packs_its_status_details_and_takes_nothing_but_messages() -> None:
    info = error_details_pb2.ErrorInfo(reason='DENIED')
    packed = any_pb2.Any()
    packed.Pack(info)
    assert CallRejected(grpc.StatusCode.PERMISSION_DENIED, 'x', status_details=[info, packed]).status_details == (
        packed, packed)
    with pytest.raises(TypeError, match='must be protobuf messages, not dict'):
        CallRejected(grpc.StatusCode.PERMISSION_DENIED, 'x', status_details=[{'reason': 'DENIED'}])  # type: ignore[list-item]
    with pytest.raises(TypeError, match='must be a sequence of protobuf messages, not ErrorInfo'):
        CallRejected(grpc.StatusCode.PERMISSION_DENIED, 'x', status_details=info)  # type: ignore[arg-type]


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_an_interceptor_refusing_with_a_message_not_packed_in_an_any_refuses_with_it_packed(
        observed: Observed, echo: Any, lane: str) -> None:
    # (The fast lane had answered such a refusal never: its caller waited for
    # the deadline, and the call stayed in flight for the metrics; a TypeError
    # instead would have let the refused call through, as any broken interceptor's.)
    with observed.client(echo.Stub, lane) as client:
        with pytest.raises(IPCRemoteError) as refused:
            client.call_method('Echo', echo.pb.EchoRequest(text='a'),
                               metadata=(('x-deny', 'with-unpacked-error-info'),))
        assert client.call_method('Echo', echo.pb.EchoRequest(text='b')).text == 'b'
    info = error_details_pb2.ErrorInfo()
    assert refused.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert len(refused.value.status_details) == 1 and refused.value.status_details[0].Unpack(info)
    assert info.reason == 'DENIED'
    assert [entry['code'] for entry in observed.ended(ECHO, lane, 2)] == ['PERMISSION_DENIED', 'OK']


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_client_interceptor_refuses_a_call_with_the_status_details_it_gives(
        observed: Observed, echo: Any, lane: str) -> None:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason='OFF_HERE', domain='vyra.ipc.test'))

    class Refusing(ClientInterceptor):
        def call_started(self, call: ClientCall) -> None:
            raise CallRejected(grpc.StatusCode.FAILED_PRECONDITION, 'off here', status_details=[info])

    with SyncIPCHandler(observed.server.socket_path, echo.Stub, lane=lane, timeout=10,
                        interceptors=[Refusing()]) as client:
        with pytest.raises(IPCRemoteError) as refused:
            client.call_method('Echo', echo.pb.EchoRequest(text='a'))
    assert (refused.value.code, refused.value.details, refused.value.status_details) == (
        grpc.StatusCode.FAILED_PRECONDITION, 'off here', (info,))


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_an_interceptor_sees_method_lane_metadata_peer_deadline_status_and_duration(
        observed: Observed, echo: Any, lane: str) -> None:
    with observed.client(echo.Stub, lane) as client:
        client.call_method('Echo', echo.pb.EchoRequest(text='a'), metadata=(('x-trace', 'abc'),))
        client.call_method('EchoSync', echo.pb.EchoRequest(text='b'))
        with pytest.raises(IPCRemoteError):
            client.call_method('Fail', echo.pb.FailRequest(code=grpc.StatusCode.NOT_FOUND.value[0],
                                                           details='no such joint'))
        with pytest.raises(IPCRemoteError):  # a def handler that aborts
            client.call_method('InspectSync', echo.pb.InspectRequest(fail_code=grpc.StatusCode.ABORTED.value[0]))
        with pytest.raises(IPCTimeoutError):
            client.call_method('Sleep', echo.pb.SleepRequest(seconds=5), timeout=0.3)
    echoed = observed.ended(ECHO, lane)[0]
    assert echoed['code'] == 'OK' and echoed['metadata']['x-trace'] == 'abc'
    assert echoed['service'] == 'vyra.ipc.test.EchoService' and echoed['has_deadline']
    assert echoed['duration'] > 0
    # The fast lane knows the client process; gRPC's runtime does not tell.
    assert echoed['peer_pid'] == (os.getpid() if lane == 'ttrpc' else None)
    assert observed.ended(ECHO_SYNC, lane)[0]['code'] == 'OK'
    failed = observed.ended(FAIL, lane)[0]
    assert (failed['code'], failed['details']) == ('NOT_FOUND', 'no such joint')
    aborted = observed.ended(INSPECT_SYNC, lane)[0]
    assert aborted['code'] == 'ABORTED' and 'failing with' in aborted['details']
    slept = observed.ended(SLEEP, lane)[0]
    # The fast lane's CANCEL says the client left at its deadline. gRPC's
    # RST_STREAM does not: the server tells by its own copy of the deadline
    # (started on arrival, rounded up), which the reset may beat (README).
    assert slept['code'] in (('DEADLINE_EXCEEDED',) if lane == 'ttrpc' else ('DEADLINE_EXCEEDED', 'CANCELLED'))
    started = [entry for entry in observed.entries() if entry['event'] == 'started' and entry['lane'] == lane]
    assert {entry['method'] for entry in started} >= {ECHO, ECHO_SYNC, FAIL, INSPECT_SYNC, SLEEP}
    # Both hooks run on the server's event loop (its main thread here), def handlers' calls too.
    assert {entry['thread'] for entry in observed.entries() if entry['lane'] == lane} == {'MainThread'}


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_calls_of_methods_the_server_does_not_have_are_counted(observed: Observed, lane: str) -> None:
    # grpc.aio answers them itself, before any handler: a peer probing the
    # server, or built against other protos, was invisible in the stats.
    with observed.client(backend_grpc.BackendServiceStub, lane) as client:
        for _ in range(3):
            with pytest.raises(IPCRemoteError) as error:
                client.call_method('GetStatus', backend_pb.StatusRequest())
            assert error.value.code is grpc.StatusCode.UNIMPLEMENTED
    unknown = observed.method_stats('(unknown method)', lane, 3)
    assert (unknown.calls, unknown.in_flight, dict(unknown.errors)) == (3, 0, {'UNIMPLEMENTED': 3})


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_stats_over_the_socket_count_calls_errors_latency_and_bytes(
        observed: Observed, echo: Any, lane: str) -> None:
    with observed.client(echo.Stub, lane) as client:
        for _ in range(5):
            client.call_method('Echo', echo.pb.EchoRequest(text='hello'))
        with pytest.raises(IPCRemoteError):
            client.call_method('Fail', echo.pb.FailRequest(code=grpc.StatusCode.ALREADY_EXISTS.value[0]))
        replies = list(client.stream_method('Count', echo.pb.CountRequest(count=3)))
        assert len(replies) == 3
        client.call_method('Echo', echo.pb.EchoRequest(payload=b'x' * SHARED_MEMORY_SIZE))
        stats = observed.stats(lane)
        lane_stats = {entry.lane: entry for entry in stats.lanes}[lane]
        assert lane_stats.connections >= 1  # this client's, open now
    echo_stats = observed.method_stats(ECHO, lane, 6)
    assert (echo_stats.calls, echo_stats.in_flight, dict(echo_stats.errors)) == (6, 0, {})
    assert sum(echo_stats.latency_counts) == 6
    assert len(echo_stats.latency_counts) == len(stats.latency_bounds_seconds) + 1
    assert 0 < echo_stats.latency_p50_seconds <= echo_stats.latency_p99_seconds <= echo_stats.latency_max_seconds
    assert dict(observed.method_stats(FAIL, lane, 1).errors) == {'ALREADY_EXISTS': 1}
    assert observed.method_stats(COUNT, lane, 1).calls == 1
    lane_stats = {entry.lane: entry for entry in observed.stats(lane).lanes}[lane]
    if lane == 'ttrpc':  # the 2 MiB request and answer went as shared memory
        assert lane_stats.shared_memory_bytes_received >= SHARED_MEMORY_SIZE
        assert lane_stats.shared_memory_bytes_sent >= SHARED_MEMORY_SIZE
        assert lane_stats.inline_bytes_received < SHARED_MEMORY_SIZE
    else:
        assert lane_stats.inline_bytes_received >= SHARED_MEMORY_SIZE
        assert lane_stats.inline_bytes_sent >= SHARED_MEMORY_SIZE
        assert lane_stats.shared_memory_bytes_received == 0
    # Introspection's own calls are not counted as the module's.
    assert not [entry for entry in observed.stats(lane).methods if 'Introspection' in entry.method]


LIMIT_EXCEEDED = (grpc.StatusCode.RESOURCE_EXHAUSTED, 'Concurrent RPC limit exceeded!')


def at_the_limit(call: Callable[[], Any]) -> Any:
    """What ``call()`` returns, or ``None`` if the server refused it at
    ``maximum_concurrent_rpcs``: on the gRPC lane a call's slot is free a
    moment after its client has the answer (when grpc.aio's task of it
    ends), so a call right after another may find it taken still."""
    try:
        return call()
    except IPCRemoteError as error:
        if (error.code, error.details) != LIMIT_EXCEEDED:
            raise
        return None


def admitted(call: Callable[[], Any], what: str) -> Any:
    """What ``call()`` returns once the server takes it (see :func:`at_the_limit`)."""
    result: list[Any] = []
    wait_for(lambda: result.append(at_the_limit(call)) or result[-1] is not None, 10, what)
    return result[-1]


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_calls_refused_at_maximum_concurrent_rpcs_are_counted(
        start_server: StartServer, socket_path: Path, tmp_path: Path, echo: Any, lane: str) -> None:
    # grpc.aio refused them itself, and the fast lane before its metrics: a
    # server shedding load showed nothing in its stats but fewer calls.
    observed = start_observed(start_server, socket_path, tmp_path, '--maximum-concurrent-rpcs', '1')
    other = 'grpc' if lane == 'ttrpc' else 'ttrpc'  # (the limit is per lane: read the stats there)

    def refused() -> int:
        stats = admitted(lambda: observed.stats(other), f'stats on the {other} lane')
        return {entry.lane: entry.calls_refused for entry in stats.lanes}[lane]  # type: ignore[no-any-return]

    with observed.client(echo.Stub, lane) as client:
        def hold() -> Any:
            stream = client.stream_method('Count', echo.pb.CountRequest(count=1_000_000))
            next(stream)  # its handler runs: the one call the lane takes
            return stream
        held = admitted(hold, 'a stream held open')
        before = refused()
        for text in ('a', 'b', 'c'):
            with pytest.raises(IPCRemoteError) as refusal:
                client.call_method('Echo', echo.pb.EchoRequest(text=text), timeout=10)
            assert (refusal.value.code, refusal.value.details) == LIMIT_EXCEEDED
        for shape, call in (('a response stream', lambda: list(client.stream_method(
                                'Count', echo.pb.CountRequest(count=2), timeout=10))),
                            ('a request stream', lambda: client.call_method(
                                'Collect', iter([echo.pb.EchoRequest(text='x')]), timeout=10))):
            with pytest.raises(IPCRemoteError) as refusal:
                call()
            assert (refusal.value.code, refusal.value.details) == LIMIT_EXCEEDED, shape
        stats = admitted(lambda: observed.stats(other), f'stats on the {other} lane')
        held.close()
    assert {entry.lane: entry.calls_refused for entry in stats.lanes}[lane] == before + 5
    echo_stats = [entry for entry in stats.methods if entry.method == ECHO and entry.lane == lane]
    assert [(entry.calls, entry.in_flight, dict(entry.errors)) for entry in echo_stats] == [
        (3, 0, {'RESOURCE_EXHAUSTED': 3})]
    # A handler's own RESOURCE_EXHAUSTED is no refusal at a limit.
    attempts = 0
    with observed.client(echo.Stub, lane) as client:
        def fail_served() -> bool:
            nonlocal attempts
            attempts += 1
            with pytest.raises(IPCRemoteError) as failure:
                client.call_method('Fail', echo.pb.FailRequest(code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]))
            return (failure.value.code, failure.value.details) != LIMIT_EXCEEDED  # (else: refused, see at_the_limit)
        wait_for(fail_served, 10, 'Fail served')
    assert refused() == before + 5 + attempts - 1


def lane_bytes(stats: introspection.Stats, lane: str) -> tuple[int, int, int, int]:
    found = {entry.lane: entry for entry in stats.lanes}[lane]
    return (found.inline_bytes_received, found.inline_bytes_sent, found.shared_memory_bytes_received,
            found.shared_memory_bytes_sent)


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_lane_bytes_count_the_modules_own_messages_only(observed: Observed, echo: Any, lane: str) -> None:
    # As its calls are: the fast lane counted those of introspection (each
    # GetStats answer grew the counters it reported), health and methods the
    # server does not have; the gRPC lane never did.
    before = lane_bytes(observed.stats(lane), lane)
    with observed.client(backend_grpc.BackendServiceStub, lane) as client:
        with pytest.raises(IPCRemoteError):
            client.call_method('GetStatus', backend_pb.StatusRequest(), timeout=10)
    for _ in range(3):
        observed.stats(lane)
    assert lane_bytes(observed.stats(lane), lane) == before
    with observed.client(echo.Stub, lane) as client:
        client.call_method('Echo', echo.pb.EchoRequest(text='counted'))
    received, sent, _, _ = lane_bytes(observed.stats(lane), lane)
    assert (received, sent) == (before[0] + 9, before[1] + 9)  # b'\n\x07counted' each way


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_running_call_is_in_flight(observed: Observed, echo: Any, lane: str) -> None:
    with observed.client(echo.Stub, lane) as client:
        call = client.stream_method('Count', echo.pb.CountRequest(count=1_000_000))
        next(call)
        running = observed.method_stats(COUNT, lane, 0)
        assert running.in_flight == 1 and running.calls == 0
        call.close()
    ended = observed.method_stats(COUNT, lane, 1)
    assert (ended.in_flight, dict(ended.errors)) == (0, {'CANCELLED': 1})


@pytest.mark.parametrize('flags, code', [(0x01, 'DEADLINE_EXCEEDED'), (0, 'CANCELLED')])
def test_a_fast_lane_cancel_ends_the_call_deadline_exceeded_when_it_says_the_deadline_passed(
        observed: Observed, echo: Any, flags: int, code: str) -> None:
    # A client leaving at its deadline cancels the call at once; the
    # server's copy of the deadline started as the request arrived and may
    # not have passed yet. Before, such a call ended CANCELLED or
    # DEADLINE_EXCEEDED by which came first (CI saw both).
    with Peer.connect(observed.server.ttrpc_path) as peer:
        peer.request(1, 'vyra.ipc.ttrpc.Connection', 'Hello', ttrpc_pb2.Hello(cancel=True).SerializeToString())
        assert ttrpc_pb2.Hello.FromString(peer.answer(1).payload).cancel
        peer.request(3, 'vyra.ipc.test.EchoService', 'Sleep', echo.pb.SleepRequest(seconds=60).SerializeToString(),
                     timeout_nano=60 * 10**9)
        wait_for(lambda: observed.method_stats(SLEEP, 'ttrpc', 0).in_flight == 1, 10, 'the call running')
        peer.send(3, 0x10, flags)  # CANCEL
        slept = observed.ended(SLEEP, 'ttrpc')[0]
        assert (slept['code'], slept['details']) == (code, 'Deadline Exceeded' if flags else
                                                     'the client cancelled the call or went away')
        assert dict(observed.method_stats(SLEEP, 'ttrpc', 1).errors) == {code: 1}
        # Nothing is sent for a call its client left; the connection serves on.
        peer.request(5, 'vyra.ipc.test.EchoService', 'Echo', echo.pb.EchoRequest(text='on').SerializeToString())
        answer = peer.answer()
        assert (answer.stream_id, echo.pb.EchoReply.FromString(answer.payload).text) == (5, 'on')


STATUS = '/vyra.ipc.test.StatusService/'


def status_failure(observed: Observed, echo: Any, lane: str, method: str, how: str) -> IPCRemoteError:
    """The error a StatusService call doing ``how`` fails with."""
    request = echo.pb.MisbehaveRequest(how=how)
    with observed.client(echo.grpc.StatusServiceStub, lane) as client, pytest.raises(IPCRemoteError) as failed:
        if method.startswith('MisbehaveStream'):
            list(client.stream_method(method, request))
        else:
            client.call_method(method, request)
    return failed.value


def assert_observed_as_sent(observed: Observed, method: str, lane: str, sent: IPCRemoteError,
                            calls: int = 1) -> None:
    """The last ``calls`` calls of ``method`` ended as ``sent`` did for the
    interceptor and the metrics, none of them left in flight."""
    ended = observed.ended(method, lane, calls)
    assert [(entry['code'], entry['details']) for entry in ended] == [(sent.code.name, sent.details)] * calls
    stats = observed.method_stats(method, lane, calls)
    assert (stats.calls, stats.in_flight, dict(stats.errors)) == (calls, 0, {sent.code.name: calls})


@pytest.mark.parametrize('method', ['Misbehave', 'MisbehaveSync', 'MisbehaveStream'])
def test_an_abort_with_an_int_code_is_observed_as_that_status(observed: Observed, echo: Any,
                                                              method: str) -> None:
    # grpc.aio takes abort(5, ...) and sends NOT_FOUND. Before, the gRPC lane's
    # observation failed on the int (logged): call_ended never ran and the
    # call stayed in flight in the stats, one more with each such call.
    failures = [status_failure(observed, echo, 'grpc', method, 'abort-with-number') for _ in range(2)]
    assert [(error.code, error.details) for error in failures] == [(grpc.StatusCode.NOT_FOUND,
                                                                    'aborted with 5')] * 2
    assert_observed_as_sent(observed, STATUS + method, 'grpc', failures[0], 2)


@pytest.mark.parametrize('method', ['Misbehave', 'MisbehaveSync', 'MisbehaveStream'])
def test_a_handler_that_sets_a_code_and_raises_is_observed_with_that_code(observed: Observed, echo: Any,
                                                                         method: str) -> None:
    # grpc sends the code set, with the exception as details; the gRPC lane's
    # observation said UNKNOWN. (The fast lane is the subject of another change.)
    failed = status_failure(observed, echo, 'grpc', method, 'set-code-then-raise')
    assert (failed.code, failed.details) == (grpc.StatusCode.NOT_FOUND,
                                             "Unexpected <class 'ValueError'>: after set_code")
    assert_observed_as_sent(observed, STATUS + method, 'grpc', failed)


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
@pytest.mark.parametrize('method', ['Misbehave', 'MisbehaveSync', 'MisbehaveStream'])
def test_an_answer_that_does_not_serialize_is_observed_as_the_unknown_the_client_gets(
        observed: Observed, echo: Any, lane: str, method: str) -> None:
    # The handler returns (yields) None: the client gets UNKNOWN. The gRPC
    # lane's observation ended when the handler returned, before the answer
    # failed to serialize, and said OK.
    failed = status_failure(observed, echo, lane, method, 'return-none')
    assert failed.code is grpc.StatusCode.UNKNOWN and "<class 'TypeError'>" in failed.details
    assert_observed_as_sent(observed, STATUS + method, lane, failed)


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_stream_that_catches_its_abort_and_goes_on_is_observed_with_the_abort(
        observed: Observed, echo: Any, lane: str) -> None:
    # grpc.aio closes such a stream and sends the abort's status; the gRPC
    # lane's observation took the close for a cancellation (CANCELLED).
    failed = status_failure(observed, echo, lane, 'MisbehaveStream', 'yield-after-abort')
    assert (failed.code, failed.details) == (grpc.StatusCode.NOT_FOUND, 'stop')
    assert_observed_as_sent(observed, STATUS + 'MisbehaveStream', lane, failed)


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_def_handler_has_is_active_cancelled_done_and_add_done_callback_on_both_lanes(
        observed: Observed, echo: Any, lane: str) -> None:
    # grpc.aio's context for def handlers has none of them: calling one was
    # an AttributeError, the call UNKNOWN, on the gRPC lane only.
    with observed.client(echo.grpc.StatusServiceStub, lane) as client:
        reply = client.call_method('MisbehaveSync', echo.pb.MisbehaveRequest(how='context', tag=f'{lane} ok'))
        assert json.loads(reply.text) == {'is_active': True, 'cancelled': False, 'done': False}
        with pytest.raises(IPCTimeoutError):  # the handler works on while is_active()
            client.call_method('MisbehaveSync', echo.pb.MisbehaveRequest(how='wait-cancel', tag=lane),
                               timeout=0.5)

    def seen(tag: str) -> list[dict[str, Any]]:
        return [entry for entry in observed.entries() if entry['event'] == 'seen' and entry['tag'] == tag]
    wait_for(lambda: seen(f'{lane} ok') and seen(lane), 10, 'the done callback, and the handler stopping')
    assert seen(f'{lane} ok') == [{'event': 'seen', 'tag': f'{lane} ok', 'done_callback': True}]
    assert seen(lane) == [{'event': 'seen', 'tag': lane, 'is_active': False, 'cancelled': True, 'done': True}]
    # It answered after its deadline: observed as the client saw it, not OK.
    # (On the gRPC lane CANCELLED when the client's cancel at its deadline
    # arrived before the server's later deadline: see the next test.)
    assert observed.ended(STATUS + 'MisbehaveSync', lane, 2)[1]['code'] in (
        ('DEADLINE_EXCEEDED',) if lane == 'ttrpc' else ('DEADLINE_EXCEEDED', 'CANCELLED'))


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
@pytest.mark.parametrize('method', ['MisbehaveSync', 'MisbehaveStreamSync'])
def test_a_def_handler_returning_as_its_deadline_passes_is_deadline_exceeded_for_client_and_observers(
        observed: Observed, echo: Any, lane: str, method: str) -> None:
    # It works while is_active() and returns the moment its deadline passed.
    # The gRPC lane's observation said DEADLINE_EXCEEDED, but grpc.aio sent
    # what the handler returned unless its own timer had fired: most such
    # calls came back OK to the client (31 of 40 here).
    #
    # On the gRPC lane the caller is a peer that does not cancel at its
    # deadline. grpc's clients do, and the server's deadline comes later than
    # the client's by the time the request took to arrive: a cancel that gets
    # there first ends the call CANCELLED on the server, as grpc core says
    # (an HTTP/2 CANCEL is CANCELLED until the deadline passed), which made
    # this test fail now and then. The fast lane's CANCEL says that its
    # client's deadline passed.
    request = echo.pb.MisbehaveRequest(how='until-inactive')
    calls = 20
    expired = ('DEADLINE_EXCEEDED', 'Deadline Exceeded')
    if lane == 'grpc':
        answers = []
        with RawConnection(observed.server.socket_path) as connection:
            connection.send(PREFACE + CLIENT_SETTINGS)
            for stream in range(1, 2 * calls, 2):
                connection.send(grpc_call(stream, STATUS + method, grpc_message(request.SerializeToString()),
                                          (b'grpc-timeout', b'50m')))
                answer = connection.results({stream})[stream]
                answers.append((answer.grpc_status, answer.grpc_message, answer.data))
        assert [answer[:2] for answer in answers] == [(grpc.StatusCode.DEADLINE_EXCEEDED.value[0], expired[1])] * calls
        # The stream's handler yields a first message before it works: sent whole, or not at all where the
        # deadline came before a thread took the handler (1 call in 20 in a CI run under load).
        sent = grpc_message(echo.pb.EchoReply(text='first').SerializeToString()) if 'Stream' in method else b''
        assert {answer[2] for answer in answers} <= {sent, b''}, answers
    else:
        with observed.client(echo.grpc.StatusServiceStub, lane) as client:
            for _ in range(calls):
                with pytest.raises(IPCTimeoutError):
                    if method == 'MisbehaveStreamSync':
                        list(client.stream_method(method, request, timeout=0.05))
                    else:
                        client.call_method(method, request, timeout=0.05)
    ended = observed.ended(STATUS + method, lane, calls)
    assert [(entry['code'], entry['details']) for entry in ended] == [expired] * calls
    assert dict(observed.method_stats(STATUS + method, lane, calls).errors) == {'DEADLINE_EXCEEDED': calls}


@pytest.mark.parametrize('lane', LANES)
def test_a_call_the_stop_cancels_after_the_grace_is_observed_as_the_unavailable_its_client_gets(
        observed: Observed, echo: Any, lane: str) -> None:
    # Found: on the gRPC lane such a call ended CANCELLED for interceptors and
    # metrics, while grpc.aio answered its client UNAVAILABLE (the fast lane did).
    async def call_through_the_stop() -> IPCUnavailableError:
        async with IPCHandler(observed.server.socket_path, echo.Stub, lane=lane, timeout=30) as client:
            call = asyncio.ensure_future(client.call_method('Sleep', echo.pb.SleepRequest(seconds=25)))
            await until(lambda: [entry for entry in observed.entries() if entry['method'] == SLEEP], 10,
                        'the call to start on the server')
            observed.server.signal(signal.SIGTERM)  # (its grace: 1 s)
            with pytest.raises(IPCUnavailableError) as stopped:
                await call
            return stopped.value
    sent = asyncio.run(call_through_the_stop())
    assert observed.server.wait() == 0
    ended = observed.ended(SLEEP, lane)[0]
    assert (sent.code.name, sent.details) == ('UNAVAILABLE', 'Cancelling all calls')
    assert (ended['code'], ended['details']) == (sent.code.name, sent.details)


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_server_info_names_the_module_process_and_services(observed: Observed, lane: str) -> None:
    with observed.client(introspection_grpc.IntrospectionStub, lane) as client:
        info = client.call_method('GetServerInfo', introspection.ServerInfoRequest())
    assert info.module_name == 'observed'
    assert (info.pid, info.uid) == (observed.server.pid, os.geteuid())
    assert info.socket_path == str(observed.server.socket_path)
    assert info.ttrpc_socket_path == str(observed.server.ttrpc_path)
    assert list(info.services) == ['vyra.ipc.test.EchoService', 'vyra.ipc.ModuleService',
                                   'vyra.ipc.test.StatusService']
    assert info.start_time > 0


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_stats_of_a_server_without_metrics_say_so(start_server: StartServer, socket_path: Path,
                                                  tmp_path: Path, lane: str) -> None:
    before = time.time()
    observed = start_observed(start_server, socket_path, tmp_path, '--no-metrics')
    with pytest.raises(IPCRemoteError) as refused:
        observed.stats(lane)
    assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert 'metrics are off' in str(refused.value)
    # The rest of the server's information does not depend on them (its start time was 0).
    with observed.client(introspection_grpc.IntrospectionStub, lane) as client:
        info = client.call_method('GetServerInfo', introspection.ServerInfoRequest())
    assert (info.module_name, info.pid) == ('observed', observed.server.pid)
    assert before <= info.start_time <= time.time()


@pytest.mark.parametrize('failure', ['RuntimeError', 'SystemExit', 'KeyboardInterrupt'])
def test_a_broken_interceptor_is_logged_and_calls_go_on(start_server: StartServer, socket_path: Path,
                                                       tmp_path: Path, echo: Any, failure: str) -> None:
    """Also one that exits: as a handler's exit, it must not end the server's event loop."""
    observed = start_observed(start_server, socket_path, tmp_path, '--broken-interceptor', failure)
    for lane in ('grpc', 'ttrpc'):
        with observed.client(echo.Stub, lane) as client:
            for text in (lane, f'{lane} again'):
                assert client.call_method('Echo', echo.pb.EchoRequest(text=text), timeout=10).text == text
        assert observed.ended(ECHO, lane)[0]['code'] == 'OK'  # the next interceptor still ran
    wait_for(lambda: 'bug in call_ended' in observed.server.log(), 10, 'the failure in the log')
    assert 'bug in call_started' in observed.server.log()


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_an_interceptor_after_one_that_refused_a_call_sees_neither_its_start_nor_its_end(
        start_server: StartServer, socket_path: Path, tmp_path: Path, echo: Any, lane: str) -> None:
    # Found: every interceptor's call_ended ran for a refused call, also those
    # after the refusing one, whose call_started never ran: an interceptor
    # pairing them (calls in flight, spans) went wrong, to -1 and below.
    observed = start_observed(start_server, socket_path, tmp_path, '--refusing-interceptor')
    with observed.client(echo.Stub, lane) as client:
        with pytest.raises(IPCRemoteError, match='refused first') as refused:
            client.call_method('Echo', echo.pb.EchoRequest(text='no'), metadata=(('x-refuse', 'yes'),))
        assert refused.value.code is grpc.StatusCode.PERMISSION_DENIED
        assert client.call_method('Echo', echo.pb.EchoRequest(text='yes')).text == 'yes'
    observed.ended(ECHO, lane)  # the served call's end: the refused one's came before it, if at all
    assert [(entry['event'], 'x-refuse' in entry['metadata']) for entry in observed.entries()] == [
        ('started', False), ('ended', False)]
    # The metrics count every call, the refused one too.
    assert dict(observed.method_stats(ECHO, lane, 2).errors) == {'PERMISSION_DENIED': 1}


def test_interceptors_must_be_server_interceptors(socket_path: Path) -> None:
    with pytest.raises(TypeError, match='interceptors must be ServerInterceptor objects'):
        IPCServer(socket_path, interceptors=[print])  # type: ignore[list-item]
    IPCServer(socket_path, interceptors=[ServerInterceptor()])


class AsyncGate(ServerInterceptor):
    """Refuses every call, written with ``async def`` hooks."""

    async def call_started(self, call: ServerCall) -> None:  # type: ignore[override]
        raise CallRejected(grpc.StatusCode.PERMISSION_DENIED, 'nobody')


class AsyncEnded(ServerInterceptor):
    async def call_ended(self, call: ServerCall, code: grpc.StatusCode, details: str,  # type: ignore[override]
                         duration: float) -> None:
        pass


class AsyncClientGate(ClientInterceptor):
    async def call_started(self, call: ClientCall) -> None:  # type: ignore[override]
        raise CallRejected(grpc.StatusCode.PERMISSION_DENIED, 'nobody')


@pytest.mark.parametrize('interceptor, hook', [(AsyncGate(), 'AsyncGate.call_started'),
                                               (AsyncEnded(), 'AsyncEnded.call_ended')])
def test_an_async_def_server_hook_is_refused_naming_it(socket_path: Path, interceptor: ServerInterceptor,
                                                       hook: str) -> None:
    # Found: hooks are called, never awaited, so an async def call_started
    # only made a coroutine: its refusal never happened and every call was
    # served (on both lanes), with nothing but Python's "never awaited" warning.
    with pytest.raises(TypeError, match=f'{hook} is an async def: .* make it a def'):
        IPCServer(socket_path, interceptors=[ServerInterceptor(), interceptor])


@pytest.mark.parametrize('client', [SyncIPCHandler, IPCHandler])
def test_an_async_def_client_hook_is_refused_naming_it(socket_path: Path, client: type) -> None:
    with pytest.raises(TypeError, match='AsyncClientGate.call_started is an async def: .* make it a def'):
        client(socket_path, interceptors=[AsyncClientGate()])


class AsyncCallable:
    """A hook as a callable object whose ``__call__`` is an ``async def``."""

    async def __call__(self, *arguments: Any) -> None:
        raise CallRejected(grpc.StatusCode.PERMISSION_DENIED, 'nobody')


async def async_refusal(*arguments: Any) -> None:
    raise CallRejected(grpc.StatusCode.PERMISSION_DENIED, 'nobody')


class HookedGate(ServerInterceptor):
    """A ServerInterceptor whose ``call_started`` is the hook given."""

    def __init__(self, hook: Any) -> None:
        self.call_started = hook  # type: ignore[method-assign]


class StaticGate(ServerInterceptor):
    call_started = staticmethod(async_refusal)  # type: ignore[assignment]


@pytest.mark.parametrize('interceptor', [
    HookedGate(AsyncCallable()), HookedGate(functools.partial(AsyncCallable())),
    HookedGate(functools.partial(async_refusal, 'bound')), StaticGate()],
    ids=['async __call__', 'partial of an async __call__', 'partial of an async def', 'staticmethod'])
def test_a_server_hook_that_makes_a_coroutine_however_written_is_refused(
        socket_path: Path, interceptor: ServerInterceptor) -> None:
    # Found: a callable object with an async def __call__ (and a partial of
    # one) passed the check, inspect seeing no coroutine function in it: its
    # refusal, never awaited, let every call through.
    name = type(interceptor).__qualname__
    with pytest.raises(TypeError, match=f'{name}.call_started is an async def: .* make it a def'):
        IPCServer(socket_path, interceptors=[interceptor])


class CallableClientGate(ClientInterceptor):
    call_started = AsyncCallable()  # type: ignore[assignment]


@pytest.mark.parametrize('client', [SyncIPCHandler, IPCHandler])
def test_a_client_hook_with_an_async_call_is_refused(socket_path: Path, client: type) -> None:
    with pytest.raises(TypeError, match='CallableClientGate.call_started is an async def: .* make it a def'):
        client(socket_path, interceptors=[CallableClientGate()])



# -- client interceptors ------------------------------------------------------------


class Recorder(ClientInterceptor):
    """Adds a trace id to every call, refuses calls of ``refused``, and
    records how each call ended."""

    def __init__(self, refused: str = '') -> None:
        self.refused = refused
        self.ended: list[tuple[str, str | None, str, str]] = []

    def call_started(self, call: ClientCall) -> None:
        call.metadata.append(('x-trace', 'trace-42'))
        if self.refused and call.method.endswith(self.refused):
            raise CallRejected(grpc.StatusCode.FAILED_PRECONDITION, f'{self.refused} is off here')

    def call_ended(self, call: ClientCall, code: grpc.StatusCode, details: str, duration: float) -> None:
        assert duration >= 0
        self.ended.append((call.method, call.lane, code.name, details))


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_client_interceptor_adds_metadata_and_sees_each_call_end(observed: Observed, echo: Any,
                                                                  lane: str) -> None:
    recorder = Recorder()
    with SyncIPCHandler(observed.server.socket_path, echo.Stub, lane=lane, timeout=10,
                        interceptors=[recorder]) as client:
        client.call_method('Echo', echo.pb.EchoRequest(text='a'), metadata=(('x-own', 'yes'),))
        with pytest.raises(IPCRemoteError):
            client.call_method('Fail', echo.pb.FailRequest(code=grpc.StatusCode.NOT_FOUND.value[0],
                                                           details='gone'))
        stream = client.stream_method('Count', echo.pb.CountRequest(count=1_000_000))
        next(stream)
        stream.close()  # left early
    echoed = observed.ended(ECHO, lane)[0]
    assert echoed['metadata']['x-trace'] == 'trace-42' and echoed['metadata']['x-own'] == 'yes'
    assert recorder.ended == [
        (ECHO, lane, 'OK', ''),
        (FAIL, lane, 'NOT_FOUND', 'gone'),
        (COUNT, lane, 'CANCELLED', 'the caller left the call'),
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
async def test_a_client_interceptor_refuses_a_call_before_anything_is_sent(observed: Observed, echo: Any,
                                                                          lane: str) -> None:
    recorder = Recorder(refused='Echo')
    async with IPCHandler(observed.server.socket_path, echo.Stub, lane=lane, timeout=10,
                          interceptors=[recorder]) as client:
        with pytest.raises(IPCRemoteError) as refused:
            await client.call_method('Echo', echo.pb.EchoRequest(text='never sent'))
        assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
        assert 'Echo is off here' in str(refused.value)
        reply = await client.call_method('EchoSync', echo.pb.EchoRequest(text='sent'))
        assert reply.text == 'sent'
        async for _ in client.stream_method('Count', echo.pb.CountRequest(count=2)):
            pass
    assert recorder.ended == [
        (ECHO, None, 'FAILED_PRECONDITION', 'Echo is off here'),
        (ECHO_SYNC, lane, 'OK', ''),
        (COUNT, lane, 'OK', ''),
    ]
    observed.ended(ECHO_SYNC, lane)
    assert not [entry for entry in observed.entries() if entry['method'] == ECHO]  # never reached the server


#: Keys gRPC keeps for itself, as a client may write them (upper-case keys are sent lower-case).
RESERVED_KEYS = ('grpc-status', 'grpc-timeout', 'grpc-message', 'grpc-encoding', 'grpc-trace-bin', 'grpc-anything',
                 'Grpc-Status', 'te', 'content-type', 'Content-Type', 'user-agent', 'host', ':authority', ':path')


class AddsReserved(ClientInterceptor):
    """Adds a reserved key to every call, as an interceptor may by mistake."""

    def call_started(self, call: ClientCall) -> None:
        call.metadata.append(('grpc-timeout', '1S'))


@pytest.mark.parametrize('kind', ['sync', 'async'])
@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_reserved_metadata_keys_are_a_value_error_naming_them_before_anything_is_sent(
        observed: Observed, echo: Any, lane: str, kind: str) -> None:
    # Before: grpc-status made the gRPC lane answer None as if OK (grpc took
    # its value for the call's status); grpc-timeout, te, content-type and
    # user-agent were dropped there, and delivered on the fast lane.
    path, options = observed.server.socket_path, {'lane': lane, 'timeout': 10}
    for key in RESERVED_KEYS:
        value: str | bytes = b'\x01' if key.endswith('-bin') else '13'
        refused = [
            call_through(kind, path, echo.Stub, 'Echo', echo.pb.EchoRequest(), metadata=[(key, value)], **options),
            call_through(kind, path, echo.Stub, 'Count', echo.pb.CountRequest(count=1), whole_stream=True,
                         metadata=[('x-ok', 'yes'), (key, value)], **options),
        ]
        for error in refused:
            assert isinstance(error, ValueError), f'{key}: {error!r}'
            assert str(error).startswith(f'metadata key {key.lower()!r} is reserved'), str(error)
    added = call_through(kind, path, echo.Stub, 'Echo', echo.pb.EchoRequest(), interceptors=[AddsReserved()],
                         **options)
    assert isinstance(added, ValueError) and "'grpc-timeout' is reserved" in str(added), repr(added)
    assert call_through(kind, path, echo.Stub, 'EchoSync', echo.pb.EchoRequest(text='sent'),
                        metadata=[('x-ok', 'yes')], **options).text == 'sent'
    served = observed.ended(ECHO_SYNC, lane)[0]
    assert served['metadata']['x-ok'] == 'yes'
    # Nothing of the refused calls reached the server (its journal has every call it saw).
    assert [entry['method'] for entry in observed.entries()] == [ECHO_SYNC, ECHO_SYNC]


def test_client_interceptors_must_be_client_interceptors(socket_path: Path) -> None:
    with pytest.raises(TypeError, match='interceptors must be ClientInterceptor objects'):
        SyncIPCHandler(socket_path, interceptors=[ServerInterceptor()])  # type: ignore[list-item]


def test_a_client_interceptor_after_one_that_refused_a_call_sees_neither_its_start_nor_its_end(
        observed: Observed, echo: Any) -> None:
    first, second = Recorder(refused='Echo'), Recorder()
    with SyncIPCHandler(observed.server.socket_path, echo.Stub, lane='ttrpc', timeout=10,
                        interceptors=[first, second]) as client:
        with pytest.raises(IPCRemoteError, match='Echo is off here'):
            client.call_method('Echo', echo.pb.EchoRequest(text='never sent'))
        client.call_method('EchoSync', echo.pb.EchoRequest(text='sent'))
    assert first.ended == [(ECHO, None, 'FAILED_PRECONDITION', 'Echo is off here'), (ECHO_SYNC, 'ttrpc', 'OK', '')]
    assert second.ended == [(ECHO_SYNC, 'ttrpc', 'OK', '')]


def test_a_client_interceptor_sees_a_retried_call_once_and_the_server_each_attempt(observed: Observed,
                                                                                  echo: Any) -> None:
    # README: call_started and call_ended run once per call, its retries
    # included (what the caller waits for); the server sees every attempt.
    recorder = Recorder()
    busy = echo.pb.FailRequest(code=grpc.StatusCode.UNAVAILABLE.value[0], details='busy')
    with SyncIPCHandler(observed.server.socket_path, echo.Stub, lane='ttrpc', timeout=1.0,
                        idempotent_methods=['Fail'], interceptors=[recorder]) as client:
        with pytest.raises(IPCUnavailableError, match='busy'):
            client.call_method('Fail', busy)
    assert recorder.ended == [(FAIL, 'ttrpc', 'UNAVAILABLE', 'busy')]
    attempts = observed.ended(FAIL, 'ttrpc', 2)
    assert {entry['metadata']['x-trace'] for entry in attempts} == {'trace-42'}


@pytest.mark.parametrize('lane', LANES)
def test_a_def_handler_whose_client_cancels_is_told_at_once_and_observed_cancelled(
        observed: Observed, echo: Any, lane: str) -> None:
    # grpc.aio told a def handler nothing of a client that left (grpc/grpc#25327):
    # on the gRPC lane it worked on until its deadline, a minute here.
    tag = f'{lane} left'

    async def cancel_while_it_runs() -> None:
        async with IPCHandler(observed.server.socket_path, echo.grpc.StatusServiceStub, lane=lane,
                              timeout=60) as client:
            call = asyncio.ensure_future(client.call_method(
                'MisbehaveSync', echo.pb.MisbehaveRequest(how='wait-cancel', tag=tag)))
            until = time.monotonic() + 10
            while not [entry for entry in observed.entries() if entry['method'] == STATUS + 'MisbehaveSync']:
                assert time.monotonic() < until, 'the call never started on the server'
                await asyncio.sleep(0.01)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
    asyncio.run(cancel_while_it_runs())

    def seen() -> list[dict[str, Any]]:
        return [entry for entry in observed.entries() if entry['event'] == 'seen' and entry['tag'] == tag]
    wait_for(seen, 10, 'the handler to see its call end')
    assert seen() == [{'event': 'seen', 'tag': tag, 'is_active': False, 'cancelled': True, 'done': True}]
    ended = observed.ended(STATUS + 'MisbehaveSync', lane)[0]
    assert ended['code'] == 'CANCELLED'
    assert dict(observed.method_stats(STATUS + 'MisbehaveSync', lane, 1).errors) == {'CANCELLED': 1}


#: A deadline that grpc-timeout rounds up by more than the way back takes.
DEADLINE = 1.0


@pytest.mark.parametrize('lane', LANES)
@pytest.mark.parametrize('ending', ['deadline', 'cancel'])
@pytest.mark.parametrize('method', ['Misbehave', 'MisbehaveStream'])
def test_a_handler_that_catches_its_calls_end_and_returns_is_observed_with_what_its_client_got(
        observed: Observed, echo: Any, lane: str, ending: str, method: str) -> None:
    # An async def handler that catches the cancellation of its call (its
    # deadline passed, its client left) and returns: the gRPC lane observed
    # it OK, though its client got DEADLINE_EXCEEDED or CANCELLED (the fast
    # lane observed what its client got). With a 1 s deadline grpc-timeout
    # rounds the server's copy up (to about 1.009 s): the client's cancellation
    # came first, and the gRPC lane observed CANCELLED.
    request = echo.pb.MisbehaveRequest(how='swallow-cancel')

    async def call() -> None:
        async with IPCHandler(observed.server.socket_path, echo.grpc.StatusServiceStub, lane=lane) as client:
            if method == 'Misbehave':
                made = client.call_method(method, request, timeout=DEADLINE if ending == 'deadline' else 30)
            else:
                made = _drain(client.stream_method(method, request,
                                                   timeout=DEADLINE if ending == 'deadline' else 30))
            running = asyncio.ensure_future(made)
            if ending == 'deadline':
                with pytest.raises(IPCTimeoutError):
                    await running
                return
            await until(lambda: any(entry['event'] == 'started' and entry['method'] == STATUS + method
                                    for entry in observed.entries()), 10, 'the call to start on the server')
            await asyncio.sleep(0.1)  # (a stream's first message on its way)
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
    asyncio.run(call())
    code = 'DEADLINE_EXCEEDED' if ending == 'deadline' else 'CANCELLED'
    assert observed.ended(STATUS + method, lane)[0]['code'] == code
    assert dict(observed.method_stats(STATUS + method, lane, 1).errors) == {code: 1}


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass
