"""IPCHandler and SyncIPCHandler against real server processes."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
import contextlib
import gc
import os
from pathlib import Path
import signal
import threading
from typing import Any, Callable, Iterator
import warnings

import grpc
import pytest

from conftest import LONG, ServerProcess, drop_leftovers, make_stale_socket, wait_for
from vyra_base_ipc import (
    IPCError,
    IPCHandler,
    IPCRemoteError,
    IPCTimeoutError,
    IPCUnavailableError,
    SyncIPCHandler,
)
from vyra_base_ipc._pool import aio_pool, aio_ttrpc_pool, sync_pool, sync_ttrpc_pool
from vyra_base_ipc.ttrpc import AsyncConnection, SyncConnection

# -- calls -------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_unary_call_through_the_documented_api(server: ServerProcess, echo) -> None:
    ipc = IPCHandler(socket_path=str(server.socket_path), service_stub=echo.Stub)
    await ipc.connect()
    response = await ipc.call_method('Echo', echo.pb.EchoRequest(text='hello'), timeout=5.0)
    await ipc.disconnect()
    assert response.text == 'hello'


@pytest.mark.asyncio
async def test_server_streaming(server: ServerProcess, echo) -> None:
    async with IPCHandler(server.socket_path, echo.Stub) as ipc:
        replies = [r async for r in ipc.stream_method('Count', echo.pb.CountRequest(count=5))]
    assert [r.index for r in replies] == [0, 1, 2, 3, 4]


@pytest.mark.asyncio
async def test_client_streaming_from_an_async_generator(server: ServerProcess, echo) -> None:
    async def requests():
        for text in ('a', 'b', 'c'):
            yield echo.pb.EchoRequest(text=text)
    async with IPCHandler(server.socket_path, echo.Stub) as ipc:
        reply = await ipc.call_method('Collect', requests())
    assert (reply.text, reply.index) == ('a,b,c', 3)


@pytest.mark.asyncio
async def test_bidirectional_streaming(server: ServerProcess, echo) -> None:
    requests = [echo.pb.EchoRequest(text=t) for t in ('x', 'y')]
    async with IPCHandler(server.socket_path, echo.Stub) as ipc:
        replies = [r async for r in ipc.stream_method('Chat', iter(requests))]
    assert [(r.text, r.index) for r in replies] == [('X', 0), ('Y', 1)]


def test_sync_client_every_call_shape(server: ServerProcess, echo) -> None:
    with SyncIPCHandler(server.socket_path, echo.Stub) as ipc:
        assert ipc.call_method('Echo', echo.pb.EchoRequest(text='u')).text == 'u'
        assert [r.index for r in ipc.stream_method('Count', echo.pb.CountRequest(count=3))] == [0, 1, 2]
        assert ipc.call_method('Collect', iter([echo.pb.EchoRequest(text='p')])).text == 'p'
        chat = ipc.stream_method('Chat', iter([echo.pb.EchoRequest(text='q')]))
        assert [r.text for r in chat] == ['Q']


def test_sync_client_takes_lists_of_requests(server: ServerProcess, echo) -> None:
    requests = [echo.pb.EchoRequest(text=t) for t in ('a', 'b')]
    with SyncIPCHandler(server.socket_path, echo.Stub) as ipc:
        assert ipc.call_method('Collect', requests).text == 'a,b'
        assert [r.text for r in ipc.stream_method('Chat', requests)] == ['A', 'B']


def test_sync_client_is_usable_from_many_threads(server: ServerProcess, echo) -> None:
    with SyncIPCHandler(server.socket_path, echo.Stub) as ipc:
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(
                lambda i: ipc.call_method('EchoSync', echo.pb.EchoRequest(text=str(i))).text, range(64)))
    assert texts == [str(i) for i in range(64)]


@pytest.mark.asyncio
async def test_leaving_a_stream_early_cancels_it(server: ServerProcess, echo) -> None:
    async with IPCHandler(server.socket_path, echo.Stub) as ipc:
        async for reply in ipc.stream_method('Count', echo.pb.CountRequest(count=1_000_000)):  # noqa: B007 (read after the loop)
            break
        assert reply.index == 0
        assert (await ipc.call_method('Echo', echo.pb.EchoRequest(text='next'))).text == 'next'


# -- errors ------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_missing_socket_fails_at_once_naming_the_path(socket_path: Path, echo) -> None:
    ipc = IPCHandler(socket_path, echo.Stub, timeout=30)
    with pytest.raises(IPCUnavailableError) as error:
        await ipc.connect()
    assert str(socket_path) in str(error.value)
    assert error.value.code is grpc.StatusCode.UNAVAILABLE


@pytest.mark.asyncio
async def test_call_after_the_server_went_away_fails_at_once_naming_the_path(
        server: ServerProcess, echo) -> None:
    async with IPCHandler(server.socket_path, echo.Stub, timeout=30) as ipc:
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        # UNAVAILABLE (not a timeout after 30 s): the call did not wait for its
        # deadline. It names the socket of the lane that failed.
        with pytest.raises(IPCUnavailableError, match=str(server.socket_path.with_suffix(''))):
            await ipc.call_method('Echo', echo.pb.EchoRequest())
        # Both lanes' sockets are gone now: the gRPC lane's answer names its socket.
        with pytest.raises(IPCUnavailableError, match=f"{server.socket_path}' does not exist"):
            await ipc.call_method('Echo', echo.pb.EchoRequest())


def test_sync_client_missing_socket_fails_at_once_naming_the_path(socket_path: Path, echo) -> None:
    with pytest.raises(IPCUnavailableError, match=str(socket_path)):
        SyncIPCHandler(socket_path, echo.Stub, timeout=30).connect()


@pytest.mark.asyncio
async def test_stale_socket_is_unavailable_not_a_hang(socket_path: Path, echo) -> None:
    make_stale_socket(socket_path)
    with pytest.raises(IPCUnavailableError, match='no server answers'):
        await IPCHandler(socket_path, echo.Stub, timeout=30).connect()
    assert aio_pool.open_connections() == 0


@pytest.mark.asyncio
async def test_deadline_expiry_is_a_timeout_error(server: ServerProcess, echo) -> None:
    async with IPCHandler(server.socket_path, echo.Stub) as ipc:
        with pytest.raises(IPCTimeoutError) as error:
            await ipc.call_method('Sleep', echo.pb.SleepRequest(seconds=5), timeout=0.2)
    assert error.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.value.method == '/vyra.ipc.test.EchoService/Sleep'


@pytest.mark.asyncio
async def test_calls_without_a_timeout_get_the_default_deadline(server: ServerProcess, echo) -> None:
    async with IPCHandler(server.socket_path, echo.Stub, timeout=0.3) as ipc:
        with pytest.raises(IPCTimeoutError):
            await ipc.call_method('Sleep', echo.pb.SleepRequest(seconds=10))


def test_sync_calls_without_a_timeout_get_the_default_deadline(server: ServerProcess, echo) -> None:
    with SyncIPCHandler(server.socket_path, echo.Stub, timeout=0.3) as ipc:
        with pytest.raises(IPCTimeoutError):
            ipc.call_method('Sleep', echo.pb.SleepRequest(seconds=10))
        with pytest.raises(IPCTimeoutError):
            for _ in ipc.stream_method('Count', echo.pb.CountRequest(count=10**9)):
                pass


@pytest.mark.asyncio
async def test_deadline_reaches_the_handler(server: ServerProcess, echo) -> None:
    async with IPCHandler(server.socket_path, echo.Stub) as ipc:
        reply = await ipc.call_method('Sleep', echo.pb.SleepRequest(seconds=0), timeout=30)
    # gRPC sends the deadline rounded up to its wire units: it arrives, not to the microsecond.
    assert 25 < reply.time_remaining < 31


@pytest.mark.asyncio
async def test_remote_error_keeps_status_code_and_details(server: ServerProcess, echo) -> None:
    request = echo.pb.FailRequest(code=grpc.StatusCode.FAILED_PRECONDITION.value[0], details='arm not homed')
    async with IPCHandler(server.socket_path, echo.Stub) as ipc:
        with pytest.raises(IPCRemoteError) as error:
            await ipc.call_method('Fail', request)
        assert (await ipc.call_method('Echo', echo.pb.EchoRequest(text='ok'))).text == 'ok'
    assert isinstance(error.value, IPCError)
    assert error.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert error.value.details == 'arm not homed'
    assert 'arm not homed' in str(error.value) and 'Fail' in str(error.value)


@pytest.mark.asyncio
async def test_error_in_a_stream_is_translated(server: ServerProcess, echo) -> None:
    async with IPCHandler(server.socket_path, echo.Stub) as ipc:
        with pytest.raises(IPCTimeoutError):
            async for _ in ipc.stream_method('Count', echo.pb.CountRequest(count=10**9), timeout=0.2):
                pass


@pytest.mark.asyncio
async def test_method_missing_on_the_server_is_unimplemented(server: ServerProcess) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    # A stub for a service this server has, asking a method name it lacks.
    class WrongStub:
        def __init__(self, channel):
            self.Nope = channel.unary_unary('/grpc.health.v1.Health/Nope',
                                            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                            response_deserializer=health_pb2.HealthCheckResponse.FromString)
    async with IPCHandler(server.socket_path, WrongStub) as ipc:
        with pytest.raises(IPCRemoteError) as error:
            await ipc.call_method('Nope', health_pb2.HealthCheckRequest())
    assert error.value.code is grpc.StatusCode.UNIMPLEMENTED
    assert health_pb2_grpc  # the real stub module is importable


# -- misuse ------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_unknown_method_name_lists_the_available_ones(server: ServerProcess, echo) -> None:
    async with IPCHandler(server.socket_path, echo.Stub) as ipc:
        with pytest.raises(ValueError, match="unknown method 'Ehco'.*available: Chat, ChatSync, Collect, Count, Echo"):
            await ipc.call_method('Ehco', echo.pb.EchoRequest())


@pytest.mark.asyncio
async def test_streaming_method_through_call_method_says_what_to_use(server: ServerProcess, echo) -> None:
    async with IPCHandler(server.socket_path, echo.Stub) as ipc:
        with pytest.raises(TypeError, match='Count is a unary_stream method: call it with stream_method'):
            await ipc.call_method('Count', echo.pb.CountRequest())
        with pytest.raises(TypeError, match='call it with call_method'):
            async for _ in ipc.stream_method('Echo', echo.pb.EchoRequest()):
                pass


@pytest.mark.parametrize('kwargs, error, message', [
    ({'timeout': 0}, ValueError, 'timeout must be a finite number'),
    ({'timeout': float('inf')}, ValueError, 'timeout must be a finite number'),
    # Past 2**63 ns: grpc failed such a call at once, the fast lane with an OverflowError.
    ({'timeout': 1e10}, ValueError, 'timeout must be a finite number of seconds > 0 and at most 1e[+]09'),
    ({'timeout': '5'}, TypeError, 'timeout must be a number'),
    ({'max_message_bytes': -1}, ValueError, 'max_message_bytes'),
    ({'default_method': 'Nope'}, ValueError, "unknown method 'Nope'"),
    # The gRPC socket given for the fast lane too (calls failed 'closed by the server').
    ({'ttrpc_socket_path': 'SOCKET'}, ValueError, 'ttrpc_socket_path must differ from socket_path'),
    # dispatch() could never work with it.
    ({'default_method': 'Count'}, ValueError, "default_method 'Count' streams its answers: dispatch"),
    # Before: "'NoneType' object is not iterable".
    ({'interceptors': None}, TypeError, 'interceptors must be a sequence of ClientInterceptor objects'),
    ({'idempotent_methods': None}, TypeError, 'idempotent_methods must be method names, not None'),
])
def test_bad_client_arguments_are_named(socket_path: Path, echo, kwargs, error, message) -> None:
    kwargs = {name: socket_path if value == 'SOCKET' else value for name, value in kwargs.items()}
    with pytest.raises(error, match=message):
        IPCHandler(socket_path, echo.Stub, **kwargs)


def test_service_stub_must_be_a_generated_stub_class(socket_path: Path, echo) -> None:
    with pytest.raises(TypeError, match='must be a generated \\*Stub class'):
        IPCHandler(socket_path, echo.Stub(grpc.insecure_channel('unix:/nonexistent')))
    with pytest.raises(TypeError, match='not a grpcio-generated stub class'):
        SyncIPCHandler(socket_path, dict)


@pytest.mark.asyncio
async def test_calls_without_a_stub_are_a_clear_error(server: ServerProcess) -> None:
    async with IPCHandler(server.socket_path) as ipc:
        with pytest.raises(ValueError, match='no service_stub was given'):
            await ipc.call_method('Echo', None)


@pytest.mark.asyncio
async def test_a_request_of_the_wrong_type_is_a_type_error_naming_both(server: ServerProcess, echo) -> None:
    """Protobuf would serialize any message: the server would get an empty
    request of its own type. The client refuses before sending."""
    async with IPCHandler(server.socket_path, echo.Stub) as ipc:
        with pytest.raises(TypeError, match=r'Echo takes a [\w.]+\.EchoRequest request, not [\w.]+\.CountRequest'):
            await ipc.call_method('Echo', echo.pb.CountRequest(count=1))
        with pytest.raises(TypeError, match='Echo takes .* not NoneType'):
            await ipc.call_method('Echo', None)
        with pytest.raises(TypeError, match=r'Count takes a [\w.]+\.CountRequest request, not [\w.]+\.EchoRequest'):
            async for _ in ipc.stream_method('Count', echo.pb.EchoRequest()):
                pass
        assert (await ipc.call_method('Echo', echo.pb.EchoRequest(text='fine'))).text == 'fine'
    with SyncIPCHandler(server.socket_path, echo.Stub) as sync:
        with pytest.raises(TypeError, match=r'Echo takes a [\w.]+\.EchoRequest request, not dict'):
            sync.call_method('Echo', {'text': 'a dict'})
        # The class itself has a DESCRIPTOR too: it passed, and failed deep in protobuf.
        with pytest.raises(TypeError, match=r'Echo takes a [\w.]+\.EchoRequest request, not the class '
                                            r'EchoRequest \(make one: EchoRequest\(\)\)'):
            sync.call_method('Echo', echo.pb.EchoRequest)
        with pytest.raises(TypeError, match=r"response_type must be a message class, not str 'EchoReply'"):
            sync.call_method('Echo', echo.pb.EchoRequest(), response_type='EchoReply')
        with pytest.raises(TypeError, match='Count takes'):
            next(sync.stream_method('Count', echo.pb.EchoRequest()))
        assert sync.call_method('Echo', echo.pb.EchoRequest(text='fine')).text == 'fine'


# -- clients that heal: calls connect on demand (issue 16) ---------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize('first', ['call', 'connect', 'stream'])
@pytest.mark.parametrize('lane', ['auto', 'grpc', 'ttrpc'])
async def test_a_handler_made_before_its_server_works_once_the_server_is_up(
        start_server, socket_path: Path, echo, lane: str, first: str) -> None:
    """A frontend started before its module: connect() and calls fail as
    unavailable, naming where they looked; once the server is up, calls
    work without another connect()."""
    ipc = IPCHandler(socket_path, echo.Stub, lane=lane)
    with pytest.raises(IPCUnavailableError, match=str(socket_path.parent)):
        await ipc.connect()
    assert not ipc.is_connected
    with pytest.raises(IPCUnavailableError, match=str(socket_path.parent)):
        await ipc.call_method('Echo', echo.pb.EchoRequest(text='too early'))
    start_server(socket_path, wait=False).wait_serving(ttrpc=True)
    # At once, without wait_for_ready: grpc's channel may still be waiting out its
    # reconnect backoff after the failed calls, which must fail neither a
    # connect() nor a call.
    if first == 'connect':
        await ipc.connect()
    elif first == 'stream':
        counted = [reply.index async for reply in ipc.stream_method('Count', echo.pb.CountRequest(count=3))]
        assert counted == [0, 1, 2]
    reply = await ipc.call_method('Echo', echo.pb.EchoRequest(text='up'))
    assert reply.text == 'up'
    assert ipc.is_connected
    assert ipc.lane_in_use in (('ttrpc', 'grpc') if lane == 'auto' else (lane,))
    await ipc.disconnect()
    assert aio_pool.open_connections() == aio_ttrpc_pool.open_connections() == 0


@pytest.mark.parametrize('first', ['call', 'stream'])
@pytest.mark.parametrize('lane', ['auto', 'grpc', 'ttrpc'])
def test_a_sync_handler_made_before_its_server_works_once_the_server_is_up(
        start_server, socket_path: Path, echo, lane: str, first: str) -> None:
    ipc = SyncIPCHandler(socket_path, echo.Stub, lane=lane)
    with pytest.raises(IPCUnavailableError, match=str(socket_path.parent)):
        ipc.connect()
    with pytest.raises(IPCUnavailableError, match=str(socket_path.parent)):
        ipc.call_method('Echo', echo.pb.EchoRequest(text='too early'))
    start_server(socket_path, wait=False).wait_serving(ttrpc=True)
    if first == 'stream':
        assert [reply.index for reply in ipc.stream_method('Count', echo.pb.CountRequest(count=3))] == [0, 1, 2]
    assert ipc.call_method('Echo', echo.pb.EchoRequest(text='up')).text == 'up'
    assert ipc.is_connected
    ipc.disconnect()
    assert sync_pool.open_connections() == sync_ttrpc_pool.open_connections() == 0


def _collected_or_refused(reply: Callable[[], Any]) -> str:
    """The text of a Collect call's answer, or 'not started again' if it failed so."""
    try:
        return reply().text
    except IPCUnavailableError as error:
        if 'not started again' in str(error):
            return 'not started again'
        raise


