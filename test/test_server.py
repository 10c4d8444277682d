"""IPCServer, mostly with servers in real processes (the rules of its socket
file, shared with TtrpcServer: test_socket_file)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
import queue
import shutil
import signal
import socket
import subprocess
import time
from typing import Any, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
import pytest

from conftest import LONG, ServerProcess, StartServer
from vyra_base_ipc import (
    IPCError,
    IPCHandler,
    IPCRemoteError,
    IPCServer,
    ModuleService,
    SocketInUseError,
    SyncIPCHandler,
)
from vyra_base_ipc import introspection_pb2 as introspection
from vyra_base_ipc import introspection_pb2_grpc as introspection_grpc
from vyra_base_ipc._loop_thread import EventLoopThread
from vyra_base_ipc._socket_file import is_listening


def echo_text(path: Path, echo, text: str = 'hi') -> str:
    with SyncIPCHandler(path, echo.Stub, timeout=10) as client:
        return client.call_method('Echo', echo.pb.EchoRequest(text=text)).text


def test_second_server_on_live_socket_is_refused(start_server, server: ServerProcess, echo) -> None:
    inode = server.socket_path.stat().st_ino
    second = start_server(server.socket_path, wait=False)
    assert second.wait() == 3
    assert str(server.socket_path) in second.log()
    assert 'another server is listening' in second.log()
    assert server.socket_path.stat().st_ino == inode
    assert echo_text(server.socket_path, echo, 'still me') == 'still me'


def test_new_server_starts_after_the_first_was_killed(start_server, server: ServerProcess, echo) -> None:
    server.signal(signal.SIGKILL)
    server.wait()
    assert server.socket_path.is_socket()  # a crash leaves the file behind
    start_server(server.socket_path)
    assert echo_text(server.socket_path, echo) == 'hi'


@pytest.mark.parametrize('stop_signal', [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_stops_gracefully_and_removes_the_socket(server: ServerProcess,
                                                             stop_signal: int) -> None:
    server.signal(stop_signal)
    assert server.wait() == 0
    assert list(server.socket_path.parent.iterdir()) == []


@contextlib.contextmanager
def immutable(directory: Path) -> Iterator[None]:
    """``directory`` immutable (``chattr +i``): not even root may add or remove
    its entries. Skips where the file system or the privileges do not allow it."""
    if shutil.which('chattr') is None:
        pytest.skip('chattr (e2fsprogs) is not installed')
    made = subprocess.run(['chattr', '+i', str(directory)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f'cannot make a directory immutable here: {made.stderr.strip()}')
    try:
        yield
    finally:
        subprocess.run(['chattr', '-i', str(directory)], check=True)


def test_a_stop_that_cannot_remove_its_socket_files_says_so_and_still_stops(server: ServerProcess) -> None:
    """Found: SIGTERM to a server whose socket directory could no longer be
    written (read-only, immutable) ended in a PermissionError traceback, and
    the process never exited: neither lane nor the handler threads were stopped."""
    with immutable(server.socket_path.parent):
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=LONG) == 0, server.log()
        assert sorted(server.socket_path.parent.iterdir()) == sorted([server.socket_path, server.ttrpc_path])
    log = server.log()
    for path in (server.socket_path, server.ttrpc_path):
        assert f'could not remove the socket {path}: Operation not permitted' in log, log
    assert 'stopped (a socket file stayed: see the warning above)' in log, log
    assert 'Traceback' not in log, log


def test_in_flight_call_finishes_within_grace_on_sigterm(server: ServerProcess, echo) -> None:
    async def scenario() -> None:
        async with IPCHandler(server.socket_path, echo.Stub, timeout=10) as client:
            call = asyncio.create_task(client.call_method('Sleep', echo.pb.SleepRequest(seconds=0.5)))
            await client.call_method('Echo', echo.pb.EchoRequest())  # the Sleep call is in flight
            server.signal(signal.SIGTERM)
            reply = await call
            assert reply.was_active
    asyncio.run(scenario())
    assert server.wait() == 0
    assert not server.socket_path.exists()


def test_health_is_serving_for_every_service(server: ServerProcess) -> None:
    with grpc.insecure_channel(f'unix:{server.socket_path}') as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ('', 'vyra.ipc.ModuleService', 'vyra.ipc.BackendService', 'vyra.ipc.test.EchoService'):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, service


def test_health_turns_not_serving_when_shutdown_begins(server: ServerProcess, echo) -> None:
    with grpc.insecure_channel(f'unix:{server.socket_path}') as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=''),
                                                           timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stub = echo.Stub(channel)
        sleeper = stub.Sleep.future(echo.pb.SleepRequest(seconds=0.5), timeout=10)
        stub.Echo(echo.pb.EchoRequest(), timeout=5)  # answered after Sleep arrived: it is in flight
        server.signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert sleeper.result().was_active
    assert server.wait() == 0


def test_a_health_watch_ends_at_once_on_sigterm_after_not_serving(start_server, socket_path: Path) -> None:
    # grpc's own health servicer kept a Watch open through the whole grace
    # (ended CANCELLED), and the stop with it: now it ends as every other
    # stream does, UNAVAILABLE "server is shutting down", after NOT_SERVING.
    server = start_server(socket_path, '--grace-period', '30')
    with grpc.insecure_channel(f'unix:{socket_path}') as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=''),
                                                           timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        server.signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as ended:
            next(watch)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        # The server's words, unless the process was gone before grpc read
        # them: a write of the client's failing first makes grpc drop what
        # it had not read yet ("Stream removed (sendmsg: Broken pipe)", seen
        # once in CI). Not CANCELLED after the grace, in either case.
        details = ended.value.details()
        assert details == 'server is shutting down' or details.startswith('Stream removed'), details
    assert server.wait() == 0


def test_a_reflection_stream_held_open_ends_at_once_on_sigterm(start_server, socket_path: Path) -> None:
    # grpc's reflection servicer kept its stream open through the whole grace
    # (then UNAVAILABLE "Cancelling all calls"), and the stop with it: a tool
    # that holds one open (a GUI client, the CLI's session) made every stop of
    # the server wait its grace. Now it ends as every other response stream does.
    server = start_server(socket_path, '--grace-period', '30')
    requests: queue.Queue[Any] = queue.Queue()
    with grpc.insecure_channel(f'unix:{socket_path}') as channel:
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter(requests.get, None), timeout=60)
        requests.put(reflection_pb2.ServerReflectionRequest(list_services=''))
        listed = {service.name for service in next(stream).list_services_response.service}
        assert 'vyra.ipc.test.EchoService' in listed
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as ended:
            next(stream)
        requests.put(None)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        details = ended.value.details()  # (or the process was gone first: see the test above)
        assert details == 'server is shutting down' or details.startswith('Stream removed'), details
    assert server.wait() == 0
    assert time.monotonic() - started < 10, 'the stop waited for the grace'


@pytest.mark.asyncio
async def test_a_health_watch_sends_not_serving_even_when_shutdown_began_while_its_last_status_was_written(
        ) -> None:
    # The race the test above hits now and then (1 in 7 CI runs): shutdown
    # begins between the watch yielding SERVING and resuming; it then ended
    # at once, without NOT_SERVING. Driven by hand for a fixed order; the
    # context only needs abort(), which grpc.aio and the fast lane raise from.
    from vyra_base_ipc._health import HealthServicer

    class Aborted(Exception):
        pass

    class Context:
        async def abort(self, code: grpc.StatusCode, details: str) -> None:
            raise Aborted(code, details)
    health = HealthServicer()
    watch = health.Watch(health_pb2.HealthCheckRequest(service=''), Context())
    assert (await watch.__anext__()).status == health_pb2.HealthCheckResponse.SERVING
    await health.enter_graceful_shutdown()  # while SERVING is being written
    assert (await watch.__anext__()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(Aborted) as ended:
        await watch.__anext__()
    assert ended.value.args == (grpc.StatusCode.UNAVAILABLE, 'server is shutting down')


def test_reflection_describes_every_service(server: ServerProcess) -> None:
    with grpc.insecure_channel(f'unix:{server.socket_path}') as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {'vyra.ipc.ModuleService', 'vyra.ipc.BackendService', 'vyra.ipc.test.EchoService',
                'grpc.health.v1.Health'} <= services
        described = database.FindFileContainingSymbol('vyra.ipc.ModuleService')
        assert [m.name for m in described.service[0].method] == ['Initialize', 'ExecuteCommand', 'GetData']


def test_messages_up_to_16_mib_pass_both_ways_by_default(server: ServerProcess, echo) -> None:
    payload = os.urandom(16 * 1024 * 1024 - 64)
    with SyncIPCHandler(server.socket_path, echo.Stub, timeout=30) as client:
        assert client.call_method('Echo', echo.pb.EchoRequest(payload=payload)).payload == payload


def test_server_message_limit_is_configurable(start_server, socket_path: Path, echo) -> None:
    start_server(socket_path, '--max-message-bytes', str(1024 * 1024))
    with SyncIPCHandler(socket_path, echo.Stub, timeout=10) as client:
        small = client.call_method('Echo', echo.pb.EchoRequest(payload=b'x' * 1000))
        assert small.payload == b'x' * 1000
        with pytest.raises(IPCRemoteError) as error:
            client.call_method('Echo', echo.pb.EchoRequest(payload=b'x' * (1024 * 1024)))
        assert error.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.call_method('Echo', echo.pb.EchoRequest(text='after')).text == 'after'


def test_def_and_async_def_handlers_are_both_served(server: ServerProcess, echo) -> None:
    with SyncIPCHandler(server.socket_path, echo.Stub, timeout=10) as client:
        assert client.call_method('Echo', echo.pb.EchoRequest(text='async')).text == 'async'
        assert client.call_method('EchoSync', echo.pb.EchoRequest(text='sync')).text == 'sync'


# -- the API, on a server in this process ------------------------------------------------

@pytest.mark.asyncio
async def test_stop_is_idempotent_and_wait_for_termination_reports_it(socket_path: Path) -> None:
    server = IPCServer(socket_path, servicers=[ModuleService('unit')])
    await server.start()
    assert server.is_serving
    assert await server.wait_for_termination(timeout=0.01) is False
    await asyncio.gather(server.stop(0), server.stop(0))
    await server.stop(0)
    assert await server.wait_for_termination(timeout=0.01) is True
    assert await server.wait_for_termination(timeout=0) is True
    assert list(socket_path.parent.iterdir()) == []


@pytest.mark.asyncio
async def test_a_wait_for_termination_cancelled_as_the_server_stops_is_cancelled(socket_path: Path) -> None:
    """Two tasks wait for the end, and the first to see it cancels the other:
    with a timeout, that one returned True, its cancel lost (Python 3.11's
    asyncio.wait_for() gave the result of what completed in that pass)."""
    server = IPCServer(socket_path, ttrpc=False)
    await server.start()
    waiting: list[asyncio.Task[bool]] = []

    async def first_to_see_it() -> bool:
        await server.wait_for_termination()
        return waiting[0].cancel()

    first = asyncio.ensure_future(first_to_see_it())
    await asyncio.sleep(0)  # (it waits first, so it wakes first)
    waiting.append(asyncio.ensure_future(server.wait_for_termination(60)))
    await asyncio.sleep(0)
    await server.stop(0)
    assert await first  # (the other had not ended)
    with pytest.raises(asyncio.CancelledError):
        await waiting[0]


@pytest.mark.asyncio
@pytest.mark.parametrize('metrics', [True, False])
async def test_start_time_and_uptime_count_from_start_not_from_construction(socket_path: Path,
                                                                          metrics: bool) -> None:
    # Both counted from the server's construction: a node that made its
    # server and started it later said it had served since it was made.
    server = IPCServer(socket_path, servicers=[ModuleService('unit')], metrics=metrics)
    made, made_monotonic = time.time(), time.monotonic()
    await server.start()
    try:
        async with IPCHandler(socket_path, introspection_grpc.IntrospectionStub, lane='grpc') as client:
            info = await client.call_method('GetServerInfo', introspection.ServerInfoRequest())
        assert made <= info.start_time <= time.time()
        if metrics:
            assert server.metrics is not None and server.metrics.start_time == info.start_time
            stats = server.stats()
            assert stats is not None and stats.uptime_seconds <= time.monotonic() - made_monotonic
    finally:
        await server.stop(0)


@pytest.mark.asyncio
async def test_stop_while_starting_stops_the_server_once_it_started(socket_path: Path) -> None:
    # Before: stop() marked the server stopped and returned, then start()
    # finished and served on, its socket files published.
    server = IPCServer(socket_path, servicers=[ModuleService('unit')])
    starting = asyncio.ensure_future(server.start())
    await asyncio.sleep(0)  # start() runs up to its first wait
    assert not starting.done()
    await server.stop(0)
    assert starting.done() and starting.exception() is None
    assert not server.is_serving
    assert await server.wait_for_termination(timeout=0) is True
    assert list(socket_path.parent.iterdir()) == []


@pytest.mark.asyncio
async def test_a_start_cancelled_at_any_step_leaves_nothing_behind(socket_path: Path) -> None:
    """Cancelled (a timeout around it, a task cancelled) at each step of its
    start: the caller gets CancelledError, the server is stopped and no file
    of it is left, not even its private bind directory."""
    for steps in range(1, 12):  # (at 0 steps, before it ran at all)
        server = IPCServer(socket_path, servicers=[ModuleService('unit')])
        starting = asyncio.ensure_future(server.start())
        for _ in range(steps):
            await asyncio.sleep(0)  # start() goes one step further
        starting.cancel()
        try:
            await starting
        except asyncio.CancelledError:
            assert await server.wait_for_termination(timeout=0) is True, steps
            assert list(socket_path.parent.iterdir()) == [], steps
        else:
            assert server.is_serving  # (the cancel came after the start)
        await server.stop(0)
        assert list(socket_path.parent.iterdir()) == []


@pytest.mark.asyncio
async def test_a_start_cancelled_again_while_it_undoes_itself_leaves_nothing_behind(socket_path: Path) -> None:
    """Found: cancelled a second time while undoing itself (a second Ctrl-C),
    start() left its private bind directory, with gRPC's socket in it, beside
    the socket path, and the gRPC server unstopped."""
    for steps in range(1, 6):
        for more_steps in range(0, 4):
            server = IPCServer(socket_path, servicers=[ModuleService('unit')])
            starting = asyncio.ensure_future(server.start())
            for _ in range(steps):
                await asyncio.sleep(0)
            starting.cancel()
            for _ in range(more_steps):
                await asyncio.sleep(0)  # undoing goes one step further
            starting.cancel()
            try:
                await starting
            except asyncio.CancelledError:
                pass
            await server.stop(0)  # (waits until it is undone)
            assert not server.is_serving, (steps, more_steps)
            assert await server.wait_for_termination(timeout=0) is True, (steps, more_steps)
            assert list(socket_path.parent.iterdir()) == [], (steps, more_steps)


@pytest.mark.parametrize('kwargs, error, message', [
    ({'grace_period': '5'}, TypeError, 'grace_period must be a number of seconds, not str'),
    ({'grace_period': -1.0}, ValueError, 'grace_period must be a finite number of seconds >= 0'),
    ({'grace_period': float('nan')}, ValueError, 'grace_period must be a finite number'),
    ({'grace_period': 1e10}, ValueError, 'and at most 1e[+]09, not 10000000000.0'),
    # Decimal 600 is 0o1130: the group could connect, its owner not.
    ({'socket_mode': 600}, ValueError, r'socket_mode must be between 0o000 and 0o777 \(octal: 0o660, not 660\), '
                                       r'not 600 \(0o1130\)'),
    ({'socket_mode': -1}, ValueError, 'socket_mode must be between 0o000 and 0o777'),
    ({'socket_mode': 0o060}, ValueError, 'socket_mode 0o60 leaves this process, its owner, without 0o600'),
    ({'socket_mode': '0600'}, TypeError, 'socket_mode must be an int such as 0o660, not str'),
    ({'directory_mode': 700}, ValueError, r'directory_mode must be between 0o000 and 0o777.*\(0o1274\)'),
    ({'socket_group': -1}, ValueError, 'socket_group must be a group id between 0 and 4294967295, not -1'),
    ({'socket_group': 2**40}, ValueError, 'socket_group must be a group id between 0 and'),
    ({'maximum_concurrent_rpcs': 0}, ValueError, 'maximum_concurrent_rpcs must be between 1 and 2147483647, not 0'),
    ({'maximum_concurrent_rpcs': '10'}, TypeError, 'maximum_concurrent_rpcs must be an int or None, not str'),
    ({'max_workers': 2**40}, ValueError, 'max_workers must be between 1 and 2147483647'),
    # Before: "'ModuleService' object is not iterable", "'NoneType' object is not iterable".
    ({'servicers': ModuleService('alone')}, TypeError, r'servicers must be a list of servicers, not '
                                                       r'ModuleService \(one servicer too: servicers=\[...\]\)'),
    ({'interceptors': None}, TypeError, 'interceptors must be a sequence of ServerInterceptor objects, not None'),
    # Before: accepted, and metrics='no' switched the metrics on; "'int' object is not callable".
    ({'metrics': 'no'}, TypeError, 'metrics must be True or False, not str'),
    ({'ttrpc': 'yes'}, TypeError, 'ttrpc must be True or False, not str'),
    ({'servicers': [(ModuleService('x'), 5)]}, TypeError, 'the add function given with ModuleService must be '
                                                          'the generated add_<Service>Servicer_to_server, not int'),
])
def test_bad_server_arguments_are_named_before_it_starts(socket_path: Path, kwargs: dict, error: type,
                                                         message: str) -> None:
    # Before: accepted, then failing inside start() or stop() (grpc's Cython,
    # a str + float in stop() after the socket files were gone), or applied
    # as given: socket_mode=-1 was 0o7777, open to every local user.
    with pytest.raises(error, match=message):
        IPCServer(socket_path, **{'servicers': [ModuleService('unit')], **kwargs})


@pytest.mark.asyncio
async def test_a_bad_grace_given_to_stop_is_refused_before_anything_stops(socket_path: Path) -> None:
    async with IPCServer(socket_path, servicers=[ModuleService('unit')]) as server:
        with pytest.raises(TypeError, match='grace must be a number of seconds, not str'):
            await server.stop('1')  # type: ignore[arg-type]
        assert server.is_serving and socket_path.is_socket()
    with pytest.raises(ValueError, match='grace must be a finite number'):
        await server.stop(float('nan'))  # also on a server that stopped (or never started)
    with pytest.raises(ValueError, match='timeout must be a finite number'):
        await server.wait_for_termination(float('nan'))  # (before: False, as if it still ran)


@pytest.mark.asyncio
async def test_stop_on_another_event_loop_is_refused_and_changes_nothing(socket_path: Path) -> None:
    """Before: it removed both socket files and said stopped, the servers
    ran on, and stop() on the right loop raised the same error for ever."""
    loop = EventLoopThread('other-loop')
    loop.start()
    try:
        server = IPCServer(socket_path, servicers=[ModuleService('unit')])
        loop.run(server.start(), timeout=LONG)
        with pytest.raises(RuntimeError, match='another event loop than the one start'):
            await server.stop(0)
        assert server.is_serving and socket_path.is_socket()
        loop.run(server.stop(0), timeout=LONG)
        assert not server.is_serving and list(socket_path.parent.iterdir()) == []
    finally:
        loop.stop()


@pytest.mark.asyncio
async def test_abandon_is_refused_while_the_loop_runs_and_changes_nothing(socket_path: Path) -> None:
    """abandon() is for a server whose loop ended (test_node.py::
    test_ipc_server_whose_event_loop_ended_removes_both_socket_files)."""
    async with IPCServer(socket_path, servicers=[ModuleService('unit')]) as server:
        with pytest.raises(RuntimeError, match='its loop still runs: await stop'):
            server.abandon()
        assert server.is_serving and socket_path.is_socket() and server.ttrpc_socket_path.is_socket()
    assert list(socket_path.parent.iterdir()) == []


def test_servicer_without_generated_base_needs_its_add_function(socket_path: Path) -> None:
    with pytest.raises(TypeError, match='does not derive from a grpcio-generated'):
        IPCServer(socket_path, servicers=[object()])


def test_same_service_twice_is_refused(socket_path: Path) -> None:
    server = IPCServer(socket_path, servicers=[ModuleService('unit')])
    with pytest.raises(ValueError, match='vyra.ipc.ModuleService is already registered'):
        server.add_servicer(ModuleService('other'))


# -- the fast lane beside it -------------------------------------------------------------

@pytest.mark.asyncio
async def test_fast_lane_socket_is_beside_the_grpc_socket_by_default(socket_path: Path) -> None:
    async with IPCServer(socket_path, servicers=[ModuleService('unit')]) as server:
        assert server.ttrpc_socket_path == socket_path.parent / 'test_ipc.ttrpc.sock'
        assert is_listening(server.ttrpc_socket_path)


@pytest.mark.asyncio
async def test_fast_lane_socket_path_is_configurable_and_can_be_switched_off(socket_dir: Path) -> None:
    elsewhere = socket_dir / 'fast' / 'lane.sock'
    async with IPCServer(socket_dir / 'a.sock', servicers=[ModuleService('unit')],
                         ttrpc_socket_path=elsewhere):
        assert is_listening(elsewhere)
    assert not elsewhere.exists()
    async with IPCServer(socket_dir / 'b.sock', servicers=[ModuleService('unit')], ttrpc=False) as server:
        assert server.ttrpc_socket_path is None
        assert sorted(p.name for p in socket_dir.iterdir()) == ['b.sock', 'fast']


def test_fast_lane_path_equal_to_the_grpc_path_is_refused(socket_path: Path) -> None:
    with pytest.raises(ValueError, match='ttrpc_socket_path must differ from socket_path'):
        IPCServer(socket_path, ttrpc_socket_path=socket_path)


def test_the_grpc_socket_appears_last_so_both_lanes_are_up_when_it_does(start_server, socket_path: Path,
                                                                        echo) -> None:
    # start_server waits for the gRPC socket only; the fast lane must answer at once.
    start_server(socket_path)
    with SyncIPCHandler(socket_path, echo.Stub, lane='ttrpc') as client:
        assert client.call_method('Echo', echo.pb.EchoRequest(text='both')).text == 'both'


@pytest.mark.asyncio
async def test_live_fast_lane_socket_is_refused_and_nothing_is_left(socket_dir: Path) -> None:
    fast = socket_dir / 'shared.ttrpc.sock'
    async with IPCServer(socket_dir / 'first.sock', servicers=[ModuleService('unit')],
                         ttrpc_socket_path=fast):
        second = IPCServer(socket_dir / 'second.sock', servicers=[ModuleService('unit')],
                           ttrpc_socket_path=fast)
        with pytest.raises(SocketInUseError) as error:
            await second.start()
        assert error.value.filename == str(fast)
        assert not (socket_dir / 'second.sock').exists()
        assert is_listening(fast)


# == handlers that leave =========================================================================

EXITS = {'exit': 'SystemExit', 'interrupt': 'KeyboardInterrupt'}


@pytest.fixture(scope='module')
def exiting_server(start_module_server: StartServer, module_socket_dir: Path) -> ServerProcess:
    """test/servers/exiting_server.py: handlers that sys.exit() or raise KeyboardInterrupt when asked."""
    return start_module_server(module_socket_dir / 'x.sock', script='exiting_server.py').wait_serving(ttrpc=True)


@pytest.mark.parametrize('how', list(EXITS))
@pytest.mark.parametrize('method', ['Echo', 'EchoSync', 'Count', 'Chat', 'ChatSync'])
@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_handler_that_exits_fails_its_call_unknown_and_the_server_serves_on(
        lane: str, method: str, how: str, exiting_server: ServerProcess, echo) -> None:
    # grpc.aio catches only Exception from a handler: a sys.exit() let out of
    # the handler's task would end the server's event loop, and every call
    # after it would hang.
    with SyncIPCHandler(exiting_server.socket_path, echo.Stub, lane=lane, timeout=LONG) as client:
        with pytest.raises(IPCError) as failure:
            if method.startswith('Echo'):
                client.call_method(method, echo.pb.EchoRequest(text=how))
            elif method == 'Count':
                list(client.stream_method(method, echo.pb.CountRequest(count=-1 if how == 'exit' else -2)))
            else:
                list(client.stream_method(method, iter([echo.pb.EchoRequest(text=how)])))
    assert failure.value.code == grpc.StatusCode.UNKNOWN
    assert f"Unexpected <class '{EXITS[how]}'>" in failure.value.details
    for other in ('grpc', 'ttrpc'):
        with SyncIPCHandler(exiting_server.socket_path, echo.Stub, lane=other, timeout=LONG) as client:
            assert client.call_method('Echo', echo.pb.EchoRequest(text='still here')).text == 'still here'
    assert exiting_server.popen.poll() is None


def test_connections_are_counted_from_the_socket_table_among_thousands_of_other_sockets(socket_dir: Path) -> None:
    from vyra_base_ipc._introspection import unix_connections

    path = socket_dir / 'counted.sock'
    longer = socket_dir / 'counted.sock.old'  # the same path and more: not counted
    listeners = [socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)]
    others = [socket.socketpair() for _ in range(1000)]
    clients: list[socket.socket] = []
    accepted: list[socket.socket] = []
    try:
        for listener, where in zip(listeners, (path, longer), strict=True):
            listener.bind(str(where))
            listener.listen(8)
        assert unix_connections(path) == 0  # the listener is not a connection
        for where, count in ((path, 3), (longer, 2)):
            for _ in range(count):
                client = socket.socket(socket.AF_UNIX)
                client.connect(str(where))
                clients.append(client)
        for listener, count in zip(listeners, (3, 2), strict=True):
            accepted += [listener.accept()[0] for _ in range(count)]
        assert (unix_connections(path), unix_connections(longer)) == (3, 2)
        accepted.pop(0).close()
        assert unix_connections(path) == 2
    finally:
        for each in (*listeners, *clients, *accepted, *(end for pair in others for end in pair)):
            each.close()
