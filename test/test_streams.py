"""Streams and cancellation on both lanes, with both clients, against a real
server process: a call the client leaves is cancelled on the server, a slow
consumer holds the producer back, a greedy handler does not hold up other
connections, a stream may live without deadline, and a stopping server ends
its streams at once."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import signal
import threading
import time
from typing import Any, Callable

import pytest

from conftest import LANES, STOP_SLACK, ServerProcess, unchanged, until, wait_for
from vyra_base_ipc import IPCHandler, IPCTimeoutError, IPCUnavailableError, MessageTooLargeError, SyncIPCHandler

#: How an async generator handler ends when its client leaves: cancelled while
#: it awaited something, closed while it had yielded (as grpc.aio does it).
LEFT = ('cancelled', 'closed')
HANDLERS = [('Watch', LEFT), ('WatchSync', 'inactive')]
HANDLER_LANES = [(lane, method, how) for lane in LANES for method, how in HANDLERS]
tags = (f'tag-{number}' for number in itertools.count())


class Reports:
    """The server's WatchService reports, fetched over a connection of their own."""

    def __init__(self, server: ServerProcess, echo: Any) -> None:
        self.echo = echo
        self.client = SyncIPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane='grpc', timeout=10)
        self.client.connect()

    def __call__(self, tag: str) -> Any:
        return self.client.call_method('Report', self.echo.pb.WatchRequest(tag=tag))

    def ended(self, tag: str, how: str | tuple[str, ...]) -> Callable[[], bool]:
        def check() -> bool:
            report = self(tag)
            assert not report.ended or report.how in ((how,) if isinstance(how, str) else how), report
            return report.ended
        return check

    def stalled(self, tag: str) -> Callable[[], bool]:
        """A condition: the handler of ``tag`` sent nothing more since the
        last check, at least 0.2 s ago."""
        return unchanged(lambda: self(tag).sent)


@pytest.fixture
def reports(server: ServerProcess, echo: Any) -> Any:
    reports = Reports(server, echo)
    yield reports
    reports.client.disconnect()


def watch(echo: Any, tag: str, **fields: Any) -> Any:
    return echo.pb.WatchRequest(tag=tag, **fields)


# -- leaving early ------------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize('lane, method, how', HANDLER_LANES)
async def test_leaving_a_stream_early_stops_its_handler_async_client(
        server: ServerProcess, echo: Any, reports: Reports, lane: str, method: str, how: str) -> None:
    tag = next(tags)
    async with IPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane) as ipc:
        async for event in ipc.stream_method(method, watch(echo, tag)):  # endless, never awaiting
            if event.index == 2:
                break
        await until(reports.ended(tag, how), 5, f'{method} to end')
        report = reports(tag)
        assert report.callback_ran
        # Nothing more is sent once the handler ended: the count stays.
        assert reports(tag).sent == report.sent
        assert (await ipc.call_method('Report', watch(echo, tag))).ended


@pytest.mark.parametrize('lane, method, how', HANDLER_LANES)
def test_leaving_a_stream_early_stops_its_handler_sync_client(
        server: ServerProcess, echo: Any, reports: Reports, lane: str, method: str, how: str) -> None:
    tag = next(tags)
    with SyncIPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane) as ipc:
        for event in ipc.stream_method(method, watch(echo, tag)):
            if event.index == 2:
                break
        wait_for(reports.ended(tag, how), 5, f'{method} to end')
        assert reports(tag).callback_ran
        assert ipc.call_method('Report', watch(echo, tag)).ended


@pytest.mark.parametrize('method, how', HANDLERS)
def test_a_stream_left_while_the_server_waits_for_its_client_to_read_still_stops_its_handler(
        server: ServerProcess, echo: Any, reports: Reports, method: str, how: str) -> None:
    """The fast-lane server stops taking new calls from a client that does
    not read its answers. A blocking client reads only while one of its
    calls waits: its CANCEL must still reach a server that has filled the
    socket, or the handler writes (or waits to) for ever."""
    tag = next(tags)
    with SyncIPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane='ttrpc',
                        stream_window=1 << 30) as ipc:  # the window does not stop the handler: the socket does
        stream = ipc.stream_method(method, watch(echo, tag, size=16 * 1024), timeout=120)
        next(stream)
        wait_for(reports.stalled(tag), 30, f'{method} to fill the socket')
        stream.close()
        wait_for(reports.ended(tag, how), 10, f'{method} to end')
        assert ipc.call_method('Report', watch(echo, tag)).ended  # and the connection serves on


