"""A handler that becomes garbage without disconnect() gives its pooled
connections back: the last user's going closes them (the server sees the
socket close), on its event loop for IPCHandler, in the collecting thread
for SyncIPCHandler; connections that live handlers share stay open."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
import gc
from pathlib import Path
import subprocess
import sys
import threading
from typing import Any, Iterator
import warnings

import grpc
import pytest

from conftest import LANES, LONG, ServerProcess, until, wait_for
from vyra_base_ipc import IPCHandler, SyncIPCHandler
from vyra_base_ipc._pool import aio_pool, aio_ttrpc_pool, sync_pool, sync_ttrpc_pool
from vyra_base_ipc.introspection_pb2 import Stats, StatsRequest

# What these tests do on purpose (the warning itself: see test_only_a_connected_handler_...).
pytestmark = pytest.mark.filterwarnings(r'ignore:unclosed (Sync)?IPCHandler of:ResourceWarning')


class Peers:
    """How many connections the server holds open per lane, as it says
    (``GetStats``: its fast lane's connections, and the accepted sockets of
    its gRPC lane), asked over a plain grpc channel of its own, which is
    not counted."""

    def __init__(self, server: ServerProcess) -> None:
        self.channel = grpc.insecure_channel(f'unix:{server.socket_path}')
        self._get = self.channel.unary_unary('/vyra.ipc.Introspection/GetStats',
                                             request_serializer=StatsRequest.SerializeToString,
                                             response_deserializer=Stats.FromString)

    def __call__(self, lane: str) -> int:
        counts = {stats.lane: stats.connections for stats in self._get(StatsRequest(), timeout=LONG).lanes}
        return counts[lane] - (lane == 'grpc')

    def closed(self, lane: str) -> Any:
        """A condition: the server holds no connection on ``lane``."""
        return lambda: self(lane) == 0


@pytest.fixture
def peers(server: ServerProcess) -> Iterator[Peers]:
    counter = Peers(server)
    yield counter
    counter.channel.close()


# -- dropped handlers -------------------------------------------------------------------

@pytest.mark.parametrize('lane', LANES)
def test_a_sync_handler_collected_without_disconnect_closes_its_connection(
        server: ServerProcess, peers: Peers, echo, lane: str) -> None:
    ipc = SyncIPCHandler(server.socket_path, echo.Stub, lane=lane)
    assert ipc.call_method('Echo', echo.pb.EchoRequest(text='once')).text == 'once'
    wait_for(lambda: peers(lane) == 1, LONG, 'the server to count the connection')
    del ipc
    gc.collect()
    wait_for(peers.closed(lane), LONG, "the server to see the dropped handler's connection close")
    assert (sync_ttrpc_pool if lane == 'ttrpc' else sync_pool).open_connections() == 0


@pytest.mark.asyncio
@pytest.mark.parametrize('lane', LANES)
async def test_an_async_handler_collected_without_disconnect_closes_its_connection(
        server: ServerProcess, peers: Peers, echo, lane: str) -> None:
    ipc = IPCHandler(server.socket_path, echo.Stub, lane=lane)
    assert (await ipc.call_method('Echo', echo.pb.EchoRequest(text='once'))).text == 'once'
    await until(lambda: peers(lane) == 1, LONG, 'the server to count the connection')
    del ipc
    gc.collect()  # (in the loop's thread, as the loop runs)
    await until(peers.closed(lane), LONG, "the server to see the dropped handler's connection close")
    assert (aio_ttrpc_pool if lane == 'ttrpc' else aio_pool).open_connections() == 0


@pytest.mark.parametrize('lane', LANES)
def test_an_async_handler_collected_on_uvloop_closes_its_connection(server: ServerProcess, peers: Peers, echo,
                                                                    lane: str) -> None:
    uvloop = pytest.importorskip('uvloop')

    async def main() -> None:
        ipc = IPCHandler(server.socket_path, echo.Stub, lane=lane)
        assert (await ipc.call_method('Echo', echo.pb.EchoRequest(text='uv'))).text == 'uv'
        await until(lambda: peers(lane) == 1, LONG, 'the server to count the connection')
        del ipc
        gc.collect()
        await until(peers.closed(lane), LONG, "the server to see the dropped handler's connection close")
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


@pytest.mark.parametrize('lane', LANES)
def test_an_async_handler_collected_in_another_thread_is_closed_by_its_loop(
        server: ServerProcess, peers: Peers, echo, lane: str) -> None:
    """The loop runs in a thread of its own; the handler is collected in
    the main thread, which must leave its connection to that loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        ipc = IPCHandler(server.socket_path, echo.Stub, lane=lane)
        call = ipc.call_method('Echo', echo.pb.EchoRequest(text='there'))
        assert asyncio.run_coroutine_threadsafe(call, loop).result(LONG).text == 'there'
        wait_for(lambda: peers(lane) == 1, LONG, 'the server to count the connection')
        del ipc, call
        gc.collect()
        wait_for(peers.closed(lane), LONG, "the server to see the dropped handler's connection close")

        async def still_open() -> int:
            return (aio_ttrpc_pool if lane == 'ttrpc' else aio_pool).open_connections()
        assert asyncio.run_coroutine_threadsafe(still_open(), loop).result(LONG) == 0
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(LONG)
        loop.close()


