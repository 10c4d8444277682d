"""Calls over the fast lane under concurrency, deadlines and failures, with
the package's own clients against a real server process."""

from __future__ import annotations

import asyncio
import fcntl
import json
from pathlib import Path
import signal
import socket
import struct
import termios
import threading
from typing import Any, Iterator
import warnings

import grpc
import pytest

from conftest import (
    CLIENT_KINDS,
    ServerProcess,
    StartServer,
    fast_lane_connection,
    handler_of,
    make_stale_socket,
    start_lanes,
    wait_for,
)
from ttrpc_peer import Peer
from vyra_base_ipc import module_service_pb2 as module_pb
from vyra_base_ipc._methods import stub_methods
from vyra_base_ipc.exceptions import (
    IPCTimeoutError,
    IPCUnavailableError,
    MessageTooLargeError,
)
from vyra_base_ipc.module_service_pb2_grpc import ModuleServiceStub
from vyra_base_ipc.ttrpc import AsyncConnection, SyncConnection
from vyra_base_ipc.ttrpc._blocking_socket import BlockingSocket
from vyra_base_ipc.ttrpc._errors import NothingSent
from vyra_base_ipc.ttrpc._transport import SEND_BUFFER_BYTES

EXECUTE = stub_methods(ModuleServiceStub)['ExecuteCommand']
PING = module_pb.CommandRequest(command='ping')


def observed(connection: SyncConnection, label: str) -> dict[str, Any] | None:
    """What the server's handler recorded under ``label`` (see ttrpc_server.py)."""
    answer = connection.call(EXECUTE, module_pb.CommandRequest(command='observed'), timeout=10)
    return json.loads(answer.result).get(label)


# -- a slow handler blocks nothing else ---------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize('method_name', ['Echo', 'EchoSync'])
async def test_sleeping_handler_does_not_delay_a_ping_on_the_same_connection(
        lanes: ServerProcess, echo: Any, method_name: str) -> None:
    method = stub_methods(echo.Stub)[method_name]
    # A def handler holds its worker thread to the end, so it sleeps less.
    text = 'sleep:slow:30' if method_name == 'Echo' else 'sleep:slow:3'
    async with await AsyncConnection.connect(lanes.ttrpc_path) as connection:
        slow = asyncio.ensure_future(connection.call(method, echo.pb.EchoRequest(text=text), timeout=60))
        for _ in range(20):
            assert (await connection.call(EXECUTE, PING, timeout=10)).result == 'pong'
        assert not slow.done(), 'pings came back only after the sleeping call ended'
        if method_name == 'EchoSync':
            assert (await slow).text == 'slow'
        else:
            slow.cancel()


def test_sleeping_handler_does_not_delay_other_connections(lanes: ServerProcess, echo: Any) -> None:
    method = stub_methods(echo.Stub)['EchoSync']
    results: list[Any] = []
    with SyncConnection.connect(lanes.ttrpc_path) as busy, SyncConnection.connect(lanes.ttrpc_path) as other:
        sleeper = threading.Thread(target=lambda: results.append(
            busy.call(method, echo.pb.EchoRequest(text='sleep:other:3'), timeout=30)))
        sleeper.start()
        try:
            wait_for(lambda: busy._core.streams, 10, 'the sleeping call to be sent')
            for _ in range(20):
                assert other.call(EXECUTE, PING, timeout=10).result == 'pong'
            assert not results, 'pings came back only after the sleeping call ended'
        finally:
            sleeper.join(30)
    assert results[0].text == 'other'


