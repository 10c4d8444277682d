"""The ipc_server node: parameters, socket path, signals, bad parameters, and
the embedding helper in a module's own node.

Process tests start the real ipc_server (the console script's ``main``) with
``--ros-args`` and talk to it through IPCHandler; in-process tests use real
rclpy nodes in a private context.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
from pathlib import Path
import resource
import signal
import sys
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterator
import uuid

import pytest
from rcl_interfaces.msg import SetParametersResult
import rclpy
from rclpy.context import Context
from rclpy.node import Node
from rclpy.parameter import Parameter
from std_srvs.srv import Trigger

from conftest import SERVERS, STOP_SLACK, ChildProcess, wait_for, with_test_servers
from launch_reading import console_scripts
from ros_env import IPC_SERVER, python_command
from vyra_base_ipc import IPCError, IPCHandler, ModuleService, ServerLimits, SyncIPCHandler, command
from vyra_base_ipc import module_service_pb2 as module_pb
from vyra_base_ipc import module_service_pb2_grpc as module_grpc
from vyra_base_ipc._loop_thread import EventLoopThread
from vyra_base_ipc._socket_file import is_listening
from vyra_base_ipc.node import (
    DECLARED_PARAMETERS,
    EXIT_BAD_PARAMETER,
    EXIT_SERVER_FAILED,
    PARAMETERS,
    IPCServerHost,
    IPCServerNode,
    ParameterError,
    host_ipc_server,
    read_ipc_config,
)
from vyra_base_ipc.ros_bridge import ServiceCallTimeout, ServiceCaller, ServiceUnavailable, call_service

pytestmark = [pytest.mark.ros]


def ros_args(*parameters: str, extra: tuple[str, ...] = ()) -> list[str]:
    args = [*IPC_SERVER, '--ros-args']
    for parameter in parameters:
        args += ['-p', parameter]
    return [*args, *extra]


async def module_status(socket_path: Path) -> dict[str, Any]:
    import json
    async with IPCHandler(socket_path, module_grpc.ModuleServiceStub, timeout=5.0) as ipc:
        answer = await ipc.call_method('ExecuteCommand', module_pb.CommandRequest(command='status'))
    assert answer.status_code == 0, answer.result
    return json.loads(answer.result)


# -- ipc_server as a process --------------------------------------------------------


@pytest.mark.asyncio
async def test_serves_on_socket_path_set_with_ros_args(start_process, socket_dir: Path) -> None:
    socket_path = socket_dir / 'given.sock'
    server = start_process(ros_args('module_name:=arm', f'socket_path:={socket_path}'))
    server.wait_listening(socket_path)
    assert (await module_status(socket_path))['module'] == 'arm'


def test_start_and_stop_are_logged_once(start_process, socket_dir: Path) -> None:
    socket_path = socket_dir / 'logged.sock'
    server = start_process(ros_args('module_name:=arm', f'socket_path:={socket_path}'))
    # Started: the socket is up before the node says so.
    wait_for(lambda: ' serving ' in server.log(), 30, 'the serving line')
    server.signal(signal.SIGINT)
    assert server.wait(timeout=30) == 0, server.log()
    lines = server.log().splitlines()
    serving = [line for line in lines if ' serving ' in line]
    assert len(serving) == 1 and '[ipc_server]: IPC server of module' in serving[0], '\n'.join(lines)
    assert len([line for line in lines if f'stopping IPC server on {socket_path}' in line]) == 1, lines
    assert len([line for line in lines if f'IPC server on {socket_path} stopped' in line]) == 1, lines


@pytest.mark.asyncio
async def test_serves_with_params_file(start_process, socket_dir: Path) -> None:
    socket_path = socket_dir / 'from_file.sock'
    params = socket_dir / 'params.yaml'
    # `servicers: []` has no type in ROS (rcl gives it no value); it means none.
    params.write_text(f'/**:\n  ros__parameters:\n    module_name: gripper\n'
                      f'    socket_path: "{socket_path}"\n    grace_period: 1.0\n    servicers: []\n')
    server = start_process([*IPC_SERVER, '--ros-args', '--params-file', str(params)])
    server.wait_listening(socket_path)
    assert (await module_status(socket_path))['module'] == 'gripper'


@pytest.mark.asyncio
async def test_package_config_file_with_module_name_from_command_line(start_process) -> None:
    # The shipped config leaves socket_path empty: the path follows module_name.
    module_name = f't{uuid.uuid4().hex[:12]}'
    socket_path = Path(f'/tmp/{module_name}_ipc.sock')
    config = Path(__file__).resolve().parent.parent / 'config' / 'ipc_server.yaml'
    server = start_process([*IPC_SERVER, '--ros-args', '--params-file', str(config),
                            '-p', f'module_name:={module_name}'])
    try:
        server.wait_listening(socket_path)
        assert (await module_status(socket_path))['module'] == module_name
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
        assert not socket_path.exists()
    finally:
        server.stop()


def test_the_shipped_config_sets_each_parameter_to_its_default() -> None:
    # It lacked keep_freed_memory_mb, so a reader of it did not learn of that
    # parameter. module_name comes from the launch or the command line; servicers
    # is shown in a comment (an empty list in YAML is no string array to rclpy).
    import yaml

    from vyra_base_ipc._node_parameters import PARAMETERS

    config = Path(__file__).resolve().parent.parent / 'config' / 'ipc_server.yaml'
    values = yaml.safe_load(config.read_text())['/**']['ros__parameters']
    assert values == {spec.name: spec.default for spec in PARAMETERS
                      if spec.name not in ('module_name', 'servicers')}


@pytest.mark.asyncio
@pytest.mark.parametrize('remap', [['-r', '__ns:=/robot1'],
                                   ['-r', '__ns:=/robot1', '-r', '__node:=arm_ipc']])
async def test_namespaced_node_gets_wildcard_parameters(start_process, socket_dir: Path,
                                                        remap: list[str]) -> None:
    socket_path = socket_dir / 'ns.sock'
    params = socket_dir / 'params.yaml'
    params.write_text(f'/**:\n  ros__parameters:\n    module_name: robot_arm\n'
                      f'    socket_path: "{socket_path}"\n')
    server = start_process([*IPC_SERVER, '--ros-args', *remap, '--params-file', str(params)])
    server.wait_listening(socket_path)
    assert (await module_status(socket_path))['module'] == 'robot_arm'
    node_name = remap[-1].split(':=')[1] if '__node' in remap[-1] else 'ipc_server'
    wait_for(lambda: f'(node /robot1/{node_name})' in server.log(), 20,
               f'the node to log its name /robot1/{node_name}')


def slow_server(start_process: Callable[..., ChildProcess], ros_environ: dict[str, str],
                test_protos_dir: Path, socket_path: Path, grace: float) -> ChildProcess:
    server = start_process(ros_args('module_name:=slow', f'socket_path:={socket_path}',
                                    f'grace_period:={grace!r}',
                                    "servicers:=['slow_servicer:SlowEchoService']"),
                           env=with_test_servers(ros_environ, test_protos_dir))
    server.wait_listening(socket_path)
    return server


def wait_in_flight(socket_path: Path, method: str) -> None:
    calls = Path(f'{socket_path}.calls')
    wait_for(lambda: calls.exists() and method in calls.read_text().split(), 20,
               f'{method} to be in flight')


@pytest.fixture
def slow_call(start_process, ros_environ, test_protos_dir, echo, socket_dir: Path):
    """An ipc_server with SlowEchoService and one call of ``method`` in flight
    on it: ``async with slow_call(grace, method, request) as (server, call)``."""
    @contextlib.asynccontextmanager
    async def in_flight(grace: float, method: str, request: Any,
                        ) -> AsyncIterator[tuple[ChildProcess, asyncio.Future[Any]]]:
        socket_path = socket_dir / 'slow.sock'
        server = slow_server(start_process, ros_environ, test_protos_dir, socket_path, grace)
        async with IPCHandler(socket_path, echo.Stub, timeout=60.0) as ipc:
            call = asyncio.ensure_future(ipc.call_method(method, request))
            await asyncio.to_thread(wait_in_flight, socket_path, method)
            yield server, call
        assert not socket_path.exists()
    return in_flight


@pytest.mark.asyncio
@pytest.mark.parametrize('stop_signal', [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=['SIGINT', 'SIGTERM', 'SIGHUP'])
async def test_signal_during_inflight_call_exits_0_within_grace(
        slow_call, echo, stop_signal: signal.Signals) -> None:
    grace = 1.0
    async with slow_call(grace, 'Sleep', echo.pb.SleepRequest(seconds=60)) as (server, call):
        server.signal(stop_signal)
        # The promise: gone within grace + 1 s, whatever the call does (the 60 s call not waited for).
        status = await asyncio.to_thread(server.wait, grace + 1.0 + STOP_SLACK)
        with pytest.raises(IPCError):
            await call
    assert status == 0, server.log()


@pytest.mark.asyncio
async def test_more_signals_during_shutdown_do_not_cut_it_short(slow_call, echo) -> None:
    grace = 1.0
    async with slow_call(grace, 'Sleep', echo.pb.SleepRequest(seconds=60)) as (server, call):
        server.signal(signal.SIGTERM)
        await asyncio.to_thread(wait_for, lambda: 'stopping IPC server' in server.log(), 20,
                                'the shutdown to begin')
        server.signal(signal.SIGINT)
        server.signal(signal.SIGTERM)
        status = await asyncio.to_thread(server.wait, grace + 1.0 + STOP_SLACK)
        with pytest.raises(IPCError):
            await call
    assert status == 0, server.log()
    assert 'already stopping' in server.log()


def test_signals_while_it_exits_never_kill_it(start_process, socket_dir: Path) -> None:
    # The interpreter, as it exits, puts back the default handler (death) in
    # place of a Python one: a second SIGTERM then killed a server that had
    # stopped cleanly (status -15), e.g. from a supervisor that repeats it.
    socket_path = socket_dir / 'late.sock'
    server = start_process(ros_args('module_name:=late', f'socket_path:={socket_path}'))
    server.wait_listening(socket_path)
    server.signal(signal.SIGTERM)
    wait_for(lambda: 'ipc_server stopped' in server.log(), 30, 'the server to stop')
    deadline = time.monotonic() + 30
    while server.running() and time.monotonic() < deadline:  # a signal every millisecond until it is gone
        server.signal(signal.SIGTERM)
        time.sleep(0.001)
    assert server.wait(timeout=1) == 0, server.log()
    assert not socket_path.exists()


#: Run before the ipc_server entry point: the first ``import grpc`` (this package's
#: first heavy import) writes the file $IMPORT_MARK and waits for $IMPORT_RELEASE.
_HOLD_IMPORT = """
import os, sys, time
class Hold:
    def find_spec(self, name, path=None, target=None):
        if name == 'grpc':
            sys.meta_path.remove(self)
            open(os.environ['IMPORT_MARK'], 'w').close()
            while not os.path.exists(os.environ['IMPORT_RELEASE']):
                time.sleep(0.01)
