"""launch_testing description for one launch file of this package, run by
test/test_launch.py with ``launch_test`` where launch_ros is installed.

Environment: VYRA_LAUNCH_FILE (the launch file), VYRA_LAUNCH_MODULE (the
module_name launch argument; the sockets are /tmp/<module>_ipc.sock and, for
the fast lane, /tmp/<module>_ipc.ttrpc.sock), VYRA_LAUNCH_ARGUMENTS (optional:
a JSON object of further launch arguments, e.g. host_ipc, servicers and
params_file), VYRA_LAUNCH_SOCKET (optional: the gRPC socket when the
arguments move it, the fast lane's beside it).
Not collected by pytest itself (the file name does not start with test_).
"""

import json
import os
from pathlib import Path
import time
import unittest

from launch import LaunchDescription
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
import launch_testing.actions
import launch_testing.asserts
import pytest

from vyra_base_ipc import SyncIPCHandler
from vyra_base_ipc import backend_service_pb2 as backend_pb
from vyra_base_ipc import backend_service_pb2_grpc as backend_grpc
from vyra_base_ipc import module_service_pb2 as module_pb
from vyra_base_ipc import module_service_pb2_grpc as module_grpc
from vyra_base_ipc._socket_file import is_listening

MODULE = os.environ['VYRA_LAUNCH_MODULE']
ARGUMENTS = json.loads(os.environ.get('VYRA_LAUNCH_ARGUMENTS', '{}'))
SOCKET = Path(os.environ.get('VYRA_LAUNCH_SOCKET', f'/tmp/{MODULE}_ipc.sock'))
TTRPC_SOCKET = SOCKET.with_suffix('.ttrpc.sock')
LANES = ('grpc', 'ttrpc')


@pytest.mark.launch_test
def generate_test_description() -> LaunchDescription:
    return LaunchDescription([
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(os.environ['VYRA_LAUNCH_FILE']),
            launch_arguments={'module_name': MODULE, **ARGUMENTS}.items()),
        launch_testing.actions.ReadyToTest(),
    ])


class TestModuleIPC(unittest.TestCase):

    def test_module_processes_are_up(self, proc_output) -> None:
        # Also keeps the launch from ending while a node still imports
        # rclpy: SIGINT then would end it with -2 before its main() could
        # catch it (seen in 2 of 9 runs on a real Kilted launch stack).
        proc_output.assertWaitFor(f"IPC server of module '{MODULE}'", timeout=30)
        if ARGUMENTS.get('host_ipc') != 'true':
            proc_output.assertWaitFor('offers /callable', timeout=30)
            proc_output.assertWaitFor(f'(node /{MODULE}_ipc_server)', timeout=30)

    def test_ipc_server_answers_on_both_sockets_from_parameters(self) -> None:
        deadline = time.monotonic() + 30
        while not (is_listening(SOCKET) and is_listening(TTRPC_SOCKET)):
            self.assertLess(time.monotonic(), deadline, f'nobody serves {SOCKET} and {TTRPC_SOCKET}')
            time.sleep(0.05)
        for lane in LANES:
            with SyncIPCHandler(SOCKET, module_grpc.ModuleServiceStub, timeout=5.0, lane=lane) as ipc:
                answer = ipc.call_method('ExecuteCommand', module_pb.CommandRequest(command='ping'))
                self.assertEqual(answer.result, 'pong')
                self.assertEqual(ipc.lane_in_use, lane)

    @unittest.skipUnless('BackendService' in ARGUMENTS.get('servicers', ''), 'no servicers argument')
    def test_servicers_argument_is_served(self) -> None:
        for lane in LANES:
            with SyncIPCHandler(SOCKET, backend_grpc.BackendServiceStub, timeout=10.0, lane=lane) as ipc:
                answer = ipc.call_method('GetStatus', backend_pb.StatusRequest())
                self.assertTrue(answer.status)


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):

    def test_every_process_exited_0(self, proc_info) -> None:
        launch_testing.asserts.assertExitCodes(proc_info)

    def test_both_sockets_removed(self) -> None:
        self.assertFalse(SOCKET.exists())
        self.assertFalse(TTRPC_SOCKET.exists())
