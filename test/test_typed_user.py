"""The public API as a typed user sees it: a module package's code (my_arm's
protos, generated as its build generates them, installed with ``py.typed``)
checked with ``mypy --strict`` against this package as installed.

Each user file is checked whole: ``assert_type`` states what a name must be,
and a line ending in ``# error: [code]`` must be reported with that code;
any other report fails the test. So an ``Any`` where the type is known, a
misuse that type checkers let through, or an import path without types
shows up here, before a user finds it."""

from __future__ import annotations

import os
from pathlib import Path
import re
import subprocess
import sys
from types import ModuleType

import pytest

import vyra_base.com.handler.ipc as documented
import vyra_base_ipc
import vyra_base_ipc_build

ROOT = Path(__file__).resolve().parent.parent
MY_ARM_PROTOS = ROOT / 'examples' / 'my_arm' / 'protos'

HEADER = """\
from __future__ import annotations

from typing import Any

from typing_extensions import assert_type

from my_arm.arm_pb2 import (CameraFrame, FrameRequest, ImageRequest, ImageStats, JointState, MoveReply,
                            MoveRequest, WatchRequest)
from my_arm.arm_pb2_grpc import ArmServiceServicer, ArmServiceStub
"""

USER_FILES = {
    # A frontend (FastAPI, a worker): the asyncio client on the module's own stub.
    'frontend': """
from vyra_base_ipc import IPCHandler, SharedBuffer, SharedBufferRef


async def frontend() -> ImageStats:
    async with IPCHandler(module_name='my_arm', service_stub=ArmServiceStub) as arm:
        assert_type(arm, IPCHandler)
        moved = await arm.call_method('Move', MoveRequest(pose='ready'), response_type=MoveReply)
        assert_type(moved, MoveReply)
        async for state in arm.stream_method('WatchJoints', WatchRequest(count=3), response_type=JointState,
                                             timeout=None, idle_timeout=1.0):
            assert_type(state, JointState)
        with SharedBuffer.copy_from(bytes(1024)) as image:
            assert_type(image.ref, SharedBufferRef)
            return await arm.call_method('InspectImage', ImageRequest(image=image.ref), buffers=[image],
                                         response_type=ImageStats)
""",
    # A servicer answering with shared memory, as the README shows it.
    'servicer': """
from vyra_base_ipc import SharedBuffer, attach_buffers, received_buffer, shared_buffer


class Arm(ArmServiceServicer):
    def InspectImage(self, request: ImageRequest, context: Any) -> ImageStats:
        image = shared_buffer(request.image, context)
        assert_type(image, memoryview)
        return attach_buffers(context, ImageStats(size=len(image)), received_buffer(request.image, context))

    async def GetCameraFrame(self, request: FrameRequest, context: Any) -> CameraFrame:
        with SharedBuffer.allocate(64) as rgb:
            reply = attach_buffers(context, CameraFrame(width=8, height=8), rgb)
            assert_type(reply, CameraFrame)
            return reply


def mistaken(buffer: SharedBuffer, context: Any) -> None:
    shared_buffer(buffer, context)  # error: [arg-type]
    received_buffer(buffer, context)  # error: [arg-type]
""",
    # An rclpy node's callback, through the import path VYRA documents.
    'documented_path': """
from vyra_base.com.handler.ipc import (IPCServer, ModuleService, SyncIPCHandler, UnsafeDirectoryError,
                                       UntrustedServerError, command, run)


class ArmModule(ModuleService):
    @command('home')
    def home(self, parameters: dict[str, str]) -> str:
        return 'homed'


def callback(arm: SyncIPCHandler) -> MoveReply | None:
    try:
        reply = arm.call_method('Move', MoveRequest(pose='home'), response_type=MoveReply)
    except UntrustedServerError:
        return None
    assert_type(reply, MoveReply)
    return reply


def serve() -> None:
    try:
        run(IPCServer(module_name='my_arm', servicers=[ArmModule('my_arm')]).serve())
    except UnsafeDirectoryError as error:
        assert_type(error, UnsafeDirectoryError)
""",
    # The module package's setup.py.
    'setup_helper': """
from vyra_base_ipc_build import generate_protos, proto_cmdclass, proto_data_files

assert_type(proto_data_files('my_arm'), list[tuple[str, list[str]]])
assert_type(proto_cmdclass(), dict[str, type[Any]])
assert_type(generate_protos('protos', 'out'), list[str])
""",
}

EXPECTED_ERROR = re.compile(r'# error: \[([a-z-]+)\]$')
REPORT = re.compile(r'^(\w+)\.py:(\d+): error: (.*)  \[([a-z-]+)\]$', re.MULTILINE)


def expected_errors(source: str) -> set[tuple[int, str]]:
    """``(line, code)`` of every line marked ``# error: [code]``."""
    return {(number, match[1]) for number, line in enumerate(source.splitlines(), 1)
            if (match := EXPECTED_ERROR.search(line))}


def package_root(module: ModuleType) -> str:
    """The directory a module's top-level package is imported from (a path entry)."""
    path = Path(str(module.__file__))
    return str(path.parents[module.__name__.count('.') + (path.name == '__init__.py')])


@pytest.fixture(scope='module')
def mypy_reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[set[tuple[int, str]], str]]:
    """The errors ``mypy --strict`` reports in each user file, run as a user runs it: the module's
    code installed (on PYTHONPATH, with py.typed), this package as installed."""
    installed = tmp_path_factory.mktemp('site')
    vyra_base_ipc_build.generate_protos(MY_ARM_PROTOS, installed, packages=['my_arm'])
    (installed / 'my_arm' / '__init__.py').write_text('')
    (installed / 'my_arm' / 'py.typed').write_text('')
    user = tmp_path_factory.mktemp('user')
    for name, body in USER_FILES.items():
        (user / f'{name}.py').write_text(HEADER + body)
    (user / 'mypy.ini').write_text('[mypy]\n')
    paths = dict.fromkeys([str(installed), package_root(vyra_base_ipc), package_root(documented),
                           package_root(vyra_base_ipc_build), *os.environ.get('PYTHONPATH', '').split(os.pathsep)])
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, paths))}
    result = subprocess.run([sys.executable, '-m', 'mypy', '--strict', '--config-file', 'mypy.ini',
                             '--python-version', '3.10', '--cache-dir', str(user / '.cache'),
                             *(f'{name}.py' for name in USER_FILES)],
                            cwd=user, env=env, capture_output=True, text=True, timeout=300)
    assert 'error: ' not in result.stderr, result.stderr
    found: dict[str, set[tuple[int, str]]] = {name: set() for name in USER_FILES}
    for match in REPORT.finditer(result.stdout):
        found.setdefault(match[1], set()).add((int(match[2]), match[4]))
    return {name: (lines, result.stdout) for name, lines in found.items()}


@pytest.mark.linter
@pytest.mark.parametrize('name', USER_FILES)
def test_mypy_strict_sees_the_types_a_user_means(mypy_reports: dict[str, tuple[set[tuple[int, str]], str]],
                                                 name: str) -> None:
    found, output = mypy_reports[name]
    offset = HEADER.count('\n')
    expected = {(line + offset, code) for line, code in expected_errors(USER_FILES[name])}
    assert found == expected, f'mypy --strict on {name}.py (lines count from the header):\n{output}'


def test_the_documented_import_path_re_exports_the_whole_public_api() -> None:
    assert sorted(documented.__all__) == sorted(vyra_base_ipc.__all__)
    for name in vyra_base_ipc.__all__:
        assert getattr(documented, name) is getattr(vyra_base_ipc, name), name
