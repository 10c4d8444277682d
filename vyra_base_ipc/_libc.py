"""The C library, loaded once for the modules that call it through ctypes
(``mmap`` for received shared memory, ``getsockopt`` for a peer in many
groups, glibc's ``mallopt``)."""

from __future__ import annotations

import ctypes
from typing import Any

__all__ = ['function', 'libc']

#: This process's C library (the symbols the process has: ``CDLL(None)``);
#: its functions keep ``errno`` for :func:`ctypes.get_errno`.
libc = ctypes.CDLL(None, use_errno=True)


def function(name: str, restype: Any, *argtypes: Any) -> Any:
    """The C library's function ``name`` with this prototype, as a function
    object of the caller's own (``libc[name]``, not the ``libc.name`` every
    module shares): no other caller's prototype changes it.

    :raises AttributeError: the C library has no such function.
    """
    found = libc[name]
    found.restype = restype
    found.argtypes = list(argtypes)
    return found