def test_a_request_stream_call_made_as_the_server_comes_back_loses_none_of_its_requests(
        start_server, socket_path: Path, echo) -> None:
    # Found: the call answered 'b,c' (and so with IPCHandler, below). grpc's
    # channel, still waiting out its reconnect backoff, failed the call after
    # grpc had read the first request, and the call went again (ServerCameUp)
    # with what was left of the stream.
    ipc = SyncIPCHandler(socket_path, echo.Stub, lane='grpc')
    server = start_server(socket_path)
    assert ipc.call_method('Echo', echo.pb.EchoRequest(text='up')).text == 'up'
    server.kill()
    with pytest.raises(IPCUnavailableError):
        ipc.call_method('Echo', echo.pb.EchoRequest(text='down'))  # the channel waits out its backoff from here
    start_server(socket_path)
    requests = iter([echo.pb.EchoRequest(text=text) for text in 'abc'])
    assert _collected_or_refused(lambda: ipc.call_method('Collect', requests)) in ('a,b,c', 'not started again')
    assert ipc.call_method('Echo', echo.pb.EchoRequest(text='up again')).text == 'up again'
    ipc.disconnect()


@pytest.mark.asyncio
async def test_an_async_request_stream_call_made_as_the_server_comes_back_loses_none_of_its_requests(
        start_server, socket_path: Path, echo) -> None:
    ipc = IPCHandler(socket_path, echo.Stub, lane='grpc')
    server = start_server(socket_path)
    assert (await ipc.call_method('Echo', echo.pb.EchoRequest(text='up'))).text == 'up'
    server.kill()
    with pytest.raises(IPCUnavailableError):
        await ipc.call_method('Echo', echo.pb.EchoRequest(text='down'))
    start_server(socket_path)
    call = asyncio.ensure_future(ipc.call_method('Collect', iter([echo.pb.EchoRequest(text=t) for t in 'abc'])))
    await asyncio.wait([call])
    assert _collected_or_refused(call.result) in ('a,b,c', 'not started again')
    assert (await ipc.call_method('Echo', echo.pb.EchoRequest(text='up again'))).text == 'up again'
    await ipc.disconnect()


