"""Socket paths: where a module's IPC socket lives, checked before use.

Resolution order (first match wins):

1. an explicit ``socket_path`` argument;
2. the environment variable ``VYRA_IPC_SOCKET``;
3. ``/tmp/<module_name>_ipc.sock``, with the module name taken from the
   ``module_name`` argument, else ``VYRA_MODULE_NAME``, else ``MODULE_NAME``.
"""

from __future__ import annotations

import os
from pathlib import Path
import re
from typing import Mapping, Union

__all__ = [
    'MAX_SOCKET_PATH_BYTES',
    'MODULE_NAME_PATTERN',
    'SOCKET_ENV',
    'MODULE_NAME_ENVS',
    'StrPath',
    'default_socket_path',
    'default_ttrpc_socket_path',
    'grpc_target',
    'resolve_socket_path',
    'validate_module_name',
    'validate_socket_path',
]

#: A path as the functions here take it. Not a string annotation: typing.get_type_hints()
#: evaluates those in the module using the alias, where ``os`` may not be imported.
StrPath = Union[str, os.PathLike[str]]

#: ``sizeof(sockaddr_un.sun_path)`` on Linux is 108, one byte of it the NUL.
MAX_SOCKET_PATH_BYTES = 107

MODULE_NAME_PATTERN = re.compile(r'^[a-z][a-z0-9_]*$')
SOCKET_ENV = 'VYRA_IPC_SOCKET'
MODULE_NAME_ENVS = ('VYRA_MODULE_NAME', 'MODULE_NAME')


def validate_module_name(module_name: object) -> str:
    """Return ``module_name`` if it matches ``^[a-z][a-z0-9_]*$``.

    :raises TypeError: if it is not a string.
    :raises ValueError: if it does not match, naming the value.
    """
    if not isinstance(module_name, str):
        raise TypeError(f'module name must be a str, not {type(module_name).__name__}')
    if not MODULE_NAME_PATTERN.match(module_name):
        raise ValueError(
            f'invalid module name {module_name!r}: it must match {MODULE_NAME_PATTERN.pattern} '
            '(lower-case letter first, then lower-case letters, digits or underscores)')
    return module_name


def default_socket_path(module_name: str) -> Path:
    """Return ``/tmp/<module_name>_ipc.sock`` for a valid module name."""
    return Path('/tmp') / f'{validate_module_name(module_name)}_ipc.sock'


def default_ttrpc_socket_path(grpc_socket_path: StrPath) -> Path:
    """The fast lane's socket beside a gRPC socket: same directory and stem,
    suffix ``.ttrpc.sock`` (``/tmp/demo_ipc.sock`` -> ``/tmp/demo_ipc.ttrpc.sock``).

    :raises ValueError: the result would be too long for a Unix socket
        (the message names both paths and the longest gRPC path that fits).
    """
    path = validate_socket_path(grpc_socket_path)
    ttrpc_path = _beside(path)
    size = len(os.fsencode(ttrpc_path))
    if size > MAX_SOCKET_PATH_BYTES:
        longest = MAX_SOCKET_PATH_BYTES - (size - len(os.fsencode(path)))
        raise ValueError(
            f"the fast lane's socket beside {str(path)!r} would be {str(ttrpc_path)!r}, {size} bytes long; "
            f'Unix sockets allow at most {MAX_SOCKET_PATH_BYTES} bytes: choose a socket path of at most '
            f"{longest} bytes, or name the fast lane's socket (ttrpc_socket_path)")
    return ttrpc_path


def _beside(path: Path) -> Path:
    """The fast lane's socket beside ``path``, however long."""
    stem = path.name[:-len('.sock')] if path.name.endswith('.sock') else path.name
    return path.with_name(f'{stem}.ttrpc.sock')


def _client_ttrpc_socket_path(socket_path: Path, given: StrPath | None, lane: str) -> tuple[Path, bool]:
    """A client's fast-lane socket (``given``, else the one beside
    ``socket_path``) and whether a server can listen there. Beside a
    ``socket_path`` of more than 101 bytes it would be too long for a Unix
    socket, so no server's fast lane is there (``IPCServer(ttrpc=False)``
    serves such a path): only ``lane='ttrpc'`` is refused, the other lanes
    take the gRPC lane.

    :raises TypeError, ValueError: ``given`` is no socket path, or (with
        ``lane='ttrpc'``) the one beside ``socket_path`` would be too long.
    """
    if given is not None:
        return validate_socket_path(given), True
    try:
        return default_ttrpc_socket_path(socket_path), True
    except ValueError:
        if lane == 'ttrpc':
            raise
        return _beside(socket_path), False


def validate_socket_path(socket_path: object) -> Path:
    """Check a socket path's form and length, without touching the filesystem.

    Relative paths are made absolute against the current directory, so that a
    server and its clients agree on one file whatever their working directory.

    :raises TypeError: if it is not a ``str`` or ``os.PathLike``.
    :raises ValueError: if it is empty, names an abstract-namespace socket
        (``@name``, ``unix-abstract:name``), contains a NUL byte, ends in a
        separator, or is longer than :data:`MAX_SOCKET_PATH_BYTES` bytes.
    """
    if not isinstance(socket_path, (str, os.PathLike)):
        raise TypeError(f'socket path must be a str or os.PathLike, not {type(socket_path).__name__}')
    text = os.fspath(socket_path)
    if not isinstance(text, str):
        raise TypeError(f'socket path must be text, not {type(text).__name__}')
    if not text.strip():
        raise ValueError('socket path is empty')
    if text.startswith(('@', 'unix-abstract:')) or '\0' in text[:1]:
        raise ValueError(
            f'socket path {text!r} names an abstract-namespace socket: not supported, because any '
            'process in the network namespace can connect to those (there are no file permissions; '
            'cf. containerd CVE-2020-15257). Use a filesystem path.')
    if '\0' in text:
        raise ValueError(f'socket path {text!r} contains a NUL byte')
    if text.endswith(os.sep):
        raise ValueError(f'socket path {text!r} names a directory, not a socket file')
    path = Path(os.path.abspath(text))
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise ValueError(
            f'socket path {str(path)!r} is {size} bytes long; Unix sockets allow at most '
            f'{MAX_SOCKET_PATH_BYTES} bytes: choose a shorter path')
    return path


def resolve_socket_path(
    socket_path: StrPath | None = None,
    *,
    module_name: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """Return the checked, absolute socket path, following the resolution order.

    :raises ValueError: if nothing names a socket (no argument, no
        ``VYRA_IPC_SOCKET``, no module name) or what names it is invalid.
    """
    env = os.environ if environ is None else environ
    if socket_path is not None:
        return validate_socket_path(socket_path)
    if env.get(SOCKET_ENV):
        return validate_socket_path(env[SOCKET_ENV])
    if module_name is None:
        module_name = next((env[name] for name in MODULE_NAME_ENVS if env.get(name)), None)
    if module_name is None:
        raise ValueError(
            'no IPC socket configured: pass socket_path or module_name, or set '
            f'{SOCKET_ENV} or one of {", ".join(MODULE_NAME_ENVS)}')
    return validate_socket_path(default_socket_path(module_name))


def grpc_target(socket_path: Path) -> str:
    """Return the gRPC target for an absolute socket path.

    ``unix:/abs/path`` rather than ``unix:///abs/path``: gRPC counts the
    target's path against the same limit, and this form is the one checked.
    """
    return f'unix:{socket_path}'
