"""Faults in the life of a server process, injected with real signals
(issue 4, guarantees 1, 2, 3 and 8).

- servers racing for one socket path: exactly one wins, the others exit
  naming the path, and the winner serves;
- SIGKILL in the middle of a call: the caller gets ``IPCUnavailableError``
  long before its deadline, and nothing of the client is left behind;
- a server down for ten seconds and back: the next call gets through within
  one second, calls that waited for it succeed;
- SIGTERM with many calls in flight: health says NOT_SERVING first, new calls
  are refused, calls in flight finish or are cut at the grace deadline, the
  process exits 0 and removes its socket.

The servers are ``test/servers/fault_server.py``: the echo server with a
journal of the requests its handlers saw, so a test knows when a call is in
flight on the server rather than merely sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
import contextlib
import fcntl
import gc
import itertools
import os
from pathlib import Path
import signal
import socket
import struct
import termios
import threading
import time
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc
import pytest

from conftest import (
    LANES,
    LONG,
    Journal,
    ServerProcess,
    StartFaultServer,
    drop_leftovers,
    in_flight,
    make_stale_socket,
    until,
    wait_for,
)
from http2_peer import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    OPEN_WINDOWS,
    PREFACE,
    frame,
    grpc_message,
    grpc_request_headers,
)
from ttrpc_peer import Peer
from vyra_base_ipc import IPCError, IPCHandler, IPCUnavailableError, SyncIPCHandler
from vyra_base_ipc import module_service_pb2 as module_pb
from vyra_base_ipc import module_service_pb2_grpc as module_grpc
from vyra_base_ipc._pool import aio_pool, aio_ttrpc_pool, sync_pool
from vyra_base_ipc._socket_file import is_listening

pytestmark = pytest.mark.fault


def open_fds() -> int:
    return len(os.listdir('/proc/self/fd'))


@pytest.fixture
def client_baseline(server_for_warmup: ServerProcess, echo) -> Iterator[tuple[int, int]]:
    """Threads and fds of this process once gRPC's process-wide state exists
    (one sync and one async round trip), so that what a test adds shows, and
    nothing earlier tests left is still to go: the shared-memory pool's timer
    thread and its free segments ending mid-test hid a thread and two fds leaked."""
    with SyncIPCHandler(server_for_warmup.socket_path, echo.Stub, timeout=LONG) as client:
        client.call_method('Echo', echo.pb.EchoRequest())

    async def warm_up() -> None:
        async with IPCHandler(server_for_warmup.socket_path, echo.Stub, timeout=LONG) as client:
            await client.call_method('Echo', echo.pb.EchoRequest())
    asyncio.run(warm_up())
    drop_leftovers()
    yield threading.active_count(), open_fds()


@pytest.fixture
def server_for_warmup(start_server: Callable[..., ServerProcess], socket_dir: Path) -> ServerProcess:
    return start_server(socket_dir / 'warmup.sock')


def assert_client_released(baseline: tuple[int, int]) -> None:
    """Threads and fds of this process fall back to the baseline.

    The traceback of a call that failed holds gRPC objects in a reference
    cycle, and grpc.aio keeps its poller thread while any of its channel
    objects exists, so the cyclic garbage collector runs first; gRPC also lets
    go of a closed channel's resources asynchronously, hence the wait.
    """
    gc.collect()
    threads, fds = baseline
    wait_for(lambda: threading.active_count() <= threads, 20,
             f'client threads back to {threads} (now {threading.active_count()}: '
             f'{[t.name for t in threading.enumerate()]})')
    wait_for(lambda: open_fds() <= fds, 20, f'client fds back to {fds} (now {open_fds()})')
    assert sync_pool.open_connections() == 0


# -- 1: a second server on a live path ---------------------------------------------------

@pytest.mark.parametrize('path_state', ['free', 'stale'])
def test_servers_racing_for_one_path_exactly_one_wins(start_fault_server: StartFaultServer,
                                                      socket_path: Path, tmp_path: Path, echo,
                                                      path_state: str) -> None:
    if path_state == 'stale':
        make_stale_socket(socket_path)
    gate = tmp_path / 'go'
    contenders = [start_fault_server(socket_path, '--start-gate', str(gate), wait=False)[0]
                  for _ in range(3)]

    def all_at_the_gate() -> bool:
        for process in contenders:
            if process.popen.poll() is not None:
                raise AssertionError(f'contender exited early:\n{process.log()}')
        return len(list(tmp_path.glob('go.*.waiting'))) == len(contenders)
    wait_for(all_at_the_gate, 60, 'every contender to wait at the start gate')
    gate.touch()  # all three start their servers within a millisecond or so

    def settled() -> bool:
        return (sum(p.popen.poll() is not None for p in contenders) == len(contenders) - 1
                and is_listening(socket_path))
    wait_for(settled, 30, 'all contenders but one to give up')
    winners = [p for p in contenders if p.popen.poll() is None]
    losers = [p for p in contenders if p.popen.poll() is not None]
    assert len(winners) == 1
    for loser in losers:
        assert loser.popen.returncode == 3, loser.log()
        # It names the socket it lost: the fast lane's is published first.
        assert str(socket_path.with_suffix('')) in loser.log()
        assert 'another server is listening' in loser.log()
    # Nothing of the losers is left: no private bind directory, no second file.
    assert sorted(p.name for p in socket_path.parent.iterdir()) == \
        [socket_path.name, socket_path.name.replace('.sock', '.ttrpc.sock')]
    with SyncIPCHandler(socket_path, echo.Stub, timeout=LONG) as client:
        assert client.call_method('Echo', echo.pb.EchoRequest(text='winner')).text == 'winner'
    # The socket is the winner's: once it is gone, nobody answers.
    winners[0].kill()
    assert socket_path.is_socket() and not is_listening(socket_path)


def test_refused_second_server_leaves_calls_in_flight_alone_then_replaces_the_crashed_first(
        start_fault_server: StartFaultServer, socket_path: Path, echo) -> None:
    first, journal = start_fault_server(socket_path)
    inode = socket_path.stat().st_ino

    async def scenario() -> None:
        async with IPCHandler(socket_path, echo.Stub, timeout=LONG) as client:
            sleeper = asyncio.create_task(client.call_method('Sleep', echo.pb.SleepRequest(seconds=1.0)))
            await until(lambda: journal.count('begin', 'Sleep') == 1, LONG, 'the Sleep call on the server')
            second, _ = await asyncio.to_thread(start_fault_server, socket_path, wait=False)
            assert await asyncio.to_thread(second.wait) == 3
            assert 'another server is listening' in second.log() and str(socket_path) in second.log()
            assert socket_path.stat().st_ino == inode
            assert (await sleeper).was_active
            assert (await client.call_method('Echo', echo.pb.EchoRequest(text='same'))).text == 'same'

            first.signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait)
            assert socket_path.is_socket()  # a crash leaves its file behind
            await asyncio.to_thread(start_fault_server, socket_path)
            assert socket_path.stat().st_ino != inode
            # The client of the crashed server reaches the new one over the same handler.
            reply = await client.call_method('Echo', echo.pb.EchoRequest(text='new'), wait_for_ready=True)
            assert reply.text == 'new'
    asyncio.run(scenario())


# -- 2: crash mid-call ---------------------------------------------------------------------

def test_sigkill_mid_call_is_unavailable_for_the_async_client(
        start_fault_server: StartFaultServer, socket_path: Path, echo,
        client_baseline: tuple[int, int], lane: str) -> None:
    server, journal = start_fault_server(socket_path)

    async def scenario() -> str:
        async with IPCHandler(socket_path, echo.Stub, timeout=LONG, lane=lane) as client:
            call = asyncio.create_task(client.call_method('Sleep', echo.pb.SleepRequest(seconds=LONG)))
            await until(lambda: journal.count('begin', 'Sleep') == 1, LONG, 'the Sleep call on the server')
            server.signal(signal.SIGKILL)
            # Not IPCTimeoutError: the call failed as soon as the connection
            # broke, not when its 30 s deadline expired.
            with pytest.raises(IPCUnavailableError) as error:
                await call
        assert aio_pool.open_connections() == aio_ttrpc_pool.open_connections() == 0
        return error.value.method
    assert asyncio.run(scenario()) == '/vyra.ipc.test.EchoService/Sleep'
    server.wait()
    assert_client_released(client_baseline)


@pytest.mark.parametrize('shape', ['unary', 'server stream'])
def test_sigkill_mid_call_is_unavailable_for_the_sync_client(
        start_fault_server: StartFaultServer, socket_path: Path, echo,
        client_baseline: tuple[int, int], shape: str, lane: str) -> None:
    server, journal = start_fault_server(socket_path)
    outcome: dict[str, Any] = {}
    with SyncIPCHandler(socket_path, echo.Stub, timeout=LONG, lane=lane) as client:
        if shape == 'unary':
            def call() -> None:
                try:
                    outcome['reply'] = client.call_method('Sleep', echo.pb.SleepRequest(seconds=LONG))
                except IPCError as error:
                    outcome['error'] = error
            caller = threading.Thread(target=call, name='sleep-caller')
            caller.start()
            wait_for(lambda: journal.count('begin', 'Sleep') == 1, LONG, 'the Sleep call on the server')
            server.signal(signal.SIGKILL)
            caller.join(LONG + 10)
            assert not caller.is_alive(), 'the call hung after the server died'
        else:
            stream = client.stream_method('Count', echo.pb.CountRequest(count=10**9))
            assert next(stream).index == 0  # the handler is producing
            server.signal(signal.SIGKILL)
            try:
                for _ in stream:
                    pass
            except IPCError as error:
                outcome['error'] = error
    server.wait()
    assert 'reply' not in outcome
    assert isinstance(outcome.get('error'), IPCUnavailableError), repr(outcome)
    outcome.clear()
    assert_client_released(client_baseline)


def test_sigkill_while_a_request_stream_is_sent_is_unavailable_for_the_async_client(
        start_fault_server: StartFaultServer, socket_path: Path, echo, lane: str) -> None:
    """Not INTERNAL: grpc.aio says "Internal error from Core" of a message
    it could not send, as if the server had failed (1 in 6 kills, before)."""
    sent = 0

    async def requests() -> Any:
        nonlocal sent
        while True:
            yield echo.pb.EchoRequest(text='x' * 100_000)
            sent += 1

    async def scenario(server: ServerProcess) -> BaseException:
        async with IPCHandler(socket_path, echo.Stub, timeout=LONG, lane=lane) as client:
            call = asyncio.create_task(client.call_method('Collect', requests()))
            await until(lambda: sent >= 50, LONG, 'the request stream to be under way')
            server.signal(signal.SIGKILL)
            with pytest.raises(IPCError) as error:
                await call
            return error.value
    for _ in range(6):
        sent = 0
        server, _ = start_fault_server(socket_path)
        error = asyncio.run(scenario(server))
        server.wait()
        assert isinstance(error, IPCUnavailableError), repr(error)


def test_calls_past_the_grace_end_unavailable_in_the_same_words_on_both_lanes(
        start_fault_server: StartFaultServer, socket_path: Path, echo) -> None:
    """Before: the fast lane closed the connection ("connection ... lost:
    closed by the server"), the gRPC lane said "Cancelling all calls"."""
    server, journal = start_fault_server(socket_path, '--grace-period', '0.5')
    errors: dict[str, BaseException] = {}

    def sleep(lane: str) -> None:
        with SyncIPCHandler(socket_path, echo.Stub, timeout=LONG, lane=lane) as client:
            try:
                client.call_method('Sleep', echo.pb.SleepRequest(seconds=LONG))
            except IPCError as error:
                errors[lane] = error
    callers = [threading.Thread(target=sleep, args=(lane,)) for lane in LANES]
    for caller in callers:
        caller.start()
    wait_for(lambda: journal.count('begin', 'Sleep') == 2, LONG, 'both Sleep calls on the server')
    server.signal(signal.SIGTERM)
    for caller in callers:
        caller.join(LONG)
    assert server.wait() == 0
    for lane in LANES:
        assert isinstance(errors.get(lane), IPCUnavailableError), (lane, errors)
        assert str(errors[lane]).endswith('UNAVAILABLE: Cancelling all calls'), (lane, errors[lane])


@pytest.mark.parametrize('lane', LANES)
def test_calls_that_meet_a_sigterm_end_answered_or_unavailable_on_both_lanes(
        start_fault_server: StartFaultServer, socket_path: Path, echo, lane: str) -> None:
    """Calls sent in a loop as the server gets SIGTERM end with their answer
    or UNAVAILABLE, on both lanes. Before: on the gRPC lane, most of those
    the server had taken in but not yet run ended CANCELLED, grpc core's word
    for them (a plain grpc.aio server says it too), which no caller retries."""
    server, journal = start_fault_server(socket_path, '--grace-period', str(GRACE))
    failures: list[tuple[bytes, IPCError]] = []

    async def scenario() -> None:
        async with IPCHandler(socket_path, echo.Stub, timeout=LONG, lane=lane) as client:
            async def calls(caller: int) -> None:
                for index in itertools.count():
                    request = echo.pb.EchoRequest(text=f'{caller}-{index}')
                    try:
                        await client.call_method('Echo', request)
                    except IPCError as error:
                        failures.append((request.SerializeToString(), error))
                        return
            callers = [asyncio.ensure_future(calls(caller)) for caller in range(8)]
            await until(lambda: journal.count('begin', 'Echo') >= 100, LONG, '100 Echo calls on the server')
            server.signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*callers), LONG)
    asyncio.run(scenario())
    assert server.wait() == 0
    assert len(failures) == 8 and all(isinstance(error, IPCUnavailableError) for _, error in failures), failures
    # Those the gRPC lane says met the shutdown "as the call came in" never reached their handler.
    began = {data for event, method, data in journal.events() if (event, method) == ('begin', 'Echo')}
    assert not any(data in began for data, error in failures if 'as the call came in' in error.details), failures