@pytest.mark.asyncio
async def test_calls_after_disconnect_connect_again(server: ServerProcess, echo) -> None:
    ipc = IPCHandler(server.socket_path, echo.Stub)
    assert not ipc.is_connected and ipc.lane_in_use is None
    for text in ('first', 'after disconnect'):
        assert (await ipc.call_method('Echo', echo.pb.EchoRequest(text=text))).text == text
        assert ipc.is_connected and ipc.lane_in_use == 'ttrpc'
        await ipc.disconnect()
        assert not ipc.is_connected
        assert aio_ttrpc_pool.open_connections() == 0


@contextlib.contextmanager
def connections_left_behind(kind: type) -> Iterator[list[str]]:
    """Collects the fast-lane connections of ``kind`` the block leaves
    behind: open at its end, or found unclosed by the garbage collector
    meanwhile (it warns)."""
    left: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', ResourceWarning)
        yield left
        gc.collect()
    left += [repr(thing) for thing in gc.get_objects() if isinstance(thing, kind) and not thing.is_closed]
    left += [str(warning.message) for warning in caught if 'unclosed ttrpc' in str(warning.message)]


@pytest.mark.asyncio
async def test_a_call_connecting_while_its_handler_disconnects_leaves_no_connection_behind(
        server: ServerProcess, echo) -> None:
    """disconnect() at every step of a call's connect: the call fails as
    closed or answers, and no connection is left open or unclosed."""
    ipc = IPCHandler(server.socket_path, echo.Stub, lane='ttrpc')
    outcomes = set()
    with connections_left_behind(AsyncConnection) as left:
        for steps in range(40):
            call = asyncio.ensure_future(ipc.call_method('Echo', echo.pb.EchoRequest(text='racing')))
            for _ in range(steps):
                await asyncio.sleep(0)  # the call goes one step further into its connect
            await ipc.disconnect()
            try:
                outcomes.add((await call).text)
            except IPCUnavailableError as error:
                assert 'was closed' in str(error), error
                outcomes.add('closed')
    assert left == []
    assert outcomes == {'closed', 'racing'}  # (disconnect() came both before and after the answer)