sys.meta_path.insert(0, Hold())
"""


def signal_pending(pid: int, signum: int) -> bool:
    """Whether ``signum`` sent to process ``pid`` waits to be delivered (no
    thread has run its handler yet)."""
    fields = dict(line.split(':', 1) for line in Path(f'/proc/{pid}/status').read_text().splitlines())
    return bool(int(fields['ShdPnd'], 16) & 1 << (signum - 1))


def stopped_while_importing(start_process: Callable[..., Any], env: dict[str, str], tmp_path: Path, entry: str,
                            ros_args: list[str], stop_signal: signal.Signals) -> str:
    """Run the Python code ``entry`` with ``--ros-args *ros_args``, hold its
    import of grpc (_HOLD_IMPORT) until ``stop_signal`` sent meanwhile was
    delivered, then let it go on. It must exit 0, with no traceback, saying
    it exited on the signal while starting; its log."""
    mark, release = tmp_path / 'importing', tmp_path / 'release'
    env = {**env, 'IMPORT_MARK': str(mark), 'IMPORT_RELEASE': str(release)}
    process = start_process([sys.executable, '-c', _HOLD_IMPORT + entry, '--ros-args', *ros_args], env)
    wait_for(lambda: mark.exists() or not process.running(), 30, 'the import of grpc')
    assert process.running(), process.log()
    process.signal(stop_signal)
    # Delivered (its handler ran) before the import goes on: no race with the rest.
    wait_for(lambda: not process.running() or not signal_pending(process.pid, stop_signal), 30,
             'the signal to be delivered')
    release.touch()
    assert process.wait(timeout=30) == 0, process.log()
    log = process.log()
    assert 'Traceback' not in log, log
    assert f'{stop_signal.name} received while starting: exiting' in log
    return log


@pytest.mark.parametrize('stop_signal', [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=['SIGINT', 'SIGTERM', 'SIGHUP'])
def test_a_signal_while_it_still_imports_ends_it_quietly_with_0(
        start_process, ros_environ: dict[str, str], tmp_path: Path, socket_dir: Path,
        stop_signal: signal.Signals) -> None:
    # Found: SIGINT there printed a KeyboardInterrupt traceback, SIGTERM and
    # SIGHUP killed it; once it serves, each ends it with 0.
    entry = IPC_SERVER[-1] if IPC_SERVER[:2] == [sys.executable, '-c'] else \
        'import sys; from vyra_base_ipc_server import main; sys.exit(main())'
    socket_path = socket_dir / 'early.sock'
    log = stopped_while_importing(start_process, ros_environ, tmp_path, entry,
                                  ['-p', 'module_name:=early', '-p', f'socket_path:={socket_path}'], stop_signal)
    assert ' serving ' not in log and not socket_path.exists()


@pytest.mark.parametrize('stop_signal', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_a_signal_while_the_demo_module_node_still_imports_ends_it_quietly_with_0(
        start_process, ros_environ: dict[str, str], tmp_path: Path, stop_signal: signal.Signals) -> None:
    # module_ipc.launch.py SIGINTs the module's node when ipc_server fails at start,
    # maybe while the node still imports. Found on a real Kilted launch stack (1 of 6
    # launches with a servicer that does not import): a KeyboardInterrupt traceback
    # and "process has died [..., exit code -2]" for a node that did nothing wrong.
    module, _, function = console_scripts()['demo_module_node'].partition(':')
    log = stopped_while_importing(start_process, ros_environ, tmp_path, python_command(module, function)[-1],
                                  ['-p', 'module_name:=early'], stop_signal)
    assert 'offers' not in log


@pytest.mark.asyncio
async def test_call_shorter_than_grace_completes_during_shutdown(slow_call, echo) -> None:
    async with slow_call(10.0, 'Sleep', echo.pb.SleepRequest(seconds=1.0)) as (server, call):
        server.signal(signal.SIGTERM)
        reply = await call
        assert await asyncio.to_thread(server.wait, 11.0) == 0, server.log()
    assert reply.was_active


@pytest.mark.asyncio
async def test_blocked_handler_thread_does_not_hold_up_exit(slow_call, echo) -> None:
    grace = 1.0
    async with slow_call(grace, 'EchoSync', echo.pb.EchoRequest(text='60')) as (server, call):
        server.signal(signal.SIGTERM)
        status = await asyncio.to_thread(server.wait, grace + 1.0 + STOP_SLACK)
        with pytest.raises(IPCError):
            await call
    assert status == 0, server.log()
    assert 'exiting without waiting for 1 handler thread' in server.log()


def _file_in_the_way(directory: Path) -> str:
    (directory / 'plain_file').write_text('')
    return f'socket_path:={directory / "plain_file" / "x.sock"}'


BAD_PARAMETERS = {
    'unknown servicer module': (
        lambda d: "servicers:=['no_such_package.servicers:Thing']", 'servicers',
        "cannot import 'no_such_package.servicers'"),
    'servicer class missing': (
        lambda d: "servicers:=['vyra_base_ipc.demo.backend_service:NoSuchClass']", 'servicers',
        "has no attribute 'NoSuchClass'"),
    'servicer not in module:Class form': (
        lambda d: "servicers:=['just_a_name']", 'servicers', 'package.module:ClassName'),
    'servicer string instead of list': (
        lambda d: 'servicers:=x', 'servicers', 'STRING_ARRAY'),
    'invalid module name': (
        lambda d: 'module_name:=Bad_Name', 'module_name', "invalid module name 'Bad_Name'"),
    'socket directory is a file': (_file_in_the_way, 'socket_path', 'cannot serve on'),
    'socket path too long': (
        lambda d: f'socket_path:=/tmp/{"x" * 120}.sock', 'socket_path', 'at most 107 bytes'),
    'negative grace period': (
        lambda d: 'grace_period:=-1.0', 'grace_period', 'finite number of seconds >= 0'),
    'socket path beginning with ~': (  # (found: a directory named ~ was made in the working directory)
        lambda d: 'socket_path:=~/arm.sock', 'socket_path', 'begins with "~", which ROS does not expand'),
    'fast lane path beginning with ~': (
        lambda d: 'ttrpc_socket_path:=~/arm.ttrpc.sock', 'ttrpc_socket_path', 'give the whole path, such as'),
    'grace period beyond every clock': (
        lambda d: 'grace_period:=1e10', 'grace_period', 'and at most 1e+09, not 10000000000.0'),
    'grace period not a number': (
        lambda d: 'grace_period:=soon', 'grace_period', 'must be of type DOUBLE'),
    'zero max message bytes': (
        lambda d: 'max_message_bytes:=0', 'max_message_bytes', 'between 1 and'),
    'fast lane switch not a bool': (
        lambda d: 'ttrpc_enabled:=maybe', 'ttrpc_enabled', 'must be of type BOOL'),
    'fast lane on the gRPC socket': (
        lambda d: f'ttrpc_socket_path:={d / "bad.sock"}', 'ttrpc_socket_path', 'must differ from'),
    'negative shared memory threshold': (
        lambda d: 'shared_memory_threshold:=-1', 'shared_memory_threshold', 'must be >= 0'),
    'fast lane path too long': (
        lambda d: f'ttrpc_socket_path:=/tmp/{"y" * 120}.sock', 'ttrpc_socket_path', 'at most 107 bytes'),
    'negative busy poll': (
        lambda d: 'busy_poll_us:=-1', 'busy_poll_us', 'must be an integer from 0 to 10000, not -1'),
    'busy poll above 10 ms': (
        lambda d: 'busy_poll_us:=10001', 'busy_poll_us', 'must be an integer from 0 to 10000, not 10001'),
    'busy poll not an integer': (
        lambda d: 'busy_poll_us:=0.5', 'busy_poll_us', 'must be of type INTEGER'),
    'negative freed memory to keep': (
        lambda d: 'keep_freed_memory_mb:=-1', 'keep_freed_memory_mb', 'from 0 to 2047 (0: off), not -1'),
    'freed memory to keep beyond what malloc takes': (
        lambda d: 'keep_freed_memory_mb:=2048', 'keep_freed_memory_mb', 'from 0 to 2047 (0: off), not 2048'),
    'negative concurrency limit': (
        lambda d: 'maximum_concurrent_rpcs:=-1', 'maximum_concurrent_rpcs',
        'must be an integer from 0 (no limit) to 2147483647, not -1'),
    'concurrency limit beyond an int32': (
        lambda d: 'maximum_concurrent_rpcs:=2147483648', 'maximum_concurrent_rpcs',
        'to 2147483647, not 2147483648'),
    'negative diagnostics period': (
        lambda d: 'diagnostics_period:=-1.0', 'diagnostics_period', 'from 0.01 to 3600, not -1.0'),
    'diagnostics every nanosecond': (  # (an idle node published on a core of its own)
        lambda d: 'diagnostics_period:=0.000000001', 'diagnostics_period', 'must be 0 (none) or a number'),
}


@pytest.mark.parametrize('case', list(BAD_PARAMETERS))
def test_bad_parameter_fails_at_startup_naming_it(start_process, socket_dir: Path, case: str) -> None:
    make, parameter, reason = BAD_PARAMETERS[case]
    socket_path = socket_dir / 'bad.sock'
    server = start_process(ros_args('module_name:=bad', f'socket_path:={socket_path}', make(socket_dir)))
    assert server.wait(timeout=30) == EXIT_BAD_PARAMETER, server.log()
    error_lines = [line for line in server.log().splitlines() if 'ERROR' in line]
    assert any(f"parameter '{parameter}'" in line and reason in line for line in error_lines), \
        server.log()
    assert not socket_path.exists()


@pytest.mark.ros
@pytest.mark.parametrize('parameters, kept', [((), 1024), (('keep_freed_memory_mb:=64',), 64),
                                              (('keep_freed_memory_mb:=0',), None)],
                         ids=['default', '64 MiB', 'off'])
def test_ipc_server_node_keeps_freed_memory_as_its_parameter_says(start_process, socket_dir: Path,
                                                                  parameters: tuple[str, ...],
                                                                  kept: int | None) -> None:
    socket_path = socket_dir / 'kept.sock'
    server = start_process(ros_args('module_name:=kept', f'socket_path:={socket_path}', *parameters))
    wait_for(lambda: ' serving ' in server.log(), 30, 'the serving line')
    keeping = [line for line in server.log().splitlines() if 'of freed memory' in line]
    if kept is None:
        assert keeping == [], keeping
    else:
        assert len(keeping) == 1 and f'keeping up to {kept} MiB of freed memory' in keeping[0], keeping


#: A message larger than the 64 MiB heap of a thread's own malloc arena (test_allocator.py).
ABOVE_ARENA_HEAP = 80 << 20


def minor_faults(pid: int) -> int:
    """Page faults of process ``pid`` so far that the kernel served without I/O."""
    return int(Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[7])


@pytest.mark.ros
@pytest.mark.parametrize('method', ['Echo', 'EchoSync'])
def test_ipc_server_node_reuses_freed_memory_for_messages_above_an_arena_heap(
        start_process, ros_environ: dict[str, str], test_protos_dir: Path, echo, socket_dir: Path,
        method: str) -> None:
    """The node's event loop and its ``def`` handlers run in threads of their
    own: with freed memory kept (the default), a message larger than a thread
    arena's heap reuses the server's freed memory instead of faulting in
    fresh pages on every call. The kernel counts the faults; nothing is timed."""
    socket_path = socket_dir / 'large.sock'
    limit = 2 * ABOVE_ARENA_HEAP
    server = start_process(ros_args('module_name:=large', f'socket_path:={socket_path}',
                                    f'max_message_bytes:={limit}', "servicers:=['echo_server:EchoService']"),
                           env=with_test_servers(ros_environ, test_protos_dir))
    server.wait_listening(socket_path)
    request = echo.pb.EchoRequest(payload=os.urandom(ABOVE_ARENA_HEAP))
    with SyncIPCHandler(socket_path, echo.Stub, timeout=60.0, max_message_bytes=limit) as ipc:
        for _ in range(2):  # (the server's heap grows to what a call keeps alive at once)
            ipc.call_method(method, request)
        before = minor_faults(server.pid)
        for _ in range(5):
            assert len(ipc.call_method(method, request).payload) == ABOVE_ARENA_HEAP
        faults = minor_faults(server.pid) - before
    # A call makes five blocks of the message's size in the server; in fresh
    # memory each faults in all its pages (20,480), on every call. Kept
    # memory faults in a page only where the heap grows past its size so far.
    assert faults < 5 * ABOVE_ARENA_HEAP // 4096, faults


def under_open_file_limit(soft: int, command: list[str]) -> list[str]:
    """``command`` started under a soft RLIMIT_NOFILE of ``soft``, the hard one kept."""
    setup = ('import os, resource, sys; hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; '
             f'resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, hard)); os.execv(sys.argv[1], sys.argv[1:])')
    return [sys.executable, '-c', setup, *command]


def test_ipc_server_node_raises_its_open_file_limit_to_what_peers_may_make_it_hold(
        start_process, socket_dir: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    needed = ServerLimits().descriptors_needed(lanes=2)
    expected = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    socket_path = socket_dir / 'nofile.sock'
    server = start_process(under_open_file_limit(
        1024, ros_args('module_name:=nofile', f'socket_path:={socket_path}')))
    wait_for(lambda: ' serving ' in server.log(), 30, 'the serving line')
    limits = Path(f'/proc/{server.pid}/limits').read_text()
    soft_now = next(line.split()[3] for line in limits.splitlines() if line.startswith('Max open files'))
    assert int(soft_now) == expected, limits
    assert f'open-file limit (RLIMIT_NOFILE) raised from 1024 to {expected}' in server.log()
    # Only where the hard limit is below what the server needs does it still warn.
    assert ('may open' in server.log()) == (expected < needed), server.log()


def test_missing_module_name_fails_naming_it(start_process) -> None:
    server = start_process(ros_args())
    assert server.wait(timeout=30) == EXIT_BAD_PARAMETER, server.log()
    assert "parameter 'module_name': is empty" in server.log()


def test_socket_in_use_by_live_server_fails_and_leaves_it(start_process, socket_dir: Path) -> None:
    socket_path = socket_dir / 'taken.sock'
    first = start_process(ros_args('module_name:=first', f'socket_path:={socket_path}'))
    first.wait_listening(socket_path)
    second = start_process(ros_args('module_name:=second', f'socket_path:={socket_path}'))
    assert second.wait(timeout=30) == EXIT_BAD_PARAMETER, second.log()
    assert "parameter 'socket_path'" in second.log()
    assert 'another server is listening' in second.log()
    assert first.running() and is_listening(socket_path)


def test_fast_lane_socket_in_use_fails_naming_its_parameter(start_process, socket_dir: Path) -> None:
    taken = socket_dir / 'fast.sock'
    first = start_process(ros_args('module_name:=first', f'socket_path:={socket_dir / "a.sock"}',
                                   f'ttrpc_socket_path:={taken}'))
    first.wait_listening(taken)
    second = start_process(ros_args('module_name:=second', f'socket_path:={socket_dir / "b.sock"}',
                                    f'ttrpc_socket_path:={taken}'))
    assert second.wait(timeout=30) == EXIT_BAD_PARAMETER, second.log()
    assert "parameter 'ttrpc_socket_path'" in second.log()
    assert not (socket_dir / 'b.sock').exists() and is_listening(taken)


def test_fast_lane_follows_its_parameters(start_process, socket_dir: Path) -> None:
    default = start_process(ros_args('module_name:=lanes', f'socket_path:={socket_dir / "d.sock"}'))
    default.wait_listening(socket_dir / 'd.ttrpc.sock')
    moved = start_process(ros_args('module_name:=lanes', f'socket_path:={socket_dir / "m.sock"}',
                                   f'ttrpc_socket_path:={socket_dir / "fast" / "m.sock"}'))
    moved.wait_listening(socket_dir / 'fast' / 'm.sock')
    off = start_process(ros_args('module_name:=lanes', f'socket_path:={socket_dir / "o.sock"}',
                                 'ttrpc_enabled:=false'))
    off.wait_listening(socket_dir / 'o.sock')
    with SyncIPCHandler(socket_dir / 'o.sock', module_grpc.ModuleServiceStub) as client:
        assert client.call_method('ExecuteCommand', module_pb.CommandRequest(command='ping')).result == 'pong'
        assert client.lane_in_use == 'grpc'
    assert not (socket_dir / 'o.ttrpc.sock').exists()
    for process in (default, moved, off):
        process.signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert sorted(p.name for p in socket_dir.iterdir()) == ['fast']


def test_every_parameter_has_a_value_for_ros2_param_dump(context: Context, spin, start_process,
                                                         socket_dir: Path) -> None:
    """Issue 16: ``ros2 param dump`` printed ``{}``: rclpy answers a
    get_parameters request that names a parameter without a value with
    nothing at all. Asked as ros2 param dump asks (list, then get all)."""
    from rcl_interfaces.msg import ParameterType
    from rcl_interfaces.srv import GetParameters, ListParameters

    name = f'ipc_{uuid.uuid4().hex[:8]}'
    server = start_process(ros_args('module_name:=dump', f'socket_path:={socket_dir / "d.sock"}',
                                    extra=('-r', f'__node:={name}')))
    server.wait_listening(socket_dir / 'd.sock')
    caller = Node('caller', context=context)
    try:
        spinner = spin(caller)

        def call(service: Any, path: str, request: Any) -> Any:
            client = caller.create_client(service, path)
            assert client.wait_for_service(timeout_sec=20), f'{path} did not appear'
            future = client.call_async(request)
            wait_for(future.done, 20, f'an answer from {path}')
            return future.result()

        listed = call(ListParameters, f'/{name}/list_parameters', ListParameters.Request()).result.names
        assert DECLARED_PARAMETERS <= set(listed)
        values = call(GetParameters, f'/{name}/get_parameters', GetParameters.Request(names=listed)).values
        assert len(values) == len(listed)
        by_name = dict(zip(listed, values, strict=True))
        assert all(value.type != ParameterType.PARAMETER_NOT_SET for value in by_name.values())
        assert by_name['module_name'].string_value == 'dump'
        servicers = by_name['servicers']
        assert not servicers.string_array_value and not servicers.byte_array_value
        spinner.stop()
    finally:
        caller.destroy_node()
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0, server.log()



@contextlib.contextmanager
def parameters_of(node_name: str, context: Context, spin: Callable[..., Any]
                  ) -> Iterator[tuple[Any, Callable[[Any], Any]]]:
    """``(client, answer)``: an AsyncParameterClient of ``node_name`` on a
    caller node spun meanwhile, as ``ros2 param`` asks, and ``answer(future)``,
    its result once it came (within 20 s)."""
    from rclpy.parameter_client import AsyncParameterClient

    caller = Node('caller', context=context)
    try:
        spinner = spin(caller)
        try:
            client = AsyncParameterClient(caller, node_name)
            assert client.wait_for_services(timeout_sec=20), f'{node_name} parameter services did not appear'

            def answer(future: Any) -> Any:
                wait_for(future.done, 20, 'an answer')
                return future.result()
            yield client, answer
        finally:
            spinner.stop()
    finally:
        caller.destroy_node()

def test_the_double_parameters_take_integers_and_stay_doubles(context: Context, spin, start_process,
                                                              socket_dir: Path) -> None:
    """Found: rclpy refuses an integer for a DOUBLE parameter, so
    ``-p grace_period:=2`` stopped ipc_server (exit 2) and ``ros2 param set
    /ipc_server grace_period 3`` was refused. Asked through a real parameter
    client, as ``ros2 param`` asks."""
    from rcl_interfaces.msg import ParameterType

    name = f'ipc_{uuid.uuid4().hex[:8]}'
    socket_path = socket_dir / 'ints.sock'
    server = start_process(ros_args('module_name:=ints', f'socket_path:={socket_path}', 'grace_period:=2',
                                    'diagnostics_period:=1', extra=('-r', f'__node:={name}')))
    server.wait_listening(socket_path)
    with parameters_of(f'/{name}', context, spin) as (client, answer):
        values = answer(client.get_parameters(['grace_period', 'diagnostics_period'])).values
        assert [(v.type, v.double_value) for v in values] == [(ParameterType.PARAMETER_DOUBLE, 2.0),
                                                              (ParameterType.PARAMETER_DOUBLE, 1.0)]
        results = answer(client.set_parameters([Parameter('grace_period', value=3),
                                                Parameter('grace_period', value=-1),
                                                Parameter('diagnostics_period', value=5)])).results
        assert results[0].successful, results[0].reason
        assert not results[1].successful and 'grace_period must be a finite number of seconds >= 0' \
            in results[1].reason and 'not -1.0' in results[1].reason
        assert not results[2].successful and 'read-only' in results[2].reason
        (value,) = answer(client.get_parameters(['grace_period'])).values
        assert (value.type, value.double_value) == (ParameterType.PARAMETER_DOUBLE, 3.0)
        descriptors = answer(client.describe_parameters(['grace_period', 'diagnostics_period'])).descriptors
        assert [d.type for d in descriptors] == [ParameterType.PARAMETER_DOUBLE] * 2
        assert not any(d.dynamic_typing for d in descriptors)
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0, server.log()
    assert f'stopping IPC server on {socket_path} (grace 3 s)' in server.log(), server.log()


def test_malformed_ros_argument_fails_with_quoting_hint(start_process) -> None:
    server = start_process(ros_args('module_name:=m', 'servicers:=[a.b:C]'))
    assert server.wait(timeout=30) == EXIT_BAD_PARAMETER, server.log()
    assert 'need YAML quotes' in server.log()


@pytest.mark.parametrize('content', [None, '/**:\n  ros__parameters:\n    grace_period: [1\n'],
                         ids=['missing', 'broken'])
def test_unusable_params_file_fails_without_the_quoting_hint(start_process, tmp_path: Path,
                                                             content: str | None) -> None:
    params = tmp_path / 'params.yaml'
    if content is not None:
        params.write_text(content)
    server = start_process([*IPC_SERVER, '--ros-args', '--params-file', str(params), '-p', 'module_name:=m'])
    assert server.wait(timeout=30) == EXIT_BAD_PARAMETER, server.log()
    assert f"cannot parse the ROS arguments (failed to initialize rcl: Couldn't parse params file: " \
           f"'--params-file {params}'" in server.log(), server.log()
    assert 'quotes' not in server.log(), server.log()


# -- the event-loop thread ----------------------------------------------------------


def test_loop_thread_runs_coroutines_from_other_threads_only() -> None:
    async def on_loop() -> str:
        return threading.current_thread().name

    async def nested() -> None:
        await asyncio.sleep(0)
        loop_thread.run(on_loop())

    with EventLoopThread(name='ipc-test-loop') as loop_thread:
        assert loop_thread.run(on_loop(), timeout=5) == 'ipc-test-loop'
        with pytest.raises(RuntimeError, match='its own loop thread'):
            loop_thread.run(nested(), timeout=5)
    with pytest.raises(RuntimeError, match='not running'):
        loop_thread.submit(on_loop())  # closed, so no "never awaited" warning either


def test_loop_thread_stop_does_not_wait_for_a_stuck_worker() -> None:
    release = threading.Event()
    loop_thread = EventLoopThread(name='ipc-test-stuck')
    loop_thread.start()
    try:
        async def stuck() -> None:
            await asyncio.to_thread(release.wait, 30)

        future = loop_thread.submit(stuck())
        started = time.monotonic()
        loop_thread.stop(timeout=0.5)
        loop_thread.stop()  # idempotent
        assert time.monotonic() - started < 5
        assert future.cancelled()
        assert not loop_thread.is_running
    finally:
        release.set()


def test_a_loop_thread_ended_by_an_escaped_exit_says_so_and_refuses_work_instead_of_hanging(
        caplog: pytest.LogCaptureFixture) -> None:
    async def end_the_loop() -> None:
        asyncio.get_running_loop().call_soon(sys.exit, 4)  # asyncio lets it out of the loop

    loop_thread = EventLoopThread(name='ipc-test-ended')
    loop_thread.start()
    loop_thread.submit(end_the_loop())
    wait_for(lambda: not loop_thread.is_running, 10, 'the loop to end')
    assert isinstance(loop_thread.failure, SystemExit)
    assert any(record.levelname == 'CRITICAL' and 'ipc-test-ended ended' in record.getMessage()
               for record in caplog.records)

    async def anything() -> None:
        pass
    with pytest.raises(RuntimeError, match=r'not running \(it ended: SystemExit\(4\)\)'):
        loop_thread.run(anything(), timeout=None)  # would wait forever for a dead loop
    loop_thread.stop(timeout=30)  # nothing to cancel: returns at once


def test_a_coroutine_waited_for_when_its_loop_ends_fails_instead_of_waiting_for_ever() -> None:
    """Found: run() of a coroutine on a loop that then ended (an escaped
    SystemExit) waited for ever (IPCServerHost.start() on server.start(), say);
    on_failure then runs on the loop's thread."""
    failures: list[BaseException] = []
    loop_thread = EventLoopThread(name='ipc-test-ends-under-a-call', on_failure=failures.append)
    loop_thread.start()
    waiting = threading.Event()

    async def never() -> None:
        waiting.set()
        await asyncio.Event().wait()

    async def end_the_loop() -> None:
        asyncio.get_running_loop().call_soon(sys.exit, 4)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(loop_thread.run, never(), None)
        assert waiting.wait(10)
        loop_thread.submit(end_the_loop())
        with pytest.raises(RuntimeError, match=r"'ipc-test-ends-under-a-call' ended \(SystemExit\(4\)\) before"):
            outcome.result(timeout=30)
    assert [repr(failure) for failure in failures] == ['SystemExit(4)']
    loop_thread.stop(timeout=30)


