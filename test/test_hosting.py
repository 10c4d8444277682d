"""Hosting the IPC server inside a module's own node, as the README shows it
(section "Hosting the IPC server inside your own node"): where the module's
name comes from (the parameter, then VYRA_MODULE_NAME/MODULE_NAME, then the
default in code) and the error that says how to set it when nothing does.

The node is the README's ``my_module/node.py`` block itself, run as a real
process with ``--ros-args``; its IPC server is asked through a real client.
"""

from __future__ import annotations

import json
from pathlib import Path
import re
import signal
import sys
import threading
from typing import Any, Callable

import pytest
from rclpy.context import Context
from rclpy.node import Node

from conftest import ChildProcess, wait_for
from ros_env import IPC_SERVER, REPO
from vyra_base_ipc import SyncIPCHandler
from vyra_base_ipc import module_service_pb2 as module_pb
from vyra_base_ipc import module_service_pb2_grpc as module_grpc
from vyra_base_ipc.address import default_ttrpc_socket_path
from vyra_base_ipc.node import EXIT_BAD_PARAMETER, IPCServerHost, host_ipc_server

pytestmark = [pytest.mark.ros]

#: What the README gives the node in code.
CODE_DEFAULT = ", module_name='my_module'"


def readme_node_block() -> str:
    """The README's hosting node: the one Python block that creates an IPCServerHost."""
    text = (REPO / 'README.md').read_text()
    found = [code for code in re.findall(r'^```python\n(.*?)^```', text, re.S | re.M)
             if 'IPCServerHost(self' in code]
    assert len(found) == 1, 'the README should have one hosting node block'
    return found[0]


def node_script(tmp_path: Path, *, code_default: bool = True) -> Path:
    """The README block as a script that runs its ``main()``, as its console script would."""
    code = readme_node_block()
    assert CODE_DEFAULT in code
    if not code_default:
        code = code.replace(CODE_DEFAULT, '')
    path = tmp_path / 'my_module_node.py'
    path.write_text(f'{code}\n\nif __name__ == "__main__":\n    raise SystemExit(main())\n')
    return path


@pytest.fixture
def sockets(socket_dir: Path) -> tuple[Path, Path]:
    """Where the node serves: VYRA_IPC_SOCKET (module names then do not move the socket)."""
    socket_path = socket_dir / 'hosted.sock'
    return socket_path, default_ttrpc_socket_path(socket_path)


def start_node(start_process: Callable[..., ChildProcess], ros_environ: dict[str, str],
               sockets: tuple[Path, Path], script: Path, *parameters: str,
               **environ: str) -> ChildProcess:
    env = {**ros_environ, 'VYRA_IPC_SOCKET': str(sockets[0]), **environ}
    command = [sys.executable, str(script)]
    if parameters:
        command += ['--ros-args', *(part for parameter in parameters for part in ('-p', parameter))]
    return start_process(command, env)


def wait_started(node: ChildProcess, sockets: tuple[Path, Path]) -> str:
    """Wait until the node logged its start line (written once start() is
    done, after the sockets appear); return that line."""
    node.wait_listening(*sockets)

    def started() -> bool:
        if not node.running():
            raise AssertionError(f'node exited with {node.popen.returncode}:\n{node.log()}')
        return 'IPC server of module' in node.log()
    wait_for(started, 30, 'the start line')
    return next(line for line in node.log().splitlines() if 'IPC server of module' in line)


def served_module(sockets: tuple[Path, Path]) -> str:
    """The module name the server's ModuleService reports, asked on both lanes."""
    names = set()
    for lane in ('grpc', 'ttrpc'):
        with SyncIPCHandler(sockets[0], module_grpc.ModuleServiceStub, timeout=10.0, lane=lane) as ipc:
            answer = ipc.call_method('ExecuteCommand', module_pb.CommandRequest(command='status'))
            assert ipc.lane_in_use == lane
        assert answer.status_code == 0, answer.result
        names.add(json.loads(answer.result)['module'])
    (name,) = names
    return name


def stop(node: ChildProcess, sockets: tuple[Path, Path]) -> None:
    node.signal(signal.SIGINT)
    assert node.wait(timeout=30) == 0, node.log()
    assert not sockets[0].exists() and not sockets[1].exists(), node.log()
    assert 'Traceback' not in node.log(), node.log()