EXECUTE = '/vyra.ipc.ModuleService/ExecuteCommand'


#: An answer far larger than a socket takes at once (~200 KiB): most of it still waits to be written
#: when its call ends.
BIG_ANSWER = 4 * 1024 * 1024


@pytest.mark.parametrize('face', ['async', 'sync'])
@pytest.mark.parametrize('lane', LANES)
def test_a_large_answer_finished_in_the_grace_reaches_its_client_whole(
        start_server: Callable[..., ServerProcess], socket_path: Path, lane: str, face: str) -> None:
    """A call whose handler answers 4 MiB once the stop has begun gets it
    whole, on both lanes (inline on the fast lane: no shared memory). Before,
    the fast lane's stop closed its connections one turn of the loop after
    their last calls ended, dropping what was not yet in the socket: the
    client saw "connection ... lost: closed by the server"."""
    server = start_server(socket_path, '--no-shared-memory', '--grace-period', str(LONG))
    request = module_pb.CommandRequest(command='repeat-at-stop', parameters={'text': 'x', 'times': str(BIG_ANSWER)})

    def call() -> Any:
        if face == 'sync':
            with SyncIPCHandler(socket_path, module_grpc.ModuleServiceStub, timeout=LONG, lane=lane) as client:
                return client.call_method('ExecuteCommand', request)

        async def scenario() -> Any:
            async with IPCHandler(socket_path, module_grpc.ModuleServiceStub, timeout=LONG, lane=lane) as client:
                return await client.call_method('ExecuteCommand', request)
        return asyncio.run(scenario())
    with ThreadPoolExecutor(1) as caller:
        answer = caller.submit(call)
        # (The handler answers once the stop has begun; a call not yet begun would be refused.)
        wait_for(lambda: in_flight(server, lane, EXECUTE) == 1, LONG, 'the call in flight on the server')
        server.signal(signal.SIGTERM)
        response = answer.result(LONG)
    assert (response.status_code, len(response.result)) == (0, BIG_ANSWER)
    assert response.result == 'x' * BIG_ANSWER
    assert server.wait() == 0, server.log()


