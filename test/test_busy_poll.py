"""Busy-polling before sleeping (issue #6): the policy, the polling selector
and event loop, the synchronous fast-lane client, the ipc_server node, and
the promise that an idle server or a client waiting for a slow answer does
not keep its CPU spinning.

Everything runs on real parts: real file descriptors, real server processes
(test/servers/echo_server.py, the ipc_server node), CPU time read from
``/proc``. No assertion is about how long something took; the CPU-time
assertions compare a process's CPU use with the wall time it spent idle or
waiting, with a margin a spinning loop (about 100 %) could never meet.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import os
from pathlib import Path
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from typing import Any, Callable, Iterator

import pytest
from rclpy.context import Context
from rclpy.node import Node
from rclpy.parameter import Parameter

from conftest import ChildProcess, ServerProcess
from ros_env import IPC_SERVER
import vyra_base_ipc
from vyra_base_ipc import DEFAULT_BUSY_POLL, IPCHandler, SyncIPCHandler
from vyra_base_ipc import _busy_poll as busy_poll
from vyra_base_ipc import module_service_pb2 as module_pb
from vyra_base_ipc import module_service_pb2_grpc as module_grpc
from vyra_base_ipc._busy_poll import MAX_BACKOFF_WAITS, BusyPoll, await_polling, poll_for, validate_busy_poll
from vyra_base_ipc._event_loop import BusyPollSelector, new_event_loop, run
from vyra_base_ipc._loop_thread import EventLoopThread
from vyra_base_ipc._pool import aio_ttrpc_pool, sync_ttrpc_pool
from vyra_base_ipc.address import default_ttrpc_socket_path
from vyra_base_ipc.exceptions import IPCTimeoutError
from vyra_base_ipc.node import host_ipc_server
from vyra_base_ipc.ttrpc import AsyncConnection, SyncConnection

REPO = Path(vyra_base_ipc.__file__).resolve().parent.parent

#: The policy switches itself off on a machine with one CPU.
needs_two_cpus = pytest.mark.skipif((os.cpu_count() or 1) < 2,
                                    reason='busy polling is off on a machine with one CPU')

#: The largest window accepted: makes every poll as long (and as costly) as it can be.
WIDEST = 0.01

#: Share of the wall time a process may spend on a CPU while idle or waiting.
#: A loop that kept polling would use about 100 %; an idle one uses a few %.
IDLE_CPU_SHARE = 0.2


def selector_of(loop: asyncio.AbstractEventLoop) -> selectors.BaseSelector | None:
    # asyncio keeps a selector loop's selector private; the test needs to see
    # which one new_event_loop() chose.
    return getattr(loop, '_selector', None)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of all threads of process ``pid`` so far."""
    with open(f'/proc/{pid}/stat') as stat:
        fields = stat.read().rsplit(')', 1)[1].split()
    # After the command: state is field 3 of proc(5); utime and stime are 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def idle_cpu_share(pid: int, seconds: float = 1.0) -> tuple[float, float]:
    """(CPU seconds, wall seconds) process ``pid`` used while left alone for ``seconds``."""
    cpu, wall = process_cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)  # the idle period being measured, not a wait for something
    return process_cpu_seconds(pid) - cpu, time.monotonic() - wall


def skips_before_polling(policy: BusyPoll) -> int:
    """How many waits in a row sleep at once (window 0.0) before one polls again."""
    skipped = 0
    while policy.window() == 0.0:
        skipped += 1
        assert skipped <= MAX_BACKOFF_WAITS, 'backoff longer than MAX_BACKOFF_WAITS'
    return skipped


# -- the policy -------------------------------------------------------------------------


@needs_two_cpus
def test_policy_polls_for_its_window_until_a_poll_misses() -> None:
    policy = BusyPoll(100e-6)
    assert policy.enabled and policy.seconds == 100e-6
    assert [policy.window() for _ in range(3)] == [100e-6] * 3
    policy.found()
    assert policy.window() == 100e-6


@needs_two_cpus
def test_fruitless_polls_back_off_exponentially_up_to_the_cap() -> None:
    policy = BusyPoll(100e-6)
    skipped = []
    for _ in range(10):
        policy.missed()
        skipped.append(skips_before_polling(policy))
    assert skipped == [1, 2, 4, 8, 16, 32, 64, 64, 64, 64]
    assert MAX_BACKOFF_WAITS == 64


@needs_two_cpus
def test_found_resets_the_backoff() -> None:
    policy = BusyPoll(100e-6)
    for _ in range(4):
        policy.missed()
        skips_before_polling(policy)
    policy.found()
    policy.missed()
    assert skips_before_polling(policy) == 1


@needs_two_cpus
def test_quick_event_after_a_sleep_reenables_polling_at_once() -> None:
    policy = BusyPoll(100e-6)
    policy.missed()
    policy.missed()  # backoff 2: the next two waits would sleep at once
    assert policy.window() == 0.0
    policy.slept(50e-6)  # that sleep ended within the window: polling would have paid
    assert policy.window() == 100e-6
    policy.missed()
    assert skips_before_polling(policy) == 1  # the backoff started over too
    policy.missed()
    assert policy.window() == 0.0
    policy.slept(100e-6)  # exactly the window still counts
    assert policy.window() == 100e-6


@needs_two_cpus
def test_slow_event_after_a_sleep_keeps_the_backoff() -> None:
    policy = BusyPoll(100e-6)
    policy.missed()
    policy.missed()
    policy.missed()  # backoff 4
    assert policy.window() == 0.0
    policy.slept(150e-6)
    assert skips_before_polling(policy) == 3


