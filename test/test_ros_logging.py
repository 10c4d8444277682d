"""What the ``ipc_server`` process (and a node's ``main()`` made with
``run_node``) logs goes where a ROS 2 node's messages go:
on /rosout (rqt_console, bags) as children of the node's logger, with the
place in the code that logged, once on the console, and at the level
``--ros-args --log-level`` gives the node. Read by a real /rosout subscriber."""

from __future__ import annotations

import os
from pathlib import Path
import re
import sys
import threading
from typing import Any, Callable

import pytest
from rcl_interfaces.msg import Log
from rclpy.context import Context
from rclpy.node import Node
from rclpy.qos import qos_profile_rosout_default

from conftest import SERVERS, ChildProcess, wait_for, with_test_servers
from ros_env import IPC_SERVER
from vyra_base_ipc import IPCRemoteError, SyncIPCHandler
from vyra_base_ipc._ros_logging import HeldRecords

pytestmark = [pytest.mark.ros]

#: Where the fast lane logs a handler's exception, as a child of the node's logger.
STATUS = 'ipc_server.vyra_base_ipc.ttrpc._status'
FAILED = 'Unexpected [SystemExit] raised by servicer method [/vyra.ipc.test.EchoService/Echo]'


class Rosout:
    """Subscribes to /rosout in the test process (as rqt_console does: its
    history too); keeps every message."""

    def __init__(self, context: Context, spin: Callable[..., Any]) -> None:
        self.node = Node('rosout_reader', context=context)
        self.lock = threading.Lock()
        self.messages: list[Log] = []
        self.node.create_subscription(Log, '/rosout', self._received, qos_profile_rosout_default)
        spin(self.node)

    def _received(self, message: Log) -> None:
        with self.lock:
            self.messages.append(message)

    def found(self, condition: Callable[[Log], bool]) -> list[Log]:
        with self.lock:
            return [message for message in self.messages if condition(message)]

    def wait(self, what: str, condition: Callable[[Log], bool]) -> Log:
        """The first message that meets ``condition`` (30 s at most)."""
        wait_for(lambda: self.found(condition), 30, f'a message on /rosout: {what}')
        return self.found(condition)[0]


@pytest.fixture
def rosout(context: Context, spin: Callable[..., Any]) -> Rosout:
    return Rosout(context, spin)


def start_ipc_server(start_process: Callable[..., ChildProcess], socket_path: Path, environ: dict[str, str],
                     protos: Path, *ros_args: str) -> ChildProcess:
    """``ipc_server`` serving the test's EchoService whose handlers leave by
    ``sys.exit()`` when asked (test/servers/exiting_server.py)."""
    env = {**environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(protos), str(SERVERS),
                                                                   environ.get('PYTHONPATH')]))}
    server = start_process([*IPC_SERVER, '--ros-args', '-p', 'module_name:=arm', '-p', f'socket_path:={socket_path}',
                            '-p', "servicers:=['exiting_server:ExitingEchoService']", *ros_args], env)
    server.wait_listening(socket_path)
    return server


def test_what_ipc_server_logs_is_on_rosout_under_its_node_with_its_place_and_once_on_the_console(
        start_process: Callable[..., ChildProcess], rosout: Rosout, socket_dir: Path,
        ros_environ: dict[str, str], test_protos_dir: Path, echo: Any) -> None:
    socket_path = socket_dir / 'arm_ipc.sock'
    server = start_ipc_server(start_process, socket_path, ros_environ, test_protos_dir)
    rosout.wait('the node says it serves', lambda m: m.name == 'ipc_server' and str(socket_path) in m.msg)
    with SyncIPCHandler(socket_path, echo.Stub, timeout=10, lane='ttrpc') as client:
        with pytest.raises(IPCRemoteError):
            client.call_method('Echo', echo.pb.EchoRequest(text='exit'))
    failed = rosout.wait('the handler that raised', lambda m: FAILED in m.msg)
    assert (failed.name, failed.level, Path(failed.file).name, failed.function) == (
        STATUS, Log.ERROR, '_status.py', 'unexpected'), failed
    assert 'Traceback (most recent call last)' in failed.msg and 'SystemExit: 3' in failed.msg
    # The console has it once, in ROS's format (not once more through Python's own handler).
    wait_for(lambda: FAILED in server.log(), 10, 'the failure on the console')
    assert server.log().count(FAILED) == 1, server.log()
    assert '[ERROR] [' in server.log() and f'[{STATUS}]: {FAILED}' in server.log()
    # At the node's level, INFO: none of the package's debug messages.
    assert not rosout.found(lambda m: m.level == Log.DEBUG and m.name.startswith('ipc_server.vyra_base_ipc'))
    assert server.stop() == 0, server.log()


