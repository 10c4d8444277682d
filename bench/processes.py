"""Child processes of the benchmark: their environment, the servers (started
together, stopped together) and the measuring workers."""

from __future__ import annotations

import json
import os
from pathlib import Path
import random
import select
import signal
import subprocess
import sys
import time
from typing import IO, Any, Callable

__all__ = ['BenchEnvironment', 'Servers', 'run_child']

REPO_ROOT = Path(__file__).resolve().parent.parent


class BenchEnvironment:
    """Environment of every child: the repository and the compiled bench
    protos importable, ROS 2 kept on this machine in a private domain with its
    logs in a temporary ``ROS_HOME``.

    :param workdir: private temporary directory of this run.
    :param proto_dir: where :func:`bench.protogen.compile_bench_protos` wrote.
    :param domain_id: ROS domain; random in 150..230 unless given, to stay
        apart from test suites that run at the same time.
    :param package_root: a directory whose ``vyra_base_ipc`` the children
        import instead of the working tree's (to measure a change on a copy).
    :param one_cpu: run every child, client or server, on the first CPU this
        process may use (see :meth:`affinity`).

    Children run in ``workdir``, not in the repository: with ``python -m`` the
    working directory comes first on ``sys.path`` and would shadow
    ``package_root``.
    """

    def __init__(self, workdir: Path, proto_dir: Path, domain_id: int | None = None,
                 package_root: Path | None = None, one_cpu: bool = False) -> None:
        self.workdir = workdir
        self.log_dir = workdir / 'logs'
        self.log_dir.mkdir(exist_ok=True)
        ros_home = workdir / 'ros_home'
        ros_home.mkdir(exist_ok=True)
        env = dict(os.environ)
        env['PYTHONPATH'] = os.pathsep.join(filter(None, [
            str(package_root) if package_root else None, str(REPO_ROOT), str(proto_dir),
            env.get('PYTHONPATH')]))
        env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
        env['ROS_DOMAIN_ID'] = str(domain_id if domain_id is not None else random.randint(150, 230))
        env['ROS_HOME'] = str(ros_home)
        env['ROS_LOG_DIR'] = str(ros_home / 'log')
        env['PYTHONUNBUFFERED'] = '1'
        self.env = env
        cpus = sorted(os.sched_getaffinity(0))
        self._cpus = (set(cpus[:1]), set(cpus[1:])) if len(cpus) >= 2 else None
        self._one_cpu = set(cpus[:1]) if one_cpu else None

    def log(self, name: str) -> Path:
        """The log file of the child process called ``name``."""
        return self.log_dir / f'{name}.log'

    @property
    def can_pin(self) -> bool:
        """Whether there are CPUs enough (two) to pin clients and servers apart."""
        return self._cpus is not None

    @property
    def one_cpu(self) -> bool:
        """Whether every child runs on one CPU (``one_cpu=True``)."""
        return self._one_cpu is not None

    def affinity(self, role: str, pin: bool) -> Callable[[], None] | None:
        """A ``preexec_fn`` that pins a child: a ``'client'`` to the first CPU
        this process may use, a ``'server'`` to the others. ``None`` unless
        ``pin``, or with fewer than two CPUs. With ``one_cpu``, every child
        goes to the first CPU, whatever ``pin`` says: where the scheduler
        often puts a client and the server it wakes, and where a call costs
        the CPU time of both sides."""
        if self._one_cpu is not None:
            first = self._one_cpu
            return lambda: os.sched_setaffinity(0, first)
        if not pin or self._cpus is None:
            return None
        cpus = self._cpus[0] if role == 'client' else self._cpus[1]
        return lambda: os.sched_setaffinity(0, cpus)


def _read_line(stream: IO[bytes], deadline: float, what: str, popen: subprocess.Popen,
               log: Path) -> str:
    buffer = b''
    while not buffer.endswith(b'\n'):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f'{what}: no answer in time; log: {log}')
        ready, _, _ = select.select([stream], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(stream.fileno(), 65536)
        if not chunk:
            code = popen.wait()
            raise RuntimeError(f'{what} exited with {code}:\n{log.read_text(errors="replace")[-3000:]}')
        buffer += chunk
    return buffer.decode()


class Servers:
    """The benchmark's server processes, started in parallel; a context manager
    that stops them all (stdin closed, then SIGTERM, then SIGKILL)."""

    def __init__(self, env: BenchEnvironment) -> None:
        self._env = env
        self._started: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.ready: dict[str, dict[str, Any]] = {}

    def start(self, name: str, *args: str, pin: bool = False) -> None:
        """Start ``python -m bench.servers ARGS`` as server ``name`` (not
        waiting), pinned to the server CPUs if ``pin``."""
        log = self._env.log(f'server-{name}')
        with open(log, 'wb') as log_file:
            popen = subprocess.Popen([sys.executable, '-m', 'bench.servers', *args],
                                     cwd=self._env.workdir, env=self._env.env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log_file,
                                     preexec_fn=self._env.affinity('server', pin))
        self._started[name] = (popen, log)

    def wait_ready(self, timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        """Wait for every started server's ready line; return ``{name: info}``.

        :raises TimeoutError, RuntimeError: a server did not come up.
        """
        deadline = time.monotonic() + timeout
        for name, (popen, log) in self._started.items():
            if name in self.ready:
                continue
            assert popen.stdout is not None
            line = _read_line(popen.stdout, deadline, f'server {name}', popen, log)
            self.ready[name] = json.loads(line)['ready']
        return self.ready

    def stop(self) -> None:
        """Close the servers' standard input (their signal to exit) and wait
        for them, 10 s for all; one still running then gets SIGTERM, and
        SIGKILL 5 s later."""
        for popen, _ in self._started.values():
            if popen.stdin is not None and not popen.stdin.closed:
                popen.stdin.close()
        deadline = time.monotonic() + 10
        for popen, _ in self._started.values():
            try:
                popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                popen.send_signal(signal.SIGTERM)
                try:
                    popen.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    popen.kill()
                    popen.wait()
            if popen.stdout is not None:
                popen.stdout.close()
        self._started.clear()

    def __enter__(self) -> 'Servers':
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_child(env: BenchEnvironment, module: str, args: list[str], name: str,
              timeout: float, pin: bool = False) -> dict[str, Any]:
    """Run ``python -m MODULE ARGS`` to completion (pinned to the client CPU
    if ``pin``); return its last stdout line as JSON.

    :raises RuntimeError: on a non-zero exit, naming the log.
    :raises subprocess.TimeoutExpired: after ``timeout`` seconds (the child is killed).
    """
    log = env.log(name)
    with open(log, 'wb') as log_file:
        completed = subprocess.run([sys.executable, '-m', module, *args], cwd=env.workdir,
                                   env=env.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=log_file, timeout=timeout,
                                   preexec_fn=env.affinity('client', pin))
    if completed.returncode != 0:
        raise RuntimeError(f'{name} exited with {completed.returncode}:\n'
                           f'{log.read_text(errors="replace")[-3000:]}')
    lines = completed.stdout.decode().strip().splitlines()
    if not lines:
        raise RuntimeError(f'{name} printed no result; log: {log}')
    return json.loads(lines[-1])