@needs_two_cpus
@pytest.mark.parametrize('timeout', [1e-3, 0.0], ids=['cut short', 'passed'])
def test_wait_cut_short_by_its_timeout_backs_off_unless_it_had_no_time(timeout: float) -> None:
    policy = BusyPoll(WIDEST)
    assert policy.wait(lambda: None, lambda seconds: None, timeout) is None
    # Polling until a timeout within the window found nothing: a miss, as any
    # fruitless poll; a timeout already passed left no time to poll at all.
    assert skips_before_polling(policy) == (1 if timeout else 0)


def test_zero_window_never_polls() -> None:
    policy = BusyPoll(0)
    assert not policy.enabled and policy.seconds == 0.0
    policy.found()
    policy.slept(0.0)
    assert [policy.window() for _ in range(5)] == [0.0] * 5


@pytest.mark.parametrize('value, error', [
    (True, TypeError), ('100e-6', TypeError), (None, TypeError), ([1e-4], TypeError),
    (-1e-6, ValueError), (0.0100001, ValueError), (1, ValueError),
    (math.nan, ValueError), (math.inf, ValueError),
], ids=repr)
def test_invalid_window_is_refused_naming_busy_poll(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match='busy_poll'):
        validate_busy_poll(value)
    with pytest.raises(error, match='busy_poll'):
        BusyPoll(value)  # type: ignore[arg-type]


def test_window_limits_are_accepted_as_float_seconds() -> None:
    assert validate_busy_poll(0) == 0.0 and isinstance(validate_busy_poll(0), float)
    assert validate_busy_poll(0.01) == 0.01
    assert validate_busy_poll(DEFAULT_BUSY_POLL) == 200e-6


def test_poll_for_returns_the_first_result_without_waiting_out_the_window() -> None:
    calls = []

    def third_time() -> str | None:
        calls.append(1)
        return 'ready' if len(calls) == 3 else None
    assert poll_for(third_time, 60.0) == 'ready'
    assert len(calls) == 3


def test_poll_for_tries_once_with_no_time_and_passes_falsy_results_on() -> None:
    calls = []

    def never() -> None:
        calls.append(1)
    assert poll_for(never, 0.0) is None
    assert calls == [1]
    assert poll_for(lambda: 0, 60.0) == 0  # only None means "not yet"