def test_first_calls_racing_disconnect_leave_no_connection_behind(server: ServerProcess, echo) -> None:
    """Calls from eight threads, each first after a disconnect() of another:
    a connection made by a call while its handler disconnected is closed."""
    ipc = SyncIPCHandler(server.socket_path, echo.Stub, lane='ttrpc')

    def calls(index: int) -> None:
        for round_ in range(200):
            try:
                ipc.call_method('Echo', echo.pb.EchoRequest(text=f'{index}.{round_}'))
            except IPCUnavailableError:
                pass  # disconnected under it: what this test is about
            if index == 0:
                ipc.disconnect()
    with connections_left_behind(SyncConnection) as left:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(calls, range(8)))
        ipc.disconnect()
    assert left == []
    assert sync_ttrpc_pool.open_connections() == 0


@pytest.mark.parametrize('lane, pool', [('grpc', sync_pool.open_connections),
                                        ('ttrpc', sync_ttrpc_pool.open_connections)])
def test_first_calls_from_many_threads_share_one_connection_and_release_it(
        server: ServerProcess, echo, lane: str, pool) -> None:
    """A SyncIPCHandler never connected, first used by eight threads at once
    (an rclpy MultiThreadedExecutor): one connection, gone after disconnect()."""
    ipc = SyncIPCHandler(server.socket_path, echo.Stub, lane=lane)
    start = threading.Barrier(8)

    def call(index: int) -> str:
        start.wait(timeout=10)
        return ipc.call_method('Echo', echo.pb.EchoRequest(text=str(index))).text

    with ThreadPoolExecutor(8) as threads:
        assert list(threads.map(call, range(8))) == [str(index) for index in range(8)]
    assert pool() == 1
    ipc.disconnect()
    assert pool() == 0


