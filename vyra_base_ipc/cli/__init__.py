"""``vyra-ipc``: see and poke the IPC servers of the modules on this machine.

``vyra-ipc list | describe | call | health | ping | stats`` (also
``python -m vyra_base_ipc`` and, where ros2cli is installed, ``ros2 ipc``),
on either lane. Message types come from each server's reflection service,
so no generated code of the module is needed. ``vyra_base_ipc.cli.ros2``
holds the ros2cli extensions; only ros2cli imports it.
"""

from ._app import VERBS, build_parser, main, run

__all__ = ['VERBS', 'build_parser', 'main', 'run']