def run_child(code: str, prelude: str = '') -> dict[str, Any]:
    """Run ``prelude`` (before vyra_base_ipc is imported) and ``code`` (which
    prints one JSON object) in a real child process; return that object."""
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(REPO),
                                                                    os.environ.get('PYTHONPATH')]))}
    done = subprocess.run([sys.executable, '-c', f'import os\n{prelude}\n{code}'], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


#: What a child process reports of the polling it would do.
POLLING_REPORT = (
    'import asyncio, json\n'
    'from vyra_base_ipc._busy_poll import BusyPoll\n'
    'from vyra_base_ipc._event_loop import BusyPollSelector, new_event_loop, run\n'
    'loop = new_event_loop()\n'
    'async def main():\n'
    '    return type(asyncio.get_running_loop()._selector).__name__\n'
    'print(json.dumps({"cpus": len(os.sched_getaffinity(0)),\n'
    '                  "seconds": BusyPoll(100e-6).seconds,\n'
    '                  "widest": BusyPoll(0.01).seconds,\n'
    '                  "polling_selector": isinstance(loop._selector, BusyPollSelector),\n'
    '                  "run_selector": run(main())}))\n'
    'loop.close()\n')


@needs_two_cpus
def test_process_pinned_to_one_cpu_still_polls() -> None:
    # Polling yields the CPU between attempts, so a process pinned to a CPU
    # (of its own, or shared with its peer) polls like any other.
    seen = run_child(POLLING_REPORT, 'os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})')
    assert seen['cpus'] == 1
    assert seen['seconds'] == 100e-6 and seen['widest'] == 0.01
    assert seen['polling_selector'] and seen['run_selector'] == 'BusyPollSelector'


def test_machine_with_one_cpu_never_polls() -> None:
    # A machine with one CPU cannot be made for a test: the child process is
    # told so by replacing os.cpu_count (the only thing that changes).
    seen = run_child(POLLING_REPORT, 'os.cpu_count = lambda: 1')
    assert seen['seconds'] == 0 and seen['widest'] == 0
    assert not seen['polling_selector']
    assert seen['run_selector'] != 'BusyPollSelector'


# -- the selector -----------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair of Unix sockets: (watched end, writing end)."""
    watched, writer = socket.socketpair()
    yield watched, writer
    watched.close()
    writer.close()


@pytest.fixture
def make_selector(pair: tuple[socket.socket, socket.socket]
                  ) -> Iterator[Callable[[float], BusyPollSelector]]:
    """``make_selector(window)``: a BusyPollSelector watching the pair's first end."""
    made: list[BusyPollSelector] = []

    def make(window: float) -> BusyPollSelector:
        selector = BusyPollSelector(BusyPoll(window))
        selector.register(pair[0], selectors.EVENT_READ, 'watched')
        made.append(selector)
        return selector
    yield make
    for selector in made:
        selector.close()


@needs_two_cpus
def test_select_with_nothing_ready_returns_nothing_and_backs_off(make_selector) -> None:
    selector = make_selector(0.001)
    assert selector.select(0.05) == []
    assert skips_before_polling(selector.busy_poll) == 1


@needs_two_cpus
def test_select_until_a_timer_due_within_the_window_polls_until_then_and_counts_a_miss(make_selector) -> None:
    selector = make_selector(WIDEST)
    assert selector.select(0.001) == []  # a loop timer due in 1 ms: poll until then only
    assert skips_before_polling(selector.busy_poll) == 1


@needs_two_cpus
def test_select_without_timeout_leaves_the_policy_alone(make_selector, pair) -> None:
    selector = make_selector(WIDEST)
    assert selector.select(0) == [] and selector.select(-1) == []
    assert selector.busy_poll.window() == WIDEST
    pair[1].send(b'x')
    assert [key.data for key, _ in selector.select(0)] == ['watched']


@needs_two_cpus
@pytest.mark.parametrize('timeout', [None, 5.0])
def test_pending_data_is_returned_by_the_poll(make_selector, pair, timeout: float | None) -> None:
    selector = make_selector(WIDEST)
    pair[1].send(b'x')
    ready = selector.select(timeout)
    assert [(key.fileobj, events) for key, events in ready] == [(pair[0], selectors.EVENT_READ)]
    assert selector.busy_poll.window() == WIDEST  # found: no backoff


@needs_two_cpus
@pytest.mark.parametrize('backed_off', [False, True], ids=['polling', 'sleeping'])
def test_data_written_by_another_thread_during_the_wait_is_delivered(
        make_selector, pair, backed_off: bool) -> None:
    selector = make_selector(WIDEST)
    if backed_off:
        selector.busy_poll.missed()  # this wait sleeps in epoll at once
    writer = threading.Thread(target=pair[1].send, args=(b'x',))
    writer.start()
    try:
        ready = selector.select(30.0)
    finally:
        writer.join()
    assert [key.data for key, _ in ready] == ['watched']


# -- the event loop ---------------------------------------------------------------------


@pytest.fixture(params=[DEFAULT_BUSY_POLL, WIDEST], ids=['default', 'widest'])
def polling_loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    loop = new_event_loop(request.param)
    try:
        yield loop
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


@needs_two_cpus
def test_new_event_loop_polls_with_the_given_window(polling_loop: asyncio.AbstractEventLoop) -> None:
    assert isinstance(polling_loop, asyncio.SelectorEventLoop)
    selector = selector_of(polling_loop)
    assert isinstance(selector, BusyPollSelector)
    assert selector.busy_poll.seconds in (DEFAULT_BUSY_POLL, WIDEST)


@needs_two_cpus
def test_loop_readers_fire_for_data_from_another_thread(polling_loop: asyncio.AbstractEventLoop,
                                                        pair) -> None:
    watched, writer = pair
    received: list[bytes] = []
    done = polling_loop.create_future()

    def on_readable() -> None:
        received.append(watched.recv(100))
        if b''.join(received) == b'abc' and not done.done():
            done.set_result(None)

    polling_loop.add_reader(watched, on_readable)
    sender = threading.Thread(target=lambda: [writer.send(byte) for byte in (b'a', b'b', b'c')])
    polling_loop.call_soon(sender.start)
    try:
        polling_loop.run_until_complete(asyncio.wait_for(done, 30))
    finally:
        polling_loop.remove_reader(watched)
        sender.join()
    assert b''.join(received) == b'abc'


@needs_two_cpus
def test_loop_timers_fire_in_order(polling_loop: asyncio.AbstractEventLoop) -> None:
    fired: list[str] = []
    done = polling_loop.create_future()

    def last() -> None:
        fired.append('20 ms')
        done.set_result(None)
    # Delays around and below the window: some timers are due while it polls.
    polling_loop.call_later(0.02, last)
    polling_loop.call_later(0.0005, fired.append, '0.5 ms')
    polling_loop.call_later(0.005, fired.append, '5 ms')
    polling_loop.call_later(0.00005, fired.append, '50 us')
    polling_loop.call_soon(fired.append, 'soon')
    polling_loop.run_until_complete(asyncio.wait_for(done, 30))
    assert fired == ['soon', '50 us', '0.5 ms', '5 ms', '20 ms']


@needs_two_cpus
@pytest.mark.parametrize('window, period', [(DEFAULT_BUSY_POLL, 100e-6), (WIDEST, 0.005)],
                         ids=['default', 'widest'])
def test_loop_whose_timers_come_within_the_window_does_not_keep_polling(window: float, period: float) -> None:
    # No socket ever has anything: each select() is cut short by the next
    # timer, which a poll found nothing before. Polling through every one of
    # them kept the CPU busy all the time (~100 %).
    async def main() -> tuple[float, float]:
        cpu, wall = own_cpu_seconds(), time.monotonic()
        while time.monotonic() - wall < 1.0:
            await asyncio.sleep(period)
        return own_cpu_seconds() - cpu, time.monotonic() - wall

    cpu, wall = run(main(), busy_poll=window)
    assert cpu < IDLE_CPU_SHARE * wall, f'the loop used {cpu:.3f} s of CPU in {wall:.3f} s'


@needs_two_cpus
def test_loop_sleeps_and_threads_complete(polling_loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> list[int]:
        await asyncio.sleep(0.01)  # nothing ready: select() must come back for the timer
        # call_soon_threadsafe from worker threads must wake a polling or sleeping loop
        return await asyncio.gather(*(asyncio.to_thread(pow, n, 2) for n in range(20)))

    assert polling_loop.run_until_complete(main()) == [n * n for n in range(20)]


@needs_two_cpus
def test_loop_serves_unix_streams(polling_loop: asyncio.AbstractEventLoop, socket_dir: Path) -> None:
    path = str(socket_dir / 'stream.sock')

    async def echo_back(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(line.upper())
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def main() -> list[bytes]:
        server = await asyncio.start_unix_server(echo_back, path)
        async with server:
            reader, writer = await asyncio.open_unix_connection(path)
            answers = []
            for n in range(200):
                writer.write(b'line %d\n' % n)
                answers.append(await reader.readline())
            writer.close()
            await writer.wait_closed()
        return answers

    assert polling_loop.run_until_complete(main()) == [b'LINE %d\n' % n for n in range(200)]


@needs_two_cpus
def test_run_returns_the_result_and_closes_its_polling_loop() -> None:
    loops: list[asyncio.AbstractEventLoop] = []
    selectors_seen: list[selectors.BaseSelector | None] = []

    async def main() -> str:
        loops.append(asyncio.get_running_loop())
        selectors_seen.append(selector_of(loops[0]))  # a closed loop drops its selector
        await asyncio.sleep(0.001)
        return 'done'

    assert run(main()) == 'done'
    assert isinstance(selectors_seen[0], BusyPollSelector)
    assert selectors_seen[0].busy_poll.seconds == DEFAULT_BUSY_POLL
    assert loops[0].is_closed()
    assert vyra_base_ipc.run is run and vyra_base_ipc.new_event_loop is new_event_loop


def test_run_cancels_what_main_left_behind() -> None:
    cancelled = threading.Event()

    async def forgotten() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def main() -> None:
        asyncio.get_running_loop().create_task(forgotten())
        await asyncio.sleep(0)

    run(main())
    assert cancelled.is_set()


def test_zero_window_gives_a_plain_asyncio_loop() -> None:
    loop = new_event_loop(0)
    try:
        assert selector_of(loop) is not None and not isinstance(selector_of(loop), BusyPollSelector)
    finally:
        loop.close()
    seen: list[asyncio.AbstractEventLoop] = []
    selectors_seen: list[selectors.BaseSelector | None] = []

    async def main() -> int:
        seen.append(asyncio.get_running_loop())
        selectors_seen.append(selector_of(seen[0]))
        return 7

    assert run(main(), busy_poll=0) == 7
    assert selectors_seen[0] is not None and not isinstance(selectors_seen[0], BusyPollSelector)
    assert seen[0].is_closed()


@pytest.mark.parametrize('value, error', [(-1, ValueError), ('x', TypeError)])
def test_loop_with_invalid_window_is_refused_naming_busy_poll(value: object,
                                                              error: type[Exception]) -> None:
    with pytest.raises(error, match='busy_poll'):
        new_event_loop(value)  # type: ignore[arg-type]

    async def main() -> None:
        pass
    coroutine = main()
    try:
        with pytest.raises(error, match='busy_poll'):
            run(coroutine, busy_poll=value)  # type: ignore[arg-type]
        # Closed unstarted: no "never awaited" warning (filterwarnings=error
        # would turn it into a failure of some later test).
        assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CLOSED
    finally:
        coroutine.close()


@needs_two_cpus
def test_event_loop_thread_runs_on_a_polling_loop_of_its_window() -> None:
    async def here() -> str:
        await asyncio.sleep(0.001)
        return threading.current_thread().name

    with EventLoopThread(name='ipc-test-poll', busy_poll=250e-6) as polling:
        selector = selector_of(polling.loop)
        assert isinstance(selector, BusyPollSelector) and selector.busy_poll.seconds == 250e-6
        assert polling.run(here(), timeout=30) == 'ipc-test-poll'
    with EventLoopThread(name='ipc-test-plain', busy_poll=0) as plain:
        assert selector_of(plain.loop) is not None
        assert not isinstance(selector_of(plain.loop), BusyPollSelector)
        assert plain.run(here(), timeout=30) == 'ipc-test-plain'


def test_event_loop_thread_refuses_an_invalid_window_at_start() -> None:
    loop_thread = EventLoopThread(name='ipc-test-bad-poll', busy_poll=-1)
    with pytest.raises(ValueError, match='busy_poll'):
        loop_thread.start()
    assert not loop_thread.is_running
    assert not any(t.name.startswith('ipc-test-bad-poll') for t in threading.enumerate())
    loop_thread.busy_poll = 0  # may still be changed: nothing started
    with loop_thread:
        assert loop_thread.is_running


# -- a real server process on the polling loop ------------------------------------------


def start_echo(start_server: Callable[..., ServerProcess], socket_path: Path,
               busy_poll: str | None) -> ServerProcess:
    """An echo server (both lanes) with ``--busy-poll busy_poll`` (None: its default)."""
    return start_server(socket_path, *(() if busy_poll is None else ('--busy-poll', busy_poll)),
                        wait=False).wait_serving(ttrpc=True)


@pytest.mark.parametrize('busy_poll', [None, '0', str(WIDEST)], ids=['default', 'off', 'widest'])
def test_server_answers_many_sync_calls_on_both_lanes(start_server, socket_path: Path, echo,
                                                      busy_poll: str | None) -> None:
    server = start_echo(start_server, socket_path, busy_poll)
    for lane in ('ttrpc', 'grpc'):
        with SyncIPCHandler(server.socket_path, echo.Stub, lane=lane, timeout=30.0) as client:
            for n in range(300):
                reply = client.call_method('Echo', echo.pb.EchoRequest(text=f'{lane} {n}',
                                                                       payload=bytes([n % 256]) * n))
                assert (reply.text, reply.payload) == (f'{lane} {n}', bytes([n % 256]) * n)
            assert [r.index for r in client.stream_method('Count', echo.pb.CountRequest(count=50))] \
                == list(range(50))
            assert client.lane_in_use == lane


@pytest.mark.asyncio
@pytest.mark.parametrize('busy_poll', [None, str(WIDEST)], ids=['default', 'widest'])
async def test_server_answers_many_async_calls_on_both_lanes(start_server, socket_path: Path, echo,
                                                             busy_poll: str | None) -> None:
    server = start_echo(start_server, socket_path, busy_poll)
    for lane in ('ttrpc', 'grpc'):
        async with IPCHandler(server.socket_path, echo.Stub, lane=lane, timeout=30.0) as client:
            for n in range(200):
                assert (await client.call_method('Echo', echo.pb.EchoRequest(text=f'{n}'))).text == f'{n}'
            replies = await asyncio.gather(*(client.call_method('Echo', echo.pb.EchoRequest(text=f'c{n}'))
                                             for n in range(100)))
            assert [reply.text for reply in replies] == [f'c{n}' for n in range(100)]
            assert client.lane_in_use == lane


@pytest.mark.parametrize('busy_poll', [None, str(WIDEST)], ids=['default', 'widest'])
def test_idle_server_does_not_keep_polling(start_server, socket_path: Path, echo,
                                           busy_poll: str | None) -> None:
    server = start_echo(start_server, socket_path, busy_poll)
    # Connected clients of both lanes stay connected while the server idles.
    with SyncIPCHandler(server.socket_path, echo.Stub, lane='ttrpc') as fast, \
            SyncIPCHandler(server.socket_path, echo.Stub, lane='grpc') as slow:
        for n in range(300):
            assert fast.call_method('Echo', echo.pb.EchoRequest(text=f'{n}')).text == f'{n}'
            assert slow.call_method('Echo', echo.pb.EchoRequest(text=f'{n}')).text == f'{n}'
        cpu, wall = idle_cpu_share(server.pid)
    assert cpu < IDLE_CPU_SHARE * wall, f'idle server used {cpu:.3f} s of CPU in {wall:.3f} s'


@pytest.mark.parametrize('client_poll', [DEFAULT_BUSY_POLL, WIDEST], ids=['default', 'widest'])
def test_client_and_server_do_not_spin_through_a_slow_call(start_server, socket_path: Path, echo,
                                                           client_poll: float) -> None:
    server = start_echo(start_server, socket_path, None)
    with SyncIPCHandler(server.socket_path, echo.Stub, lane='ttrpc', busy_poll=client_poll,
                        timeout=30.0) as client:
        for n in range(100):  # quick answers first: polling is fully on when the slow call starts
            assert client.call_method('Echo', echo.pb.EchoRequest(text=f'{n}')).text == f'{n}'
        server_cpu, own_cpu = process_cpu_seconds(server.pid), own_cpu_seconds()
        thread_cpu, wall = time.thread_time(), time.monotonic()
        reply = client.call_method('Sleep', echo.pb.SleepRequest(seconds=1.0))
        thread_cpu, wall = time.thread_time() - thread_cpu, time.monotonic() - wall
        own_cpu, server_cpu = own_cpu_seconds() - own_cpu, process_cpu_seconds(server.pid) - server_cpu
        assert client.lane_in_use == 'ttrpc'
    assert reply.was_active
    assert thread_cpu < IDLE_CPU_SHARE * wall, f'the calling thread used {thread_cpu:.3f} s in {wall:.3f} s'
    assert own_cpu < IDLE_CPU_SHARE * wall, f'the client process used {own_cpu:.3f} s in {wall:.3f} s'
    assert server_cpu < IDLE_CPU_SHARE * wall, f'the server used {server_cpu:.3f} s in {wall:.3f} s'


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Allow every thread of process ``pid`` (and those it creates later) on ``cpus`` only."""
    for task in os.listdir(f'/proc/{pid}/task'):
        try:
            os.sched_setaffinity(int(task), cpus)
        except ProcessLookupError:  # a thread that just ended
            pass


@needs_two_cpus
def test_client_and_server_polling_on_one_shared_cpu_both_progress(start_server, socket_path: Path,
                                                                   echo) -> None:
    # The worst case for polling: the poller holds the very CPU its peer
    # needs to answer. Yielding between attempts must let the peer run, and
    # neither side may keep the CPU once the calls stop.
    server = start_echo(start_server, socket_path, str(WIDEST))
    cpu = {min(os.sched_getaffinity(0))}
    pin_threads(server.pid, cpu)
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpu)  # this (calling) thread only: it is the one that polls
    try:
        with SyncIPCHandler(server.socket_path, echo.Stub, lane='ttrpc', busy_poll=WIDEST,
                            timeout=30.0) as client:
            assert client.call_method('Sleep', echo.pb.SleepRequest(seconds=0.05)).was_active
            # Quick calls last: the server idles with polling fully on.
            for n in range(300):
                assert client.call_method('Echo', echo.pb.EchoRequest(text=f'{n}')).text == f'{n}'
            cpu_used, wall = idle_cpu_share(server.pid)
    finally:
        os.sched_setaffinity(0, own)
    assert cpu_used < IDLE_CPU_SHARE * wall, f'idle server used {cpu_used:.3f} s of CPU in {wall:.3f} s'


# -- the synchronous client -------------------------------------------------------------


@pytest.fixture
def echo_server(start_server, socket_path: Path) -> ServerProcess:
    return start_echo(start_server, socket_path, None)


@pytest.mark.parametrize('deadline', [50e-6, 1e-3], ids=['50us', '1ms'])
@pytest.mark.parametrize('client_poll', [DEFAULT_BUSY_POLL, WIDEST], ids=['default', 'widest'])
def test_deadline_within_the_poll_window_times_out_and_the_connection_stays(
        echo_server: ServerProcess, echo, deadline: float, client_poll: float) -> None:
    opened = sync_ttrpc_pool.open_connections()
    with SyncIPCHandler(echo_server.socket_path, echo.Stub, lane='ttrpc', busy_poll=client_poll,
                        timeout=30.0) as client:
        assert client.call_method('Echo', echo.pb.EchoRequest(text='before')).text == 'before'
        connection = client._fast
        with pytest.raises(IPCTimeoutError):
            client.call_method('Sleep', echo.pb.SleepRequest(seconds=0.2), timeout=deadline)
        # The next call outlives the abandoned one: its late answer (if the
        # server sends one) arrives while this call reads, and must be dropped.
        assert client.call_method('Sleep', echo.pb.SleepRequest(seconds=0.4)).was_active
        assert client.call_method('Echo', echo.pb.EchoRequest(text='after')).text == 'after'
        assert client._fast is connection and not connection.is_closed
        assert sync_ttrpc_pool.open_connections() == opened + 1
    assert sync_ttrpc_pool.open_connections() == opened


def test_answers_stay_right_around_slow_calls(echo_server: ServerProcess, echo) -> None:
    with SyncIPCHandler(echo_server.socket_path, echo.Stub, lane='ttrpc', timeout=30.0) as client:
        for round_ in range(4):
            # Each slow call makes the polls miss: the quick calls after it
            # start backed off, then poll again.
            assert client.call_method('Sleep', echo.pb.SleepRequest(seconds=0.02)).was_active
            for n in range(100):
                text = f'{round_}.{n}'
                assert client.call_method('Echo', echo.pb.EchoRequest(text=text)).text == text
        assert client.lane_in_use == 'ttrpc'


def test_threads_sharing_a_polling_connection_get_their_own_answers(echo_server: ServerProcess,
                                                                    echo) -> None:
    wrong: list[str] = []
    with SyncIPCHandler(echo_server.socket_path, echo.Stub, lane='ttrpc', busy_poll=WIDEST,
                        timeout=30.0) as client:
        def caller(name: str) -> None:
            for n in range(100):
                if n % 25 == 0:  # a slow call now and then: the reading thread changes hands
                    client.call_method('Sleep', echo.pb.SleepRequest(seconds=0.01))
                text = f'{name} {n}'
                got = client.call_method('Echo', echo.pb.EchoRequest(text=text)).text
                if got != text:
                    wrong.append(f'{text} -> {got}')
        threads = [threading.Thread(target=caller, args=(f't{i}',)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
    assert wrong == []


def test_client_without_polling_answers(echo_server: ServerProcess, echo) -> None:
    with SyncIPCHandler(echo_server.socket_path, echo.Stub, lane='ttrpc', busy_poll=0,
                        timeout=30.0) as client:
        for n in range(100):
            assert client.call_method('Echo', echo.pb.EchoRequest(text=f'{n}')).text == f'{n}'
        assert client.busy_poll == 0.0
        assert not client._fast._io._busy_poll.enabled
        with pytest.raises(IPCTimeoutError):
            client.call_method('Sleep', echo.pb.SleepRequest(seconds=0.2), timeout=1e-3)
        assert client.call_method('Echo', echo.pb.EchoRequest(text='after')).text == 'after'


@pytest.mark.parametrize('value, error', [(-1, ValueError), (0.02, ValueError), ('x', TypeError),
                                          (True, TypeError)], ids=repr)
def test_client_with_invalid_window_is_refused_naming_busy_poll(socket_path: Path, echo, value: object,
                                                               error: type[Exception]) -> None:
    with pytest.raises(error, match='busy_poll'):
        SyncIPCHandler(socket_path, echo.Stub, busy_poll=value)  # type: ignore[arg-type]
    with pytest.raises(error, match='busy_poll'):
        SyncConnection.connect(socket_path, busy_poll=value)  # type: ignore[arg-type]


def test_pooled_connections_follow_the_window(echo_server: ServerProcess, echo) -> None:
    opened = sync_ttrpc_pool.open_connections()

    def handler(busy_poll: float) -> SyncIPCHandler:
        return SyncIPCHandler(echo_server.socket_path, echo.Stub, lane='ttrpc', busy_poll=busy_poll)

    short, same, wide = handler(100e-6), handler(0.0001), handler(WIDEST)
    with short, same, wide:
        for client in (short, same, wide):
            assert client.call_method('Echo', echo.pb.EchoRequest(text='x')).text == 'x'
        assert short._fast is same._fast
        assert short._fast is not wide._fast
        assert sync_ttrpc_pool.open_connections() == opened + 2
        connections = (short._fast, wide._fast)
        wide.disconnect()
        assert sync_ttrpc_pool.open_connections() == opened + 1 and connections[1].is_closed
        short.disconnect()
        assert not connections[0].is_closed  # `same` still uses it
        assert same.call_method('Echo', echo.pb.EchoRequest(text='y')).text == 'y'
    assert sync_ttrpc_pool.open_connections() == opened
    assert all(connection.is_closed for connection in connections)


# -- polling on the caller's event loop (the asyncio client) ----------------------------


class RecordingSelector(selectors.DefaultSelector):
    """Records the timeout of every ``select()``; on the first one that would
    sleep, runs ``on_sleep`` (once) and does not sleep."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []
        self.on_sleep: Callable[[], None] | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self.timeouts.append(timeout)
        if (timeout is None or timeout > 0) and self.on_sleep is not None:
            on_sleep, self.on_sleep = self.on_sleep, None
            on_sleep()
            timeout = 0
        return super().select(timeout)

    def slept(self) -> bool:
        return any(timeout is None or timeout > 0 for timeout in self.timeouts)


def on_recording_loop(main: Callable[[asyncio.AbstractEventLoop, RecordingSelector], Any]) -> Any:
    selector = RecordingSelector()
    loop = asyncio.SelectorEventLoop(selector)
    try:
        return loop.run_until_complete(main(loop, selector))
    finally:
        loop.close()


@needs_two_cpus
def test_awaiting_with_polling_keeps_the_loop_passing_without_sleeping() -> None:
    policy = BusyPoll(WIDEST)

    async def main(loop: asyncio.AbstractEventLoop, selector: RecordingSelector) -> tuple[str, int]:
        future: asyncio.Future[str] = loop.create_future()
        # Due well within the window: the loop must not sleep until then, yet
        # must pass (run its callbacks, look at its sockets) all along.
        loop.call_later(WIDEST / 5, future.set_result, 'answer')
        selector.timeouts.clear()
        result = await await_polling(policy, future)
        assert not selector.slept(), selector.timeouts
        return result, len(selector.timeouts)

    result, passes = on_recording_loop(main)
    assert result == 'answer'
    assert passes >= 1


@needs_two_cpus
def test_awaiting_with_polling_yields_the_cpu_at_every_pass(monkeypatch) -> None:
    # A peer on the same CPU (the server, often) answers only when it gets to
    # run: a pass of the loop that kept the CPU would delay the very answer
    # it polls for, up to the whole window. So every pass yields it first,
    # as the blocking client's polls do.
    policy = BusyPoll(WIDEST)
    yields: list[int] = []
    sched_yield = os.sched_yield

    def counting_yield() -> None:
        yields.append(len(yields))
        sched_yield()

    monkeypatch.setattr(os, 'sched_yield', counting_yield)
    # The polling's clock stands still: its window must not run out before the
    # 20th pass, which on a loaded machine (each yield lets others run) it did.
    monkeypatch.setattr(busy_poll, 'time', types.SimpleNamespace(perf_counter=lambda: 0.0))

    async def main(loop: asyncio.AbstractEventLoop, selector: RecordingSelector) -> tuple[str, int]:
        future: asyncio.Future[str] = loop.create_future()
        countdown = iter(range(20))

        def tick() -> None:  # the answer comes at the 20th pass of the loop
            if next(countdown, None) is None:
                future.set_result('answer')
            else:
                loop.call_soon(tick)

        loop.call_soon(tick)
        selector.timeouts.clear()
        result = await await_polling(policy, future)
        return result, len(selector.timeouts)

    result, passes = on_recording_loop(main)
    assert result == 'answer'
    assert passes >= 20 and len(yields) >= passes - 1, (passes, len(yields))


@pytest.mark.parametrize('connections', [1, 2], ids=['one connection', 'two connections'])
def test_of_several_waiters_on_one_loop_one_polls_for_all(monkeypatch, connections: int) -> None:
    # One poller keeps the loop passing for every waiter, of its connection
    # or another: a second one would only add a sched_yield and a task step
    # to every pass (with 8 calls in flight, about a fifth fewer calls a second).
    policies = [BusyPoll(WIDEST) for _ in range(connections)]
    yielded_by: list[str] = []
    sched_yield = os.sched_yield

    def counting_yield() -> None:
        task = asyncio.current_task()
        yielded_by.append(task.get_name() if task is not None else '')
        sched_yield()

    monkeypatch.setattr(os, 'sched_yield', counting_yield)
    monkeypatch.setattr(busy_poll, 'time', types.SimpleNamespace(perf_counter=lambda: 0.0))

    async def main(loop: asyncio.AbstractEventLoop, selector: RecordingSelector) -> tuple[list[str], int]:
        first: asyncio.Future[str] = loop.create_future()
        second: asyncio.Future[str] = loop.create_future()
        countdown = iter(range(30))

        def tick() -> None:  # answers at the 20th and the 30th pass of the loop
            left = next(countdown, None)
            if left == 20:
                first.set_result('first')
            if left is None:
                second.set_result('second')
            else:
                loop.call_soon(tick)

        loop.call_soon(tick)
        selector.timeouts.clear()
        results = await asyncio.gather(
            asyncio.create_task(await_polling(policies[0], first), name='first'),
            asyncio.create_task(await_polling(policies[-1], second), name='second'))
        return results, len(selector.timeouts)

    results, passes = on_recording_loop(main)
    assert results == ['first', 'second']
    assert set(yielded_by) == {'first'} and 20 <= len(yielded_by) <= passes, (passes, yielded_by)
    assert not busy_poll._polled  # (the loop is not kept)


@needs_two_cpus
def test_awaiting_a_late_answer_polls_its_window_then_sleeps_and_backs_off() -> None:
    policy = BusyPoll(DEFAULT_BUSY_POLL)

    async def main(loop: asyncio.AbstractEventLoop, selector: RecordingSelector) -> str:
        future: asyncio.Future[str] = loop.create_future()
        # The answer comes only once the loop would sleep: after the poll gave up.
        selector.on_sleep = lambda: loop.call_soon(future.set_result, 'late')
        return await await_polling(policy, future)

    assert on_recording_loop(main) == 'late'
    assert skips_before_polling(policy) == 1


def test_awaiting_without_polling_lets_the_loop_sleep_at_once() -> None:
    policy = BusyPoll(0)

    async def main(loop: asyncio.AbstractEventLoop, selector: RecordingSelector) -> str:
        future: asyncio.Future[str] = loop.create_future()
        selector.on_sleep = lambda: loop.call_soon(future.set_result, 'slept')
        selector.timeouts.clear()
        result = await await_polling(policy, future)
        assert selector.timeouts and selector.timeouts[0] != 0, selector.timeouts
        return result

    assert on_recording_loop(main) == 'slept'


@pytest.mark.asyncio
async def test_awaiting_with_polling_passes_on_exceptions_and_cancellation() -> None:
    loop = asyncio.get_running_loop()
    failed: asyncio.Future[None] = loop.create_future()
    loop.call_soon(failed.set_exception, LookupError('gone'))
    with pytest.raises(LookupError, match='gone'):
        await await_polling(BusyPoll(WIDEST), failed)
    waiting = asyncio.ensure_future(await_polling(BusyPoll(WIDEST), loop.create_future()))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


@pytest.mark.asyncio
@pytest.mark.parametrize('client_poll', [0, DEFAULT_BUSY_POLL, WIDEST], ids=['off', 'default', 'widest'])
async def test_async_client_answers_calls_and_streams_with_any_window(echo_server: ServerProcess, echo,
                                                                      client_poll: float) -> None:
    async with IPCHandler(echo_server.socket_path, echo.Stub, lane='ttrpc', busy_poll=client_poll,
                          timeout=30.0) as client:
        assert client.busy_poll == client_poll
        for n in range(200):
            if n % 50 == 0:  # a slow call now and then: the polls miss and back off
                assert (await client.call_method('Sleep', echo.pb.SleepRequest(seconds=0.01))).was_active
            assert (await client.call_method('Echo', echo.pb.EchoRequest(text=f'{n}'))).text == f'{n}'
        replies = await asyncio.gather(*(client.call_method('Echo', echo.pb.EchoRequest(text=f'c{n}'))
                                         for n in range(100)))
        assert [reply.text for reply in replies] == [f'c{n}' for n in range(100)]
        assert [r.index async for r in client.stream_method('Count', echo.pb.CountRequest(count=50))] \
            == list(range(50))
        with pytest.raises(IPCTimeoutError):
            await client.call_method('Sleep', echo.pb.SleepRequest(seconds=0.2), timeout=1e-3)
        assert (await client.call_method('Echo', echo.pb.EchoRequest(text='after'))).text == 'after'
        assert client.lane_in_use == 'ttrpc'


@pytest.mark.asyncio
@pytest.mark.parametrize('client_poll', [DEFAULT_BUSY_POLL, WIDEST], ids=['default', 'widest'])
async def test_async_client_does_not_spin_through_a_slow_call(echo_server: ServerProcess, echo,
                                                              client_poll: float) -> None:
    async with IPCHandler(echo_server.socket_path, echo.Stub, lane='ttrpc', busy_poll=client_poll,
                          timeout=30.0) as client:
        for n in range(100):  # quick answers first: polling is fully on when the slow call starts
            assert (await client.call_method('Echo', echo.pb.EchoRequest(text=f'{n}'))).text == f'{n}'
        own_cpu, wall = own_cpu_seconds(), time.monotonic()
        reply = await client.call_method('Sleep', echo.pb.SleepRequest(seconds=1.0))
        own_cpu, wall = own_cpu_seconds() - own_cpu, time.monotonic() - wall
    assert reply.was_active
    assert own_cpu < IDLE_CPU_SHARE * wall, f'the client process used {own_cpu:.3f} s in {wall:.3f} s'


@pytest.mark.asyncio
@pytest.mark.parametrize('value, error', [(-1, ValueError), (0.02, ValueError), ('x', TypeError),
                                          (True, TypeError)], ids=repr)
async def test_async_client_with_invalid_window_is_refused_naming_busy_poll(
        socket_path: Path, echo, value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match='busy_poll'):
        IPCHandler(socket_path, echo.Stub, busy_poll=value)  # type: ignore[arg-type]
    with pytest.raises(error, match='busy_poll'):
        await AsyncConnection.connect(socket_path, busy_poll=value)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_async_pooled_connections_follow_the_window(echo_server: ServerProcess, echo) -> None:
    opened = aio_ttrpc_pool.open_connections()
    short, same, wide = (IPCHandler(echo_server.socket_path, echo.Stub, lane='ttrpc', busy_poll=window)
                         for window in (100e-6, 0.0001, WIDEST))
    for client in (short, same, wide):
        assert (await client.call_method('Echo', echo.pb.EchoRequest(text='x'))).text == 'x'
    assert short._fast is same._fast
    assert short._fast is not wide._fast
    assert aio_ttrpc_pool.open_connections() == opened + 2
    for client in (short, same, wide):
        await client.disconnect()
    assert aio_ttrpc_pool.open_connections() == opened


# -- the ipc_server node ----------------------------------------------------------------


def ping(socket_path: Path, lane: str) -> str:
    with SyncIPCHandler(socket_path, module_grpc.ModuleServiceStub, lane=lane, timeout=10.0) as client:
        reply = client.call_method('ExecuteCommand', module_pb.CommandRequest(command='ping'))
        assert client.lane_in_use == lane
    return reply.result


@pytest.mark.ros
def test_ipc_server_node_serves_with_polling_off_and_by_default(start_process, socket_dir: Path) -> None:
    nodes: dict[str, tuple[ChildProcess, Path]] = {}
    for name, parameters in (('off', ['busy_poll_us:=0']), ('default', [])):
        socket_path = socket_dir / f'{name}.sock'
        args = [*IPC_SERVER, '--ros-args']
        for parameter in (f'module_name:=poll_{name}', f'socket_path:={socket_path}', *parameters):
            args += ['-p', parameter]
        nodes[name] = (start_process(args), socket_path)
    for process, socket_path in nodes.values():
        process.wait_listening(socket_path)
        process.wait_listening(default_ttrpc_socket_path(socket_path))
        for _ in range(50):
            assert ping(socket_path, 'ttrpc') == 'pong'
        assert ping(socket_path, 'grpc') == 'pong'
    process, _ = nodes['default']
    cpu, wall = idle_cpu_share(process.popen.pid)
    assert cpu < IDLE_CPU_SHARE * wall, f'idle ipc_server used {cpu:.3f} s of CPU in {wall:.3f} s'
    for process, socket_path in nodes.values():
        process.signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, process.log()
        assert not socket_path.exists()


@pytest.mark.ros
@needs_two_cpus
def test_busy_poll_us_parameter_reaches_the_server_loop(context: Context, socket_dir: Path) -> None:
    socket_path = socket_dir / 'param.sock'
    node = Node('busy_poll_module', context=context, parameter_overrides=[
        Parameter('module_name', value='polled'), Parameter('socket_path', value=str(socket_path)),
        Parameter('busy_poll_us', value=250), Parameter('grace_period', value=0.5)])
    host = host_ipc_server(node)
    try:
        assert host.config is not None and host.config.busy_poll == 250e-6
        selector = selector_of(host.loop_thread.loop)
        assert isinstance(selector, BusyPollSelector) and selector.busy_poll.seconds == 250e-6
        assert ping(socket_path, 'ttrpc') == 'pong'
    finally:
        host.close()
        node.destroy_node()
    assert not socket_path.exists()