@pytest.mark.parametrize('lane', LANES)
def test_a_sync_stream_left_in_a_reference_cycle_is_cancelled_when_collected_while_another_reads(
        server: ServerProcess, echo: Any, reports: Reports, lane: str) -> None:
    """The garbage collector may finalize a left stream at any allocation,
    also while the same thread reads another stream's messages, holding the
    connection's locks: that used to deadlock the fast lane's connection."""
    class Holder:
        generator: Any
    left: list[str] = []
    failures: list[BaseException] = []

    def read_and_leave(ipc: SyncIPCHandler) -> None:
        thresholds = gc.get_threshold()
        gc.set_threshold(1)  # collect at nearly every allocation: also inside the client's locked blocks
        try:
            for _ in range(100):
                left.append(next(tags))
                holder = Holder()
                holder.generator = ipc.stream_method('Watch', watch(echo, left[-1]))  # endless
                holder.holder = holder  # type: ignore[attr-defined]  # a reference cycle
                next(holder.generator)
                del holder
                assert len(list(ipc.stream_method('Watch', watch(echo, next(tags), count=20)))) == 20
        except BaseException as error:
            failures.append(error)
        finally:
            gc.set_threshold(*thresholds)

    with SyncIPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane, timeout=30) as ipc:
        reader = threading.Thread(target=read_and_leave, args=(ipc,), daemon=True)
        reader.start()
        reader.join(60)
        assert not reader.is_alive(), 'the connection deadlocked'
        assert not failures, failures
        gc.collect()
        for tag in left:
            wait_for(reports.ended(tag, LEFT), 10, f'left stream {tag} to be cancelled')


@pytest.mark.asyncio
@pytest.mark.parametrize('lane', LANES)
async def test_leaving_a_bidirectional_stream_cancels_its_handler(
        server: ServerProcess, echo: Any, reports: Reports, lane: str) -> None:
    tag = next(tags)
    gate = asyncio.Event()

    async def requests() -> Any:
        yield watch(echo, tag, index=0)
        await gate.wait()  # the request stream stays open
    async with IPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane) as ipc:
        responses = ipc.stream_method('Converse', requests())
        assert (await responses.__anext__()).index == 0
        await responses.aclose()
        # On the gRPC lane the handler's read may see the end of the request
        # stream before its task is cancelled: it then ends as finished.
        await until(reports.ended(tag, LEFT if lane == 'ttrpc' else (*LEFT, 'finished')), 10,
                         'Converse to end')


@pytest.mark.asyncio
@pytest.mark.parametrize('lane', LANES)
async def test_disconnect_with_a_call_and_a_stream_in_flight_fails_them_as_closed(
        server: ServerProcess, echo: Any, reports: Reports, lane: str) -> None:
    # As the fast lane says it, on both lanes: before, the gRPC lane's call
    # ended with a bare CancelledError (nobody cancelled the caller's task).
    tag = next(tags)
    ipc = IPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane, timeout=30)

    async def streamed() -> None:
        async for _ in ipc.stream_method('Watch', watch(echo, tag + 's', count=1, hold=True), timeout=None):
            pass
    held = asyncio.ensure_future(ipc.call_method('Hold', watch(echo, tag)))
    stream = asyncio.ensure_future(streamed())
    await until(lambda: reports(tag).started and reports(tag + 's').sent == 1, 10, 'both on the server')
    await ipc.disconnect()
    for call in (held, stream):
        with pytest.raises(IPCUnavailableError, match='was closed'):
            await call