def end_the_event_loop_of_ipc_server(start_process, ros_environ, test_protos_dir, socket_path: Path,
                                      *also_listening: Path) -> ChildProcess:
    """Start ipc_server serving exiting_server's LoopEnder, make its event loop
    end (an escaped SystemExit(4)) and wait until the process exited."""
    server = start_process(ros_args('module_name:=ender', f'socket_path:={socket_path}',
                                    "servicers:=['exiting_server:LoopEnder']"),
                           env=with_test_servers(ros_environ, test_protos_dir))
    server.wait_listening(socket_path, *also_listening)
    with SyncIPCHandler(socket_path, module_grpc.ModuleServiceStub, timeout=10) as client:
        answer = client.call_method('ExecuteCommand', module_pb.CommandRequest(command='end_loop'))
    assert answer.result == 'ending the loop'
    server.wait(timeout=30)
    return server


def test_ipc_server_exits_nonzero_when_its_event_loop_ends_under_it(
        start_process, ros_environ, test_protos_dir, socket_dir: Path) -> None:
    server = end_the_event_loop_of_ipc_server(start_process, ros_environ, test_protos_dir,
                                              socket_dir / 'ender.sock')
    # Gone with a failure status (a launch file's respawn starts it anew), saying why.
    assert server.popen.returncode == EXIT_SERVER_FAILED, server.log()
    assert "the IPC server's event loop ended (SystemExit(4))" in server.log()