def test_a_fast_lane_client_that_does_not_read_its_large_answer_holds_the_stop_no_longer_than_its_bound(
        start_server: Callable[..., ServerProcess], socket_path: Path) -> None:
    """The stop waits for a fast-lane client to read the answers written to
    it, not for ever: one that reads nothing (a plain ttrpc peer, its answer
    inline) has its connection closed without them once the grace and the
    stop's second past it are over, and the server exits, saying so."""
    server = start_server(socket_path, '--no-shared-memory', '--grace-period', '0.5')
    request = module_pb.CommandRequest(command='repeat-at-stop', parameters={'text': 'x', 'times': str(BIG_ANSWER)})
    with Peer.connect(server.ttrpc_path) as peer:
        peer.request(1, 'vyra.ipc.ModuleService', 'ExecuteCommand', request.SerializeToString())
        wait_for(lambda: in_flight(server, 'ttrpc', EXECUTE) == 1, LONG, 'the call in flight on the server')
        server.signal(signal.SIGTERM)
        wait_for(lambda: not server.running(), LONG, 'the server to exit')  # (nothing read meanwhile)
    assert server.popen.returncode == 0
    log = server.log()
    assert 'had not read their answers' in log or 'did not take the shutdown' in log, log


# -- 3: restart --------------------------------------------------------------------------