@pytest.mark.parametrize('lane', LANES)
def test_disconnect_with_a_sync_call_in_flight_fails_it_as_closed(
        server: ServerProcess, echo: Any, reports: Reports, lane: str) -> None:
    # Before, on the gRPC lane: IPCRemoteError CANCELLED "Channel closed!",
    # as if the server had answered so.
    tag = next(tags)
    # (A limit of its own: its own connection, not the one the reports share.)
    ipc = SyncIPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane, timeout=30,
                         max_message_bytes=8 << 20)
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            ipc.call_method('Hold', watch(echo, tag))
        except BaseException as error:
            errors.append(error)
    thread = threading.Thread(target=hold)
    thread.start()
    wait_for(lambda: reports(tag).started, 10, 'the call on the server')
    ipc.disconnect()
    thread.join(10)
    assert len(errors) == 1 and isinstance(errors[0], IPCUnavailableError), errors
    assert 'was closed' in str(errors[0])


@pytest.mark.asyncio
@pytest.mark.parametrize('lane', LANES)
async def test_cancelling_the_task_of_a_unary_call_cancels_its_handler(
        server: ServerProcess, echo: Any, reports: Reports, lane: str) -> None:
    tag = next(tags)
    async with IPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane, timeout=30) as ipc:
        call = asyncio.ensure_future(ipc.call_method('Hold', watch(echo, tag)))
        await until(lambda: reports(tag).started, 10, 'Hold to start')
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await until(reports.ended(tag, 'cancelled'), 10, 'Hold to be cancelled')


@pytest.mark.parametrize('lane', LANES)
@pytest.mark.parametrize('client', ['sync', 'asyncio'])
def test_a_stream_read_after_its_deadline_gives_no_more_messages(
        server: ServerProcess, echo: Any, lane: str, client: str) -> None:
    """The deadline covers the whole stream: messages that came in time but
    are read after it passed are not given, the read fails, as on gRPC."""
    request = watch(echo, next(tags), size=100)  # endless: the window fills while the caller waits
    if client == 'sync':
        with SyncIPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane) as ipc:
            stream = ipc.stream_method('Watch', request, timeout=0.5)
            next(stream)
            ends = time.monotonic() + 0.5
            wait_for(lambda: time.monotonic() > ends, 5, 'the deadline to pass')
            with pytest.raises(IPCTimeoutError):
                next(stream)

    async def main() -> None:
        async with IPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane) as ipc:
            stream = ipc.stream_method('Watch', request, timeout=0.5)
            await anext(stream)
            ends = time.monotonic() + 0.5
            await until(lambda: time.monotonic() > ends, 5, 'the deadline to pass')
            with pytest.raises(IPCTimeoutError):
                await anext(stream)
            await stream.aclose()
    if client == 'asyncio':
        asyncio.run(main())


def test_a_deadline_passing_cancels_a_sync_stream_on_the_server(
        server: ServerProcess, echo: Any, reports: Reports) -> None:
    tag = next(tags)
    with SyncIPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane='ttrpc') as ipc:
        with pytest.raises(IPCTimeoutError):
            for _ in ipc.stream_method('Watch', watch(echo, tag, count=1, hold=True), timeout=0.3):
                pass
        wait_for(reports.ended(tag, 'cancelled'), 10, 'Watch to be cancelled')


@pytest.mark.asyncio
async def test_leaving_a_stream_early_then_calling_again_200_times(server: ServerProcess, echo: Any) -> None:
    """The test that used to wait behind the abandoned stream, 200 times over."""
    async with IPCHandler(server.socket_path, echo.Stub) as ipc:
        for attempt in range(200):
            async for reply in ipc.stream_method('Count', echo.pb.CountRequest(count=1_000_000)):  # noqa: B007 (read after the loop)
                break
            assert reply.index == 0
            text = f'next {attempt}'
            assert (await ipc.call_method('Echo', echo.pb.EchoRequest(text=text), timeout=5)).text == text
            assert ipc.lane_in_use == 'ttrpc'


# -- fairness and flow control ------------------------------------------------------------------

