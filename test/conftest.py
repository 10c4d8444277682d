"""Shared fixtures and helpers: short socket directories, the test protos
compiled in this environment, real child processes (one spawner: test
servers, the two-lane ``lanes`` server, ROS processes via ros_env), the
Go ttrpc client, and what the fault tests share. The raw ttrpc peer is
test/ttrpc_peer.py."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
from pathlib import Path
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Sequence

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


def unchanged(count: Callable[[], int], spacing: float = 0.2) -> Callable[[], bool]:
    """A condition for :func:`wait_for`: ``count()`` gave the same number as
    at the last check, at least ``spacing`` s before (a producer that stalled)."""
    last = [-1, 0.0]

    def check() -> bool:
        now = time.monotonic()
        if now - last[1] < spacing:
            return False
        before, last[:] = last[0], [count(), now]
        return before == last[0]
    return check


async def until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """:func:`wait_for` for coroutines: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout} s waiting for {what}')
        await asyncio.sleep(0.01)


def compile_protos(proto_root: Path, output: Path) -> None:
    """The test protos' code, built as a module package builds its own."""
    from vyra_base_ipc_build import generate_protos

    generate_protos(proto_root, output, stubs=False)


@pytest.fixture(scope='session')
def test_protos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test protos, generated for this run and importable (``vyra_ipc_test``)."""
    output = tmp_path_factory.mktemp('test_protos')
    compile_protos(HERE / 'protos', output)
    sys.path.insert(0, str(output))
    return output


@pytest.fixture(scope='session')
def echo(test_protos_dir: Path):
    """``vyra_ipc_test.echo_pb2`` and ``echo_pb2_grpc`` as one namespace."""
    from vyra_ipc_test import echo_pb2, echo_pb2_grpc

    class Echo:
        pb = echo_pb2
        grpc = echo_pb2_grpc
        Stub = echo_pb2_grpc.EchoServiceStub
    return Echo


def _short_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix='ipc-', dir='/tmp'))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_log_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with no kind of peer-caused log record seen: the
    limit (vyra_base_ipc._log_limit) is per process, so what an earlier test
    in this process logged would otherwise hide for 10 s what this one
    looks for in its log."""
    from vyra_base_ipc import _log_limit

    monkeypatch.setattr(_log_limit, '_kinds', {})


