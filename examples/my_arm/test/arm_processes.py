"""What my_arm's tests share besides fixtures: waiting on sockets and conditions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
import signal
import socket
import subprocess
import time

#: The size of the arm's default camera frame (2048 x 1024 RGB): 6 MiB.
FRAME_BYTES = 2048 * 1024 * 3

#: Starts the arm's node on a socket path; returns once it serves there.
StartNode = Callable[[Path], Path]


def listening(path: Path) -> bool:
    """Whether a server accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def wait_until(condition: Callable[[], bool], seconds: float, what: Callable[[], str]) -> None:
    """Return once ``condition()`` holds; fail with ``what()`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what()
        time.sleep(0.05)




class Processes:
    """Processes a test started, each serving a Unix socket; :meth:`stop`
    ends them with SIGINT, which each must survive with status 0."""

    def __init__(self, logs: Path) -> None:
        self._logs = logs
        self._started: list[tuple[subprocess.Popen[bytes], Path]] = []
        self._count = 0

    def start(self, name: str, args: Sequence[str], env: dict[str, str], serves: Path) -> None:
        """Start ``args`` (output to ``<name>-<n>.log``); return once it
        serves ``serves``, or fail with its log if it exits first."""
        log = self._logs / f'{name}-{self._count}.log'
        self._count += 1
        with open(log, 'wb') as output:
            process = subprocess.Popen(args, env=env, stdout=output, stderr=subprocess.STDOUT)
        self._started.append((process, log))
        wait_until(lambda: listening(serves) or process.poll() is not None, 30,
                   lambda: f'{name} did not serve {serves}:\n{log.read_text()}')
        assert process.poll() is None, log.read_text()

    def stop(self) -> None:
        """SIGINT to each, which must exit 0; any left running is killed.
        Stops each once: a second call stops only those started since."""
        started, self._started = self._started, []
        try:
            for process, log in started:
                process.send_signal(signal.SIGINT)
                assert process.wait(timeout=20) == 0, log.read_text()
        finally:
            for process, _ in started:
                if process.poll() is None:
                    process.kill()
                    process.wait()
