"""vyra_base_ipc_build, the helper module packages use to build their own
protos (examples/my_arm builds with it in CI; these are its edges)."""

from __future__ import annotations

from pathlib import Path
import subprocess
import sys

import pytest

from vyra_base_ipc_build import generate_protos, vyra_proto_path


def test_a_proto_importing_ours_compiles_to_importable_code_with_stubs(tmp_path: Path) -> None:
    (tmp_path / 'protos' / 'gripper').mkdir(parents=True)
    (tmp_path / 'protos' / 'gripper' / 'grip.proto').write_text(
        'syntax = "proto3";\npackage gripper;\nimport "vyra_base_ipc/shared_memory.proto";\n'
        'service Gripper { rpc Grip(GripRequest) returns (GripReply); }\n'
        'message GripRequest { vyra.ipc.SharedBufferRef image = 1; }\nmessage GripReply { bool held = 1; }\n')
    assert generate_protos(tmp_path / 'protos', tmp_path / 'out') == ['gripper/grip.proto']
    assert {path.name for path in (tmp_path / 'out' / 'gripper').iterdir()} >= {
        'grip_pb2.py', 'grip_pb2.pyi', 'grip_pb2_grpc.py'}
    probe = ('from gripper import grip_pb2, grip_pb2_grpc; '
             'print(grip_pb2.GripRequest.DESCRIPTOR.fields[0].message_type.full_name, '
             'grip_pb2_grpc.GripperStub.__name__)')
    out = subprocess.run([sys.executable, '-c', probe], cwd=tmp_path / 'out', check=True,
                         capture_output=True, text=True, env={'PYTHONPATH': f'{tmp_path / "out"}:{":".join(sys.path)}'})
    assert out.stdout.split() == ['vyra.ipc.SharedBufferRef', 'GripperStub']


def test_our_protos_are_found(tmp_path: Path) -> None:
    assert (vyra_proto_path() / 'vyra_base_ipc' / 'shared_memory.proto').is_file()


def test_a_directory_without_protos_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f'no .proto file under {tmp_path}'):
        generate_protos(tmp_path, tmp_path / 'out')


def test_a_broken_proto_fails_the_build_naming_it(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (tmp_path / 'broken.proto').write_text('syntax = "proto3";\nmessage Broken { strin name = 1; }\n')
    with pytest.raises(RuntimeError, match=r"protoc failed with status 1 on \['broken.proto'\]"):
        generate_protos(tmp_path, tmp_path / 'out')
    assert '"strin" is not defined' in capfd.readouterr().err