def test_ipc_server_whose_event_loop_ended_removes_both_socket_files(
        start_process, ros_environ, test_protos_dir, socket_dir: Path) -> None:
    """Found: with the loop gone, stop() returned early and both socket files
    stayed behind until the next start replaced them as stale."""
    server = end_the_event_loop_of_ipc_server(start_process, ros_environ, test_protos_dir,
                                              socket_dir / 'ender.sock', socket_dir / 'ender.ttrpc.sock')
    assert server.popen.returncode == EXIT_SERVER_FAILED, server.log()
    assert sorted(path.name for path in socket_dir.iterdir()) == [], server.log()
    assert 'its event loop ended; removing its socket files' in server.log()


# -- in-process: parameters ---------------------------------------------------------


def test_node_declares_exactly_the_parameter_table(context: Context) -> None:
    node = IPCServerNode(context=context)
    try:
        own = set(node.get_parameters_by_prefix('')) - {'use_sim_time', 'start_type_description_service'}
        assert own == DECLARED_PARAMETERS
        for spec in PARAMETERS:
            descriptor = node.describe_parameter(spec.name)
            assert descriptor.description == spec.description and descriptor.description
            assert descriptor.read_only == spec.read_only
            if spec.dynamic_typing:  # servicers: see ParameterSpec
                assert descriptor.dynamic_typing
            else:
                assert descriptor.type == spec.type.value
    finally:
        node.destroy_node()


