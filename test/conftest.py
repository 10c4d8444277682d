"""Shared fixtures: short socket directories, the test protos compiled in this
environment, real server processes, and what the fault tests share."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator

import pytest

HERE = Path(__file__).resolve().parent
SERVERS = HERE / 'servers'

# Fixtures for tests that start ROS 2 participants (DDS kept on this machine).
pytest_plugins = ['ros_env']


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` until it is true; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout} s waiting for {what}')
        time.sleep(0.01)


def compile_protos(proto_root: Path, output: Path) -> None:
    from grpc_tools import protoc
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / '_proto'
    # The package's own protos, for imports such as vyra_base_ipc/shared_memory.proto
    # (the generated code then imports them from the installed package).
    package_protos = HERE.parent / 'protos'
    protos = [str(p.relative_to(proto_root)) for p in proto_root.rglob('*.proto')]
    status = protoc.main(['protoc', f'-I{proto_root}', f'-I{package_protos}', f'-I{well_known}',
                          f'--python_out={output}', f'--grpc_python_out={output}', *protos])
    assert status == 0, f'protoc failed on {protos}'


@pytest.fixture(scope='session')
def test_protos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test protos, generated for this run and importable (``vyra_ipc_test``)."""
    output = tmp_path_factory.mktemp('test_protos')
    compile_protos(HERE / 'protos', output)
    sys.path.insert(0, str(output))
    return output


@pytest.fixture(scope='session')
def echo(test_protos_dir: Path):  # noqa: ANN201 - a module
    """``vyra_ipc_test.echo_pb2`` and ``echo_pb2_grpc`` as one namespace."""
    from vyra_ipc_test import echo_pb2, echo_pb2_grpc

    class Echo:
        pb = echo_pb2
        grpc = echo_pb2_grpc
        Stub = echo_pb2_grpc.EchoServiceStub
    return Echo


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A fresh directory with a short path (socket paths are limited to 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix='ipc-', dir='/tmp'))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def socket_path(socket_dir: Path) -> Path:
    return socket_dir / 'test_ipc.sock'


class ServerProcess:
    """A server running as a real child process."""

    def __init__(self, popen: subprocess.Popen, socket_path: Path, log: Path) -> None:
        self.popen = popen
        self.socket_path = socket_path
        self.log_path = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors='replace')

    def wait_serving(self, timeout: float = 20.0) -> 'ServerProcess':
        from vyra_base_ipc.socket_file import is_listening

        def ready() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f'server exited with {self.popen.returncode}:\n{self.log()}')
            return is_listening(self.socket_path)
        wait_for(ready, timeout, f'a server on {self.socket_path}')
        return self

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float = 20.0) -> int:
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=20)


@pytest.fixture
def start_server(test_protos_dir: Path, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: ``start_server(path, *args, wait=True, script=..., umask=..., env=...)`` runs
    test/servers/echo_server.py (or ``script``) as a real process.

    Every server still running at teardown gets SIGTERM, then SIGKILL.
    """
    started: list[ServerProcess] = []

    def start(socket_path: Path, *args: str, wait: bool = True, script: str = 'echo_server.py',
              umask: int | None = None, env: dict[str, str] | None = None) -> ServerProcess:
        env = {**os.environ, **(env or {})}
        # The servers directory too: under PYTHONSAFEPATH=1 a script's own
        # directory is not on sys.path, and servers share EchoService.
        env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(test_protos_dir), str(SERVERS),
                                                          env.get('PYTHONPATH')]))
        log = tmp_path / f'server-{len(started)}.log'
        with open(log, 'wb') as log_file:
            popen = subprocess.Popen(
                [sys.executable, str(SERVERS / script), str(socket_path), *args],
                env=env, stdout=log_file, stderr=subprocess.STDOUT,
                preexec_fn=None if umask is None else (lambda: os.umask(umask)))
        server = ServerProcess(popen, socket_path, log)
        started.append(server)
        if wait:
            server.wait_serving()
        return server

    yield start
    for server in started:
        if server.popen.poll() is None:
            server.signal(signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


@pytest.fixture
def server(start_server: Callable[..., ServerProcess], socket_path: Path) -> ServerProcess:
    """One echo server on ``socket_path``."""
    return start_server(socket_path)


# -- fault injection ------------------------------------------------------------------

#: A deadline far longer than any fault takes to show: a call failing with
#: anything but a timeout failed without waiting for it.
LONG = 30.0


class Journal:
    """The requests a fault_server's handlers saw, one ``event method hex`` line each."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def events(self) -> list[tuple[str, str, bytes]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        lines = text.split('\n')[:-1]  # a line being appended right now is not an event yet
        return [(event, method, bytes.fromhex(data))
                for event, method, data in (line.split(' ') for line in lines)]

    def count(self, event: str, method: str) -> int:
        return sum(1 for e, m, _ in self.events() if (e, m) == (event, method))


StartFaultServer = Callable[..., tuple[ServerProcess, Journal]]


@pytest.fixture
def start_fault_server(start_server: Callable[..., ServerProcess], tmp_path: Path) -> StartFaultServer:
    """Factory: ``start_fault_server(path, *args, wait=True)`` -> (process, journal)."""
    numbers = itertools.count()

    def start(path: Path, *args: str, wait: bool = True) -> tuple[ServerProcess, Journal]:
        journal = Journal(tmp_path / f'journal-{next(numbers)}.txt')
        process = start_server(path, '--journal', str(journal.path), *args, wait=wait,
                               script='fault_server.py')
        return process, journal
    return start


def make_stale_socket(path: Path) -> None:
    """Leave a socket file nobody listens on, as a crashed server does."""
    from vyra_base_ipc.socket_file import is_listening

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    assert path.is_socket() and not is_listening(path)