def module_name_parameter(context: Context, spin: Callable[..., Any], node_name: str) -> str:
    """``ros2 param get /<node_name> module_name``, asked over ROS."""
    from rcl_interfaces.srv import GetParameters

    caller = Node('caller', context=context)
    try:
        spinner = spin(caller)
        client = caller.create_client(GetParameters, f'/{node_name}/get_parameters')
        assert client.wait_for_service(timeout_sec=20), f'/{node_name}/get_parameters did not appear'
        future = client.call_async(GetParameters.Request(names=['module_name']))
        wait_for(future.done, 20, 'the parameter')
        spinner.stop()
        (value,) = future.result().values
        return str(value.string_value)
    finally:
        caller.destroy_node()


def test_readme_node_serves_under_the_default_in_code(start_process, ros_environ: dict[str, str],
                                                       sockets: tuple[Path, Path], tmp_path: Path) -> None:
    node = start_node(start_process, ros_environ, sockets, node_script(tmp_path))
    assert "IPC server of module 'my_module' (node /my_module)" in wait_started(node, sockets)
    assert served_module(sockets) == 'my_module'
    stop(node, sockets)


def test_module_name_parameter_wins_over_environment_and_code(
        start_process, ros_environ: dict[str, str], sockets: tuple[Path, Path], tmp_path: Path) -> None:
    node = start_node(start_process, ros_environ, sockets, node_script(tmp_path), 'module_name:=arm2',
                      VYRA_MODULE_NAME='from_env')
    wait_started(node, sockets)
    assert served_module(sockets) == 'arm2'
    stop(node, sockets)


def test_environment_wins_over_code_and_the_parameter_shows_it(
        start_process, ros_environ: dict[str, str], sockets: tuple[Path, Path], tmp_path: Path,
        context: Context, spin: Callable[..., Any]) -> None:
    node = start_node(start_process, ros_environ, sockets, node_script(tmp_path), MODULE_NAME='gripper')
    wait_started(node, sockets)
    assert served_module(sockets) == 'gripper'
    assert module_name_parameter(context, spin, 'my_module') == 'gripper'
    stop(node, sockets)


def test_ctrl_c_while_starting_leaves_no_socket(start_process, ros_environ: dict[str, str],
                                                sockets: tuple[Path, Path], tmp_path: Path) -> None:
    # SIGINT as soon as the sockets appear: start() is often still running
    # (diagnostics not yet made). Either way the node exits 0 and leaves nothing.
    node = start_node(start_process, ros_environ, sockets, node_script(tmp_path))
    node.wait_listening(*sockets, timeout=30)
    stop(node, sockets)


def test_without_a_module_name_the_error_says_how_to_set_it(
        start_process, ros_environ: dict[str, str], sockets: tuple[Path, Path], tmp_path: Path) -> None:
    node = start_node(start_process, ros_environ, sockets, node_script(tmp_path, code_default=False))
    assert node.wait(timeout=30) == EXIT_BAD_PARAMETER, node.log()
    log = node.log()
    assert ("parameter 'module_name': is empty on node /my_module and neither VYRA_MODULE_NAME nor "
            'MODULE_NAME is set: name the module with the launch argument module_name:=<name>, with '
            '`ros2 run <package> <executable> --ros-args -p module_name:=<name>`, or with '
            'VYRA_MODULE_NAME=<name> in the environment; a node hosting the server can give a default '
            "in code: host_ipc_server(node, module_name='<name>')") in log, log
    # The failed start leaves the node destroyable: rclpy's shutdown closes its host.
    assert 'Traceback' not in log, log
    assert not sockets[0].exists()


def test_ipc_server_without_a_module_name_says_how_to_set_it(start_process) -> None:
    server = start_process([*IPC_SERVER])
    assert server.wait(timeout=30) == EXIT_BAD_PARAMETER, server.log()
    assert ("parameter 'module_name': is empty on node /ipc_server and neither VYRA_MODULE_NAME nor "
            'MODULE_NAME is set: name the module with the launch argument module_name:=<name>') \
        in server.log(), server.log()


def test_invalid_module_name_from_environment_says_where_it_came_from(
        start_process, ros_environ: dict[str, str]) -> None:
    server = start_process([*IPC_SERVER], {**ros_environ, 'MODULE_NAME': 'Arm-1'})
    assert server.wait(timeout=30) == EXIT_BAD_PARAMETER, server.log()
    assert "parameter 'module_name': invalid module name 'Arm-1'" in server.log(), server.log()
    assert '(from MODULE_NAME in the environment)' in server.log(), server.log()


def test_invalid_default_in_code_is_refused_at_once(context: Context) -> None:
    node = Node('bad_default', context=context)
    try:
        with pytest.raises(ValueError, match="invalid module name 'My-Module'"):
            host_ipc_server(node, module_name='My-Module')
        with pytest.raises(ValueError, match="invalid module name 'My-Module'"):
            IPCServerHost(node, module_name='My-Module')
        assert not node.has_parameter('module_name'), 'nothing is declared before the check'
    finally:
        node.destroy_node()