def test_grace_period_changes_at_runtime_but_socket_path_does_not(context: Context) -> None:
    node = IPCServerNode(context=context)
    try:
        results = node.set_parameters([Parameter('grace_period', value=0.25)])
        assert results[0].successful and node.host.grace_period == 0.25
        results = node.set_parameters([Parameter('grace_period', value=-1.0)])
        assert not results[0].successful and 'grace_period' in results[0].reason
        assert node.host.grace_period == 0.25
        results = node.set_parameters([Parameter('socket_path', value='/tmp/other.sock')])
        assert not results[0].successful and 'read-only' in results[0].reason
    finally:
        node.destroy_node()


def test_a_grace_period_change_that_the_hosting_node_refuses_changes_nothing(context: Context) -> None:
    # The node's own check runs after the host's (rclpy calls the last added
    # first): a set it refuses as a whole must leave the host's grace alone.
    node = Node('arm', context=context)
    node.declare_parameter('speed', 1.0)
    node.add_on_set_parameters_callback(lambda parameters: SetParametersResult(
        successful=all(p.name != 'speed' or p.value <= 10 for p in parameters), reason='speed too high'))
    host = IPCServerHost(node, module_name='arm')
    try:
        result = node.set_parameters_atomically([Parameter('grace_period', value=0.5),
                                                 Parameter('speed', value=99.0)])
        assert not result.successful and result.reason == 'speed too high'
        assert node.get_parameter('grace_period').value == host.grace_period == 5.0
        assert node.set_parameters_atomically([Parameter('grace_period', value=0.5)]).successful
        assert host.grace_period == 0.5
    finally:
        host.close()
        node.destroy_node()