# -- channels ----------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize('lane, pool', [('grpc', aio_pool.open_connections),
                                        ('ttrpc', aio_ttrpc_pool.open_connections)])
async def test_handlers_of_one_socket_share_one_connection_per_loop(server: ServerProcess, echo,
                                                                    lane: str, pool) -> None:
    first = IPCHandler(server.socket_path, echo.Stub, lane=lane)
    second = IPCHandler(server.socket_path, echo.Stub, lane=lane)
    await first.connect()
    await second.connect()
    assert pool() == 1
    await first.disconnect()
    assert (await second.call_method('Echo', echo.pb.EchoRequest(text='shared'))).text == 'shared'
    assert second.lane_in_use == lane
    await second.disconnect()
    await second.disconnect()  # idempotent
    assert pool() == 0


def test_one_handler_works_across_two_event_loops(server: ServerProcess, echo) -> None:
    ipc = IPCHandler(server.socket_path, echo.Stub)

    async def first() -> str:
        await ipc.connect()
        return (await ipc.call_method('Echo', echo.pb.EchoRequest(text='one'))).text

    async def second() -> str:
        try:
            return (await ipc.call_method('Echo', echo.pb.EchoRequest(text='two'))).text
        finally:
            await ipc.disconnect()
            assert aio_pool.open_connections() == 0

    assert asyncio.run(first()) == 'one'
    assert asyncio.run(second()) == 'two'