#: Appended to the README node: GetStatus takes 3 s (well within the 5 s grace
#: period) and says when it started; the stop steps are logged.
SLOW_STATUS = """
import logging as _logging
from pathlib import Path as _Path
import time as _time

_logging.basicConfig(level=_logging.INFO)


def _slow_status(self, request, context):
    _Path({started!r}).touch()
    _time.sleep(3)
    return StatusResponse(status='running', uptime_seconds=1.0)


Backend.GetStatus = _slow_status
"""


#: The usual rclpy main() in place of the README's: rclpy's signal handlers,
#: under which a second SIGINT is a KeyboardInterrupt in the middle of the stop.
RCLPY_MAIN = """

def main(args=None) -> int:
    rclpy.init(args=args)
    node = MyModuleNode()
    node.ipc.start()
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
"""


@pytest.mark.parametrize('main', ['readme', 'rclpy-signal-handlers'])
def test_a_second_sigint_while_stopping_does_not_cut_the_grace_period_short(
        start_process, ros_environ: dict[str, str], sockets: tuple[Path, Path], tmp_path: Path, main: str) -> None:
    # A terminal's Ctrl-C under ros2 launch: SIGINT from the terminal, then again from launch.
    # Under rclpy's handlers the second one interrupted IPCServerHost's stop: the call in
    # flight got UNAVAILABLE and the node died with a KeyboardInterrupt traceback.
    from vyra_base_ipc import backend_service_pb2 as backend_pb
    from vyra_base_ipc import backend_service_pb2_grpc as backend_grpc

    script = node_script(tmp_path)
    started = tmp_path / 'call_started'
    code = script.read_text()
    extra = SLOW_STATUS.format(started=str(started)) + (RCLPY_MAIN if main != 'readme' else '')
    script.write_text(code.replace('\n\nif __name__', extra + '\n\nif __name__'))
    node = start_node(start_process, ros_environ, sockets, script)
    wait_started(node, sockets)
    answers: list[Any] = []

    def call() -> None:
        with SyncIPCHandler(sockets[0], backend_grpc.BackendServiceStub, timeout=30.0) as ipc:
            try:
                answers.append(ipc.call_method('GetStatus', backend_pb.StatusRequest()))
            except Exception as error:  # the assertion below shows it
                answers.append(error)

    caller = threading.Thread(target=call)
    caller.start()
    wait_for(started.exists, 30, 'the call in flight')
    node.signal(signal.SIGINT)
    wait_for(lambda: 'stopping IPC server on' in node.log(), 30, 'the stop to begin')
    node.signal(signal.SIGINT)
    caller.join(timeout=60)
    assert not caller.is_alive()
    assert [getattr(answer, 'status', answer) for answer in answers] == ['running'], node.log()
    assert node.wait(timeout=30) == 0, node.log()
    assert 'Traceback' not in node.log(), node.log()
    if main == 'readme':  # (StopSignals: no KeyboardInterrupt at all)
        assert 'KeyboardInterrupt' not in node.log(), node.log()
    assert not sockets[0].exists() and not sockets[1].exists(), node.log()


#: A node whose destroy_node() takes 2 s (after it says so), run by run_node.
SLOW_STOP_NODE = """
import sys
import time
from pathlib import Path

from rclpy.node import Node

from vyra_base_ipc.node import run_node


class SlowStop(Node):
    def __init__(self):
        super().__init__('slow_stop')
        self.get_logger().info('spinning')

    def destroy_node(self):
        Path(sys.argv[1]).touch()
        time.sleep(2)
        print('destroyed', flush=True)
        super().destroy_node()


sys.exit(run_node(SlowStop, sys.argv[2:]))
"""


def test_run_node_stops_once_whatever_signals_arrive_meanwhile(start_process, tmp_path: Path) -> None:
    # demo_module_node's and my_arm's main(): SIGINT, then SIGINT and SIGTERM while the node is destroyed.
    stopping = tmp_path / 'stopping'
    node = start_process([sys.executable, '-c', SLOW_STOP_NODE, str(stopping), '--ros-args', '-r', '__ns:=/t'])
    wait_for(lambda: 'spinning' in node.log() or not node.running(), 30, 'the node to spin')
    node.signal(signal.SIGINT)
    wait_for(stopping.exists, 30, 'destroy_node()')
    node.signal(signal.SIGINT)
    node.signal(signal.SIGTERM)
    assert node.wait(timeout=30) == 0, node.log()
    assert 'destroyed' in node.log() and 'Traceback' not in node.log(), node.log()