def test_threads_share_one_sync_connection(lanes: ServerProcess, echo: Any) -> None:
    method = stub_methods(echo.Stub)['Echo']
    errors: list[BaseException] = []
    with SyncConnection.connect(lanes.ttrpc_path) as connection:
        slow = threading.Thread(target=lambda: connection.call(
            method, echo.pb.EchoRequest(text='sleep:shared:2'), timeout=30))
        slow.start()

        def worker(index: int) -> None:
            try:
                for count in range(50):
                    text = f'{index}-{count}'
                    assert connection.call(method, echo.pb.EchoRequest(text=text), timeout=30).text == text
            except BaseException as error:  # reported below
                errors.append(error)
        threads = [threading.Thread(target=worker, args=(index,)) for index in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        slow.join(60)
    assert not errors, errors


@pytest.mark.asyncio
async def test_many_calls_in_flight_on_one_async_connection(lanes: ServerProcess, echo: Any) -> None:
    method = stub_methods(echo.Stub)['Echo']
    async with await AsyncConnection.connect(lanes.ttrpc_path) as connection:
        replies = await asyncio.gather(*[
            connection.call(method, echo.pb.EchoRequest(text=str(index), payload=bytes([index % 256]) * 64),
                            timeout=30) for index in range(256)])
    assert [reply.text for reply in replies] == [str(index) for index in range(256)]
    assert all(reply.payload == bytes([index % 256]) * 64 for index, reply in enumerate(replies))


@pytest.mark.asyncio
async def test_streams_and_unary_calls_interleave_on_one_connection(lanes: ServerProcess, echo: Any) -> None:
    methods = stub_methods(echo.Stub)
    async with await AsyncConnection.connect(lanes.ttrpc_path) as connection:
        async def count(n: int) -> list[int]:
            return [reply.index async for reply in connection.stream(
                methods['Count'], echo.pb.CountRequest(count=n), timeout=30)]

        async def chat(words: list[str]) -> list[str]:
            return [reply.text async for reply in connection.stream(
                methods['Chat'], [echo.pb.EchoRequest(text=w) for w in words], timeout=30)]
        results = await asyncio.gather(count(100), chat(['a', 'b']), count(3),
                                       connection.call(EXECUTE, PING, timeout=30),
                                       chat(['x'] * 50))
    assert results[0] == list(range(100))
    assert results[1] == ['A', 'B']
    assert results[2] == [0, 1, 2]
    assert results[3].result == 'pong'
    assert results[4] == ['X'] * 50


# -- large frames: the sockets' send buffers -----------------------------------------------------

def _wmem_max() -> int:
    try:
        return int(Path('/proc/sys/net/core/wmem_max').read_text())
    except (OSError, ValueError):
        return 0


#: A message four times the kernel's default send buffer (208 KiB), whole
#: frame well within the enlarged one (2 MiB).
LARGE = 900_000
needs_large_send_buffers = pytest.mark.skipif(
    _wmem_max() < SEND_BUFFER_BYTES,
    reason=f'net.core.wmem_max is below {SEND_BUFFER_BYTES}: no send buffer holds a {LARGE} B frame')


def unread_bytes(sock: socket.socket) -> int:
    """Bytes waiting in ``sock`` to be read (FIONREAD)."""
    return struct.unpack('i', fcntl.ioctl(sock.fileno(), termios.FIONREAD, b'\0' * 4))[0]


@needs_large_send_buffers
def test_sync_client_writes_a_large_request_without_waiting_for_the_server(
        lanes: ServerProcess, echo: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole frame fits in the socket: the blocking client never sleeps
    for POLLOUT while the server reads (in the kernel's default 208 KiB
    buffer it slept four times per 1 MiB frame, each time until the server
    had emptied three quarters of the buffer)."""
    waits: list[Any] = []
    wait_writable = BlockingSocket._wait_writable

    def counted(self: BlockingSocket, deadline: Any) -> bool:
        waits.append(deadline)
        return wait_writable(self, deadline)
    monkeypatch.setattr(BlockingSocket, '_wait_writable', counted)
    payload = bytes(range(256)) * (LARGE // 256)
    with SyncConnection.connect(lanes.ttrpc_path, shared_memory=None) as connection:
        for _ in range(3):
            reply = connection.call(stub_methods(echo.Stub)['Echo'], echo.pb.EchoRequest(payload=payload),
                                    timeout=30)
            assert reply.payload == payload
        send_buffer = connection._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    assert waits == []
    assert send_buffer >= 2 * SEND_BUFFER_BYTES


@needs_large_send_buffers
def test_server_writes_a_large_answer_whole_into_the_socket(lanes: ServerProcess, echo: Any) -> None:
    """The answer to a client that has not read yet waits whole in the
    client's socket: the server wrote it at once, not a quarter of the
    default buffer each time the client read (keeping the frame meanwhile)."""
    payload = b'a' * LARGE
    with Peer.connect(lanes.ttrpc_path) as peer:
        peer.request(1, 'vyra.ipc.test.EchoService', 'Echo', echo.pb.EchoRequest(payload=payload).SerializeToString())
        wait_for(lambda: unread_bytes(peer.sock) > LARGE, 20, 'the whole answer in the socket')
        answer = peer.answer(1)
    assert answer.code == 0 and echo.pb.EchoReply.FromString(answer.payload).payload == payload


@pytest.mark.asyncio
async def test_async_client_socket_has_the_enlarged_send_buffer(lanes: ServerProcess) -> None:
    async with await AsyncConnection.connect(lanes.ttrpc_path) as connection:
        sock = connection._transport.get_extra_info('socket')
        wanted = 2 * min(SEND_BUFFER_BYTES, _wmem_max())
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= wanted


# -- deadlines ----------------------------------------------------------------------------------

@pytest.mark.parametrize('method_name', ['Echo', 'EchoSync'])
def test_deadline_expires_on_both_sides(lanes: ServerProcess, echo: Any, method_name: str) -> None:
    method = stub_methods(echo.Stub)[method_name]
    label = f'deadline-{method_name}'
    with SyncConnection.connect(lanes.ttrpc_path) as connection:
        with pytest.raises(IPCTimeoutError) as raised:
            connection.call(method, echo.pb.EchoRequest(text=f'sleep:{label}:1.0'), timeout=0.3)
        assert raised.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert raised.value.method == method.path
        wait_for(lambda: observed(connection, label), 20, 'the handler to record its context')
        seen = observed(connection, label)
        # The connection is still fine after a call timed out on it.
        assert connection.call(EXECUTE, PING, timeout=10).result == 'pong'
    assert seen is not None
    assert seen['time_remaining'] <= 0
    assert seen['is_active'] is False
    assert seen['cancelled'] is True


@pytest.mark.asyncio
async def test_async_client_deadline(lanes: ServerProcess, echo: Any) -> None:
    method = stub_methods(echo.Stub)['Sleep']
    async with await AsyncConnection.connect(lanes.ttrpc_path) as connection:
        with pytest.raises(IPCTimeoutError):
            await connection.call(method, echo.pb.SleepRequest(seconds=30), timeout=0.2)
        with pytest.raises(IPCTimeoutError):
            async for _ in connection.stream(stub_methods(echo.Stub)['Chat'],
                                             _never_ending(echo), timeout=0.2):
                pass
        reply = await connection.call(method, echo.pb.SleepRequest(seconds=0.01), timeout=30)
    assert reply.was_active is True
    assert 0 < reply.time_remaining <= 30


@pytest.mark.asyncio
async def test_calls_that_time_out_waiting_for_a_stopped_server_to_read_leave_nothing_behind(
        lanes: ServerProcess, echo: Any) -> None:
    """New calls wait while the server does not read (its socket is full);
    each that times out there used to leave its waiter with the connection
    until the server read again: for ever for a server that never does."""
    method = stub_methods(echo.Stub)['Echo']
    async with await AsyncConnection.connect(lanes.ttrpc_path) as connection:
        assert (await connection.call(method, echo.pb.EchoRequest(text='up'), timeout=10)).text == 'up'
        protocol = connection._protocol
        filling: list[asyncio.Task[Any]] = []
        lanes.signal(signal.SIGSTOP)
        try:
            for _ in range(2000):  # inline requests until the socket takes no more
                if protocol.write_paused:
                    break
                filling.append(asyncio.ensure_future(connection.call(
                    method, echo.pb.EchoRequest(text='fill', payload=bytes(30_000)), timeout=60)))
                await asyncio.sleep(0)
            assert protocol.write_paused
            await asyncio.sleep(0)  # (the last filling calls reach their wait)
            waiting = len(protocol._drain_waiters)
            for _ in range(3):
                failed = await asyncio.gather(*(connection.call(method, echo.pb.EchoRequest(text='late'),
                                                                timeout=0.05) for _ in range(100)),
                                              return_exceptions=True)
                assert all(isinstance(error, IPCTimeoutError) for error in failed), failed
                assert len(protocol._drain_waiters) == waiting
        finally:
            lanes.signal(signal.SIGCONT)
        answers = await asyncio.gather(*filling)
        assert {answer.text for answer in answers} == {'fill'}
        assert (await connection.call(method, echo.pb.EchoRequest(text='again'), timeout=10)).text == 'again'


@pytest.mark.asyncio
async def test_a_call_cancelled_as_the_hello_is_answered_is_cancelled(lanes: ServerProcess, echo: Any) -> None:
    """The first call of a connection waits for the answer to its Hello: a
    task cancelled in the pass of the loop that answer arrives in went on
    with its call (Python 3.11's wait_for() gave the answer, not the cancel)."""
    method = stub_methods(echo.Stub)['Sleep']
    async with await AsyncConnection.connect(lanes.ttrpc_path) as connection:
        call = asyncio.ensure_future(connection.call(method, echo.pb.SleepRequest(seconds=30), timeout=60))
        await asyncio.sleep(0)  # (it waits for the Hello's answer)
        hello = connection._protocol.core.hello
        assert hello is not None and not hello.done()
        hello.add_done_callback(lambda _: call.cancel())
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(call, 10)
        reply = await connection.call(method, echo.pb.SleepRequest(seconds=0), timeout=10)
        assert reply.was_active and connection.cancels  # (the next call settled the Hello)


async def _never_ending(echo: Any) -> Any:
    yield echo.pb.EchoRequest(text='one')
    await asyncio.Event().wait()


def test_call_without_deadline_has_none_on_the_server(lanes: ServerProcess, echo: Any) -> None:
    with SyncConnection.connect(lanes.ttrpc_path) as connection:
        reply = connection.call(stub_methods(echo.Stub)['Sleep'], echo.pb.SleepRequest(seconds=0),
                                timeout=None)
    # The handler reports time_remaining() or 0.0: None arrives as 0.0.
    assert reply.time_remaining == 0.0


# -- failures -----------------------------------------------------------------------------------

def test_missing_socket_is_unavailable(socket_dir: Path) -> None:
    with pytest.raises(IPCUnavailableError, match='does not exist'):
        SyncConnection.connect(socket_dir / 'none.ttrpc.sock')


@pytest.mark.asyncio
async def test_stale_socket_is_unavailable(socket_dir: Path) -> None:
    make_stale_socket(socket_dir / 'stale.sock')
    with pytest.raises(IPCUnavailableError, match='no server answers'):
        await AsyncConnection.connect(socket_dir / 'stale.sock')


@pytest.mark.asyncio
async def test_server_killed_mid_call_is_unavailable(start_server: StartServer, socket_dir: Path,
                                                     echo: Any) -> None:
    lanes = start_lanes(start_server, socket_dir)  # a server of its own
    sleep = stub_methods(echo.Stub)['Sleep']
    async with await AsyncConnection.connect(lanes.ttrpc_path) as connection:
        call = asyncio.ensure_future(connection.call(sleep, echo.pb.SleepRequest(seconds=30), timeout=30))
        assert (await connection.call(EXECUTE, PING, timeout=10)).result == 'pong'
        lanes.signal(signal.SIGKILL)
        with pytest.raises(IPCUnavailableError) as lost:
            await call
        assert connection.is_closed
        with pytest.raises(IPCUnavailableError) as refused:
            await connection.call(EXECUTE, PING, timeout=10)
    # The connection's one error, named for each call it failed.
    assert (lost.value.method, refused.value.method) == (sleep.path, EXECUTE.path)


def test_sync_connection_breaks_cleanly_when_the_server_dies(start_server: StartServer, socket_dir: Path,
                                                             echo: Any) -> None:
    lanes = start_lanes(start_server, socket_dir)  # a server of its own
    sleep = stub_methods(echo.Stub)['Sleep']
    failures: list[BaseException] = []
    with SyncConnection.connect(lanes.ttrpc_path) as connection:
        def call() -> None:
            try:
                connection.call(sleep, echo.pb.SleepRequest(seconds=30), timeout=30)
            except BaseException as error:
                failures.append(error)
        threads = [threading.Thread(target=call) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(connection._core.streams) == 4, 10, 'four calls in flight')
        lanes.signal(signal.SIGKILL)
        for thread in threads:
            thread.join(30)
        assert connection.is_closed
    assert len(failures) == 4 and all(isinstance(f, IPCUnavailableError) for f in failures), failures
    assert {f.method for f in failures} == {sleep.path}  # type: ignore[attr-defined]


def test_sigterm_stops_the_server_and_removes_the_socket(start_server: StartServer, socket_dir: Path) -> None:
    lanes = start_lanes(start_server, socket_dir)  # a server of its own
    with SyncConnection.connect(lanes.ttrpc_path) as connection:
        assert connection.call(EXECUTE, PING, timeout=10).result == 'pong'
        lanes.signal(signal.SIGTERM)
        assert lanes.wait() == 0
        with pytest.raises(IPCUnavailableError):
            connection.call(EXECUTE, PING, timeout=10)
    assert not lanes.ttrpc_path.exists()


def test_wrong_call_shape_is_a_type_error(lanes: ServerProcess, echo: Any) -> None:
    methods = stub_methods(echo.Stub)
    with SyncConnection.connect(lanes.ttrpc_path) as connection:
        with pytest.raises(TypeError, match='stream'):
            connection.call(methods['Count'], echo.pb.CountRequest(count=1), timeout=10)
        with pytest.raises(TypeError, match='call'):
            list(connection.stream(methods['Echo'], echo.pb.EchoRequest(), timeout=10))
        with pytest.raises(TypeError, match='Method'):
            connection.call('Echo', echo.pb.EchoRequest(), timeout=10)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match='timeout'):
            connection.call(methods['Echo'], echo.pb.EchoRequest(), timeout=-1)


def test_too_large_request_fails_before_sending(lanes: ServerProcess, echo: Any) -> None:
    method = stub_methods(echo.Stub)['Echo']
    with SyncConnection.connect(lanes.ttrpc_path, max_message_bytes=1024) as connection:
        with pytest.raises(MessageTooLargeError) as raised:  # the client's own refusal, not the server's
            connection.call(method, echo.pb.EchoRequest(payload=b'x' * 2000), timeout=10)
        assert raised.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (raised.value.size, raised.value.limit) == (2003, 1024)
        assert connection.call(method, echo.pb.EchoRequest(text='still fine'), timeout=10).text == 'still fine'


def test_request_iterator_failure_reaches_the_caller(lanes: ServerProcess, echo: Any) -> None:
    def requests() -> Iterator[Any]:
        yield echo.pb.EchoRequest(text='a')
        raise LookupError("the caller's own bug")
    with SyncConnection.connect(lanes.ttrpc_path) as connection:
        with pytest.raises(LookupError, match='own bug'):
            connection.call(stub_methods(echo.Stub)['Collect'], requests(), timeout=10)
        assert connection.call(EXECUTE, PING, timeout=10).result == 'pong'


def test_close_is_idempotent_and_fails_later_calls(lanes: ServerProcess) -> None:
    connection = SyncConnection.connect(lanes.ttrpc_path)
    connection.close()
    connection.close()
    assert connection.is_closed
    with pytest.raises(IPCUnavailableError, match='closed'):
        connection.call(EXECUTE, PING, timeout=10)


def test_connection_of_the_parent_refuses_calls_in_a_forked_child(lanes: ServerProcess) -> None:
    import os
    with SyncConnection.connect(lanes.ttrpc_path) as connection:
        assert connection.call(EXECUTE, PING, timeout=10).result == 'pong'
        read_end, write_end = os.pipe()
        with warnings.catch_warnings():
            # Python 3.12 warns about fork() in a multi-threaded process;
            # the child here only makes one call and leaves with _exit().
            warnings.simplefilter('ignore', DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: report what a call does, then leave at once
            try:
                connection.call(EXECUTE, PING, timeout=10)
                verdict = b'call went through'
            except IPCUnavailableError as error:
                verdict = b'refused' if 'after fork' in error.details else error.details.encode()
            os.write(write_end, verdict)
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, 'rb') as pipe:
            verdict = pipe.read()
        os.waitpid(pid, 0)
        assert verdict == b'refused'
        assert connection.call(EXECUTE, PING, timeout=10).result == 'pong'  # the parent's still works


def test_async_connection_is_bound_to_its_event_loop(lanes: ServerProcess) -> None:
    home = asyncio.new_event_loop()
    try:
        connection = home.run_until_complete(AsyncConnection.connect(lanes.ttrpc_path))
        with pytest.raises(RuntimeError, match='another event loop'):
            asyncio.run(connection.call(EXECUTE, PING, timeout=10))
        assert home.run_until_complete(connection.call(EXECUTE, PING, timeout=10)).result == 'pong'
        home.run_until_complete(connection.close())
    finally:
        home.close()


# -- stream ids used up ---------------------------------------------------------------------------

LAST_STREAM_ID = 2**32 - 1


def core_of(connection: Any) -> Any:
    """The framed core of a fast-lane connection of either kind (the asyncio
    one's is its protocol's), which numbers its streams."""
    protocol = getattr(connection, '_protocol', None)
    return connection._core if protocol is None else protocol.core


@pytest.mark.parametrize('client', CLIENT_KINDS)
def test_a_connection_that_used_up_its_stream_ids_says_so_and_counts_as_closed(
        client: str, lanes: ServerProcess, echo: Any) -> None:
    # Ids only increase and are 32 bits: a client's 2**31 calls (25 days at
    # a thousand a second), then the connection must be replaced.
    echo_method = stub_methods(echo.Stub)['Echo']
    with pytest.raises(IPCUnavailableError) as raised:
        with fast_lane_connection(client, lanes.ttrpc_path) as connection:
            connection.call(echo_method, echo.pb.EchoRequest(text='hello'), timeout=10)
            core_of(connection).next_id = LAST_STREAM_ID - 2
            assert [connection.call(echo_method, echo.pb.EchoRequest(text=text), timeout=10).text
                    for text in ('last but one', 'last')] == ['last but one', 'last']
            assert connection.is_closed
            connection.call(echo_method, echo.pb.EchoRequest(), timeout=10)
    assert f'its stream ids are used up ({LAST_STREAM_ID}): open a new connection' in str(raised.value)


@pytest.mark.parametrize('client', CLIENT_KINDS)
def test_handlers_open_a_new_connection_once_the_old_one_used_up_its_stream_ids(
        client: str, lanes: ServerProcess, echo: Any) -> None:
    options: dict[str, Any] = {'ttrpc_socket_path': lanes.ttrpc_path, 'lane': 'ttrpc', 'timeout': 10}
    with handler_of(client, lanes.socket_path, echo.Stub, **options) as handler, handler as ipc:
        ipc.call_method('Echo', echo.pb.EchoRequest(text='first'))
        used = ipc._fast
        core_of(used).next_id = LAST_STREAM_ID
        texts = [ipc.call_method('Echo', echo.pb.EchoRequest(text=text)).text for text in ('last', 'next')]
        assert ipc._fast is not used and used.is_closed
    assert texts == ['last', 'next']


@pytest.mark.parametrize('client', CLIENT_KINDS)
def test_a_full_listen_backlog_is_unavailable_at_once_not_an_untrusted_server(
        client: str, socket_dir: Path) -> None:
    # asyncio's sock_connect() took a Unix socket's EAGAIN for a connect in
    # progress and returned a socket never connected: its peer looked like a
    # process of uid -1, "untrusted".
    path = socket_dir / 'busy.sock'
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)  # never accepts
    queued: list[socket.socket] = []
    try:
        while True:  # fill the backlog
            waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            waiting.setblocking(False)
            queued.append(waiting)
            try:
                waiting.connect(str(path))
            except BlockingIOError:
                break
            assert len(queued) < 64, 'the backlog never filled'

        with pytest.raises(IPCUnavailableError) as raised:
            with fast_lane_connection(client, path):
                pass
        assert type(raised.value) is IPCUnavailableError  # not UntrustedServerError
        assert f'{str(path)!r} takes no connection now: its listen backlog is full' in str(raised.value)
    finally:
        for waiting in queued:
            waiting.close()
        listener.close()


# -- retired connections ----------------------------------------------------------------------------

@pytest.mark.parametrize('client', CLIENT_KINDS)
def test_a_call_that_took_a_connection_before_it_was_retired_and_closed_is_to_go_again(
        client: str, lanes: ServerProcess) -> None:
    # The handlers retire a connection whose server shuts down (no new calls; closed once none
    # is in flight), from the call that heard it; another call that had taken the connection
    # just before found it closed with nothing of it sent, and failed UNAVAILABLE for good
    # instead of going again over a new connection (NothingSent).
    with pytest.raises(IPCUnavailableError) as raised:
        with fast_lane_connection(client, lanes.ttrpc_path) as connection:
            assert connection.call(EXECUTE, PING, timeout=10).result == 'pong'
            connection.retire()  # nothing in flight: closed at once
            assert connection.is_closed
            connection.call(EXECUTE, PING, timeout=10)
    assert isinstance(raised.value, NothingSent), repr(raised.value)
    assert 'was closed' in raised.value.details


def test_a_blocking_call_cannot_start_between_retire_finding_no_call_and_closing(
        lanes: ServerProcess, echo: Any) -> None:
    # retire() looked for calls in flight and closed without the state lock: a call of another
    # thread could start in between, send its request (the server ran it) and fail "was closed",
    # not to go again since it was sent. Driven here at that very moment, from another thread.
    slow = stub_methods(echo.Stub)['Echo']
    outcome: list[object] = []
    with SyncConnection.connect(lanes.ttrpc_path) as connection:
        assert connection.call(EXECUTE, PING, timeout=10).result == 'pong'

        def call() -> None:
            try:
                outcome.append(connection.call(slow, echo.pb.EchoRequest(text='sleep:retired:1'), timeout=10))
            except IPCUnavailableError as error:
                outcome.append(error)
        caller = threading.Thread(target=call)
        close = connection.close

        def closing() -> None:  # retire() found no call in flight and closes: a call starts now
            connection.close = close  # type: ignore[method-assign]
            lock_free: list[bool] = []

            def probe() -> None:  # (from another thread: the retiring one may hold the lock)
                if connection._state_lock.acquire(blocking=False):
                    connection._state_lock.release()
                    lock_free.append(True)
            prober = threading.Thread(target=probe)
            prober.start()
            prober.join(10)
            caller.start()
            if lock_free:  # nothing keeps the call out: it sends its request before the close
                wait_for(lambda: connection._core.streams and not connection._send_lock.locked(), 10,
                         'the call to send its request')
            close()
        connection.close = closing  # type: ignore[method-assign]
        connection.retire()
        caller.join(20)
    assert len(outcome) == 1 and isinstance(outcome[0], NothingSent), outcome
