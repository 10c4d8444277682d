"""The life of a server's socket file: claimed, published, removed.

gRPC unlinks whatever is at a Unix socket path before it binds and again when
it stops (grpc/grpc#17122), so binding straight to the public path would let a
second server silently take over a live one, and let either delete the other's
file. Instead the server binds inside a private 0700 directory next to the
public path, the socket gets its final mode there (no window in which the
umask decides who may connect), and the inode is then hard-linked to the public
path. gRPC only ever touches the private name; the public name is removed on
stop only while it still points to our inode.

Other local users must not be able to redirect any of this (like sshd's
StrictModes):

- The socket's directory and every directory above it must belong to the
  server's user or root, and must not be writable by others unless it is a
  root-owned sticky directory like ``/tmp`` (there others can add entries
  but neither rename nor remove ours). Otherwise starting fails with
  :class:`~vyra_base_ipc.UnsafeDirectoryError`. Nobody else can therefore
  swap the private directory or plant a symlink in the server's way; that
  is what makes binding by path (gRPC's only way) safe.
- Below that directory everything goes through descriptors and never
  follows a symlink: the directory is opened once, the private directory is
  created and verified through it, the bound socket's owner and mode are set
  on the inode that was bound (opened ``O_PATH | O_NOFOLLOW``), links and
  unlinks are relative to the directory's descriptor.
- Publishers of the same path are serialized by an ``flock`` on a lock file
  beside the socket (``.<name>.lock``, mode 0600, owned by the server's user,
  removed after use): only that user (and root) can open it, so no other
  user can hold it. (A lock on the directory itself, as before, could be
  held by anyone who may list it: ``flock /tmp`` stopped every server in
  ``/tmp``.) Where others may write, they can take the lock's name (as the
  socket's): the start then fails, naming the file and its owner.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import logging
import os
from pathlib import Path
import secrets
import socket
import stat
import time

from ._peer import foreign_link
from .address import MAX_SOCKET_PATH_BYTES
from .exceptions import SocketInUseError, UnsafeDirectoryError

__all__ = ['FD_DIR', 'SocketFile', 'check_directory_chain', 'is_listening', 'socket_access']

_logger = logging.getLogger(__name__)

#: How long to wait for another server of this package publishing the same
#: path (the lock is held for microseconds; this bounds a stuck holder).
_LOCK_TIMEOUT = 5.0
_PRIVATE_SOCKET = 's'
#: Where this process's descriptors have names (no /proc in every container).
FD_DIR = '/proc/self/fd'


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


def check_directory_chain(directory: Path) -> None:
    """Refuse ``directory`` (a real path) unless it and every directory above
    it belong to this process's user or root and are not writable by others,
    or are root-owned and sticky.

    :raises UnsafeDirectoryError: naming the directory, its owner and mode.
    """
    euid = os.geteuid()
    for current in (directory, *directory.parents):
        info = os.stat(current)
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid not in (euid, 0):
            raise UnsafeDirectoryError(
                errno.EPERM, f'cannot serve below {str(current)!r}: it belongs to uid {info.st_uid}, not to '
                f"this server's user (uid {euid}) or root, who could swap the socket", str(current))
        if mode & (stat.S_IWGRP | stat.S_IWOTH) and not (mode & stat.S_ISVTX and info.st_uid == 0):
            raise UnsafeDirectoryError(
                errno.EPERM, f'cannot serve below {str(current)!r}: other users may write to it (mode '
                f'{mode:04o}) and it is not a root-owned sticky directory like /tmp', str(current))


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
        self._directory: Path | None = None  # the real parent directory
        self._dir_fd: int | None = None
        self._private: tuple[str, int] | None = None  # name and descriptor
        self._identity: tuple[int, int] | None = None

    def check(self) -> None:
        """Fail early, before anything binds, if the path cannot be served.

        Creates missing parent directories with :attr:`directory_mode`.

        :raises UnsafeDirectoryError: a directory on the way is not safe.
        :raises SocketInUseError: a live server already listens on the path.
        :raises IsADirectoryError: the path is a directory.
        :raises FileExistsError: the path is a file that is not a socket.
        :raises NotADirectoryError: a parent of the path is not a directory.
        :raises PermissionError: the parent directory is not writable.
        """
        if self._dir_fd is None:
            self._open_parent()
        self._check_existing()

    def private_bind_path(self) -> Path:
        """Create the private directory and return the path to bind to."""
        assert self._dir_fd is not None and self._directory is not None, 'check() first'
        if self._private is None:
            name = f'.ipc-{secrets.token_hex(6)}'
            try:
                os.mkdir(name, 0o700, dir_fd=self._dir_fd)
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=self._dir_fd)
            except OSError as error:
                raise type(error)(
                    error.errno, f'cannot create socket {str(self.path)!r}: no private directory '
                    f'can be made beside it ({error.strerror})', str(self.path.parent)) from None
            self._private = (name, fd)
            os.fchmod(fd, 0o700)  # whatever the umask
        private = self._directory / self._private[0] / _PRIVATE_SOCKET
        if len(os.fsencode(private)) > MAX_SOCKET_PATH_BYTES:
            self._discard_private()
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
        assert self._private is not None and self._dir_fd is not None, 'private_bind_path() first'
        private_fd = self._private[1]
        bound = os.open(_PRIVATE_SOCKET, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=private_fd)
        try:
            if not stat.S_ISSOCK(os.fstat(bound).st_mode):
                raise FileExistsError(errno.EEXIST, 'the private bind name is not the bound socket',
                                      str(self.path))
            # Through the descriptor: the inode that was bound, whatever its
            # name. Without /proc (a rare container), by its name in the
            # private directory, where only this user makes or renames files.
            if os.path.isdir(FD_DIR):
                inode, where = f'{FD_DIR}/{bound}', None
            else:
                inode, where = _PRIVATE_SOCKET, private_fd
            if self.group is not None:  # group first: chown() may clear set-id bits
                os.chown(inode, -1, self.group, dir_fd=where)
            os.chmod(inode, self.socket_mode, dir_fd=where)
        finally:
            os.close(bound)
        name = self.path.name
        with _PublishLock(self._dir_fd, name):
            try:
                os.link(_PRIVATE_SOCKET, name, src_dir_fd=private_fd, dst_dir_fd=self._dir_fd,
                        follow_symlinks=False)
            except FileExistsError:
                self._check_existing(replace_stale=True)
                os.link(_PRIVATE_SOCKET, name, src_dir_fd=private_fd, dst_dir_fd=self._dir_fd,
                        follow_symlinks=False)
        info = os.lstat(name, dir_fd=self._dir_fd)
        self._identity = (info.st_dev, info.st_ino)
        self._discard_private()

    def remove(self) -> bool:
        """Remove the public path if it is still this server's socket. Never
        raises for a file it cannot remove (a read-only or immutable directory):
        it logs a warning naming it, for a stopping server must still stop.

        :returns: whether a file was removed.
        """
        removed = False
        try:
            self._discard_private()
            identity, self._identity = self._identity, None
            if identity is not None and self._dir_fd is not None:
                removed = self._unlink_if(identity)
        except OSError as error:
            _logger.warning('could not remove the socket %s: %s', self.path, error.strerror or error)
        finally:
            self._close_parent()
        return removed

    def discard(self) -> None:
        """Drop the private directory of a server that never published."""
        self._discard_private()
        if self._identity is None:
            self._close_parent()

    # -- the directory --------------------------------------------------------------

    def _open_parent(self) -> None:
        parent = self.path.parent
        missing: list[Path] = []
        existing = parent
        for directory in (parent, *parent.parents):
            if directory.exists() or directory.is_symlink():
                existing = directory
                break
            missing.append(directory)
        if not existing.is_dir():
            raise NotADirectoryError(
                errno.ENOTDIR, f'cannot create socket {str(self.path)!r}: its parent is not a directory',
                str(parent))
        check_directory_chain(Path(os.path.realpath(existing)))
        for directory in reversed(missing):  # below a safe directory: ours alone
            self._make_directory(directory)
        # (After making them: a link another user put where one was missing is found too.)
        link = foreign_link(parent, frozenset({os.geteuid(), 0}))
        if link is not None:
            raise UnsafeDirectoryError(
                errno.EPERM, f'cannot serve below {str(link[0])!r}: it is a symbolic link of uid {link[1]}, '
                f"not of this server's user (uid {os.geteuid()}) or root, who chooses where it leads",
                str(link[0]))
        real = Path(os.path.realpath(parent))
        check_directory_chain(real)
        if not os.access(real, os.W_OK | os.X_OK):
            raise PermissionError(
                errno.EACCES, f'cannot create socket {str(self.path)!r}: directory is not writable',
                str(parent))
        self._dir_fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._directory = real

    def _make_directory(self, directory: Path) -> None:
        try:
            os.mkdir(directory, self.directory_mode)
        except FileExistsError:
            return
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if self.group is not None:
                os.fchown(fd, -1, self.group)
            os.fchmod(fd, self.directory_mode)  # after chown, whatever the umask
        finally:
            os.close(fd)

    def _close_parent(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    # -- the public name ------------------------------------------------------------

    def _check_existing(self, *, replace_stale: bool = False) -> None:
        assert self._dir_fd is not None
        try:
            info = os.lstat(self.path.name, dir_fd=self._dir_fd)
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
            self._unlink_if((info.st_dev, info.st_ino))

    def _unlink_if(self, identity: tuple[int, int]) -> bool:
        """Unlink the public name if it is still the inode ``identity``."""
        assert self._dir_fd is not None
        try:
            info = os.lstat(self.path.name, dir_fd=self._dir_fd)
        except FileNotFoundError:
            return False
        if (info.st_dev, info.st_ino) != identity:
            _logger.warning("not removing %s: it is no longer this server's socket", self.path)
            return False
        try:
            os.unlink(self.path.name, dir_fd=self._dir_fd)
        except FileNotFoundError:
            return False
        return True

    def _discard_private(self) -> None:
        if self._private is None:
            return
        name, fd = self._private
        self._private = None
        try:
            os.unlink(_PRIVATE_SOCKET, dir_fd=fd)
        except FileNotFoundError:
            pass  # not bound yet, or gRPC unlinked it
        finally:
            os.close(fd)
        if self._dir_fd is not None:
            try:
                os.rmdir(name, dir_fd=self._dir_fd)
            except OSError as error:
                _logger.warning('could not remove the private directory %s: %s',
                                self.path.parent / name, error.strerror)


class _PublishLock:
    """An exclusive ``flock`` on ``.<name>.lock`` in the socket's directory:
    a 0600 file of this user, so only this user (and root) can open, and so
    hold, it. Removed on release; a waiter that locked a file meanwhile
    removed opens it anew."""

    def __init__(self, dir_fd: int, name: str) -> None:
        self._dir_fd = dir_fd
        self._name = f'.{name}.lock'
        self._fd = -1

    def _planted(self) -> UnsafeDirectoryError | None:
        """The error for a symlink, or another user's file, at the lock's name."""
        try:
            found = os.lstat(self._name, dir_fd=self._dir_fd)
        except OSError:
            return None
        if stat.S_ISLNK(found.st_mode):
            return UnsafeDirectoryError(
                errno.EPERM, f'the lock file {self._name!r} beside the socket is a symlink of uid '
                f'{found.st_uid} (planted by another user?): not followed; remove it', self._name)
        if found.st_uid != os.geteuid():
            return UnsafeDirectoryError(
                errno.EPERM, f'the lock file {self._name!r} beside the socket belongs to uid '
                f"{found.st_uid}, not to this server's user: remove it", self._name)
        return None

    def __enter__(self) -> None:
        deadline = time.monotonic() + _LOCK_TIMEOUT
        while True:
            try:
                fd = os.open(self._name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=self._dir_fd)
            except OSError as error:
                # A symlink: ELOOP, or EACCES where fs.protected_* refuse another user's name.
                planted = self._planted() if error.errno in (errno.ELOOP, errno.EACCES) else None
                if planted is None:
                    raise
                raise planted from None
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode) or opened.st_uid != os.geteuid():
                os.close(fd)
                raise UnsafeDirectoryError(
                    errno.EPERM, f'the lock file {self._name!r} beside the socket belongs to uid '
                    f"{opened.st_uid}, not to this server's user: remove it", self._name)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise TimeoutError(errno.ETIMEDOUT, 'another server of this user holds the lock '
                                       'of the socket path', self._name) from None
                time.sleep(0.005)
                continue
            try:
                current = os.lstat(self._name, dir_fd=self._dir_fd)
            except FileNotFoundError:
                current = None
            if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
                self._fd = fd
                return
            os.close(fd)  # the previous holder removed the file we locked: again

    def __exit__(self, *exc_info: object) -> None:
        try:
            os.unlink(self._name, dir_fd=self._dir_fd)
        finally:
            os.close(self._fd)  # closing releases the lock


def socket_access(socket_mode: int | None, directory_mode: int | None, socket_group: str | int | None
                  ) -> tuple[int | None, dict[str, int]]:
    """The group id and the ``socket_mode``/``directory_mode`` a server's
    socket files get: 0600/0700 by default, 0660/0750 with a group.

    :raises TypeError, ValueError: a mode that is not one (0o000..0o777),
        or that takes from the owner what it needs (0o600 of the socket,
        0o700 of the directory); a group this system does not know.
    """
    group = _group_id(socket_group)
    return group, {
        'socket_mode': _mode(socket_mode, 'socket_mode', 0o600) if socket_mode is not None else (
            0o600 if group is None else 0o660),
        'directory_mode': _mode(directory_mode, 'directory_mode', 0o700) if directory_mode is not None
        else (0o700 if group is None else 0o750),
    }


def _mode(value: object, name: str, owner: int) -> int:
    """:raises TypeError, ValueError: unless ``value`` is a permission mode
    (0o000..0o777) that gives the owner ``owner``'s bits."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'{name} must be an int such as 0o660, not {type(value).__name__}')
    if not 0 <= value <= 0o777:
        raise ValueError(f'{name} must be between 0o000 and 0o777 (octal: 0o660, not 660), not {value}'
                         f'{f" ({value:#o})" if value >= 0 else ""}')
    if value & owner != owner:
        raise ValueError(f'{name} {value:#o} leaves this process, its owner, without {owner:#o}')
    return value


def _group_id(group: str | int | None) -> int | None:
    """:raises ValueError: for a group name this system does not know."""
    if group is None or (isinstance(group, int) and not isinstance(group, bool)):
        if group is not None and not 0 <= group < 2**32:
            raise ValueError(f'socket_group must be a group id between 0 and {2**32 - 1}, not {group}')
        return group
    if not isinstance(group, str):
        raise TypeError(f'socket_group must be a group name or id, not {type(group).__name__}')
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f'socket_group {group!r}: no such group on this system') from None
