"""The ``vyra-ipc`` executable's entry point (console script
``vyra-ipc = vyra_base_ipc_cli:main``).

It is a package of its own, importing nothing of :mod:`vyra_base_ipc`, so
that it runs before that package's imports (gRPC, protobuf: about a third of
a second): a Ctrl-C (SIGINT) while they run ends ``vyra-ipc`` at once with
exit status 130 and nothing on the terminal, as one does once a verb runs,
instead of a ``KeyboardInterrupt`` traceback. Only the interpreter's own
start-up, and whatever the generated console script does before it calls
:func:`main`, are left to Python's default handler.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Sequence

__all__ = ['EXIT_INTERRUPTED', 'main']

#: The exit status of ``vyra-ipc`` interrupted by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


def _exit_interrupted(signum: int, frame: FrameType | None) -> None:
    # Nothing is written and nothing needs cleaning up yet, and a
    # KeyboardInterrupt raised somewhere inside an import could be printed
    # as "Exception ignored" by a finalizer or swallowed by the module that
    # runs: leave at once.
    os._exit(EXIT_INTERRUPTED)


def main(argv: Sequence[str] | None = None) -> int:
    """Import :mod:`vyra_base_ipc.cli` with Ctrl-C ending the process at once
    (130), then put the SIGINT handler back and run its
    :func:`~vyra_base_ipc.cli.main`, which answers Ctrl-C with 130 too.

    A SIGINT that the process was started ignoring (``nohup``, a background
    job of a script) stays ignored."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _exit_interrupted)
    from vyra_base_ipc import cli

    # None: a handler set outside Python, which cannot be put back; Python's own then.
    signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
    return cli.main(argv)
