"""my_arm end to end: its node (a real ROS 2 process hosting the IPC server)
and its frontend (a real process), on both lanes."""

from __future__ import annotations

from importlib.metadata import distribution
import json
from pathlib import Path
import signal
import subprocess
import sys

from arm_processes import FRAME_BYTES, wait_until
from google.rpc import error_details_pb2
import grpc
from my_arm import arm_pb2
from my_arm.arm_pb2 import FrameRequest, MoveRequest
from my_arm.arm_pb2_grpc import ArmServiceStub
import pytest

from vyra_base_ipc import IPCRemoteError, SyncIPCHandler
from vyra_base_ipc.introspection_pb2 import StatsRequest
from vyra_base_ipc.introspection_pb2_grpc import IntrospectionStub


@pytest.mark.parametrize('lane', ['ttrpc', 'grpc'])
def test_the_frontend_moves_watches_and_fetches_on_either_lane(arm_socket: Path, ros_env: dict[str, str],
                                                              lane: str) -> None:
    frontend = subprocess.run([sys.executable, '-m', 'my_arm.frontend', '--lane', lane],
                              env={**ros_env, 'VYRA_IPC_SOCKET': str(arm_socket)},
                              capture_output=True, text=True, timeout=60)
    assert frontend.returncode == 0, frontend.stdout + frontend.stderr
    lines = [json.loads(line) for line in frontend.stdout.splitlines()]
    assert lines[0] == {'move': 'ready', 'reached': True}
    assert [line['sequence'] for line in lines[1:4]] == [0, 1, 2]
    assert lines[1]['joints'] == [0.0, -0.5, 1.2]
    assert lines[4] == {'frame': [2048, 1024], 'bytes': FRAME_BYTES, 'lane': lane}
    assert lines[5] == {'image': 256 * 4096, 'intact': True}


@pytest.mark.parametrize('lane', ['ttrpc', 'grpc'])
def test_an_unknown_pose_is_invalid_argument_naming_the_known_ones_with_a_bad_request_detail(
        arm_socket: Path, lane: str) -> None:
    with SyncIPCHandler(arm_socket, ArmServiceStub, lane=lane) as arm, \
            pytest.raises(IPCRemoteError) as refused:
        arm.call_method('Move', MoveRequest(pose='dance'))
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown pose 'dance'; known: home, ready, stow" in str(refused.value)
    bad_request = error_details_pb2.BadRequest()
    assert [detail.Unpack(bad_request) for detail in refused.value.status_details] == [True]
    assert [(violation.field, violation.description) for violation in bad_request.field_violations] == [
        ('pose', "'dance' is not one of: home, ready, stow")]


def test_the_camera_frame_travels_as_shared_memory_on_the_fast_lane(arm_socket: Path) -> None:
    with SyncIPCHandler(arm_socket, ArmServiceStub, lane='ttrpc') as arm:
        frame = arm.call_method('GetCameraFrame', FrameRequest())
    assert len(frame.rgb) == FRAME_BYTES and frame.rgb[:3] == bytes([0, 1, 2])
    with SyncIPCHandler(arm_socket, IntrospectionStub, lane='ttrpc') as introspection:
        lanes = {lane.lane: lane for lane in introspection.call_method('GetStats', StatsRequest()).lanes}
    assert lanes['ttrpc'].shared_memory_bytes_sent >= FRAME_BYTES


def test_the_generated_code_has_type_stubs_beside_it() -> None:
    generated = Path(arm_pb2.__file__).parent
    for name in ('arm_pb2.py', 'arm_pb2.pyi', 'arm_pb2_grpc.py'):
        assert (generated / name).is_file(), name


def test_a_node_without_a_module_name_exits_with_the_error_that_says_how_to_set_it(
        ros_env: dict[str, str]) -> None:
    node = subprocess.run([sys.executable, '-m', 'my_arm.arm_node'], env=ros_env,
                          capture_output=True, text=True, timeout=60)
    # run_node logs it and exits 2, as ipc_server does on an unusable parameter.
    assert node.returncode == 2, node.stdout + node.stderr
    assert "parameter 'module_name': is empty on node /arm_node" in node.stderr
    assert 'module_name:=<name>' in node.stderr
    # The failed start leaves nothing half-done behind for destroy_node().
    assert 'Traceback' not in node.stderr, node.stderr


#: Run before the node's entry point: its first ``import grpc`` writes the file
#: $IMPORT_MARK and waits for $IMPORT_RELEASE, so that a signal surely comes while
#: it still imports (rclpy's and gRPC's imports take most of a second).
HOLD_IMPORT = """
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
    """Whether ``signum`` sent to process ``pid`` waits to be delivered (no thread ran its handler yet)."""
    fields = dict(line.split(':', 1) for line in Path(f'/proc/{pid}/status').read_text().splitlines())
    return bool(int(fields['ShdPnd'], 16) & 1 << (signum - 1))


@pytest.mark.parametrize('stop_signal', [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=['SIGINT', 'SIGTERM', 'SIGHUP'])
def test_a_stop_signal_while_the_node_still_imports_ends_it_quietly_with_0(
        ros_env: dict[str, str], tmp_path: Path, socket_dir: Path, stop_signal: signal.Signals) -> None:
    # Found: Ctrl-C in the first ~0.4 s of `ros2 run my_arm arm_node` printed a KeyboardInterrupt
    # traceback and exit status -2; SIGTERM and SIGHUP killed it (-15, -1). A launch stops it so too:
    # module_ipc.launch.py SIGINTs the module's node when ipc_server fails at start beside it.
    # What the console script (ros2 run's executable) runs, as installed.
    (script,) = [entry for entry in distribution('my_arm').entry_points
                 if entry.group == 'console_scripts' and entry.name == 'arm_node']
    run_script = f'import sys; from {script.module} import {script.attr}; sys.exit({script.attr}())'
    mark, release, log = tmp_path / 'importing', tmp_path / 'release', tmp_path / 'arm_node.log'
    socket_path = socket_dir / 'early.sock'
    with open(log, 'wb') as output:
        node = subprocess.Popen([sys.executable, '-c', HOLD_IMPORT + run_script, '--ros-args',
                                 '-p', 'module_name:=early', '-p', f'socket_path:={socket_path}'],
                                env={**ros_env, 'IMPORT_MARK': str(mark), 'IMPORT_RELEASE': str(release)},
                                stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: mark.exists() or node.poll() is not None, 30,
                   lambda: f'no import of grpc:\n{log.read_text()}')
        assert node.poll() is None, log.read_text()
        node.send_signal(stop_signal)
        # Delivered (its handler ran, or it died) before the import goes on: no race with the rest.
        wait_until(lambda: node.poll() is not None or not signal_pending(node.pid, stop_signal), 30,
                   lambda: f'{stop_signal.name} not delivered:\n{log.read_text()}')
        release.touch()
        assert node.wait(timeout=30) == 0, log.read_text()
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
    text = log.read_text()
    assert 'Traceback' not in text, text
    assert f'{stop_signal.name} received while starting: exiting' in text, text
    assert 'serving' not in text and not socket_path.exists(), text
