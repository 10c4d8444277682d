"""``vyra-ipc``: see and poke the IPC servers of the modules on this machine.

``vyra-ipc list | describe | call | health | ping | stats`` (also
``python -m vyra_base_ipc`` and, where ros2cli is installed, ``ros2 ipc``),
on either lane. Message types come from each server's reflection service,
so no generated code of the module is needed.
"""

from ._app import build_parser, main

__all__ = ['build_parser', 'main']