def drop_leftovers() -> None:
    """Let go now of what earlier tests of this process left to be let go of later, so that nothing of theirs moves
    this process's descriptors, mappings, segments or threads while a test counts them: their garbage (the collector
    would close what it holds mid-test), every free segment of the shared-memory pool, idle or not (the pool's timer
    thread 'vyra-ipc-segment-trim' drops one ~10 s after it came back, and the pool's next use under a lower
    ``max_free_bytes`` at once: each holds two descriptors and a mapping before Python 3.13), with the timer that
    waits for them, and timer threads cancelled but not yet ended. The pool keeps its settings."""
    from vyra_base_ipc import configure_shared_memory_pool
    from vyra_base_ipc._segment_pool import segment_pool

    gc.collect()
    kept = segment_pool().max_free_bytes
    configure_shared_memory_pool(max_free_bytes=0)  # (applied at once: every free segment goes, and its timer)
    configure_shared_memory_pool(max_free_bytes=kept)
    for thread in threading.enumerate():
        if isinstance(thread, threading.Timer) and thread.finished.is_set():
            thread.join(LONG)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A fresh directory with a short path (socket paths are limited to 107 bytes)."""
    yield from _short_dir()


@pytest.fixture(scope='module')
def module_socket_dir() -> Iterator[Path]:
    """``socket_dir`` for the servers of a module (``start_module_server``)."""
    yield from _short_dir()


#: Another local user, for access tests run as root (``setpriv``): a uid with
#: no account, and 'nobody'/'nogroup' (Debian's 65534) as a group to share.
OTHER_UID = 65533
NOBODY = 65534


@pytest.fixture
def open_dir(socket_dir: Path) -> Path:
    """``socket_dir``, traversable by every user (as /tmp is), so that the
    rights of what is inside decide."""
    socket_dir.chmod(0o755)
    return socket_dir


@pytest.fixture
def socket_path(socket_dir: Path) -> Path:
    return socket_dir / 'test_ipc.sock'


def with_test_servers(env: dict[str, str], test_protos_dir: Path) -> dict[str, str]:
    """``env`` with the test protos and test/servers importable: the servers'
    own modules, and the servicers an ipc_server loads by its ``servicers``
    parameter."""
    return {**env, 'PYTHONPATH': os.pathsep.join(filter(None, [str(test_protos_dir), str(SERVERS),
                                                                env.get('PYTHONPATH')]))}


def _child_env(test_protos_dir: Path) -> dict[str, str]:
    env = with_test_servers(dict(os.environ), test_protos_dir)
    # A crash (SIGSEGV in native code) leaves every thread's Python stack in the log.
    env['PYTHONFAULTHANDLER'] = '1'
    return env


@pytest.fixture
def child_env(test_protos_dir: Path) -> dict[str, str]:
    """The environment of a child process of the tests: this one's, with the
    test protos and test/servers importable (under PYTHONSAFEPATH=1 a
    script's own directory is not on sys.path, and servers share EchoService)."""
    return _child_env(test_protos_dir)


class ChildProcess:
    """A real child process with its output in a log file."""

    def __init__(self, popen: subprocess.Popen, log_path: Path) -> None:
        self.popen = popen
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors='replace')

    def running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float = 20.0) -> int:
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        if self.running():
            self.popen.kill()
        self.popen.wait(timeout=20)

    def stop(self) -> int:
        """SIGTERM (SIGKILL after 10 s) unless it has exited; its exit status."""
        if self.running():
            self.signal(signal.SIGTERM)
            try:
                self.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode

    def wait_listening(self, *paths: Path, timeout: float = 30.0) -> None:
        """Wait until a server accepts connections on each socket of ``paths``;
        fail at once, with the log, if the process exits."""
        from vyra_base_ipc._socket_file import is_listening

        def ready() -> bool:
            if not self.running():
                raise AssertionError(f'process exited with {self.popen.returncode}:\n{self.log()}')
            return all(is_listening(path) for path in paths)
        wait_for(ready, timeout, f'a server on {" and ".join(map(str, paths))}')


class ServerProcess(ChildProcess):
    """A test server (test/servers) running as a real child process.

    ``socket_path`` (also ``grpc_path``) is its gRPC socket; ``ttrpc_path``
    its fast lane's socket, by default beside it."""

    def __init__(self, popen: subprocess.Popen, log_path: Path, socket_path: Path,
                 ttrpc_path: Path | None = None) -> None:
        from vyra_base_ipc.address import default_ttrpc_socket_path

        super().__init__(popen, log_path)
        self.socket_path = socket_path
        self.ttrpc_path = ttrpc_path or default_ttrpc_socket_path(socket_path)

    @property
    def grpc_path(self) -> Path:
        return self.socket_path

    def wait_serving(self, timeout: float = 20.0, *, ttrpc: bool = False) -> 'ServerProcess':
        """Wait until the gRPC socket (and with ``ttrpc`` the fast lane's) listens."""
        self.wait_listening(self.socket_path, *([self.ttrpc_path] if ttrpc else []), timeout=timeout)
        return self


class Spawner:
    """Starts child processes with their output in ``logs/<name>-<n>.log``;
    :meth:`stop_all` stops those still running."""

    def __init__(self, logs: Path, name: str) -> None:
        self.logs = logs
        self.name = name
        self.started: list[ChildProcess] = []

    def start(self, command: Sequence[str], env: dict[str, str], *, umask: int | None = None,
              kind: type[ChildProcess] = ChildProcess, **attributes: Any) -> Any:
        """Run ``command``; return it as a ``kind`` (with ``attributes``)."""
        log = self.logs / f'{self.name}-{len(self.started)}.log'
        with open(log, 'wb') as log_file:
            popen = subprocess.Popen(list(command), env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                     # (Popen's umask, not a preexec_fn, which ran Python and gRPC's
                                     # fork handlers in a child forked while gRPC's threads ran: it
                                     # aborted now and then, "epoll_wait error: Bad file descriptor".
                                     # With umask, Python may vfork: no handlers, no Python there.)
                                     umask=-1 if umask is None else umask)
        try:
            process = kind(popen, log, **attributes)
        except BaseException:  # (e.g. no fast-lane path fits beside the socket path): no orphan left
            popen.kill()
            popen.wait()
            raise
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.started:
            process.stop()


