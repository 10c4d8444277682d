"""The IPC server's status on /diagnostics (diagnostic_msgs/DiagnosticArray),
as rqt_robot_monitor shows it: from a real ``ipc_server`` process and from
a real module node that hosts its server, read by a real subscriber."""

from __future__ import annotations

from pathlib import Path
import signal
import sys
import threading
from typing import Any, Callable

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
import grpc
import pytest
from rclpy.context import Context
from rclpy.node import Node

from conftest import SERVERS, ChildProcess, wait_for, with_test_servers
from ros_env import IPC_SERVER
from vyra_base_ipc import IPCError, IPCRemoteError, SyncIPCHandler
from vyra_base_ipc import backend_service_pb2 as backend_pb
from vyra_base_ipc import backend_service_pb2_grpc as backend_grpc
from vyra_base_ipc import module_service_pb2 as module_pb
from vyra_base_ipc import module_service_pb2_grpc as module_grpc
from vyra_base_ipc.node import EXIT_SERVER_FAILED, IPCServerHost

pytestmark = [pytest.mark.ros]


class Monitor:
    """Subscribes to /diagnostics in the test process; keeps every status."""

    def __init__(self, context: Context, spin: Callable[..., Any]) -> None:
        self.node = Node('monitor', context=context)
        self.lock = threading.Lock()
        self.statuses: list[DiagnosticStatus] = []
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._received, 10)
        spin(self.node)

    def _received(self, array: DiagnosticArray) -> None:
        with self.lock:
            self.statuses.extend(array.status)

    def mark(self) -> int:
        """Where the statuses received from now on begin."""
        with self.lock:
            return len(self.statuses)

    def found(self, name: str, condition: Callable[[DiagnosticStatus], bool], since: int
              ) -> list[DiagnosticStatus]:
        """The statuses of ``name`` received since ``since`` that meet ``condition``."""
        with self.lock:
            return [status for status in self.statuses[since:] if status.name == name and condition(status)]

    def wait(self, name: str, what: str, condition: Callable[[DiagnosticStatus], bool],
             timeout: float = 30.0) -> DiagnosticStatus:
        """The first status of ``name`` received from now on that meets ``condition``."""
        since = self.mark()
        wait_for(lambda: self.found(name, condition, since), timeout,
                 f'a status of {name!r} on /diagnostics: {what}')
        return self.found(name, condition, since)[0]


@pytest.fixture
def monitor(context: Context, spin: Callable[..., Any]) -> Monitor:
    return Monitor(context, spin)


def values(status: DiagnosticStatus) -> dict[str, str]:
    return {item.key: item.value for item in status.values}


def fail_until(monitor: Monitor, since: int, condition: Callable[[DiagnosticStatus], bool], what: str,
               call: Callable[[], object], code: grpc.StatusCode) -> DiagnosticStatus:
    """Make calls that fail with ``code`` (``call()``), five at a time, until
    ``ipc_server`` publishes a status meeting ``condition`` (received since
    ``since``: the calls keep coming until a period with them is reported); that status."""
    def failing() -> bool:
        for _ in range(5):
            with pytest.raises(IPCRemoteError) as failed:
                call()
            assert failed.value.code == code
        return bool(monitor.found('ipc_server: IPC server', condition, since))
    wait_for(failing, 30, f'{what} on /diagnostics')
    return monitor.found('ipc_server: IPC server', condition, since)[0]


def start_ipc_server(start_process: Callable[..., ChildProcess], socket_path: Path, *parameters: str
                     ) -> ChildProcess:
    args = [*IPC_SERVER, '--ros-args', '-p', 'module_name:=arm', '-p', f'socket_path:={socket_path}',
            '-p', 'diagnostics_period:=0.2']
    for parameter in parameters:
        args += ['-p', parameter]
    server = start_process(args)
    server.wait_listening(socket_path)
    return server