@pytest.mark.parametrize('lane', LANES)
def test_a_greedy_stream_does_not_hold_up_calls_on_other_connections(
        server: ServerProcess, echo: Any, reports: Reports, lane: str) -> None:
    """A handler yielding a million messages without awaiting anything else,
    read as fast as a client can: calls on another connection are answered
    while it runs (they used to wait until it ended)."""
    tag = next(tags)
    leave = threading.Event()
    read: list[int] = []

    def greedy() -> None:
        with SyncIPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane, timeout=120) as ipc:
            for event in ipc.stream_method('Watch', watch(echo, tag, count=1_000_000)):
                read.append(event.index)
                if leave.is_set():
                    break
    reader = threading.Thread(target=greedy)
    reader.start()
    try:
        wait_for(lambda: len(read) > 1000, 30, 'the greedy stream to flow')

        async def other_client() -> int:
            async with IPCHandler(server.socket_path, echo.Stub, lane=lane, timeout=30) as ipc:
                for index in range(50):
                    assert (await ipc.call_method('Echo', echo.pb.EchoRequest(text=str(index)))).text == str(index)
            return len(read)
        read_meanwhile = asyncio.run(other_client())
        # All 50 answered while the stream was still being produced.
        assert not reports(tag).ended and read_meanwhile < 1_000_000
    finally:
        leave.set()
        reader.join(60)
    wait_for(reports.ended(tag, LEFT), 10, 'the greedy stream to be cancelled')


@pytest.mark.parametrize('lane', LANES)
def test_a_slow_consumer_keeps_the_servers_memory_flat_and_gets_every_message(
        server: ServerProcess, echo: Any, reports: Reports, lane: str) -> None:
    """25,000 messages of 4 KiB (100 MiB in all) to a consumer that stops
    ten times: the server holds back instead of buffering what is not read."""
    tag = next(tags)
    count, size = 25_000, 4096
    baseline = reports('nothing').rss_bytes
    peak = 0
    with SyncIPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane, timeout=300) as ipc:
        expected = 0
        for event in ipc.stream_method('Watch', watch(echo, tag, count=count, size=size)):
            assert event.index == expected and len(event.payload) == size
            expected += 1
            if expected % (count // 10) == 0:
                time.sleep(0.3)  # the slow consumer: a producer not held back would run ahead now
                peak = max(peak, reports(tag).rss_bytes)
    assert expected == count
    assert peak - baseline < 32 << 20, f'server grew by {(peak - baseline) >> 20} MiB'


@pytest.mark.asyncio
async def test_a_handler_that_does_not_read_holds_back_the_request_stream(
        server: ServerProcess, echo: Any, reports: Reports) -> None:
    """Flow control of request streams: the client's sender waits while the
    handler does not read, and everything arrives in order once it does."""
    tag = next(tags)
    pulled = 0
    total, held_at = 20_000, 10

    def requests() -> Any:
        nonlocal pulled
        for index in range(total):
            pulled += 1
            yield watch(echo, tag, index=index, count=held_at, payload=b'r' * 1024)
    async with IPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane='ttrpc', timeout=60) as ipc:
        call = asyncio.ensure_future(ipc.call_method('Absorb', requests()))
        await until(lambda: reports(tag).taken == held_at, 10, 'the handler to take its first requests')
        connection = ipc._fast
        # The sender stops once it used up the window the server granted.
        await until(lambda: any(stream.credit is not None and stream.credit.credit <= 0
                                     for stream in connection._protocol.core.streams.values()
                                     if hasattr(stream, 'credit')), 10, 'the sender to run out of credit')
        assert pulled * (1024 + 64) < 4 << 20  # one window (1 MiB), not all 20 MiB
        await ipc.call_method('Release', watch(echo, tag))
        answer = await call
    assert (answer.index, answer.in_order) == (total, True)


