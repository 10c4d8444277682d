"""TtrpcServer's shutdown and handlers, in this process, on real sockets (the
rules of its socket file, shared with IPCServer: test_socket_file)."""

from __future__ import annotations

import asyncio
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import until
from ttrpc_peer import DATA, REMOTE_OPEN, Peer
from vyra_base_ipc._methods import record_servicer, stub_methods
from vyra_base_ipc.exceptions import IPCUnavailableError
from vyra_base_ipc.ttrpc import AsyncConnection, SyncConnection, TtrpcServer, ttrpc_socket_path

ECHO = 'vyra.ipc.test.EchoService'


@pytest.fixture
def servicer(echo: Any) -> Any:
    class Servicer(echo.grpc.EchoServiceServicer):
        def __init__(self) -> None:
            self.ended: list[tuple[bool, float | None]] = []

        async def Echo(self, request: Any, context: Any) -> Any:
            return echo.pb.EchoReply(text=request.text)

        async def Sleep(self, request: Any, context: Any) -> Any:
            context.add_done_callback(
                lambda ctx: self.ended.append((ctx.cancelled(), ctx.time_remaining())))
            await asyncio.sleep(request.seconds)
            return echo.pb.SleepReply(time_remaining=context.time_remaining() or 0.0, was_active=True)
    return Servicer()


def server_for(path: Path, servicer: Any, **kwargs: Any) -> TtrpcServer:
    return TtrpcServer(path, record_servicer(servicer), **kwargs)


@pytest.mark.asyncio
async def test_in_flight_calls_finish_within_the_grace_period(socket_dir: Path, servicer: Any,
                                                              echo: Any) -> None:
    path = socket_dir / 'h.sock'
    server = server_for(path, servicer)
    await server.start()
    methods = stub_methods(echo.Stub)
    connection = await AsyncConnection.connect(path)
    try:
        in_flight = asyncio.ensure_future(connection.call(
            methods['Sleep'], echo.pb.SleepRequest(seconds=0.3), timeout=30))
        await asyncio.sleep(0)  # the request is written
        await until(lambda: server._active, 10, 'the Sleep call on the server')
        stopping = asyncio.ensure_future(server.stop(grace=30))
        while not server._stopping:
            await asyncio.sleep(0)
        with pytest.raises(IPCUnavailableError, match='shutting down'):
            await connection.call(methods['Echo'], echo.pb.EchoRequest(), timeout=10)
        assert (await in_flight).was_active is True
        await stopping
        [(cancelled, remaining)] = servicer.ended
        assert cancelled is False and 0 < remaining < 30
    finally:
        await connection.close()


@pytest.mark.asyncio
async def test_calls_past_the_grace_period_are_cancelled(socket_dir: Path, servicer: Any, echo: Any) -> None:
    path = socket_dir / 'i.sock'
    server = server_for(path, servicer)
    await server.start()
    async with await AsyncConnection.connect(path) as connection:
        in_flight = asyncio.ensure_future(connection.call(
            stub_methods(echo.Stub)['Sleep'], echo.pb.SleepRequest(seconds=60), timeout=120))
        await until(lambda: server._active, 10, 'the Sleep call on the server')
        await server.stop(grace=0.1)
        with pytest.raises(IPCUnavailableError):
            await in_flight
    assert len(servicer.ended) == 1 and servicer.ended[0][0] is True  # the handler saw it cancelled


@pytest.mark.asyncio
async def test_a_given_executor_is_not_shut_down(socket_dir: Path, servicer: Any) -> None:
    with futures.ThreadPoolExecutor(1) as executor:
        async with server_for(socket_dir / 'j.sock', servicer, executor=executor):
            pass
        assert executor.submit(lambda: 42).result(timeout=10) == 42


def test_a_service_registered_twice_is_refused(socket_dir: Path, servicer: Any) -> None:
    with pytest.raises(ValueError, match='twice'):
        TtrpcServer(socket_dir / 'k.sock', record_servicer(servicer) + record_servicer(servicer))


def test_default_fast_lane_path_is_beside_the_grpc_socket() -> None:
    assert ttrpc_socket_path('/tmp/demo_ipc.sock') == Path('/tmp/demo_ipc.ttrpc.sock')
    assert ttrpc_socket_path('/run/x/api') == Path('/run/x/api.ttrpc.sock')
    with pytest.raises(ValueError, match='107 bytes'):
        ttrpc_socket_path('/tmp/' + 'x' * 95 + '.sock')


