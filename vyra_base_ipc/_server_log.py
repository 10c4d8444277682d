"""What an :class:`~vyra_base_ipc.IPCServer`'s process logs besides the
server's own lines: this package's INFO lines on stderr while
:meth:`~vyra_base_ipc.IPCServer.serve` runs in a process that configured no
logging."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

__all__ = ['logged_to_stderr']


@contextlib.contextmanager
def logged_to_stderr() -> Iterator[None]:
    """INFO lines of this package to stderr, unless logging is configured."""
    package = logging.getLogger(__name__.rpartition('.')[0])
    if package.hasHandlers() or logging.getLogger().level != logging.WARNING:
        yield  # the process configured logging: its choice
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter('[%(levelname)s] [%(asctime)s] [%(name)s]: %(message)s'))
    level = package.level
    package.addHandler(handler)
    package.setLevel(min(level or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