@pytest.mark.asyncio
@pytest.mark.parametrize('lane', LANES)
async def test_a_request_stream_still_waiting_when_its_call_ends_is_closed_with_nothing_left_behind(
        server: ServerProcess, echo: Any, lane: str) -> None:
    """A request stream fed from a queue waits for its next message when
    the call ends: the server answered, or the deadline passed. The client
    stops reading it then and closes it: no task waits on it for ever."""
    closed: list[str] = []
    outboxes: list[asyncio.Queue[Any]] = []  # the application keeps its outboxes, as a real one does

    async def requests(tag: str, count: int = 0) -> Any:
        outboxes.append(asyncio.Queue())
        outboxes[-1].put_nowait(watch(echo, tag, count=count, hold=True))
        try:
            while True:
                yield await outboxes[-1].get()
        finally:
            closed.append(tag)

    async with IPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane, timeout=10) as ipc:
        tasks = len(asyncio.all_tasks())
        answered = next(tags)  # the handler answers once released, while the stream waits
        call = asyncio.ensure_future(ipc.call_method('Absorb', requests(answered, count=1)))
        await ipc.call_method('Release', watch(echo, answered))  # (kept if it comes first)
        assert (await call).index == 1
        timed_out, streamed = next(tags), next(tags)
        with pytest.raises(IPCTimeoutError):
            await ipc.call_method('Absorb', requests(timed_out, count=1), timeout=0.5)
        with pytest.raises(IPCTimeoutError):
            async for _ in ipc.stream_method('Converse', requests(streamed), timeout=0.5):
                pass
        await until(lambda: len(closed) == 3, 10, 'the three request streams to be closed')
        assert sorted(closed) == sorted([answered, timed_out, streamed])
        await until(lambda: len(asyncio.all_tasks()) <= tasks, 10, 'no task to be left behind')


# -- request streams that fail -------------------------------------------------------------------

class SourceFailed(Exception):
    """The caller's own source of requests failing mid-stream."""


def failing_requests(echo: Any, tag: str, reports: Reports) -> Any:
    for index in range(2):
        yield watch(echo, tag, index=index)
    wait_for(lambda: reports(tag).taken == 2, 10, 'the handler to take both messages')
    raise SourceFailed('the camera went away')


async def failing_requests_async(echo: Any, tag: str, reports: Reports) -> Any:
    for index in range(2):
        yield watch(echo, tag, index=index)
    await until(lambda: reports(tag).taken == 2, 10, 'the handler to take both messages')
    raise SourceFailed('the camera went away')


@pytest.mark.parametrize('lane', LANES)
@pytest.mark.parametrize('client', ['sync', 'asyncio'])
def test_a_request_stream_that_raises_gives_the_caller_its_exception_and_cancels_the_call(
        server: ServerProcess, echo: Any, reports: Reports, lane: str, client: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """As gRPC does it: the server never takes the messages sent so far for
    the whole stream (before, the fast lane ended the stream, and the
    handler finished with them), and the caller gets its own exception
    (before, the gRPC lane said UNKNOWN or "connection was closed"), and
    nothing else: no ERROR is logged of it (before, grpc's blocking channel
    logged "Exception iterating requests!" with its traceback)."""
    tag = next(tags)
    with pytest.raises(SourceFailed, match='the camera went away'):
        if client == 'sync':
            with SyncIPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane, timeout=30) as ipc:
                ipc.call_method('Absorb', failing_requests(echo, tag, reports))
        else:
            async def call() -> None:
                async with IPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane,
                                      timeout=30) as ipc:
                    await ipc.call_method('Absorb', failing_requests_async(echo, tag, reports))
            asyncio.run(call())
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
    if lane == 'ttrpc':
        # (grpc.aio's server may show a handler its cancelled request stream
        # as ended before it cancels the handler: not asserted there.)
        wait_for(reports.ended(tag, 'cancelled'), 10, 'the handler to be cancelled')


@pytest.mark.parametrize('lane', LANES)
def test_a_streamed_message_too_large_fails_a_blocking_call_at_once_not_at_its_deadline(
        server: ServerProcess, echo: Any, lane: str) -> None:
    # The sender thread finds it too large; the caller, asleep reading the
    # socket, used to hear of it only when its deadline (here 600 s) woke it.
    outcome: list[BaseException] = []

    def call() -> None:
        with SyncIPCHandler(server.socket_path, echo.Stub, lane=lane, timeout=600, max_message_bytes=10_000,
                            shared_memory=None) as ipc:
            try:
                ipc.call_method('Collect', [echo.pb.EchoRequest(text='a'), echo.pb.EchoRequest(payload=bytes(20_000))])
            except BaseException as error:
                outcome.append(error)
    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(30)
    assert not caller.is_alive(), 'the call waits for its deadline'
    assert isinstance(outcome[0], MessageTooLargeError), outcome