@pytest.fixture
def def_servicer(echo: Any) -> Any:
    """Every call shape as plain ``def`` handlers (run in worker threads)."""
    class Servicer(echo.grpc.EchoServiceServicer):
        def Count(self, request: Any, context: Any) -> Any:
            for index in range(request.count):
                yield echo.pb.EchoReply(index=index)

        def Collect(self, request_iterator: Any, context: Any) -> Any:
            texts = [request.text for request in request_iterator]
            return echo.pb.EchoReply(text=','.join(texts), index=len(texts))

        def Chat(self, request_iterator: Any, context: Any) -> Any:
            for index, request in enumerate(request_iterator):
                yield echo.pb.EchoReply(text=request.text.upper(), index=index)

        def Fail(self, request: Any, context: Any) -> Any:
            code = next(c for c in grpc.StatusCode if c.value[0] == request.code)
            context.abort(code, request.details)
    return Servicer()


@pytest.mark.asyncio
async def test_def_handlers_of_every_shape_answer_as_on_grpc(socket_dir: Path, def_servicer: Any,
                                                             echo: Any) -> None:
    from vyra_base_ipc import IPCHandler, IPCServer
    from vyra_base_ipc.exceptions import IPCRemoteError

    methods = stub_methods(echo.Stub)
    words = [echo.pb.EchoRequest(text=w) for w in ('a', 'b', 'c')]
    async with IPCServer(socket_dir / 'g.sock', servicers=[def_servicer]) as grpc_server, \
            TtrpcServer(socket_dir / 't.sock', grpc_server.services), \
            IPCHandler(socket_dir / 'g.sock', echo.Stub) as handler, \
            await AsyncConnection.connect(socket_dir / 't.sock') as connection:
        counted = [r.index async for r in connection.stream(methods['Count'], echo.pb.CountRequest(count=300),
                                                            timeout=30)]
        assert counted == [r.index async for r in handler.stream_method('Count', echo.pb.CountRequest(count=300))]
        assert counted == list(range(300))
        collected = await connection.call(methods['Collect'], iter(words), timeout=30)
        assert collected == await handler.call_method('Collect', iter(words))
        chatted = [r.text async for r in connection.stream(methods['Chat'], iter(words), timeout=30)]
        assert chatted == [r.text async for r in handler.stream_method('Chat', iter(words))] == ['A', 'B', 'C']
        with pytest.raises(IPCRemoteError) as via_ttrpc:
            await connection.call(methods['Fail'], echo.pb.FailRequest(code=7, details='no'), timeout=30)
        with pytest.raises(IPCRemoteError) as via_grpc:
            await handler.call_method('Fail', echo.pb.FailRequest(code=7, details='no'))
        assert (via_ttrpc.value.code, via_ttrpc.value.details) == (via_grpc.value.code, via_grpc.value.details)


@pytest.mark.asyncio
async def test_a_def_handler_reading_the_request_stream_of_a_client_that_left_is_ended_not_given_its_end(
        socket_dir: Path, echo: Any) -> None:
    # Found: a client that cancelled its call mid-stream ended a def
    # handler's iteration as its half-close does, so a handler that commits
    # what it read at the end committed part of an upload. Its next read now
    # raises CallEnded, as on the gRPC lane, which ends it; nothing is sent.
    from vyra_base_ipc import IPCHandler, IPCServer

    first_read = asyncio.Event()
    outcome: futures.Future[str] = futures.Future()
    loop = asyncio.get_running_loop()

    class Uploads(echo.grpc.EchoServiceServicer):
        def Collect(self, request_iterator: Any, context: Any) -> Any:
            texts = []
            try:
                for request in request_iterator:
                    texts.append(request.text)
                    loop.call_soon_threadsafe(first_read.set)
            except BaseException as error:
                outcome.set_result(type(error).__name__)
                raise
            outcome.set_result(f'the end of the stream, after {texts}')
            return echo.pb.EchoReply(text=','.join(texts))

    async def upload() -> Any:
        yield echo.pb.EchoRequest(text='part 1')
        await asyncio.Event().wait()  # the rest never comes: the caller leaves

    async with IPCServer(socket_dir / 'u.sock', servicers=[Uploads()]) as server, \
            IPCHandler(server.socket_path, echo.Stub, lane='ttrpc', timeout=30) as client:
        call = asyncio.ensure_future(client.call_method('Collect', upload()))
        await asyncio.wait_for(first_read.wait(), 30)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await asyncio.wrap_future(outcome) == 'CallEnded'


