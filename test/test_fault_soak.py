"""Soak (issue 4, guarantee 11): many calls through one server while clients
connect and disconnect, and the server does not grow.

``VYRA_IPC_SOAK_CALLS`` sets the number of calls (default 20 000 for CI;
the full run is 100 000). After a warm-up of a tenth of them (at least
2 000), the server's resident memory may grow by less than 10 %, and its
open files and threads must come back to where they were once every client
has gone. Clients are separate processes started one after the other
(``test/servers/fault_soak_client.py``), each opening and closing a new
handler every 200 calls, and handlers created and closed in this process in
between. The numbers are printed (``pytest -rP`` or ``-s`` shows them).
"""

from __future__ import annotations

from collections.abc import Callable
import gc
import importlib.util
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import threading
from types import ModuleType

import pytest

from conftest import SERVERS, ServerProcess, drop_leftovers, wait_for
from vyra_base_ipc._pool import sync_pool

SOAK_CALLS = int(os.environ.get('VYRA_IPC_SOAK_CALLS', '20000'))
WARMUP_CALLS = max(2000, SOAK_CALLS // 10)
CLIENT_PROCESSES = 4
#: Share of the calls after warm-up made by handlers in this process.
IN_PROCESS_SHARE = 0.2

pytestmark = [pytest.mark.fault, pytest.mark.soak]


def server_numbers(pid: int) -> dict[str, int]:
    """Resident memory (kB), open fds and threads of process ``pid``; the
    threads without gRPC's EventEngine pool, which grpc sizes to the load and
    shrinks on a schedule of its own (bounded by grpc, not by us)."""
    status = Path(f'/proc/{pid}/status').read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith('VmRSS:'))
    threads = 0
    for task in os.listdir(f'/proc/{pid}/task'):
        try:
            threads += Path(f'/proc/{pid}/task/{task}/comm').read_text().strip() != 'event_engine'
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return {'rss_kb': rss, 'fds': len(os.listdir(f'/proc/{pid}/fd')), 'threads': threads}


def connections(pid: int) -> int:
    """How many accepted client connections process ``pid`` holds: its
    connected Unix sockets that carry the listener's address (the unnamed
    socketpairs of its event loop do not)."""
    inodes = set()
    for fd in os.listdir(f'/proc/{pid}/fd'):
        try:
            target = os.readlink(f'/proc/{pid}/fd/{fd}')
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith('socket:['):
            inodes.add(target[len('socket:['):-1])
    connected = 0
    for line in Path('/proc/net/unix').read_text().splitlines()[1:]:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode [Path]; St 03 = connected
        if fields[6] in inodes and fields[5] == '03' and len(fields) > 7:
            connected += 1
    return connected


@pytest.fixture(scope='module')
def soak_client(test_protos_dir: Path) -> ModuleType:
    """test/servers/fault_soak_client.py, loaded as a module for the in-process sessions."""
    spec = importlib.util.spec_from_file_location('fault_soak_client', SERVERS / 'fault_soak_client.py')
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_client_process(socket_path: Path, calls: int, env: dict[str, str]) -> None:
    finished = subprocess.run([sys.executable, str(SERVERS / 'fault_soak_client.py'), str(socket_path),
                               str(calls)], env=env, capture_output=True, text=True,
                              timeout=120 + calls / 100, check=False)
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert json.loads(finished.stdout.splitlines()[-1])['calls'] == calls


def run_in_process(socket_path: Path, calls: int, soak_client: ModuleType, first: int) -> None:
    """Sessions of handlers created and closed in this process."""
    soak_client.run_sessions(str(socket_path), calls, first=first)


@pytest.mark.timeout(120 + SOAK_CALLS // 200)
def test_soak_server_does_not_grow_while_clients_come_and_go(
        start_server: Callable[..., ServerProcess], socket_path: Path, child_env: dict[str, str],
        soak_client: ModuleType) -> None:
    # One worker for def handlers: the pool grows on demand up to max_workers
    # and never shrinks, so with two it held one or two threads after the
    # warm-up depending on how the clients' concurrent EchoSync calls happened
    # to overlap (a loaded machine saw 10 threads after it and 11 at the end).
    # With one, the warm-up's first EchoSync fills it: a thread more is a leak.
    server = start_server(socket_path, '--max-workers', '1')
    pid = server.pid
    # Counted once nothing earlier tests left is still to go: the shared-memory pool's timer thread waiting
    # for a free segment of theirs ended mid-test and hid a thread leaked here.
    drop_leftovers()
    threads_here = threading.active_count()

    def idle() -> dict[str, int]:
        wait_for(lambda: connections(pid) == 0, 30, 'every client connection of the server to close')
        return server_numbers(pid)

    started = idle()
    run_client_process(socket_path, WARMUP_CALLS, child_env)
    run_in_process(socket_path, 400, soak_client, WARMUP_CALLS)
    baseline = idle()
    print(f'soak: {SOAK_CALLS} calls; server at start {started}, after a warm-up of '
          f'{WARMUP_CALLS + 400} calls {baseline}')

    remaining = SOAK_CALLS - WARMUP_CALLS - 400
    in_process = int(remaining * IN_PROCESS_SHARE) // CLIENT_PROCESSES
    per_process = (remaining - in_process * CLIENT_PROCESSES) // CLIENT_PROCESSES
    done = WARMUP_CALLS + 400
    for turn in range(CLIENT_PROCESSES):
        calls = per_process if turn < CLIENT_PROCESSES - 1 else \
            SOAK_CALLS - done - in_process * (CLIENT_PROCESSES - turn)
        run_client_process(socket_path, calls, child_env)
        run_in_process(socket_path, in_process, soak_client, done + calls)
        done += calls + in_process
        print(f'soak: after {done} calls {server_numbers(pid)}')
    assert done == SOAK_CALLS

    # Once every client has gone: no connection, fd or thread more than after
    # the warm-up (gRPC's thread pool may take a moment to shrink back).
    idle()
    wait_for(lambda: server_numbers(pid)['fds'] <= baseline['fds'], 30,
             f'server fds back to {baseline["fds"]} (now {server_numbers(pid)})')
    wait_for(lambda: server_numbers(pid)['threads'] <= baseline['threads'], 30,
             f'server threads back to {baseline["threads"]} (now {server_numbers(pid)})')
    final = server_numbers(pid)
    growth = (final['rss_kb'] - baseline['rss_kb']) / baseline['rss_kb']
    print(f'soak: server at the end {final}; RSS growth after warm-up {growth:+.1%}')
    assert growth < 0.10, f'server RSS grew {growth:+.1%}: {baseline} -> {final}'

    # No socket files but the server's own two; no private bind directory left.
    assert sorted(p.name for p in socket_path.parent.iterdir()) == \
        [socket_path.name, socket_path.name.replace('.sock', '.ttrpc.sock')]
    # This process let go of its channels and threads too.
    gc.collect()
    wait_for(lambda: threading.active_count() <= threads_here, 20,
             f'threads of the test process back to {threads_here} ({threading.enumerate()})')
    assert sync_pool.open_connections() == 0

    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert list(socket_path.parent.iterdir()) == []