#: How long the server stays down.
OUTAGE = 10.0


def test_server_down_ten_seconds_is_reachable_within_one_second_of_its_restart(
        start_server: Callable[..., ServerProcess], socket_path: Path, echo) -> None:
    """One outage for a client pair on each lane (``auto`` and each lane
    alone): ten seconds are what a growing reconnect backoff would stretch."""
    first = start_server(socket_path)
    request = echo.pb.EchoRequest
    lanes = ['auto', *LANES]

    async def scenario() -> None:
        # A thread for every blocking call below: the default pool's six would queue some.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(32))
        async with contextlib.AsyncExitStack() as stack:
            pairs = [(await stack.enter_async_context(IPCHandler(socket_path, echo.Stub, timeout=LONG, lane=lane)),
                      stack.enter_context(SyncIPCHandler(socket_path, echo.Stub, timeout=LONG, lane=lane)))
                     for lane in lanes]
            for aclient, sclient in pairs:
                assert (await aclient.call_method('Echo', request(text='up'))).text == 'up'
                assert sclient.call_method('Echo', request(text='up')).text == 'up'
            first.kill()
            down_since = time.monotonic()
            for aclient, sclient in pairs:
                with pytest.raises(IPCUnavailableError):
                    await aclient.call_method('Echo', request())
                with pytest.raises(IPCUnavailableError):
                    sclient.call_method('Echo', request())
            # Calls that wait for the server through the whole outage; their
            # reconnect attempts meanwhile are what a long backoff would delay.
            waiting = []
            for lane, (aclient, sclient) in zip(lanes, pairs, strict=True):
                waiting += [asyncio.ensure_future(
                    aclient.call_method('Echo', request(text=f'{lane} async {i}'), wait_for_ready=True,
                                        timeout=OUTAGE + LONG)) for i in range(3)]
                waiting += [asyncio.ensure_future(asyncio.to_thread(
                    sclient.call_method, 'Echo', request(text=f'{lane} sync {i}'), wait_for_ready=True,
                    timeout=OUTAGE + LONG)) for i in range(3)]
            await asyncio.sleep(OUTAGE - (time.monotonic() - down_since))  # the outage itself
            assert not any(call.done() for call in waiting), [c for c in waiting if c.done()]

            await asyncio.to_thread(start_server, socket_path)  # returns once it listens
            nexts = await asyncio.gather(*(call for aclient, sclient in pairs for call in (
                aclient.call_method('Echo', request(text='next'), wait_for_ready=True, timeout=1.0),
                asyncio.to_thread(sclient.call_method, 'Echo', request(text='next sync'),
                                  wait_for_ready=True, timeout=1.0))))
            assert [reply.text for reply in nexts] == ['next', 'next sync'] * len(lanes)
            replies = await asyncio.gather(*waiting)
            assert sorted(r.text for r in replies) == sorted(
                f'{lane} {face} {i}' for lane in lanes for face in ('async', 'sync') for i in range(3))
    asyncio.run(scenario())


