"""Helpers and fixtures for tests that start ROS 2 participants.

Every participant is confined to this machine and to a private domain:
``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``, a random ``ROS_DOMAIN_ID`` per
test, and ``ROS_HOME`` in the test's temp dir. The fixtures reach every
test module as a plugin (conftest's ``pytest_plugins``); import only helpers.
"""

from __future__ import annotations

import os
from pathlib import Path
import random
import sys
import threading
from typing import Any, Callable, Iterator
import uuid

import pytest

from conftest import ChildProcess, Spawner

REPO = Path(__file__).resolve().parent.parent

#: Variables that would redirect a server or client to another socket.
_IPC_ENVS = ('VYRA_IPC_SOCKET', 'VYRA_MODULE_NAME', 'MODULE_NAME')


def private_domain_id() -> int:
    """A ``ROS_DOMAIN_ID`` for one test: random in 100..232 (clear of the
    usual 0 and of small IDs other setups pick; 232 is the highest whose
    ports still fit in 16 bits), within this pytest-xdist worker's own share
    of them, so that tests running at once in two workers never share one."""
    worker = os.environ.get('PYTEST_XDIST_WORKER', 'gw0')
    count = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    index = int(worker.removeprefix('gw')) if worker.removeprefix('gw').isdigit() else 0
    share = 133 // max(1, count)
    return 100 + share * (index % max(1, count)) + random.randrange(share)


def private_ros_environ(ros_home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for ROS 2 processes that keeps DDS on this machine."""
    env = dict(os.environ if base is None else base)
    for name in _IPC_ENVS:
        env.pop(name, None)
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    env.pop('ROS_STATIC_PEERS', None)
    env['ROS_DOMAIN_ID'] = str(private_domain_id())
    env['ROS_HOME'] = str(ros_home)
    env['ROS_LOG_DIR'] = str(ros_home / 'log')
    env['PYTHONUNBUFFERED'] = '1'
    # A crash (SIGSEGV in rcl, say) leaves every thread's Python stack in the log.
    env['PYTHONFAULTHANDLER'] = '1'
    return env


@pytest.fixture
def ros_environ(tmp_path: Path) -> dict[str, str]:
    """Environment for ROS 2 subprocesses of one test."""
    home = tmp_path / 'ros_home'
    home.mkdir()
    return private_ros_environ(home)


@pytest.fixture
def ros_in_process(monkeypatch: pytest.MonkeyPatch, ros_environ: dict[str, str]) -> dict[str, str]:
    """The same settings for participants created by the test process itself
    (read by ``rclpy.init``)."""
    for name in ('ROS_AUTOMATIC_DISCOVERY_RANGE', 'ROS_DOMAIN_ID', 'ROS_HOME', 'ROS_LOG_DIR'):
        monkeypatch.setenv(name, ros_environ[name])
    monkeypatch.delenv('ROS_STATIC_PEERS', raising=False)
    for name in _IPC_ENVS:
        monkeypatch.delenv(name, raising=False)
    return ros_environ


@pytest.fixture
def context(ros_in_process: dict[str, str]) -> Iterator[Any]:
    """A private ``rclpy.context.Context`` for nodes of the test process
    itself; no signal handlers (pytest keeps Ctrl-C)."""
    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions

    context = Context()
    # A namespace of its own: tests running at the same time in the same
    # domain cannot answer each other's service calls.
    rclpy.init(args=['--ros-args', '-r', f'__ns:=/t{uuid.uuid4().hex[:12]}'], context=context,
               signal_handler_options=SignalHandlerOptions.NO)
    yield context
    rclpy.try_shutdown(context=context)


def python_command(module: str, function: str = 'main') -> list[str]:
    """Run ``module:function`` the way its console script does."""
    return [sys.executable, '-c',
            f'import sys; from {module} import {function}; sys.exit({function}())']


def ipc_server_command() -> list[str]:
    """The installed ``ipc_server`` console script when the package under test
    is an installed one (colcon test), else the same entry point run from the
    source tree."""
    import vyra_base_ipc
    try:
        from ament_index_python.packages import get_package_prefix
        prefix = Path(get_package_prefix('vyra_base_ipc')).resolve()
    except (ImportError, LookupError, OSError):
        return python_command('vyra_base_ipc_server')
    script = prefix / 'lib' / 'vyra_base_ipc' / 'ipc_server'
    if script.is_file() and Path(vyra_base_ipc.__file__).resolve().is_relative_to(prefix):
        return [str(script)]
    return python_command('vyra_base_ipc_server')


IPC_SERVER = ipc_server_command()


@pytest.fixture
def start_process(socket_dir: Path, tmp_path: Path, ros_environ: dict[str, str]
                  ) -> Iterator[Callable[..., ChildProcess]]:
    """Factory ``start_process(command, env=None)``: ``command`` as a real child
    process, in ``ros_environ`` unless ``env`` is given; every process still
    running at teardown gets SIGTERM, then SIGKILL (before ``socket_dir`` goes)."""
    spawner = Spawner(tmp_path, 'process')
    yield lambda command, env=None: spawner.start(command, ros_environ if env is None else env)
    spawner.stop_all()


class Spinner:
    """Nodes spun by one single-threaded executor on a thread of its own."""

    def __init__(self, *nodes: Any) -> None:
        from rclpy.executors import SingleThreadedExecutor

        self.executor = SingleThreadedExecutor(context=nodes[0].context)
        for node in nodes:
            self.executor.add_node(node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True,
                                       name=f'spin-{nodes[0].get_name()}')
        self.thread.start()

    def stop(self) -> None:
        """Stop spinning, waiting for callbacks in progress; idempotent.
        Call before destroying the nodes."""
        self.executor.shutdown(timeout_sec=10)
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


@pytest.fixture
def spin() -> Iterator[Callable[..., Spinner]]:
    """``spin(*nodes)`` -> :class:`Spinner`; all stopped at teardown."""
    spinners: list[Spinner] = []

    def start(*nodes: Any) -> Spinner:
        spinners.append(Spinner(*nodes))
        return spinners[-1]

    yield start
    for spinner in spinners:
        spinner.stop()
