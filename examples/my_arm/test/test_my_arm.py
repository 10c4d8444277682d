"""my_arm end to end: its node (a real ROS 2 process hosting the IPC server)
and its frontend (a real process), on both lanes."""

from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys

from arm_processes import FRAME_BYTES
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