@pytest.mark.asyncio
async def test_long_response_stream_arrives_whole(socket_dir: Path, servicer: Any, def_servicer: Any,
                                                  echo: Any) -> None:
    count = stub_methods(echo.Stub)['Count']
    async with TtrpcServer(socket_dir / 't.sock', record_servicer(def_servicer)):
        def read_all() -> list[int]:
            with SyncConnection.connect(socket_dir / 't.sock') as connection:
                return [r.index for r in connection.stream(count, echo.pb.CountRequest(count=20000), timeout=60)]
        assert await asyncio.to_thread(read_all) == list(range(20000))


@pytest.mark.asyncio
async def test_requests_a_handler_does_not_read_are_bounded_for_a_client_without_flow_control(
        socket_dir: Path, echo: Any) -> None:
    """A plain ttrpc client (no Hello, so no flow control) that streams
    requests nobody reads is cut off; the connection serves on."""
    class Stuck(echo.grpc.EchoServiceServicer):
        async def Collect(self, request_iterator: Any, context: Any) -> Any:
            await asyncio.Event().wait()  # never reads

        async def Echo(self, request: Any, context: Any) -> Any:
            return echo.pb.EchoReply(text=request.text)

    def exchange(path: Path) -> tuple[Any, Any]:
        with Peer.connect(path) as peer:
            message = echo.pb.EchoRequest(payload=b'x' * 500).SerializeToString()
            peer.request(1, ECHO, 'Collect', flags=REMOTE_OPEN)
            for _ in range(100):
                peer.send(1, DATA, 0, message)
            refused = peer.answer(1)
            peer.request(3, ECHO, 'Echo', echo.pb.EchoRequest(text='ok').SerializeToString())
            return refused, peer.answer(3)
    async with TtrpcServer(socket_dir / 't.sock', record_servicer(Stuck()), max_message_bytes=1024):
        refused, answered = await asyncio.to_thread(exchange, socket_dir / 't.sock')
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert 'not read' in refused.message
    assert echo.pb.EchoReply.FromString(answered.payload).text == 'ok'


@pytest.mark.asyncio
@pytest.mark.parametrize('style', ['def', 'async def'])
async def test_handlers_may_stream_with_context_write(socket_dir: Path, echo: Any, style: str) -> None:
    if style == 'def':
        class Servicer(echo.grpc.EchoServiceServicer):
            def Count(self, request: Any, context: Any) -> None:
                for index in range(request.count):
                    context.write(echo.pb.EchoReply(index=index))
    else:
        class Servicer(echo.grpc.EchoServiceServicer):  # type: ignore[no-redef]
            async def Count(self, request: Any, context: Any) -> None:
                for index in range(request.count):
                    await context.write(echo.pb.EchoReply(index=index))
    async with TtrpcServer(socket_dir / 't.sock', record_servicer(Servicer())), \
            await AsyncConnection.connect(socket_dir / 't.sock') as connection:
        replies = [r.index async for r in connection.stream(
            stub_methods(echo.Stub)['Count'], echo.pb.CountRequest(count=5), timeout=30)]
    assert replies == [0, 1, 2, 3, 4]


@pytest.mark.asyncio
async def test_calls_over_the_concurrency_limit_are_refused_as_on_grpc(socket_dir: Path, servicer: Any,
                                                                       echo: Any) -> None:
    from vyra_base_ipc.exceptions import IPCRemoteError

    methods = stub_methods(echo.Stub)
    server = server_for(socket_dir / 't.sock', servicer, maximum_concurrent_rpcs=1)
    async with server, await AsyncConnection.connect(socket_dir / 't.sock') as connection:
        busy = asyncio.ensure_future(connection.call(methods['Sleep'], echo.pb.SleepRequest(seconds=30),
                                                     timeout=60))
        await until(lambda: server._active, 10, 'the Sleep call on the server')
        with pytest.raises(IPCRemoteError) as raised:
            await connection.call(methods['Echo'], echo.pb.EchoRequest(), timeout=10)
        assert (raised.value.code, raised.value.details) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED, 'Concurrent RPC limit exceeded!')
        busy.cancel()
    with pytest.raises(ValueError, match='maximum_concurrent_rpcs'):
        server_for(socket_dir / 'u.sock', servicer, maximum_concurrent_rpcs=0)
