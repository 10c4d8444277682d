"""``vyra_base.com.handler.ipc``: the documented import path of the VYRA IPC
handler, re-exporting :mod:`vyra_base_ipc` whole: every name of its ``__all__``,
the same objects (a list of its own here fell behind: exceptions, the
interceptors and ModuleService were missing).

Shipped as a portion of the ``vyra_base`` namespace package (no
``__init__.py`` files), with a ``py.typed`` marker of its own so that type
checkers read it. Where the upstream ``vyra_base`` package is installed,
its regular package takes precedence under Python's import rules; import from
``vyra_base_ipc`` there.
"""

# A wildcard import is a re-export for mypy and pyright alike (and for IDE completion).
from vyra_base_ipc import *  # noqa: F403
from vyra_base_ipc import __all__ as __all__