def test_ipc_server_publishes_ok_with_its_lanes_calls_and_latency(
        start_process: Callable[..., ChildProcess], monitor: Monitor, socket_dir: Path) -> None:
    socket_path = socket_dir / 'arm_ipc.sock'
    start_ipc_server(start_process, socket_path)
    first = monitor.wait('ipc_server: IPC server', 'OK', lambda s: s.level == DiagnosticStatus.OK)
    assert first.hardware_id == 'arm' and first.message == 'serving'
    assert values(first)['socket_path'] == str(socket_path)
    assert values(first)['ttrpc_socket_path'].endswith('arm_ipc.ttrpc.sock')
    with SyncIPCHandler(socket_path, module_grpc.ModuleServiceStub, timeout=10) as client:
        for _ in range(20):
            assert client.call_method('ExecuteCommand', module_pb.CommandRequest(command='ping')).result == 'pong'
        busy = monitor.wait('ipc_server: IPC server', 'calls', lambda s: float(values(s)['calls/s']) > 0)
        assert busy.level == DiagnosticStatus.OK
        assert int(values(busy)['ttrpc connections']) >= 1
        assert float(values(busy)['p99 ms']) >= float(values(busy)['p50 ms']) > 0
        assert values(busy)['handler threads busy'].startswith('0/')
        assert values(busy)['refused/s'] == '0.0'


def test_many_calls_failing_in_the_server_turn_the_status_to_warn(
        start_process: Callable[..., ChildProcess], monitor: Monitor, socket_dir: Path) -> None:
    """A method the server does not have answers UNIMPLEMENTED: a server error."""
    socket_path = socket_dir / 'arm_ipc.sock'
    start_ipc_server(start_process, socket_path)
    monitor.wait('ipc_server: IPC server', 'OK', lambda s: s.level == DiagnosticStatus.OK)
    since = monitor.mark()

    def warn(status: DiagnosticStatus) -> bool:
        return status.level == DiagnosticStatus.WARN

    with SyncIPCHandler(socket_path, backend_grpc.BackendServiceStub, timeout=10) as client:
        warned = fail_until(monitor, since, warn, 'a WARN status',
                            lambda: client.call_method('GetStatus', backend_pb.StatusRequest()),
                            grpc.StatusCode.UNIMPLEMENTED)
    assert 'calls failed in the server' in warned.message
    assert float(values(warned)['errors/s']) > 0


