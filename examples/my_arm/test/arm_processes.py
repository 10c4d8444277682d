"""What my_arm's tests share besides fixtures: waiting on sockets and conditions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
import socket
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