StartServer = Callable[..., ServerProcess]


def _server_spawner(base_env: dict[str, str], logs: Path) -> Iterator[StartServer]:
    """What ``start_server`` and ``start_module_server`` yield; stops every
    server still running when resumed."""
    spawner = Spawner(logs, 'server')

    def start(socket_path: Path, *args: str, wait: bool = True, script: str = 'echo_server.py',
              umask: int | None = None, env: dict[str, str] | None = None,
              ttrpc_path: Path | None = None, wrapper: Sequence[str] = ()) -> ServerProcess:
        server = spawner.start([*wrapper, sys.executable, str(SERVERS / script), str(socket_path), *args],
                               {**base_env, **(env or {})}, umask=umask, kind=ServerProcess,
                               socket_path=socket_path, ttrpc_path=ttrpc_path)
        return server.wait_serving() if wait else server

    yield start
    spawner.stop_all()


@pytest.fixture
def start_server(socket_dir: Path, child_env: dict[str, str], tmp_path: Path) -> Iterator[StartServer]:
    """Factory: ``start_server(path, *args, wait=True, script=..., umask=..., env=...,
    ttrpc_path=..., wrapper=...)`` runs test/servers/echo_server.py (or ``script``)
    as a real process with ``path`` and ``args`` as its arguments and (with
    ``wait``) returns once its gRPC socket listens. ``ttrpc_path``: where its
    fast lane is when not beside the gRPC socket (``ServerProcess.ttrpc_path``).
    ``wrapper``: a command that runs the server's command line as its own
    (``unshare ...``) and keeps its pid.

    Every server still running at teardown gets SIGTERM, then SIGKILL (before
    ``socket_dir`` goes).
    """
    yield from _server_spawner(child_env, tmp_path)