@pytest.mark.parametrize('face', ['async', 'sync'])
def test_a_client_that_waited_for_its_server_takes_the_fast_lane_once_it_is_up(
        start_fault_server: StartFaultServer, socket_path: Path, tmp_path: Path, echo, face: str) -> None:
    """A client started with its server (``ros2 launch``) waits for it on the
    gRPC lane, the fast lane tried once. Before: its calls then stayed on the
    gRPC lane until a second after that try, though the server publishes its
    gRPC socket last, once both lanes are up."""
    gate = tmp_path / 'go'
    start_fault_server(socket_path, '--start-gate', str(gate), wait=False)
    wait_for(lambda: any(tmp_path.glob('go.*.waiting')), 60, 'the server to wait at its start gate')
    request = echo.pb.EchoRequest(text='first')

    def fast_lane_tried(client: IPCHandler | SyncIPCHandler) -> bool:
        return client._choice._fast_retry_at > 0  # (it found no fast lane and took the gRPC lane's wait)

    if face == 'sync':
        client = SyncIPCHandler(socket_path, echo.Stub, timeout=LONG, wait_for_ready=True)
        try:
            with ThreadPoolExecutor(1) as pool:
                connected = pool.submit(client.connect)
                wait_for(lambda: fast_lane_tried(client), LONG, 'the fast lane to be tried')
                gate.touch()
                connected.result(LONG)
            assert client.call_method('Echo', request).text == 'first'
            assert client.lane_in_use == 'ttrpc'
        finally:
            client.disconnect()
        return

    async def scenario() -> None:
        client = IPCHandler(socket_path, echo.Stub, timeout=LONG, wait_for_ready=True)
        try:
            connected = asyncio.ensure_future(client.connect())
            await until(lambda: fast_lane_tried(client), LONG, 'the fast lane to be tried')
            gate.touch()
            await connected
            assert (await client.call_method('Echo', request)).text == 'first'
            assert client.lane_in_use == 'ttrpc'
        finally:
            await client.disconnect()
    asyncio.run(scenario())