def test_answers_that_are_the_callers_errors_leave_the_status_ok(
        start_process: Callable[..., ChildProcess], monitor: Monitor, socket_dir: Path) -> None:
    """NOT_FOUND for a key nobody registered (as CANCELLED for a caller that
    left) answers the caller: counted in errors/s, no sign of trouble in the server."""
    socket_path = socket_dir / 'arm_ipc.sock'
    start_ipc_server(start_process, socket_path)
    monitor.wait('ipc_server: IPC server', 'OK', lambda s: s.level == DiagnosticStatus.OK)
    since = monitor.mark()

    def with_errors(status: DiagnosticStatus) -> bool:
        return float(values(status).get('errors/s', '0')) > 0

    with SyncIPCHandler(socket_path, module_grpc.ModuleServiceStub, timeout=10) as client:
        fail_until(monitor, since, with_errors, 'a period with errors',
                   lambda: client.call_method('GetData', module_pb.DataRequest(key='no such key')),
                   grpc.StatusCode.NOT_FOUND)
    counted = monitor.found('ipc_server: IPC server', with_errors, since)
    assert all(status.level == DiagnosticStatus.OK for status in counted), [s.message for s in counted]
    assert all(status.message == 'serving' for status in counted)


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_calls_refused_at_maximum_concurrent_rpcs_turn_the_status_to_warn(
        start_process: Callable[..., ChildProcess], monitor: Monitor, socket_dir: Path,
        ros_environ: dict[str, str], test_protos_dir: Path, echo: Any, lane: str) -> None:
    """A server shedding load says so: before, its refusals were counted
    nowhere, and the status stayed OK "serving" with fewer calls/s."""
    socket_path = socket_dir / 'arm_ipc.sock'
    env = with_test_servers(ros_environ, test_protos_dir)
    server = start_process([*IPC_SERVER, '--ros-args', '-p', 'module_name:=arm', '-p', f'socket_path:={socket_path}',
                            '-p', 'diagnostics_period:=0.2', '-p', 'maximum_concurrent_rpcs:=1',
                            '-p', 'grace_period:=0.5', '-p', "servicers:=['slow_servicer:SlowEchoService']"], env)
    server.wait_listening(socket_path)
    monitor.wait('ipc_server: IPC server', 'OK', lambda s: s.level == DiagnosticStatus.OK)
    since = monitor.mark()

    def warn(status: DiagnosticStatus) -> bool:
        return status.level == DiagnosticStatus.WARN

    with SyncIPCHandler(socket_path, echo.Stub, timeout=60, lane=lane) as client:
        outcome: list[BaseException] = []

        def hold() -> None:  # the one call the lane takes, until the server stops
            while True:
                try:
                    client.call_method('Sleep', echo.pb.SleepRequest(seconds=60), timeout=30)
                    return
                except IPCError as error:
                    # (On the gRPC lane connect()'s probe frees its slot a
                    # moment after its answer: the first call may find it taken.)
                    if error.details != 'Concurrent RPC limit exceeded!':
                        outcome.append(error)
                        return
        held = threading.Thread(target=hold, daemon=True)
        held.start()
        calls = Path(f'{socket_path}.calls')
        wait_for(lambda: calls.exists() and 'Sleep' in calls.read_text().split(), 20, 'Sleep in flight')

        warned = fail_until(monitor, since, warn, 'a WARN status',
                            lambda: client.call_method('Echo', echo.pb.EchoRequest(text='shed'), timeout=10),
                            grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert 'calls refused at maximum_concurrent_rpcs or max_concurrent_streams' in warned.message
        assert float(values(warned)['refused/s']) > 0
        server.signal(signal.SIGTERM)  # (ends the held call)
        assert server.wait(timeout=30) == 0, server.log()
        held.join(timeout=30)
        assert not held.is_alive() and outcome, outcome


def test_an_event_loop_held_by_a_handler_turns_the_status_to_error_until_it_runs_again(
        start_process: Callable[..., ChildProcess], monitor: Monitor, socket_dir: Path,
        ros_environ: dict[str, str], test_protos_dir: Path, echo: Any) -> None:
    """Found: an ``async def`` handler blocking the loop for 6 s left the status
    OK "serving" throughout, while every other call on either lane timed out."""
    socket_path = socket_dir / 'arm_ipc.sock'
    env = with_test_servers(ros_environ, test_protos_dir)
    server = start_process([*IPC_SERVER, '--ros-args', '-p', 'module_name:=arm', '-p', f'socket_path:={socket_path}',
                            '-p', 'diagnostics_period:=0.2', '-p', "servicers:=['loop_blocker:LoopBlocker']"], env)
    server.wait_listening(socket_path)
    # (The first status may come before the first callback handed to the loop has run.)
    ok = monitor.wait('ipc_server: IPC server', 'OK with a loop delay',
                      lambda s: s.level == DiagnosticStatus.OK and 'event loop delay ms' in values(s))
    assert float(values(ok)['event loop delay ms']) >= 0  # a callback ran on the loop
    since = monitor.mark()
    with SyncIPCHandler(socket_path, echo.Stub, timeout=30) as client:
        blocked = threading.Thread(target=client.call_method, args=('Sleep', echo.pb.SleepRequest(seconds=2.5)),
                                   daemon=True)
        blocked.start()
        stalled = monitor.wait('ipc_server: IPC server', 'ERROR',
                               lambda s: s.level == DiagnosticStatus.ERROR, timeout=10)
        assert stalled.message.startswith('event loop not responding for '), stalled.message
        assert values(stalled)['in flight'] == '1'
        blocked.join(timeout=30)
        assert not blocked.is_alive()
        monitor.wait('ipc_server: IPC server', 'OK again', lambda s: s.level == DiagnosticStatus.OK, timeout=10)
        assert client.call_method('Echo', echo.pb.EchoRequest(text='after')).text == 'after'
    before = monitor.found('ipc_server: IPC server', lambda s: True, since)
    first_error = next(i for i, s in enumerate(before) if s.level == DiagnosticStatus.ERROR)
    assert all(s.level == DiagnosticStatus.OK for s in before[:first_error])


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_ipc_server_says_error_on_diagnostics_as_a_signal_stops_it(
        start_process: Callable[..., ChildProcess], monitor: Monitor, socket_dir: Path, signum: int) -> None:
    """rqt_robot_monitor shows the server stopped, not its last OK until it goes stale."""
    socket_path = socket_dir / 'arm_ipc.sock'
    server = start_ipc_server(start_process, socket_path)
    monitor.wait('ipc_server: IPC server', 'OK', lambda s: s.level == DiagnosticStatus.OK)
    since = monitor.mark()
    server.signal(signum)
    assert server.wait() == 0
    wait_for(lambda: monitor.found('ipc_server: IPC server', lambda s: s.level == DiagnosticStatus.ERROR, since),
             10, 'the last status: ERROR')
    assert monitor.found('ipc_server: IPC server', lambda s: True, since)[-1].message == 'not serving'


def test_ipc_server_says_error_as_soon_as_it_begins_to_stop_not_after_the_grace_period(
        start_process: Callable[..., ChildProcess], monitor: Monitor, socket_dir: Path,
        ros_environ: dict[str, str], test_protos_dir: Path, echo: Any) -> None:
    """Found: with a call in flight, the last status for the whole grace
    period was OK "serving" (the executor stops spinning first, and with it
    the timer), while the socket was gone and new calls were refused."""
    socket_path = socket_dir / 'arm_ipc.sock'
    env = with_test_servers(ros_environ, test_protos_dir)
    server = start_process([*IPC_SERVER, '--ros-args', '-p', 'module_name:=arm', '-p', f'socket_path:={socket_path}',
                            '-p', 'diagnostics_period:=0.2', '-p', 'grace_period:=2.0',
                            '-p', "servicers:=['slow_servicer:SlowEchoService']"], env)
    server.wait_listening(socket_path)
    monitor.wait('ipc_server: IPC server', 'OK', lambda s: s.level == DiagnosticStatus.OK)
    with SyncIPCHandler(socket_path, echo.Stub, timeout=30) as client:
        held = threading.Thread(target=lambda: pytest.raises(IPCError, client.call_method, 'Sleep',
                                                             echo.pb.SleepRequest(seconds=30)), daemon=True)
        held.start()
        calls = Path(f'{socket_path}.calls')
        wait_for(lambda: calls.exists() and 'Sleep' in calls.read_text().split(), 20, 'Sleep in flight')
        since = monitor.mark()
        server.signal(signal.SIGTERM)
        stopping = monitor.wait('ipc_server: IPC server', 'ERROR', lambda s: s.level == DiagnosticStatus.ERROR)
        assert held.is_alive()  # within the grace period: the call it gives time to is still in flight
        assert stopping.message == 'stopping: calls in flight get 2 s, new calls are refused'
        assert server.wait(timeout=30) == 0, server.log()
        held.join(timeout=30)
    statuses = monitor.found('ipc_server: IPC server', lambda s: True, since)
    assert [s.message for s in statuses if s.level != DiagnosticStatus.OK] == [stopping.message, 'not serving']
    assert statuses[-1].message == 'not serving'


def test_ipc_server_whose_event_loop_ended_says_error_not_ok(
        start_process: Callable[..., ChildProcess], monitor: Monitor, socket_dir: Path,
        ros_environ: dict[str, str], test_protos_dir: Path) -> None:
    """Found: a server whose loop ended still counted as serving: the status
    published as ipc_server exited was OK "serving"."""
    socket_path = socket_dir / 'arm_ipc.sock'
    env = with_test_servers(ros_environ, test_protos_dir)
    server = start_process([*IPC_SERVER, '--ros-args', '-p', 'module_name:=arm', '-p', f'socket_path:={socket_path}',
                            '-p', 'diagnostics_period:=0.2', '-p', "servicers:=['exiting_server:LoopEnder']"], env)
    server.wait_listening(socket_path)
    monitor.wait('ipc_server: IPC server', 'OK', lambda s: s.level == DiagnosticStatus.OK)
    with SyncIPCHandler(socket_path, module_grpc.ModuleServiceStub, timeout=10) as client:
        client.call_method('ExecuteCommand', module_pb.CommandRequest(command='end_loop'))
    since = monitor.mark()
    assert server.wait(timeout=30) == EXIT_SERVER_FAILED, server.log()
    wait_for(lambda: monitor.found('ipc_server: IPC server', lambda s: s.level == DiagnosticStatus.ERROR, since),
             10, 'the last status: ERROR')
    last = monitor.found('ipc_server: IPC server', lambda s: True, since)[-1]
    assert last.level == DiagnosticStatus.ERROR and last.message == 'event loop ended: SystemExit(4)', last


def test_a_hosting_node_whose_server_loop_ended_removes_its_socket_files_at_once(
        start_process: Callable[..., ChildProcess], monitor: Monitor, socket_dir: Path,
        ros_environ: dict[str, str], test_protos_dir: Path) -> None:
    """Found: a node that hosts its server lives on when the server's loop
    ends; its socket files stayed (clients found a socket nobody answered)
    until the node closed its host."""
    socket_path = socket_dir / 'arm_ipc.sock'
    env = with_test_servers(ros_environ, test_protos_dir)
    node = start_process([sys.executable, str(SERVERS / 'diagnostics_host.py'), '--ros-args',
                          '-p', 'module_name:=arm', '-p', f'socket_path:={socket_path}',
                          '-p', 'diagnostics_period:=0.2', '-p', "servicers:=['exiting_server:LoopEnder']"], env)
    node.wait_listening(socket_path, socket_dir / 'arm_ipc.ttrpc.sock')
    with SyncIPCHandler(socket_path, module_grpc.ModuleServiceStub, timeout=10) as client:
        client.call_method('ExecuteCommand', module_pb.CommandRequest(command='end_loop'))
    wait_for(lambda: not any(socket_dir.iterdir()), 30, 'both socket files to go')
    ended = monitor.wait('arm_node: IPC server', 'ERROR', lambda s: s.level == DiagnosticStatus.ERROR)
    assert ended.message == 'event loop ended: SystemExit(4)'
    assert node.running()  # the node lives on and says so


def test_a_hosting_node_reports_error_when_its_server_stops_serving(
        start_process: Callable[..., ChildProcess], monitor: Monitor, socket_dir: Path) -> None:
    socket_path = socket_dir / 'arm_ipc.sock'
    node = start_process([sys.executable, str(SERVERS / 'diagnostics_host.py'), '--ros-args',
                          '-p', 'module_name:=arm', '-p', f'socket_path:={socket_path}',
                          '-p', 'diagnostics_period:=0.2'])
    node.wait_listening(socket_path)
    monitor.wait('arm_node: IPC server', 'OK', lambda s: s.level == DiagnosticStatus.OK)
    node.signal(signal.SIGUSR1)
    stopped = monitor.wait('arm_node: IPC server', 'ERROR "not serving"',
                           lambda s: s.level == DiagnosticStatus.ERROR and s.message == 'not serving')
    assert values(stopped)['socket_path'] == str(socket_path)
    assert 'IPC server stopped on request' in node.log()
    assert node.running()  # the node lives on and keeps saying so


def test_diagnostics_period_zero_publishes_nothing(context: Context, socket_dir: Path) -> None:
    from rclpy.parameter import Parameter

    node = Node('quiet', context=context, parameter_overrides=[
        Parameter('module_name', value='quiet'), Parameter('socket_path', value=str(socket_dir / 'q.sock')),
        Parameter('diagnostics_period', value=0.0)])
    host = IPCServerHost(node)
    try:
        host.start()
        assert host.diagnostics is None
        assert node.count_publishers('/diagnostics') == 0
    finally:
        host.close()
        node.destroy_node()
