"""The README's "Your own module" walk-through, run as written: copy the
example module, rename it, build it with colcon against this package, and
use the code generated from its own proto."""

from __future__ import annotations

import os
from pathlib import Path
import re
import shutil
import subprocess
import sys

import pytest

REPO = Path(__file__).resolve().parent.parent


def walkthrough() -> list[str]:
    """The commands of the README's first bash block under "Your own module"."""
    readme = (REPO / 'README.md').read_text()
    section = readme[readme.index('### Your own module'):]
    block = re.search(r'```bash\n(.*?)```', section, re.S)
    assert block is not None, 'no bash block in "Your own module"'
    return [line.split('  #')[0].strip() for line in block.group(1).splitlines() if line.strip()]


def build_as_the_readme_says(home: Path) -> tuple[Path, dict[str, str]]:
    """Run the walkthrough up to and including its colcon build, with ``home``
    as ~; return the workspace and the environment it ran in."""
    if shutil.which('colcon') is None and not (Path(sys.executable).parent / 'colcon').exists():
        pytest.skip('colcon is not installed in this environment')
    commands = walkthrough()
    assert commands[0].startswith('cp -r examples/my_arm ~/ws/src/my_gripper')
    build = next(index for index, command in enumerate(commands) if command.startswith('cd ~/ws && colcon build'))
    # Everything up to and including the build (the ros2 CLI is not installed
    # here; examples/my_arm's own tests run its node and frontend).
    script = ' && '.join(['set -e', 'mkdir -p ~/ws/src', f'cd {REPO}', *commands[:build + 1]])
    # As in a developer's shell: tools/test.sh sets PYTHONSAFEPATH for its own colcon test, users do not.
    env = {name: value for name, value in os.environ.items() if name != 'PYTHONSAFEPATH'}
    env['HOME'] = str(home)
    result = subprocess.run(['bash', '-c', script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return home / 'ws', env


def test_the_copied_example_builds_and_its_own_proto_is_importable(tmp_path: Path) -> None:
    workspace, env = build_as_the_readme_says(tmp_path)
    probe = ('from my_gripper import arm_pb2, arm_pb2_grpc; from my_gripper.arm_service import ArmService; '
             'print(arm_pb2.DESCRIPTOR.package, arm_pb2_grpc.ArmServiceStub.__name__, '
             'arm_pb2.ImageRequest.DESCRIPTOR.fields[0].message_type.full_name)')
    out = subprocess.run(['bash', '-c', f'source install/setup.bash && {sys.executable} -c "{probe}"'],
                         cwd=workspace, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split() == ['my_gripper', 'ArmServiceStub', 'vyra.ipc.SharedBufferRef']
    installed = workspace / 'install' / 'my_gripper' / 'share' / 'my_gripper'
    assert (installed / 'launch' / 'my_gripper.launch.py').is_file()
    assert (installed / 'protos' / 'my_gripper' / 'arm.proto').is_file()


def test_colcon_test_of_the_copied_example_imports_the_installed_package(tmp_path: Path) -> None:
    # colcon test runs `python -m pytest` in the package's source directory, where there is no generated code.
    workspace, env = build_as_the_readme_says(tmp_path)
    selected = 'test_a_node_without_a_module_name or test_the_generated_code_has_type_stubs'  # in and out of process
    result = subprocess.run(
        ['bash', '-c', 'source install/setup.bash && colcon test --return-code-on-test-failure '
                       f'--event-handlers console_direct+ --pytest-args -k "{selected}"'],
        cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r'=+ 2 passed, \d+ deselected in', result.stdout), result.stdout