def limit_speed(parameters: list[Parameter[Any]]) -> list[Parameter[Any]]:
    """A hosting node's own pre-set callback, as rclpy's demos write one."""
    return [Parameter('speed', value=min(parameter.value, 10.0)) if parameter.name == 'speed' else parameter
            for parameter in parameters]


@pytest.mark.parametrize('order', ['own-first', 'host-first'])
def test_a_hosting_nodes_own_pre_set_callback_keeps_working_beside_the_host(context: Context,
                                                                           order: str) -> None:
    """Found: rclpy sets what all pre-set callbacks return joined, so the
    host's conversion of integers beside the node's own callback set each
    parameter twice: the limited speed was set back to 99 (host-first), and
    an integer grace_period was refused as no DOUBLE (both orders)."""
    node = Node('arm', context=context)
    node.declare_parameter('speed', 1.0)
    if order == 'own-first':
        node.add_pre_set_parameters_callback(limit_speed)
    host = IPCServerHost(node, module_name='arm')
    if order == 'host-first':
        node.add_pre_set_parameters_callback(limit_speed)
    try:
        (result,) = node.set_parameters([Parameter('speed', value=99.0)])
        assert result.successful and node.get_parameter('speed').value == 10.0
        (result,) = node.set_parameters([Parameter('grace_period', value=2)])
        assert result.successful, result.reason
        assert node.get_parameter('grace_period').value == host.grace_period == 2.0
        result = node.set_parameters_atomically([Parameter('grace_period', value=3), Parameter('speed', value=50.0)])
        assert result.successful, result.reason
        assert (node.get_parameter('grace_period').value, node.get_parameter('speed').value) == (3.0, 10.0)
        assert host.grace_period == 3.0
    finally:
        host.close()
        node.destroy_node()


def test_a_second_declaration_on_one_node_converts_integers_once(context: Context) -> None:
    node = Node('arm', context=context)
    first = IPCServerHost(node, module_name='arm')
    second = IPCServerHost(node, module_name='arm')
    seen: list[list[Parameter[Any]]] = []
    node.add_pre_set_parameters_callback(lambda parameters: seen.append(parameters) or parameters)
    try:
        (result,) = node.set_parameters([Parameter('grace_period', value=4)])
        assert result.successful, result.reason
        assert [[(p.name, p.type_, p.value) for p in parameters] for parameters in seen] == \
            [[('grace_period', Parameter.Type.DOUBLE, 4.0)]]
        assert first.grace_period == second.grace_period == 4.0
    finally:
        first.close()
        second.close()
        node.destroy_node()


@pytest.mark.parametrize('order', ['own-first', 'host-first'])
def test_parameters_set_over_ros_on_a_hosting_node_with_its_own_pre_set_callback(
        context: Context, spin, start_process, ros_environ: dict[str, str], socket_dir: Path,
        order: str) -> None:
    """The same, on a real hosting node, set as ``ros2 param set`` sets them."""
    socket_path = socket_dir / 'limited.sock'
    namespace = f'/t{uuid.uuid4().hex[:8]}'
    node = start_process([sys.executable, str(SERVERS / 'limiting_host.py'), order, '--ros-args',
                          '-r', f'__ns:={namespace}', '-p', f'socket_path:={socket_path}'])
    node.wait_listening(socket_path)
    with parameters_of(f'{namespace}/arm_node', context, spin) as (client, answer):
        results = answer(client.set_parameters([Parameter('speed', value=99.0),
                                                Parameter('grace_period', value=2)])).results
        assert [(r.successful, r.reason) for r in results] == [(True, '')] * 2
        values = answer(client.get_parameters(['speed', 'grace_period'])).values
        assert [v.double_value for v in values] == [10.0, 2.0]
    node.signal(signal.SIGTERM)
    assert node.wait(timeout=30) == 0, node.log()
    assert not socket_path.exists()


@pytest.mark.parametrize('switch, parameter, value, reason', [
    ('ttrpc_enabled', 'ttrpc_socket_path', '/tmp/' + 'y' * 120 + '.sock', 'at most 107 bytes'),
    ('shared_memory_enabled', 'shared_memory_threshold', -1, 'must be >= 0'),
], ids=['fast lane path', 'shared memory threshold'])
def test_a_bad_value_is_refused_while_its_feature_is_off(context: Context, switch: str, parameter: str,
                                                         value: Any, reason: str) -> None:
    # Found: accepted while off, refused only once someone switched it on.
    node = IPCServerNode(context=context, parameter_overrides=[
        Parameter('module_name', value='off'), Parameter(switch, value=False), Parameter(parameter, value=value)])
    try:
        with pytest.raises(ParameterError, match=f"parameter '{parameter}': .*{reason}"):
            read_ipc_config(node)
    finally:
        node.destroy_node()


def test_with_the_fast_lane_off_its_default_path_is_not_checked(context: Context) -> None:
    # A socket_path so long that the default fast-lane path beside it would not fit.
    socket_path = '/tmp/' + 'z' * (107 - len('/tmp/.sock')) + '.sock'
    node = IPCServerNode(context=context, parameter_overrides=[
        Parameter('module_name', value='off'), Parameter('socket_path', value=socket_path),
        Parameter('ttrpc_enabled', value=False)])
    try:
        config = read_ipc_config(node)
        assert config.socket_path == Path(socket_path) and config.ttrpc_socket_path is None
        assert config.shared_memory is None
    finally:
        node.destroy_node()