@pytest.mark.asyncio
@pytest.mark.parametrize('lane', LANES)
async def test_a_request_stream_message_of_another_type_is_refused_naming_it(
        server: ServerProcess, echo: Any, lane: str) -> None:
    wrong = r'Collect takes a stream of vyra.ipc.test.EchoRequest requests, not vyra.ipc.test.CountRequest ' \
            r'\(message 1 of the stream\)'
    alone = 'Collect streams its requests: give it an iterable of vyra.ipc.test.EchoRequest messages, not EchoRequest'
    requests = [echo.pb.EchoRequest(text='a'), echo.pb.CountRequest(count=1)]
    with SyncIPCHandler(server.socket_path, echo.Stub, lane=lane) as ipc:
        with pytest.raises(TypeError, match=wrong):
            ipc.call_method('Collect', requests)
        with pytest.raises(TypeError, match=alone):
            ipc.call_method('Collect', echo.pb.EchoRequest(text='one'))
        with pytest.raises(TypeError, match='an async iterable of requests needs the asyncio client'):
            ipc.call_method('Collect', aiter_of(echo.pb.EchoRequest(text='a')))
        assert ipc.call_method('Collect', iter(requests[:1])).text == 'a'
    async with IPCHandler(server.socket_path, echo.Stub, lane=lane) as aio:
        with pytest.raises(TypeError, match=wrong):
            await aio.call_method('Collect', requests)
        with pytest.raises(TypeError, match=wrong):
            await aio.call_method('Collect', aiter_of(*requests))
        with pytest.raises(TypeError, match=alone):
            await aio.call_method('Collect', echo.pb.EchoRequest(text='one'))
        with pytest.raises(TypeError, match=wrong.replace('Collect', 'Chat')):
            async for _ in aio.stream_method('Chat', requests):
                pass
        assert (await aio.call_method('Collect', aiter_of(*requests[:1]))).text == 'a'


async def aiter_of(*messages: Any) -> Any:
    for message in messages:
        yield message


# -- long-lived streams -------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize('lane', LANES)
async def test_a_stream_without_deadline_outlives_the_default_timeout_and_ends_when_left(
        server: ServerProcess, echo: Any, reports: Reports, lane: str) -> None:
    tag = next(tags)
    async with IPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane, timeout=0.3) as ipc:
        first = None
        async for event in ipc.stream_method('Watch', watch(echo, tag, interval=0.02), timeout=None):
            first = event.sent_at if first is None else first
            if event.sent_at - first > 1.0:  # over three default deadlines
                break
        # The watch yields every 20 ms: left while it awaited, or while it had yielded.
        await until(reports.ended(tag, LEFT), 10, 'the watch to end')


def test_a_sync_stream_without_deadline_outlives_the_default_timeout(
        server: ServerProcess, echo: Any, reports: Reports) -> None:
    tag = next(tags)
    with SyncIPCHandler(server.socket_path, echo.grpc.WatchServiceStub, timeout=0.3) as ipc:
        first = None
        for event in ipc.stream_method('Watch', watch(echo, tag, interval=0.02), timeout=None):
            first = event.sent_at if first is None else first
            if event.sent_at - first > 1.0:
                break
        wait_for(reports.ended(tag, LEFT), 10, 'the watch to end')


@pytest.mark.asyncio
@pytest.mark.parametrize('lane', LANES)
async def test_idle_timeout_fails_a_stream_whose_messages_stop(
        server: ServerProcess, echo: Any, reports: Reports, lane: str) -> None:
    tag = next(tags)
    async with IPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane) as ipc:
        received = []
        with pytest.raises(IPCTimeoutError, match='idle timeout of 0.3 s'):
            async for event in ipc.stream_method('Watch', watch(echo, tag, count=3, hold=True),
                                                 timeout=None, idle_timeout=0.3):
                received.append(event.index)
        assert received == [0, 1, 2]
        await until(reports.ended(tag, 'cancelled'), 10, 'the idle watch to be cancelled')