@pytest.mark.parametrize('lane', ['ttrpc', 'grpc'])
def test_a_handler_called_from_a_second_loop_while_its_loop_runs_is_refused_and_its_loop_keeps_it(
        server: ServerProcess, echo, lane: str) -> None:
    # A handler made at a web app's import, awaited in its routes (uvicorn's loop) and in a def route
    # with asyncio.run() (a worker thread's loop): the move closed the running loop's connection
    # under its calls, which failed UNAVAILABLE "connection ... was closed" (or with futures of
    # another loop), and the worker's calls as the handler moved back, at random.
    ipc = IPCHandler(server.socket_path, echo.Stub, lane=lane)
    with loop_in_a_thread() as loop:
        def on_its_loop(text: str) -> str:
            call = ipc.call_method('Echo', echo.pb.EchoRequest(text=text))
            return asyncio.run_coroutine_threadsafe(call, loop).result(LONG).text
        assert on_its_loop('first') == 'first'
        connection = ipc._fast if lane == 'ttrpc' else dict(ipc._grpc)
        with pytest.raises(RuntimeError, match='in use on another event loop, which still runs'):
            asyncio.run(ipc.call_method('Echo', echo.pb.EchoRequest(text='elsewhere')))
        assert on_its_loop('still') == 'still'
        assert (ipc._fast if lane == 'ttrpc' else dict(ipc._grpc)) == connection  # not closed and made anew
        asyncio.run_coroutine_threadsafe(ipc.disconnect(), loop).result(LONG)
        # Let go on its loop, it moves: one loop at a time.
        assert asyncio.run(ipc.call_method('Echo', echo.pb.EchoRequest(text='moved'))).text == 'moved'
        asyncio.run(ipc.disconnect())