def test_empty_module_name_and_socket_path_fall_back_to_environment(context: Context) -> None:
    node = IPCServerNode(context=context)
    try:
        config = read_ipc_config(node, environ={'VYRA_MODULE_NAME': 'envmod'})
        assert config.module_name == 'envmod'
        assert config.socket_path == Path('/tmp/envmod_ipc.sock')
        config = read_ipc_config(node, environ={'VYRA_MODULE_NAME': 'envmod',
                                                'VYRA_IPC_SOCKET': '/run/x/env.sock'})
        assert config.socket_path == Path('/run/x/env.sock')
        with pytest.raises(ParameterError, match="parameter 'module_name': is empty"):
            read_ipc_config(node, environ={})
    finally:
        node.destroy_node()


# -- in-process: embedding ----------------------------------------------------------


class CrossService(ModuleService):
    """Commands that wait for the ROS side, and release it."""

    def __init__(self, ros_released: threading.Event, ipc_seen: threading.Event) -> None:
        super().__init__('embedded')
        self.ros_released = ros_released
        self.ipc_seen = ipc_seen
        self.waiting = threading.Event()

    @command('release_ros')
    async def release_ros(self, parameters: dict[str, str]) -> str:
        self.ipc_seen.set()
        return 'released'

    @command('wait_for_ros')
    async def wait_for_ros(self, parameters: dict[str, str]) -> str:
        self.waiting.set()
        # Awaited on the IPC loop: only a ROS callback can set it.
        released = await asyncio.to_thread(self.ros_released.wait, 10)
        return 'ros answered' if released else 'timed out'


