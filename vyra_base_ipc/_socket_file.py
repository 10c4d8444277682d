"""The life of a server's socket file: claimed, published, removed.

gRPC unlinks whatever is at a Unix socket path before it binds and again when
it stops (grpc/grpc#17122), so binding straight to the public path would let a
second server silently take over a live one, and let either delete the other's
file. Instead the server binds inside a private 0700 directory next to the
public path, the socket gets its final mode there (no window in which the
umask decides who may connect), and the inode is then hard-linked to the public
path under a directory lock. gRPC only ever touches the private name; the
public name is removed on stop only while it still points to our inode.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path
import shutil
import socket
import stat
import tempfile
import time

from .address import MAX_SOCKET_PATH_BYTES
from .exceptions import SocketInUseError

__all__ = ['SocketFile', 'is_listening']

_logger = logging.getLogger(__name__)

#: How long to wait for another server of this package publishing in the same
#: directory (the lock is held for microseconds; this bounds a stuck holder).
_LOCK_TIMEOUT = 5.0


def is_listening(path: Path) -> bool:
    """Return whether a server accepts connections on the Unix socket ``path``.

    Non-blocking and side-effect free apart from one connect/close. A socket
    we may not connect to (``EACCES``) counts as listening: it belongs to
    someone else and must not be replaced.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError, NotADirectoryError):
        return False
    except BlockingIOError:  # backlog full: somebody is listening
        return True
    except PermissionError:
        return True
    except OSError as error:
        if error.errno == errno.EAGAIN:
            return True
        return False
    finally:
        probe.close()
    return True


class SocketFile:
    """The public socket path of one server.

    Not thread-safe; owned by the server that created it. :meth:`remove` is
    idempotent.

    :param path: absolute, validated socket path.
    :param socket_mode: permission bits of the socket file (connecting needs
        write permission).
    :param directory_mode: permission bits of parent directories this object
        creates; existing directories are left as they are.
    :param group: group id given to the socket file and created directories,
        or ``None`` to keep the process's group.
    """

    def __init__(self, path: Path, *, socket_mode: int = 0o600, directory_mode: int = 0o700,
                 group: int | None = None) -> None:
        self.path = path
        self.socket_mode = socket_mode
        self.directory_mode = directory_mode
        self.group = group
        self._private_dir: Path | None = None
        self._identity: tuple[int, int] | None = None

    def check(self) -> None:
        """Fail early, before anything binds, if the path cannot be served.

        Creates missing parent directories with :attr:`directory_mode`.

        :raises SocketInUseError: a live server already listens on the path.
        :raises IsADirectoryError: the path is a directory.
        :raises FileExistsError: the path is a file that is not a socket.
        :raises NotADirectoryError: a parent of the path is not a directory.
        :raises PermissionError: the parent directory is not writable.
        """
        self._make_parent()
        self._check_existing()

    def private_bind_path(self) -> Path:
        """Create the private directory and return the path to bind to."""
        if self._private_dir is None:
            try:
                self._private_dir = Path(tempfile.mkdtemp(prefix='.ipc-', dir=self.path.parent))
            except OSError as error:
                raise type(error)(
                    error.errno, f'cannot create socket {str(self.path)!r}: no private directory '
                    f'can be made beside it ({error.strerror})', str(self.path.parent)) from None
        private = self._private_dir / 's'
        if len(os.fsencode(private)) > MAX_SOCKET_PATH_BYTES:
            self._discard_private_dir()
            raise ValueError(
                f'socket path {str(self.path)!r}: its directory is too long for the private name '
                f'the server binds first ({str(private)!r}, over {MAX_SOCKET_PATH_BYTES} bytes); '
                'choose a shorter directory')
        return private

    def publish(self) -> None:
        """Give the bound private socket its mode and link it to the public path.

        :raises SocketInUseError: a live server took the path in the meantime.
        :raises FileExistsError: a non-socket file appeared at the path.
        """
        assert self._private_dir is not None, 'private_bind_path() first'
        private = self._private_dir / 's'
        self._set_owner_and_mode(private, self.socket_mode)
        with _DirectoryLock(self.path.parent):
            try:
                os.link(private, self.path)
            except FileExistsError:
                self._check_existing(replace_stale=True)
                os.link(private, self.path)
        info = os.lstat(self.path)
        self._identity = (info.st_dev, info.st_ino)
        self._discard_private_dir()

    def remove(self) -> bool:
        """Remove the public path if it is still this server's socket.

        :returns: whether a file was removed.
        """
        self._discard_private_dir()
        identity, self._identity = self._identity, None
        if identity is None:
            return False
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return False
        if (info.st_dev, info.st_ino) != identity:
            _logger.warning("not removing %s: it is no longer this server's socket", self.path)
            return False
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        return True

    def discard(self) -> None:
        """Drop the private directory of a server that never published."""
        self._discard_private_dir()

    def _make_parent(self) -> None:
        parent = self.path.parent
        missing: list[Path] = []
        for directory in (parent, *parent.parents):
            if directory.exists() or directory.is_symlink():
                break
            missing.append(directory)
        for directory in reversed(missing):
            try:
                os.mkdir(directory, self.directory_mode)
            except FileExistsError:
                continue
            self._set_owner_and_mode(directory, self.directory_mode)
        if not parent.is_dir():
            raise NotADirectoryError(
                errno.ENOTDIR, f'cannot create socket {str(self.path)!r}: its parent is not a directory',
                str(parent))
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(
                errno.EACCES, f'cannot create socket {str(self.path)!r}: directory is not writable',
                str(parent))

    def _check_existing(self, *, replace_stale: bool = False) -> None:
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(
                errno.EISDIR, 'cannot serve on socket path: it is a directory', str(self.path))
        if not stat.S_ISSOCK(info.st_mode):
            raise FileExistsError(
                errno.EEXIST, 'cannot serve on socket path: a file that is not a socket is there',
                str(self.path))
        if is_listening(self.path):
            raise SocketInUseError(self.path)
        if replace_stale:
            _logger.info('replacing stale socket %s (nobody listens on it)', self.path)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _set_owner_and_mode(self, path: Path, mode: int) -> None:
        # Group first: chown() may clear set-id bits, and the mode must not
        # depend on the umask, so it is set explicitly afterwards.
        if self.group is not None:
            os.chown(path, -1, self.group)
        os.chmod(path, mode)

    def _discard_private_dir(self) -> None:
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None


class _DirectoryLock:
    """An exclusive ``flock`` on a directory, serializing publishers in it."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = os.open(self._directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        deadline = time.monotonic() + _LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self._fd)
                    raise TimeoutError(
                        errno.ETIMEDOUT, 'another process holds the lock of the socket directory',
                        str(self._directory)) from None
                time.sleep(0.005)

    def __exit__(self, *exc_info: object) -> None:
        os.close(self._fd)  # closing releases the lock
