"""Fixtures of my_arm's tests: a ROS environment of their own, and the arm's
node as a real process.

The tests use the built package, as its users do: `colcon test` runs
`python -m pytest` in the source directory, which puts that directory first
on sys.path, and there the package has no generated code (the build writes
it into the build and install trees). So it comes off sys.path here, and the
processes the tests start run in their temporary directory.
"""

from __future__ import annotations

from collections.abc import Iterator
import os
from pathlib import Path
import random
import shutil
import sys
import tempfile

from arm_processes import Processes, StartNode
import pytest

SOURCE = Path(__file__).resolve().parent.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or os.curdir).resolve() != SOURCE]


@pytest.fixture(autouse=True)
def run_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of the source directory: `python -m` puts the working directory first on sys.path."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def ros_env(tmp_path: Path) -> dict[str, str]:
    """DDS stays on this machine, in a domain of its own."""
    env = {name: value for name, value in os.environ.items()
           if name not in ('VYRA_IPC_SOCKET', 'VYRA_MODULE_NAME', 'MODULE_NAME', 'ROS_STATIC_PEERS')}
    # 100..232, a share of its own for each pytest-xdist worker: tests running at once never meet.
    worker = int(os.environ.get('PYTEST_XDIST_WORKER', 'gw0').removeprefix('gw') or 0)
    share = 133 // int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    domain = 100 + share * worker + random.randrange(share)
    env.update(ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST', ROS_DOMAIN_ID=str(domain),
               ROS_HOME=str(tmp_path / 'ros'), ROS_LOG_DIR=str(tmp_path / 'ros' / 'log'))
    return env


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory of its own for the test's sockets (short: socket paths <= 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix='arm-', dir='/tmp'))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def start_arm_node(ros_env: dict[str, str], tmp_path: Path) -> Iterator[StartNode]:
    """Start arm_node processes; SIGINT at the end must stop each cleanly and
    remove its socket."""
    nodes = Processes(tmp_path)
    paths: list[Path] = []

    def start(path: Path) -> Path:
        nodes.start('arm_node', [sys.executable, '-m', 'my_arm.arm_node', '--ros-args',
                                 '-p', 'module_name:=my_arm', '-p', f'socket_path:={path}'], ros_env, path)
        paths.append(path)
        return path

    try:
        yield start
    finally:
        nodes.stop()
    assert not [path for path in paths if path.exists()]


@pytest.fixture
def arm_socket(start_arm_node: StartNode, socket_dir: Path) -> Path:
    """The socket of a running arm_node process."""
    return start_arm_node(socket_dir / 'my_arm_ipc.sock')