def test_a_fast_lane_connection_whose_queued_close_its_loop_drops_unrun_is_closed_then(
        server: ServerProcess, peers: Peers, echo) -> None:
    """The handler is collected in the main thread while its loop runs a
    callback, which then stops the loop: the close queued on the loop
    meanwhile never runs, and the loop closes. Found: the socket stayed open
    until the garbage collector found the connection (here: never, it is off)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    busy, go_on = threading.Event(), threading.Event()

    def hold_then_stop() -> None:
        # What is queued while this runs waits for the loop's next pass, which never comes.
        busy.set()
        go_on.wait(LONG)
        loop.stop()

    try:
        ipc = IPCHandler(server.socket_path, echo.Stub, lane='ttrpc')
        call = ipc.call_method('Echo', echo.pb.EchoRequest(text='there'))
        assert asyncio.run_coroutine_threadsafe(call, loop).result(LONG).text == 'there'
        wait_for(lambda: peers('ttrpc') == 1, LONG, 'the server to count the connection')
        loop.call_soon_threadsafe(hold_then_stop)
        assert busy.wait(LONG)
        del ipc, call
        gc.collect()  # the handler's finalizer queues the close on the loop, which is running
        gc.disable()
        go_on.set()
        thread.join(LONG)
        assert not thread.is_alive() and not loop.is_running()
        loop.close()  # drops the close it never ran
        wait_for(peers.closed('ttrpc'), LONG, "the server to see the dropped handler's connection close")
    finally:
        gc.enable()
        go_on.set()
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(LONG)
            loop.close()


@pytest.mark.parametrize('lane', LANES)
def test_a_live_sync_handler_keeps_the_connection_a_dropped_one_shared(
        server: ServerProcess, peers: Peers, echo, lane: str) -> None:
    first = SyncIPCHandler(server.socket_path, echo.Stub, lane=lane)
    second = SyncIPCHandler(server.socket_path, echo.Stub, lane=lane)
    for ipc in (first, second):
        assert ipc.call_method('Echo', echo.pb.EchoRequest(text='both')).text == 'both'
    shared = second._fast if lane == 'ttrpc' else second._grpc[False]._channel
    wait_for(lambda: peers(lane) == 1, LONG, 'the server to count the shared connection')
    del first, ipc
    gc.collect()
    assert second.call_method('Echo', echo.pb.EchoRequest(text='still')).text == 'still'
    assert (second._fast if lane == 'ttrpc' else second._grpc[False]._channel) is shared
    assert lane != 'ttrpc' or not shared.is_closed
    assert peers(lane) == 1
    del second, shared
    gc.collect()
    wait_for(peers.closed(lane), LONG, 'the server to see the connection close with its last user')


@pytest.mark.asyncio
@pytest.mark.parametrize('lane', LANES)
async def test_a_live_async_handler_keeps_the_connection_a_dropped_one_shared(
        server: ServerProcess, peers: Peers, echo, lane: str) -> None:
    first = IPCHandler(server.socket_path, echo.Stub, lane=lane)
    second = IPCHandler(server.socket_path, echo.Stub, lane=lane)
    for ipc in (first, second):
        assert (await ipc.call_method('Echo', echo.pb.EchoRequest(text='both'))).text == 'both'
    shared = second._fast if lane == 'ttrpc' else second._grpc[False]._channel
    await until(lambda: peers(lane) == 1, LONG, 'the server to count the shared connection')
    del first, ipc
    gc.collect()
    for _ in range(3):
        await asyncio.sleep(0)  # (what the loop would close, it has closed now)
    assert (await second.call_method('Echo', echo.pb.EchoRequest(text='still'))).text == 'still'
    assert (second._fast if lane == 'ttrpc' else second._grpc[False]._channel) is shared
    assert lane != 'ttrpc' or not shared.is_closed
    assert peers(lane) == 1
    del second, shared
    gc.collect()
    await until(peers.closed(lane), LONG, 'the server to see the connection close with its last user')


def test_a_sync_handler_collected_while_its_thread_holds_the_pool_lock_does_not_wait(
        server: ServerProcess, peers: Peers, echo) -> None:
    """The garbage collector may run a finalizer in a thread in the middle of
    the pool's own work (its lock held): the release must not wait for that
    lock (for ever), and is done as the lock is let go."""
    held = [SyncIPCHandler(server.socket_path, echo.Stub, lane='ttrpc')]
    assert held[0].call_method('Echo', echo.pb.EchoRequest(text='x')).text == 'x'
    dropped = threading.Event()

    def drop_under_the_lock() -> None:
        with sync_ttrpc_pool._lock:
            held.clear()  # the last reference: its finalizer runs here and now
        dropped.set()
    thread = threading.Thread(target=drop_under_the_lock, daemon=True)
    thread.start()
    assert dropped.wait(LONG), 'the finalizer waited for the lock its own thread held'
    # The next use of the pool releases what the finalizer could not.
    wait_for(lambda: sync_ttrpc_pool.open_connections() == 0 and peers('ttrpc') == 0, LONG,
             "the dropped handler's connection to close")


@pytest.mark.parametrize('lane', LANES)
def test_sync_handlers_made_and_dropped_by_many_threads_leave_no_connection(
        server: ServerProcess, peers: Peers, echo, lane: str) -> None:
    """Eight threads (an rclpy MultiThreadedExecutor's callbacks) each make
    a handler per call and drop it, collecting now and then: connections
    are shared, closed and made again under them; none is left open."""
    def calls(index: int) -> None:
        for round_ in range(30):
            ipc = SyncIPCHandler(server.socket_path, echo.Stub, lane=lane)
            assert ipc.call_method('Echo', echo.pb.EchoRequest(text=f'{index}.{round_}')).text == f'{index}.{round_}'
            if round_ % 5 == index % 5:
                gc.collect()
    with ThreadPoolExecutor(8) as threads:
        list(threads.map(calls, range(8)))
    gc.collect()
    wait_for(lambda: (sync_ttrpc_pool if lane == 'ttrpc' else sync_pool).open_connections() == 0
             and peers(lane) == 0, LONG, 'every connection to close')


# -- the warning -------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['sync', 'async'])
def test_only_a_connected_handler_collected_without_disconnect_warns(server: ServerProcess, echo,
                                                                     kind: str) -> None:
    handler = SyncIPCHandler if kind == 'sync' else IPCHandler

    async def use(ipc: Any, disconnect: bool) -> None:
        if kind == 'sync':
            ipc.call_method('Echo', echo.pb.EchoRequest(text='x'))
            if disconnect:
                ipc.disconnect()
        else:
            await ipc.call_method('Echo', echo.pb.EchoRequest(text='x'))
            if disconnect:
                await ipc.disconnect()

    async def main() -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always', ResourceWarning)
            handler(server.socket_path, echo.Stub)  # never connected
            await use(handler(server.socket_path, echo.Stub), disconnect=True)
            await use(handler(server.socket_path, echo.Stub), disconnect=False)
            gc.collect()
        return [str(warning.message) for warning in caught if warning.category is ResourceWarning]
    messages = asyncio.run(main())
    assert len(messages) == 1, messages
    assert messages[0].startswith(f'unclosed {handler.__name__}') and str(server.socket_path) in messages[0]


# -- a loop that closed, and the interpreter's exit --------------------------------------

_CLOSED_LOOP_SCRIPT = """
import asyncio, gc, sys
from vyra_ipc_test import echo_pb2, echo_pb2_grpc
from vyra_base_ipc import IPCHandler, SyncIPCHandler

socket_path, lane, how = sys.argv[1:]
kept = []

async def main():
    ipc = IPCHandler(socket_path, echo_pb2_grpc.EchoServiceStub, lane=lane)
    await ipc.call_method('Echo', echo_pb2.EchoRequest(text='x'))
    if how == 'kept past its loop':
        kept.append(ipc)
    # else: collected as main() returns, its loop closing right after

loop = asyncio.new_event_loop()
loop.run_until_complete(main())
loop.close()
kept.clear()
gc.collect()
print('dropped', flush=True)
sys.stdin.readline()  # (the test counts the server's connections meanwhile)

# Left for the interpreter's exit: a connected handler of each kind (one of a closed loop).
sync_left = SyncIPCHandler(socket_path, echo_pb2_grpc.EchoServiceStub, lane=lane)
sync_left.call_method('Echo', echo_pb2.EchoRequest(text='x'))
async def left():
    ipc = IPCHandler(socket_path, echo_pb2_grpc.EchoServiceStub, lane=lane)
    await ipc.call_method('Echo', echo_pb2.EchoRequest(text='x'))
    return ipc
async_left = asyncio.run(left())
"""


@pytest.mark.parametrize('how', ['kept past its loop', 'collected as its loop ends'])
@pytest.mark.parametrize('lane', LANES)
def test_a_handler_of_a_loop_that_closed_is_closed_quietly(server: ServerProcess, peers: Peers,
                                                           child_env: dict[str, str], tmp_path: Path,
                                                           lane: str, how: str) -> None:
    """In a process of its own, in dev mode (ResourceWarnings shown, asyncio
    debugging): a handler collected after its loop closed, or as its loop
    stops for good, closes its connection without a traceback; so does the
    exit with connected handlers left."""
    script = tmp_path / 'closed_loop.py'
    script.write_text(_CLOSED_LOOP_SCRIPT)
    with subprocess.Popen([sys.executable, '-X', 'dev', str(script), str(server.socket_path), lane, how],
                          env=child_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None and child.stdin is not None
            assert child.stdout.readline() == 'dropped\n'
            wait_for(peers.closed(lane), LONG, "the server to see the dropped handler's connection close")
            child.stdin.write('\n')
            child.stdin.flush()
            stderr = child.communicate(timeout=LONG)[1]
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
    assert child.returncode == 0, stderr
    for trouble in ('Traceback', 'Exception ignored', 'Task was destroyed', 'ERROR', 'Error'):
        assert trouble not in stderr, stderr