def test_the_nodes_log_level_lets_the_packages_debug_messages_through(
        start_process: Callable[..., ChildProcess], rosout: Rosout, socket_dir: Path,
        ros_environ: dict[str, str], test_protos_dir: Path) -> None:
    socket_path = socket_dir / 'arm_ipc.sock'
    start_ipc_server(start_process, socket_path, ros_environ, test_protos_dir, '--log-level', 'ipc_server:=debug')
    fast_lane = rosout.wait('the fast lane says it serves (DEBUG)',
                            lambda m: m.name == 'ipc_server.vyra_base_ipc.ttrpc._server' and 'serving' in m.msg)
    assert fast_lane.level == Log.DEBUG, fast_lane


def test_the_nodes_log_level_holds_for_what_it_logs_as_it_stops(
        start_process: Callable[..., ChildProcess], socket_dir: Path, ros_environ: dict[str, str],
        test_protos_dir: Path) -> None:
    # What it logs once it begins to stop goes to stderr alone; at the node's level still
    # (before: the INFO lines of the stop came with --log-level error too).
    socket_path = socket_dir / 'arm_ipc.sock'
    quiet = start_ipc_server(start_process, socket_path, ros_environ, test_protos_dir, '--log-level',
                             'ipc_server:=error')
    assert quiet.stop() == 0, quiet.log()
    assert 'stopping IPC server on' not in quiet.log() and 'ipc_server stopped' not in quiet.log(), quiet.log()
    told = start_ipc_server(start_process, socket_path, ros_environ, test_protos_dir)
    assert told.stop() == 0, told.log()
    assert 'stopping IPC server on' in told.log() and 'ipc_server stopped' in told.log(), told.log()


#: A module's node that hosts its IPC server, its main() made by run_node
#: (as examples/my_arm's), serving the EchoService of exiting_server.py.
HOSTING_NODE = """
import logging
import sys

from exiting_server import ExitingEchoService
from rclpy.node import Node

from vyra_base_ipc.node import host_ipc_server, run_node


class ArmNode(Node):
    def __init__(self):
        super().__init__('arm_node')
        logging.getLogger('my_arm').info('being made')
        self.host = host_ipc_server(self, [ExitingEchoService()], module_name='arm')
        self.timer = self.create_timer(0.01, self.spinning)

    def spinning(self):
        self.timer.cancel()
        logging.getLogger('my_arm').info('spinning')

    def destroy_node(self):
        self.host.close()
        super().destroy_node()


sys.exit(run_node(ArmNode, sys.argv[1:]))
"""