@pytest.mark.parametrize('lane', LANES)
def test_idle_timeout_of_a_sync_stream(server: ServerProcess, echo: Any, reports: Reports, lane: str) -> None:
    tag = next(tags)
    with SyncIPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane) as ipc:
        received = []
        with pytest.raises(IPCTimeoutError, match='idle timeout of 0.3 s'):
            for event in ipc.stream_method('Watch', watch(echo, tag, count=3, hold=True), timeout=None,
                                           idle_timeout=0.3):
                received.append(event.index)
        assert received == [0, 1, 2]
        wait_for(reports.ended(tag, 'cancelled'), 10, 'the idle watch to be cancelled')


@pytest.mark.parametrize('lane', LANES)
@pytest.mark.parametrize('client', ['sync', 'asyncio'])
def test_idle_timeout_does_not_count_the_time_the_caller_spends_on_a_message(
        server: ServerProcess, echo: Any, lane: str, client: str) -> None:
    """The idle timeout is about the server's silence: a caller that takes
    twice the idle timeout over each message still gets them all."""
    request = watch(echo, next(tags), count=4)

    def busy_for(seconds: float) -> Callable[[], bool]:
        ends = time.monotonic() + seconds
        return lambda: time.monotonic() > ends
    received = []
    if client == 'sync':
        with SyncIPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane) as ipc:
            for event in ipc.stream_method('Watch', request, idle_timeout=0.3):
                received.append(event.index)
                wait_for(busy_for(0.6), 5, 'the caller to be done with its message')

    async def main() -> None:
        async with IPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane) as ipc:
            async for event in ipc.stream_method('Watch', request, idle_timeout=0.3):
                received.append(event.index)
                await until(busy_for(0.6), 5, 'the caller to be done with its message')
    if client == 'asyncio':
        asyncio.run(main())
    assert received == [0, 1, 2, 3]


def test_idle_timeout_is_for_streams_only_and_checked(server: ServerProcess, echo: Any) -> None:
    with SyncIPCHandler(server.socket_path, echo.Stub) as ipc:
        with pytest.raises(TypeError):
            ipc.call_method('Echo', echo.pb.EchoRequest(), idle_timeout=1)  # type: ignore[call-arg]
        with pytest.raises(ValueError, match='idle_timeout'):
            list(ipc.stream_method('Count', echo.pb.CountRequest(count=1), idle_timeout=0))


# -- shutdown -----------------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize('lane', LANES)
async def test_sigterm_with_50_open_watches_ends_them_at_once_and_exits(
        start_server: Callable[..., ServerProcess], socket_path: Any, echo: Any, lane: str) -> None:
    grace = 5.0
    server = start_server(socket_path, '--grace-period', str(grace))
    reports = Reports(server, echo)
    outcomes: list[BaseException | None] = []

    async def follow(ipc: IPCHandler, tag: str) -> None:
        try:
            async for _ in ipc.stream_method('Watch', watch(echo, tag, interval=0.05), timeout=None):
                pass
            outcomes.append(None)
        except BaseException as error:  # noqa: B036 - recorded and asserted below
            outcomes.append(error)
    try:
        async with IPCHandler(server.socket_path, echo.grpc.WatchServiceStub, lane=lane) as ipc:
            watches = [asyncio.ensure_future(follow(ipc, f'shutdown-{lane}-{index}')) for index in range(50)]
            await until(lambda: all(reports(f'shutdown-{lane}-{index}').sent > 0 for index in range(50)),
                             20, 'the 50 watches to flow')
            reports.client.disconnect()
            server.signal(signal.SIGTERM)
            code = await asyncio.to_thread(server.wait, grace + 1 + STOP_SLACK)  # raises if it takes longer
            await asyncio.wait_for(asyncio.gather(*watches), 10)
    finally:
        reports.client.disconnect()
    assert code == 0, server.log()
    assert len(outcomes) == 50
    for outcome in outcomes:
        # Told at once: after the grace the streams would have been cut off
        # (connection lost / CANCELLED), not told why.
        assert isinstance(outcome, IPCUnavailableError), outcome
        assert outcome.details == 'server is shutting down', outcome