@pytest.mark.parametrize('first', ['call', 'stream'])
@pytest.mark.parametrize('lane', ['auto', *LANES])
def test_a_server_restarted_while_its_clients_idle_answers_their_next_call(
        start_server: Callable[..., ServerProcess], socket_path: Path, echo, lane: str, first: str) -> None:
    # The old fast-lane connection shows it broke only when the next call
    # writes to it (EPIPE): nothing of that call left, so it goes again at
    # once over a new connection, as gRPC retries an RPC that never left the
    # client. An event loop that does not run between calls
    # (run_until_complete from a callback) learns it no sooner.
    server = start_server(socket_path)
    request = echo.pb.EchoRequest
    loop = asyncio.new_event_loop()
    aclient = IPCHandler(socket_path, echo.Stub, timeout=LONG, lane=lane)

    async def count() -> list[int]:
        return [reply.index async for reply in aclient.stream_method('Count', echo.pb.CountRequest(count=3))]
    try:
        with SyncIPCHandler(socket_path, echo.Stub, timeout=LONG, lane=lane) as sclient:
            for restarted in (False, True):
                if restarted:
                    server.kill()
                    server = start_server(socket_path).wait_serving(ttrpc=True)
                if first == 'call':
                    assert sclient.call_method('Echo', request(text='sync')).text == 'sync'
                    assert loop.run_until_complete(aclient.call_method('Echo', request(text='a'))).text == 'a'
                else:
                    assert [reply.index for reply in sclient.stream_method(
                        'Count', echo.pb.CountRequest(count=3))] == [0, 1, 2]
                    assert loop.run_until_complete(count()) == [0, 1, 2]
    finally:
        loop.run_until_complete(aclient.disconnect())
        loop.close()