def test_a_node_run_by_run_node_logs_on_rosout_under_its_own_name(
        start_process: Callable[..., ChildProcess], rosout: Rosout, socket_dir: Path,
        ros_environ: dict[str, str], test_protos_dir: Path, echo: Any) -> None:
    socket_path = socket_dir / 'arm_ipc.sock'
    env = with_test_servers(ros_environ, test_protos_dir)
    node = start_process([sys.executable, '-c', HOSTING_NODE, '--ros-args', '-p', f'socket_path:={socket_path}'],
                         env)
    # The module's own Python logging, once it spins (run_node forwards from then on)...
    spinning = rosout.wait('the node spins', lambda m: m.msg == 'spinning')
    assert (spinning.name, spinning.level, spinning.function) == ('arm_node.my_arm', Log.INFO, 'spinning')
    # ...and, passed on once the node existed, what it logged while it was being made.
    made = rosout.wait('the node being made', lambda m: m.msg == 'being made')
    assert (made.name, made.level, made.function) == ('arm_node.my_arm', Log.INFO, '__init__')
    with SyncIPCHandler(socket_path, echo.Stub, timeout=10, lane='ttrpc') as client:
        with pytest.raises(IPCRemoteError):
            client.call_method('Echo', echo.pb.EchoRequest(text='exit'))
    failed = rosout.wait('the handler that raised', lambda m: FAILED in m.msg)
    assert (failed.name, failed.level) == ('arm_node.vyra_base_ipc.ttrpc._status', Log.ERROR), failed
    assert node.stop() == 0, node.log()
    assert node.log().count(FAILED) == 1, node.log()
    # What it logged as it stopped, after it spun, went to stderr (nobody configured logging):
    # before, to logging's last resort, which shows warnings alone.
    assert f'IPC server on {socket_path} stopped' in node.log(), node.log()


#: A node whose making logs, then fails on a parameter.
FAILING_NODE = """
import logging
import sys

from rclpy.node import Node

from vyra_base_ipc.exceptions import ParameterError
from vyra_base_ipc.node import run_node


class ArmNode(Node):
    def __init__(self):
        super().__init__('arm_node')
        logging.getLogger('my_arm').info('quiet: below the level logging had')
        logging.getLogger('my_arm').warning('loud: about to fail')
        raise ParameterError('speed', 'must be positive')


sys.exit(run_node(ArmNode, sys.argv[1:]))
"""


def test_what_a_node_logged_before_it_failed_to_be_made_goes_where_logging_would_have_put_it(
        start_process: Callable[..., ChildProcess]) -> None:
    node = start_process([sys.executable, '-c', FAILING_NODE])
    assert node.wait() == 2, node.log()  # EXIT_BAD_PARAMETER
    log = node.log()
    assert 'loud: about to fail' in log and 'quiet' not in log, log
    assert log.index('loud: about to fail') < log.index("parameter 'speed': must be positive"), log


#: A node whose making logs argv[1] warnings "made N", then (argv[2] 'fail') fails on a parameter.
LOUD_NODE = """
import logging
import sys

from rclpy.node import Node

from vyra_base_ipc.exceptions import ParameterError
from vyra_base_ipc.node import run_node


class ArmNode(Node):
    def __init__(self):
        super().__init__('arm_node')
        for number in range(int(sys.argv[1])):
            logging.getLogger('my_arm').warning('made %d', number)
        if sys.argv[2] == 'fail':
            raise ParameterError('speed', 'must be positive')


sys.exit(run_node(ArmNode, []))
"""


@pytest.mark.parametrize('made', ['made', 'failed'])
def test_a_node_that_logs_more_than_is_held_while_it_is_made_shows_the_first_and_counts_the_rest(
        start_process: Callable[..., ChildProcess], made: str) -> None:
    # What is logged while the node is made is held until it exists (or failed); past the bound,
    # the first records are shown, then how many more there were, whether the node was made or not.
    shown = [f'made {number}' for number in range(HeldRecords.LIMIT)]
    told = '5 more records logged while the node was made are not shown'
    node = start_process([sys.executable, '-c', LOUD_NODE, str(HeldRecords.LIMIT + 5),
                          'fail' if made == 'failed' else 'ok'])
    if made == 'failed':
        assert node.wait() == 2, node.log()  # EXIT_BAD_PARAMETER
    else:
        wait_for(lambda: told in node.log(), 30, 'the count of the records not shown')
        assert node.stop() == 0, node.log()
    log = node.log()
    assert re.findall(r'made \d+$', log, re.MULTILINE) == shown, log[-2000:]
    assert told in log, log[-2000:]
    assert log.index(told) > log.index(f'{shown[-1]}\n'), log[-2000:]