@contextlib.contextmanager
def loop_in_a_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own (as a web server's does), stopped and closed after."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(LONG)
        loop.close()


def open_fds() -> int:
    return len(os.listdir('/proc/self/fd'))


@pytest.mark.parametrize('handlers', ['one', 'one per run'])
@pytest.mark.parametrize('lane', ['ttrpc', 'grpc'])
@pytest.mark.filterwarnings(r'ignore:unclosed IPCHandler of:ResourceWarning')  # (what it does on purpose)
def test_asyncio_run_again_and_again_without_disconnect_leaves_no_connection_behind(
        server: ServerProcess, echo, lane: str, handlers: str) -> None:
    # A closed loop's connections can no longer be closed by it: the next
    # loop's first call closes them (before: one socket and one whole event
    # loop more with every asyncio.run(), until the process ran out of descriptors).
    shared = IPCHandler(server.socket_path, echo.Stub, lane=lane)

    async def one_call(text: str) -> str:
        ipc = shared if handlers == 'one' else IPCHandler(server.socket_path, echo.Stub, lane=lane)
        return (await ipc.call_method('Echo', echo.pb.EchoRequest(text=text))).text

    def loops() -> int:
        gc.collect()
        return sum(isinstance(thing, asyncio.AbstractEventLoop) for thing in gc.get_objects())
    assert asyncio.run(one_call('warm')) == 'warm'
    drop_leftovers()  # (a free segment of an earlier test's, dropped mid-test, would hide two descriptors)
    fds, loops_before = open_fds(), loops()
    for index in range(20):
        assert asyncio.run(one_call(str(index))) == str(index)
    assert loops() <= loops_before + 1  # the last run's (before: one more with every run)
    assert open_fds() <= fds + 2  # the last run's connection (before: +20 on the fast lane)


def test_one_handler_used_from_two_loops_in_turn_releases_each_loops_connection(
        server: ServerProcess, echo) -> None:
    # Moving to another loop lets go of the one left: its connection is
    # closed there, so disconnect() on each loop leaves nothing open (before:
    # each move counted one more user, and the connections stayed for ever).
    ipc = IPCHandler(server.socket_path, echo.Stub, lane='ttrpc')
    loops = [asyncio.new_event_loop(), asyncio.new_event_loop()]
    try:
        drop_leftovers()  # (a free segment of an earlier test's, dropped mid-test, would hide a descriptor)
        fds = open_fds()
        for index in range(10):
            reply = loops[index % 2].run_until_complete(ipc.call_method('Echo', echo.pb.EchoRequest(text='x')))
            assert reply.text == 'x'
        assert open_fds() <= fds + 1  # the loop in use's connection only
        loops[1].run_until_complete(ipc.disconnect())
        assert open_fds() <= fds
    finally:
        for loop in loops:
            loop.close()


@pytest.mark.parametrize('lane', ['ttrpc', 'grpc'])
def test_disconnect_in_a_forked_child_returns_and_leaves_the_parents_connections_alone(
        server: ServerProcess, echo, lane: str) -> None:
    # The parent's loop runs in a thread, which the child does not have:
    # disconnect() must not wait for that loop (before: it waited for ever).
    ipc = IPCHandler(server.socket_path, echo.Stub, lane=lane)
    with loop_in_a_thread() as loop:
        try:
            call = ipc.call_method('Echo', echo.pb.EchoRequest(text='parent'))
            assert asyncio.run_coroutine_threadsafe(call, loop).result(LONG).text == 'parent'
            pid = os.fork()
            if pid == 0:  # the child: exits 0 once disconnect() returned
                code = 1
                try:
                    asyncio.run(ipc.disconnect())
                    code = 0
                finally:
                    os._exit(code)
            statuses: list[int] = []

            def exited() -> bool:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    statuses.append(status)
                return bool(done)
            try:
                wait_for(exited, 20, 'the forked child to return from disconnect()')
            finally:
                if not statuses:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(statuses[0]) == 0
            call = ipc.call_method('Echo', echo.pb.EchoRequest(text='still'))
            assert asyncio.run_coroutine_threadsafe(call, loop).result(LONG).text == 'still'
        finally:
            asyncio.run_coroutine_threadsafe(ipc.disconnect(), loop).result(LONG)


@pytest.mark.parametrize('lane, pool', [('grpc', sync_pool.open_connections),
                                        ('ttrpc', sync_ttrpc_pool.open_connections)])
def test_sync_handlers_share_one_connection_and_release_it(server: ServerProcess, echo,
                                                           lane: str, pool) -> None:
    with SyncIPCHandler(server.socket_path, echo.Stub, lane=lane), \
            SyncIPCHandler(server.socket_path, echo.Stub, lane=lane):
        assert pool() == 1
    assert pool() == 0


def test_restarted_server_is_reachable_again_within_one_second(start_server, socket_path: Path, echo) -> None:
    first = start_server(socket_path)
    with SyncIPCHandler(socket_path, echo.Stub, lane='grpc') as ipc:
        assert ipc.call_method('Echo', echo.pb.EchoRequest(text='before')).text == 'before'
        first.signal(signal.SIGKILL)
        first.wait()
        with pytest.raises(IPCUnavailableError):
            ipc.call_method('Echo', echo.pb.EchoRequest())
        # An outage of a few seconds: gRPC's default backoff (1 s, x1.6) would
        # now wait seconds before its next attempt; ours is capped at 0.5 s.
        threading.Event().wait(3.0)
        start_server(socket_path)
        reply = ipc.call_method('Echo', echo.pb.EchoRequest(text='after'), wait_for_ready=True, timeout=1.0)
        assert reply.text == 'after'


@pytest.mark.asyncio
async def test_wait_for_ready_call_succeeds_once_the_server_is_up(start_server, socket_path: Path,
                                                                  echo) -> None:
    ipc = IPCHandler(socket_path, echo.Stub, wait_for_ready=True, timeout=20)
    connecting = asyncio.create_task(ipc.connect())
    await asyncio.sleep(0)  # connect() is now waiting for a server that is not there yet
    await asyncio.to_thread(start_server, socket_path)
    await connecting
    assert (await ipc.call_method('Echo', echo.pb.EchoRequest(text='late'))).text == 'late'
    await ipc.disconnect()


# -- the VYRA handler shape --------------------------------------------------------------

@pytest.mark.asyncio
async def test_handler_family_shape(server: ServerProcess, echo, socket_dir: Path) -> None:
    ipc = IPCHandler(server.socket_path, echo.Stub, default_method='Echo')
    assert ipc.get_protocol() == 'ipc'
    assert ipc.is_available()
    assert not IPCHandler(socket_dir / 'absent.sock', echo.Stub).is_available()
    async with ipc:
        await ipc.dispatch(echo.pb.EchoRequest(text='fed'))
    with pytest.raises(ValueError, match='default_method'):
        await IPCHandler(server.socket_path, echo.Stub).dispatch(echo.pb.EchoRequest())


def test_documented_import_path_is_the_same_class() -> None:
    from vyra_base.com.handler import ipc as documented
    import vyra_base_ipc

    assert documented.IPCHandler is IPCHandler
    # Everything it offers is the package's own object.
    assert documented.__all__ and all(getattr(documented, name) is getattr(vyra_base_ipc, name)
                                      for name in documented.__all__)