@pytest.fixture(scope='module')
def start_module_server(module_socket_dir: Path, test_protos_dir: Path,
                        tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """``start_server`` for servers that the tests of one module share; they
    are stopped before ``module_socket_dir`` goes."""
    yield from _server_spawner(_child_env(test_protos_dir), tmp_path_factory.mktemp('servers'))


def start_lanes(start: StartServer, directory: Path, *args: str) -> ServerProcess:
    """The two-lane test server (test/servers/ttrpc_server.py: an IPCServer on
    ``g.sock``, a TtrpcServer on ``t.sock`` serving the same servicers)."""
    return start(directory / 'g.sock', str(directory / 't.sock'), *args, script='ttrpc_server.py',
                 ttrpc_path=directory / 't.sock', wait=False).wait_serving(ttrpc=True)


#: Loggers of the fast lane's own machinery (not of the handlers it runs).
_MACHINERY = ('ERROR:vyra_base_ipc.ttrpc._server', 'ERROR:vyra_base_ipc.ttrpc._connection',
              'ERROR:vyra_base_ipc.ttrpc._dispatch')


@pytest.fixture(scope='module')
def lanes(request: pytest.FixtureRequest, start_module_server: StartServer,
          module_socket_dir: Path) -> Iterator[ServerProcess]:
    """One two-lane test server (:func:`start_lanes`) for the tests of a
    module, with the module's ``LANES_SERVER_ARGS`` as its options.

    At teardown it must exit cleanly, and whatever the tests threw at it, its
    log shows no failure of the server's own machinery.
    """
    server = start_lanes(start_module_server, module_socket_dir,
                         *getattr(request.module, 'LANES_SERVER_ARGS', ()))
    yield server
    status, log = server.stop(), server.log()
    assert status == 0, log
    trouble = [line for line in log.splitlines()
               if line.startswith(('ERROR:asyncio', 'WARNING:asyncio', *_MACHINERY))
               and 'raised by servicer method' not in line]
    assert not trouble, log


#: The two lanes of a server: gRPC, and the ttrpc fast lane beside it.
LANES = ('grpc', 'ttrpc')


@pytest.fixture(params=LANES)
def lane(request: pytest.FixtureRequest) -> str:
    """Each lane in turn (a client's ``lane=``)."""
    return request.param


@pytest.fixture
def server(start_server: StartServer, socket_path: Path) -> ServerProcess:
    """One echo server on ``socket_path``."""
    return start_server(socket_path)


@pytest.fixture(scope='session')
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An independent ttrpc client: containerd's Go package, as Debian ships
    it, in a small client (test/go/ttrpc_client) compiled for this run.

    Skips without the Debian packages ``golang-go`` and
    ``golang-github-containerd-ttrpc-dev`` (which pulls in gogo/protobuf,
    grpc-go's status, genproto). Built in GOPATH mode with the module proxy
    switched off: nothing is downloaded.
    """
    gopath = Path('/usr/share/gocode')
    if shutil.which('go') is None or not (gopath / 'src/github.com/containerd/ttrpc').is_dir():
        pytest.skip('needs the Debian packages golang-go and golang-github-containerd-ttrpc-dev '
                    '(go and the containerd ttrpc Go source under /usr/share/gocode)')
    build = tmp_path_factory.mktemp('go')
    binary = build / 'ttrpc_client'
    env = {
        'PATH': os.environ.get('PATH', '/usr/bin:/bin'),
        'HOME': str(build),
        'GO111MODULE': 'off',
        'GOPATH': str(gopath),
        'GOCACHE': str(build / 'cache'),
        'GOPROXY': 'off',
        'GOFLAGS': '',
        'CGO_ENABLED': '0',
    }
    result = subprocess.run(['go', 'build', '-o', str(binary), 'main.go'],
                            cwd=HERE / 'go' / 'ttrpc_client', env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f'go build failed:\n{result.stdout}\n{result.stderr}'
    return binary


# -- fault injection ------------------------------------------------------------------

#: A deadline far longer than any fault takes to show: a call failing with
#: anything but a timeout failed without waiting for it.
LONG = 30.0
#: What a process stopping "within the grace period plus 1 s" may take more in
#: a test: the timers it stops by fire late when the machine is loaded (a
#: test waiting only grace + 1 s failed so under load, the server being
#: right). Far below the calls those tests leave in flight (60 s): a stop that
#: waited for them still fails.
STOP_SLACK = 10.0


def in_flight(server: ServerProcess, lane: str, method: str) -> int:
    """The server's calls of ``method`` (its full path) in flight on ``lane``, by its GetStats asked on that lane."""
    from vyra_base_ipc import SyncIPCHandler
    from vyra_base_ipc import introspection_pb2 as introspection
    from vyra_base_ipc import introspection_pb2_grpc as introspection_grpc

    with SyncIPCHandler(server.socket_path, introspection_grpc.IntrospectionStub, lane=lane, timeout=LONG) as client:
        stats = client.call_method('GetStats', introspection.StatsRequest())
    return sum(entry.in_flight for entry in stats.methods if entry.method == method and entry.lane == lane)


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
def start_fault_server(start_server: StartServer, tmp_path: Path) -> StartFaultServer:
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
    from vyra_base_ipc._socket_file import is_listening

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    assert path.is_socket() and not is_listening(path)


def call_through(kind: str, path: Path, stub: type, method: str, request: Any, *,
                 whole_stream: bool = False, **options: Any) -> Any:
    """One call through a new handler of ``kind`` (:func:`handler_of`),
    without connect() first: the call connects. Its answer (with
    ``whole_stream``: the list of a response stream's replies), or the
    exception it raised. ``options`` go to the handler, but ``timeout``,
    ``buffers``, ``parent`` and ``metadata`` to the call."""
    per_call = {key: options.pop(key) for key in ('timeout', 'buffers', 'parent', 'metadata') if key in options}
    with handler_of(kind, path, stub, **options) as handler:
        try:
            if whole_stream:
                return list(handler.stream_method(method, request, **per_call))
            return handler.call_method(method, request, **per_call)
        except Exception as error:
            return error
        finally:
            handler.disconnect()


# -- one scenario, both kinds of client -----------------------------------------------

#: The kinds of client: blocking, and asyncio.
CLIENT_KINDS = ('sync', 'async')

_END = object()


async def _into(awaitable: Any, result: list[Any]) -> None:
    result.append(await awaitable)


def run_on(runner: asyncio.Runner, awaitable: Any) -> Any:
    """``awaitable``'s result, awaited in a task on ``runner``'s loop. The
    result is not the task's: ``Runner.run`` formats the repr of its task
    (Python 3.11's signal.getsignal() of the SIGINT handler, which holds the
    task), result and all: a second for a message of 100 MiB (measured)."""
    result: list[Any] = []
    runner.run(_into(awaitable, result))
    return result[0]


async def _next_or_end(stream: Any) -> Any:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return _END


class Blocking:
    """The blocking face of an asyncio client (an ``AsyncConnection``, an
    ``IPCHandler``), so that one scenario drives either kind of client.

    A method's coroutine runs to its end on ``runner``'s event loop (one
    task a step); an async iterator it returns (a stream) iterates as an
    iterator, each message taken on that loop, and is closed on that loop
    when left (``aclose()``); any other attribute is the client's own. The
    loop runs only while a step runs, and it is the client's loop
    throughout; but unlike one coroutine, it polls its sockets once more as
    a step starts and ends (``asyncio.Runner.run``), as an ``await
    asyncio.sleep(0)`` would: not for a scenario in which that poll could
    decide the outcome (what arrived just after an answer). As a context
    manager, it enters and leaves the client's ``async with``.
    """

    def __init__(self, client: Any, runner: asyncio.Runner) -> None:
        self._client = client
        self._runner = runner

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)
        if not callable(value):
            return value

        def blocking(*args: Any, **kwargs: Any) -> Any:
            result = value(*args, **kwargs)
            if hasattr(result, '__await__'):
                return run_on(self._runner, result)
            if hasattr(result, '__anext__'):
                return self._iterate(result)
            return result
        return blocking

    def _iterate(self, stream: Any) -> Iterator[Any]:
        try:
            while (message := run_on(self._runner, _next_or_end(stream))) is not _END:
                yield message
        finally:
            # Left early (break, close(), dropped): closed now, on its loop,
            # as contextlib.aclosing() closes it, not whenever the loop runs
            # next (it may run to close the connection first). Dropped after
            # the runner closed: the runner closed it (shutdown_asyncgens).
            if hasattr(stream, 'aclose') and self._runner_idle():
                run_on(self._runner, stream.aclose())

    def _runner_idle(self) -> bool:
        """Whether the runner is open and its loop not running."""
        try:
            return not self._runner.get_loop().is_running()
        except RuntimeError:  # (closed)
            return False

    def __enter__(self) -> Blocking:
        run_on(self._runner, self._client.__aenter__())
        return self

    def __exit__(self, *exc_info: Any) -> None:
        run_on(self._runner, self._client.__aexit__(*exc_info))


@contextlib.contextmanager
def fast_lane_connection(kind: str, path: Path, **options: Any) -> Iterator[Any]:
    """A connection to the fast lane on ``path`` of ``kind`` (``'sync'``: a
    ``SyncConnection``; ``'async'``: an ``AsyncConnection`` on an event loop
    of its own, behind :class:`Blocking`), made with ``options``, closed on
    leaving. The same blocking steps drive either: ``call()`` returns the
    answer, ``stream()`` is an iterator."""
    from vyra_base_ipc.ttrpc import AsyncConnection, SyncConnection

    if kind == 'sync':
        with SyncConnection.connect(path, **options) as connection:
            yield connection
        return
    with asyncio.Runner() as runner:
        with Blocking(run_on(runner, AsyncConnection.connect(path, **options)), runner) as connection:
            yield connection


@contextlib.contextmanager
def handler_of(kind: str, path: Path, stub: type, **options: Any) -> Iterator[Any]:
    """A new handler of ``kind`` for ``path`` and ``stub``, made with
    ``options`` and not connected (its ``with`` connects): ``'sync'``, a
    ``SyncIPCHandler``; ``'async'``, an ``IPCHandler`` on an event loop of its
    own (closed on leaving), behind :class:`Blocking`. The same blocking steps
    drive either: ``call_method()`` returns the answer, ``stream_method()``
    is an iterator."""
    from vyra_base_ipc import IPCHandler, SyncIPCHandler

    if kind == 'sync':
        yield SyncIPCHandler(path, stub, **options)
        return
    with asyncio.Runner() as runner:
        yield Blocking(IPCHandler(path, stub, **options), runner)