@pytest.mark.parametrize('first_call', ['call', 'stream'])
@pytest.mark.parametrize('kind', ['sync', 'async'])
def test_fast_lane_clients_of_a_draining_server_reach_the_server_started_in_its_place(
        start_fault_server: StartFaultServer, socket_path: Path, echo, kind: str, first_call: str) -> None:
    # A stopping server withdraws its socket files at once, so that a new one
    # may start on the path while it drains, and refuses new calls on its open
    # connections. Its clients must then go to the new server, as the gRPC
    # lane's do (HTTP/2 GOAWAY): not keep the old connection, refused for the
    # whole grace period, while a call of theirs is in flight on it. A call the
    # old server refused unstarted goes to the new one at once, idempotent or
    # not (as grpc retries one above a GOAWAY's last stream id).
    first, first_journal = start_fault_server(socket_path, '--grace-period', str(LONG))
    request, count = echo.pb.EchoRequest, echo.pb.CountRequest(count=2)
    options: dict[str, Any] = {'timeout': LONG, 'lane': 'ttrpc'}

    def replace_first() -> Journal:
        wait_for(lambda: first_journal.count('begin', 'Sleep') == 1, LONG, 'the Sleep call on the first server')
        first.signal(signal.SIGTERM)
        wait_for(lambda: not first.socket_path.exists() and not first.ttrpc_path.exists(), LONG,
                 'the first server to withdraw its socket files')
        second, journal = start_fault_server(socket_path)
        second.wait_serving(ttrpc=True)
        return journal

    if kind == 'sync':
        with ThreadPoolExecutor(1) as pool, SyncIPCHandler(socket_path, echo.Stub, **options) as client:
            sleeping = pool.submit(client.call_method, 'Sleep', echo.pb.SleepRequest(seconds=LONG))
            second_journal = replace_first()
            # Refused unstarted by the first server, sent again to the second one.
            if first_call == 'stream':
                assert [reply.text for reply in client.stream_method('Count', count)] == ['item 0', 'item 1']
            assert client.call_method('Echo', request(text='retried'), timeout=10).text == 'retried'
            assert client.call_method('EchoSync', request(text='next')).text == 'next'
            assert not sleeping.done()  # the old connection's call goes on
            first.kill()
            assert isinstance(sleeping.exception(LONG), IPCUnavailableError)
    else:
        async def scenario() -> Journal:
            async with IPCHandler(socket_path, echo.Stub, **options) as client:
                sleeping = asyncio.ensure_future(client.call_method('Sleep', echo.pb.SleepRequest(seconds=LONG)))
                journal = await asyncio.to_thread(replace_first)
                if first_call == 'stream':
                    assert [reply.text async for reply in client.stream_method('Count', count)] == [
                        'item 0', 'item 1']
                assert (await client.call_method('Echo', request(text='retried'), timeout=10)).text == 'retried'
                assert (await client.call_method('EchoSync', request(text='next'))).text == 'next'
                assert not sleeping.done()
                first.kill()
                with pytest.raises(IPCUnavailableError):
                    await asyncio.wait_for(sleeping, LONG)
                return journal
        second_journal = asyncio.run(scenario())
    assert second_journal.count('begin', 'Echo') == 1
    assert first_journal.count('begin', 'Echo') == 0


# -- 8: shutdown during load ---------------------------------------------------------------

GRACE = 3.0


def test_sigterm_under_load_drains_then_exits_cleanly(start_fault_server: StartFaultServer,
                                                      socket_path: Path, echo) -> None:
    server, journal = start_fault_server(socket_path, '--grace-period', str(GRACE))
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    async def scenario() -> None:
        async with IPCHandler(socket_path, health_pb2_grpc.HealthStub, timeout=LONG) as health, \
                IPCHandler(socket_path, echo.Stub, timeout=LONG) as client:
            watch = health.stream_method('Watch', health_pb2.HealthCheckRequest(service=''))
            assert (await watch.__anext__()).status == serving
            # Calls that end well inside the grace period, and calls that would outlive it.
            short = [asyncio.ensure_future(client.call_method('Sleep', echo.pb.SleepRequest(seconds=1.0)))
                     for _ in range(20)]
            long = [asyncio.ensure_future(client.call_method('Sleep', echo.pb.SleepRequest(seconds=LONG - 5)))
                    for _ in range(20)]
            await until(lambda: journal.count('begin', 'Sleep') == 40, LONG, '40 Sleep calls on the server')

            server.signal(signal.SIGTERM)
            # Health is the first thing to change: a watcher hears NOT_SERVING
            # while every call is still in flight.
            assert (await watch.__anext__()).status == not_serving
            # New calls are refused at once, while the long calls still run.
            # (Between health turning NOT_SERVING and the gRPC server stopping,
            # a call may still be served; that is fine, a hang is not.)
            deadline = time.monotonic() + LONG
            while True:
                try:
                    await client.call_method('Echo', echo.pb.EchoRequest(text='late'))
                except IPCUnavailableError:
                    break
                assert time.monotonic() < deadline, 'new calls are still served during shutdown'
            # A new client cannot connect either.
            with pytest.raises(IPCUnavailableError):
                await asyncio.to_thread(SyncIPCHandler(socket_path, echo.Stub, timeout=LONG).connect)
            assert not any(call.done() for call in long)

            short_replies = await asyncio.gather(*short, return_exceptions=True)
            assert all(not isinstance(r, BaseException) and r.was_active for r in short_replies), short_replies
            long_outcomes = await asyncio.gather(*long, return_exceptions=True)
            # Cut at the grace deadline: neither answered (they had 25 s to go)
            # nor left to run into their own 30 s deadline.
            assert all(isinstance(o, IPCUnavailableError) for o in long_outcomes), long_outcomes
            await watch.aclose()
    asyncio.run(scenario())
    assert server.wait() == 0
    assert not socket_path.exists()
    assert list(socket_path.parent.iterdir()) == []
    assert journal.count('end', 'Sleep') == 20
    assert journal.count('cancelled', 'Sleep') == 20


