"""The ``ipc_server`` executable's entry point (console script
``ipc_server = vyra_base_ipc_server:main``).

It is a package of its own, importing nothing of :mod:`vyra_base_ipc`,
so that it runs before that package's imports (gRPC, rclpy: most of a
second): from its first line on SIGINT, SIGTERM and SIGHUP are noted instead
of raising ``KeyboardInterrupt`` (a traceback) or killing the process, and
one that arrives while the rest still imports ends ``ipc_server`` quietly
with status 0, as it does once the server runs. Only the interpreter's own
start-up, before this runs, is left to Python's default handlers.
:mod:`vyra_base_ipc_server.demo_module_node` does the same for the demo
module's node, which ``module_ipc.launch.py`` starts beside ``ipc_server``,
and so can a module package's own node with :func:`note_stop_signals` and
``run_node(..., received=...)`` (``examples/my_arm``'s ``arm_node``): this
package is typed (``py.typed``) for them.

Then, before rclpy's import starts threads, it gives the process one malloc
arena (:func:`vyra_base_ipc._allocator.one_malloc_arena`), so that the
node's ``keep_freed_memory_mb`` covers its event loop, which runs in a
thread of its own (importing :mod:`vyra_base_ipc` itself starts none).
"""

from __future__ import annotations

import signal
from typing import Sequence

__all__ = ['STOP_SIGNALS', 'main', 'note_stop_signals']

#: The signals that stop ``ipc_server``.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def note_stop_signals() -> list[str]:
    """Note SIGINT, SIGTERM and SIGHUP from now on, instead of dying or
    raising ``KeyboardInterrupt``; the list returned gets the names of those
    that arrive, for :class:`vyra_base_ipc.node.StopSignals` to take over.
    The first thing an entry point does, before any heavy import."""
    received: list[str] = []

    def note(signum: int, frame: object) -> None:
        received.append(signal.Signals(signum).name)

    for signum in STOP_SIGNALS:
        signal.signal(signum, note)
    return received


def main(args: Sequence[str] | None = None) -> int:
    """Take the stop signals, give the process one malloc arena, import
    :mod:`vyra_base_ipc.node` and run its :func:`~vyra_base_ipc.node.main`,
    which exits at once with 0 if a stop signal came while importing."""
    received = note_stop_signals()
    from vyra_base_ipc._allocator import one_malloc_arena

    one_malloc_arena()
    from vyra_base_ipc import node

    return node.main(args, received=received)



def __getattr__(name: str) -> object:
    """The node's parameter table (``DECLARED_PARAMETERS``, ``PARAMETERS`` of
    :mod:`vyra_base_ipc.node`), for tools that look for it in the module a
    console script names; imported only when asked for."""
    if name in ('DECLARED_PARAMETERS', 'PARAMETERS'):
        from vyra_base_ipc import node

        return getattr(node, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