class EmbeddingNode(Node):
    """A module node with ROS services and the IPC server inside."""

    def __init__(self, context: Context, socket_path: Path) -> None:
        super().__init__('embedding_module', context=context, parameter_overrides=[
            Parameter('module_name', value='embedded'),
            Parameter('socket_path', value=str(socket_path)),
            Parameter('grace_period', value=1.0),
        ])
        self.ros_released = threading.Event()
        self.ipc_seen = threading.Event()
        self.in_blocking_callback = threading.Event()
        self.service = CrossService(self.ros_released, self.ipc_seen)
        self.create_service(Trigger, 'block_until_ipc', self.block_until_ipc)
        self.create_service(Trigger, 'release_ipc', self.release_ipc)
        self.ipc = host_ipc_server(self, [self.service])

    def block_until_ipc(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        # Holds the only executor thread until an IPC call arrives.
        self.in_blocking_callback.set()
        response.success = self.ipc_seen.wait(10)
        return response

    def release_ipc(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        self.ros_released.set()
        response.success = True
        return response

    def destroy_node(self) -> None:
        self.ipc.close()
        super().destroy_node()


def call_trigger(node: Node, name: str, timeout: float = 20.0) -> Any:
    client = node.create_client(Trigger, name)
    assert client.wait_for_service(timeout_sec=timeout), f'{name} did not appear'
    return client.call_async(Trigger.Request())


def test_ipc_call_is_served_while_ros_callback_blocks_executor(context: Context, spin,
                                                               socket_dir: Path) -> None:
    socket_path = socket_dir / 'embedded.sock'
    module = EmbeddingNode(context, socket_path)
    caller = Node('caller', context=context)
    try:
        spinner = spin(module, caller)
        answer = call_trigger(caller, 'block_until_ipc')
        wait_for(module.in_blocking_callback.is_set, 20, 'the ROS callback to block')
        with SyncIPCHandler(socket_path, module_grpc.ModuleServiceStub, timeout=5.0) as ipc:
            reply = ipc.call_method('ExecuteCommand', module_pb.CommandRequest(command='release_ros'))
        assert reply.result == 'released'
        wait_for(answer.done, 20, 'the ROS callback to return')
        assert answer.result().success
    finally:
        spinner.stop()
        caller.destroy_node()
        module.destroy_node()
    assert not socket_path.exists()


def test_a_sync_handler_made_in_a_nodes_init_before_its_server_heals(
        context: Context, spin, start_server, socket_path: Path, echo) -> None:
    """Issue 16: an rclpy node makes its SyncIPCHandler in ``__init__``, before
    the module's server is up. Its timer's calls fail with an IPCError (which
    the callback catches) while the server is down and succeed once it is up;
    spin never dies."""

    class Frontend(Node):
        def __init__(self) -> None:
            super().__init__('frontend', context=context)
            self.ipc = SyncIPCHandler(socket_path, echo.Stub, timeout=2.0)
            with pytest.raises(IPCError):
                self.ipc.connect()
            self.failures = 0
            self.replies: list[str] = []
            self.create_timer(0.05, self.tick)

        def tick(self) -> None:
            try:
                self.replies.append(self.ipc.call_method('Echo', echo.pb.EchoRequest(text='tick')).text)
            except IPCError:
                self.failures += 1

    node = Frontend()
    try:
        spinner = spin(node)
        wait_for(lambda: node.failures >= 2, 20, 'calls to fail while the server is down')
        start_server(socket_path)
        wait_for(lambda: node.replies, 20, 'a reply once the server is up')
        assert node.replies[0] == 'tick'
        assert spinner.thread.is_alive()
        spinner.stop()
    finally:
        node.ipc.disconnect()
        node.destroy_node()


def test_ros_callback_runs_while_ipc_handler_waits(context: Context, spin, socket_dir: Path) -> None:
    socket_path = socket_dir / 'embedded.sock'
    module = EmbeddingNode(context, socket_path)
    caller = Node('caller', context=context)
    result: dict[str, Any] = {}
    try:
        spinner = spin(module, caller)

        def call_ipc() -> None:
            with SyncIPCHandler(socket_path, module_grpc.ModuleServiceStub, timeout=15.0) as ipc:
                result['reply'] = ipc.call_method(
                    'ExecuteCommand', module_pb.CommandRequest(command='wait_for_ros'))
        ipc_thread = threading.Thread(target=call_ipc)
        ipc_thread.start()
        wait_for(module.service.waiting.is_set, 20, 'the IPC handler to wait')
        answer = call_trigger(caller, 'release_ipc')
        wait_for(answer.done, 20, 'the ROS callback to return')
        ipc_thread.join(timeout=20)
        assert result['reply'].result == 'ros answered'
    finally:
        spinner.stop()
        caller.destroy_node()
        module.destroy_node()


class CallableBridge(ModuleService):
    """An IPC command that calls a ROS 2 Trigger service."""

    def __init__(self) -> None:
        super().__init__('bridge')
        self.caller: ServiceCaller | None = None

    def attach_ipc_host(self, host: IPCServerHost) -> None:
        self.caller = ServiceCaller(host.node.create_client(Trigger, 'callable'))

    @command('callable')
    async def call_callable(self, parameters: dict[str, str]) -> str:
        assert self.caller is not None
        response = await self.caller.call(Trigger.Request(), float(parameters['timeout']))
        return response.message


class CallableNode(Node):
    def __init__(self, context: Context, *, answer: bool = True, busy: float = 0.0) -> None:
        super().__init__('callable_server', context=context)
        self.busy = busy
        self.count = 0
        self.lock = threading.Lock()
        self.answer = answer
        self.release = threading.Event()
        self.create_service(Trigger, 'callable', self.on_call)

    def on_call(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        if not self.answer:
            self.release.wait(10)
        # A server slower than the requests arrive: more than the QoS depth
        # (10) of them would pile up, and ROS 2 would drop the excess.
        time.sleep(self.busy)
        with self.lock:
            self.count += 1
            response.message = f'call {self.count}'
        response.success = True
        return response


@pytest.fixture
def bridge_host(context: Context, spin, socket_dir: Path) -> Iterator[tuple[Node, Path]]:
    node = Node('bridge_module', context=context, parameter_overrides=[
        Parameter('module_name', value='bridge'),
        Parameter('socket_path', value=str(socket_dir / 'bridge.sock')),
        Parameter('grace_period', value=1.0),
    ])
    host = host_ipc_server(node, [CallableBridge()])
    spinner = spin(node)
    try:
        yield node, socket_dir / 'bridge.sock'
    finally:
        spinner.stop()
        host.close()
        node.destroy_node()


@pytest.mark.asyncio
async def test_concurrent_ipc_calls_each_calling_a_busy_ros_service(context: Context, spin,
                                                                    bridge_host) -> None:
    _, socket_path = bridge_host
    server = CallableNode(context, busy=0.005)
    spinner = spin(server)
    calls = 30  # three times the default service QoS depth
    try:
        async with IPCHandler(socket_path, module_grpc.ModuleServiceStub, timeout=30.0) as ipc:
            replies = await asyncio.gather(*(
                ipc.call_method('ExecuteCommand', module_pb.CommandRequest(
                    command='callable', parameters={'timeout': '20'}))
                for _ in range(calls)))
        assert [reply.result for reply in replies if reply.status_code != 0] == []
        assert sorted(reply.result for reply in replies) == \
            sorted(f'call {n}' for n in range(1, calls + 1))
    finally:
        spinner.stop()
        server.destroy_node()


@pytest.mark.asyncio
async def test_ros_service_call_times_out_when_nobody_serves(context: Context, bridge_host) -> None:
    node, _ = bridge_host
    client = node.create_client(Trigger, 'nobody_serves_this')
    with pytest.raises(ServiceUnavailable, match='nobody_serves_this'):
        await call_service(client, Trigger.Request(), timeout=0.2)


@pytest.mark.asyncio
async def test_ros_service_call_times_out_when_server_does_not_answer(context: Context, spin,
                                                                      bridge_host) -> None:
    node, _ = bridge_host
    server = CallableNode(context, answer=False)
    spinner = spin(server)
    client = node.create_client(Trigger, 'callable')
    try:
        await asyncio.to_thread(client.wait_for_service, 20)
        with pytest.raises(ServiceCallTimeout, match='did not answer within 0.3 s'):
            await call_service(client, Trigger.Request(), timeout=0.3)
    finally:
        server.release.set()
        spinner.stop()
        server.destroy_node()


@pytest.mark.asyncio
@pytest.mark.parametrize('timeout, error, message', [
    (float('nan'), ValueError, 'timeout must be a number of seconds, not nan'),
    (None, TypeError, 'timeout must be a number of seconds, not NoneType'),
    ('1', TypeError, 'timeout must be a number of seconds, not str'),
], ids=['nan', 'none', 'text'])
async def test_a_ros_service_call_without_a_number_of_seconds_is_refused_at_once(
        context: Context, timeout: Any, error: type[Exception], message: str) -> None:
    """Found: with a NaN timeout (``float(parameters['timeout'])`` of a
    caller's 'nan') a call to a service that is not there polled for it
    without pause, a core busy for as long as the caller waited."""
    node = Node('bridge_caller', context=context)
    try:
        client = node.create_client(Trigger, 'nobody_serves_this')
        started = time.process_time()
        for call in (lambda: call_service(client, Trigger.Request(), timeout),
                     lambda: ServiceCaller(client).call(Trigger.Request(), timeout)):
            with pytest.raises(error, match=f'^{message}$'):
                await asyncio.wait_for(call(), 5)
        assert time.process_time() - started < 1
    finally:
        node.destroy_node()


@pytest.mark.parametrize('max_in_flight, error', [(1.5, TypeError), (True, TypeError), (0, ValueError)])
def test_service_caller_takes_a_whole_number_of_calls_in_flight(context: Context, max_in_flight: Any,
                                                               error: type[Exception]) -> None:
    # Found: 1.5 was taken, and let two calls in flight.
    node = Node('bridge_caller', context=context)
    try:
        with pytest.raises(error, match='max_in_flight must be'):
            ServiceCaller(node.create_client(Trigger, 'callable'), max_in_flight=max_in_flight)
    finally:
        node.destroy_node()


@pytest.mark.asyncio
async def test_a_ros_service_call_without_a_time_limit_is_answered(context: Context, spin, bridge_host) -> None:
    node, _ = bridge_host
    server = CallableNode(context)
    spinner = spin(server)
    try:
        client = node.create_client(Trigger, 'callable')
        response = await asyncio.wait_for(ServiceCaller(client).call(Trigger.Request(), float('inf')), 20)
        assert response.success
    finally:
        spinner.stop()
        server.destroy_node()


def test_host_reuses_module_name_the_node_declared_itself(context: Context, socket_dir: Path) -> None:
    node = Node('own_params', context=context, parameter_overrides=[
        Parameter('socket_path', value=str(socket_dir / 'own.sock'))])
    node.declare_parameter('module_name', 'own_module')
    host = IPCServerHost(node)
    try:
        host.start()
        assert host.config is not None and host.config.module_name == 'own_module'
        assert is_listening(socket_dir / 'own.sock')
    finally:
        host.close()
        node.destroy_node()
    assert not (socket_dir / 'own.sock').exists()
    assert not host.loop_thread.is_running



def test_a_module_service_the_servicers_parameter_makes_takes_the_modules_name(context: Context,
                                                                               socket_dir: Path) -> None:
    # Made with no arguments, it said "module" in its status and allowed Initialize only
    # share/module/config: the module's own configuration was refused.
    from ament_index_python.packages import get_package_share_directory

    config = Path(get_package_share_directory('vyra_base_ipc')) / 'config' / 'ipc_server.yaml'
    node = Node('named_by_its_host', context=context, parameter_overrides=[
        Parameter('module_name', value='vyra_base_ipc'),  # (a package installed with a config directory)
        Parameter('socket_path', value=str(socket_dir / 'named.sock')),
        Parameter('servicers', value=['vyra_base_ipc.module_service:ModuleService'])])
    host = host_ipc_server(node)
    try:
        with SyncIPCHandler(socket_dir / 'named.sock', module_grpc.ModuleServiceStub) as ipc:
            status = ipc.call_method('ExecuteCommand', module_pb.CommandRequest(command='status'))
            loaded = ipc.call_method('Initialize', module_pb.InitRequest(config_path=str(config)))
    finally:
        host.close()
        node.destroy_node()
    assert json.loads(status.result)['module'] == 'vyra_base_ipc'
    assert loaded.success, loaded.message

def test_host_start_failure_leaves_nothing_running(context: Context, socket_dir: Path) -> None:
    node = Node('failing', context=context, parameter_overrides=[
        Parameter('module_name', value='failing'),
        Parameter('servicers', value=['no_such_module:Nothing'])])
    threads_before = set(threading.enumerate())
    try:
        with pytest.raises(ParameterError, match="parameter 'servicers'"):
            host_ipc_server(node)
    finally:
        node.destroy_node()
    assert {t for t in threading.enumerate() if t.name.startswith('ipc-')} - threads_before == set()


def test_ros_shutdown_then_close_still_stops_server(context: Context, socket_dir: Path) -> None:
    socket_path = socket_dir / 'late.sock'
    node = Node('late_close', context=context, parameter_overrides=[
        Parameter('module_name', value='late'), Parameter('socket_path', value=str(socket_path))])
    host = host_ipc_server(node)
    assert is_listening(socket_path)
    rclpy.shutdown(context=context)
    started = time.monotonic()
    host.close()
    assert not socket_path.exists()
    assert time.monotonic() - started < host.grace_period + 1.0