WATCH = '/vyra.ipc.test.WatchService/Watch'


def test_sigterm_exits_when_a_grpc_client_froze_with_a_stream_it_does_not_read(
        start_server: Callable[..., ServerProcess], socket_path: Path, echo: Any) -> None:
    # grpc.aio's stop() waits without bound, past the grace, for grpc core to
    # flush a write to a peer that does not read (a process stopped in a
    # debugger): the server never exited. Its wait is now bounded.
    # The peer is HTTP/2 by hand, with every window open: a grpc client grows
    # its windows as it reads, so whether the server's writes then filled the
    # socket (the case here) or stopped at the window first (grpc's stop()
    # then ends) was a race, which this test lost now and then.
    server = start_server(socket_path, '--grace-period', '1')
    with socket.socket(socket.AF_UNIX) as peer:
        peer.connect(str(socket_path))
        request = echo.pb.WatchRequest(tag='f', size=256 * 1024).SerializeToString()
        peer.sendall(PREFACE + OPEN_WINDOWS + frame(HEADERS, END_HEADERS, 1, grpc_request_headers(WATCH))
                     + frame(DATA, END_STREAM, 1, grpc_message(request)))
        received = 0
        while received < 4 * 256 * 1024:  # (the stream runs; from here on nothing is read)
            chunk = peer.recv(1 << 20)
            assert chunk, 'the server closed the connection'
            received += len(chunk)
        wait_for(lambda: unread(peer) > 0, 10, 'answers the peer does not read')
        server.signal(signal.SIGTERM)
        wait_for(lambda: not server.running(), 30, 'the server to exit')
    assert server.popen.returncode == 0
    assert 'did not take the shutdown' in server.log()


def unread(sock: socket.socket) -> int:
    """The bytes waiting in ``sock``'s receive queue (FIONREAD)."""
    return struct.unpack('i', fcntl.ioctl(sock, termios.FIONREAD, b'\0\0\0\0'))[0]


@pytest.mark.parametrize('handler', ['servicer', 'command'])
def test_an_embedded_server_with_a_handler_blocked_in_io_exits_on_sigterm(start_server, socket_path: Path,
                                                                         echo, handler: str) -> None:
    """Issue 15: a def handler blocked past the grace period (here a
    10-minute sleep, standing for I/O that never returns) kept an embedded
    server (run(server.serve())) alive after SIGTERM: its thread pool's
    workers were joined at interpreter exit. A ModuleService def command
    (asyncio.to_thread's pool until it ran in the server's threads) too."""
    server = start_server(socket_path, '--grace-period', '0.5')
    threads_before = len(os.listdir(f'/proc/{server.pid}/task'))
    stub, method, request = (
        (echo.Stub, 'InspectSync', echo.pb.InspectRequest(sleep_seconds=600)) if handler == 'servicer' else
        (module_grpc.ModuleServiceStub, 'ExecuteCommand',
         module_pb.CommandRequest(command='block', parameters={'seconds': '600'})))
    with SyncIPCHandler(socket_path, stub, lane='ttrpc', timeout=600) as ipc:
        with ThreadPoolExecutor(1) as caller:
            blocked = caller.submit(ipc.call_method, method, request)
            # The server's first def call starts its first handler thread.
            wait_for(lambda: len(os.listdir(f'/proc/{server.pid}/task')) > threads_before, 20,
                     'the handler thread to start')
            server.signal(signal.SIGTERM)
            assert server.wait(timeout=20) == 0, server.log()
            with pytest.raises(IPCError):
                blocked.result(timeout=20)
