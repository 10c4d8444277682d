"""The ``demo_module_node`` executable's entry point (console script
``demo_module_node = vyra_base_ipc_server.demo_module_node:main``).

As ``ipc_server``'s (:func:`vyra_base_ipc_server.main`), it takes SIGINT,
SIGTERM and SIGHUP before it imports rclpy, and one that arrives while that
still imports ends the node quietly with status 0. ``module_ipc.launch.py``
stops the module's node with SIGINT when ``ipc_server`` fails at start (an
unusable parameter: status 2), which can be while the node still imports:
it then printed a ``KeyboardInterrupt`` traceback and the launch reported it
as died with status -2 (1 of 6 such launches on a real Kilted launch stack).
"""

from __future__ import annotations

from typing import Sequence

from vyra_base_ipc_server import note_stop_signals

__all__ = ['main']


def main(args: Sequence[str] | None = None) -> int:
    """Take the stop signals, import :mod:`vyra_base_ipc.demo.module_node`
    and run its :func:`~vyra_base_ipc.demo.module_node.main`, which exits at
    once with 0 if a stop signal came while importing."""
    received = note_stop_signals()
    from vyra_base_ipc.demo import module_node

    return module_node.main(args, received=received)


def __getattr__(name: str) -> object:
    """The node's ``DECLARED_PARAMETERS`` (of :mod:`vyra_base_ipc.demo.module_node`),
    for tools that look for it in the module a console script names; imported
    only when asked for."""
    if name == 'DECLARED_PARAMETERS':
        from vyra_base_ipc.demo import module_node

        return module_node.DECLARED_PARAMETERS
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
