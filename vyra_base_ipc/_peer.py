"""Who is at the other end of a Unix socket.

Clients: the server a client reaches must run as a user it trusts (by
default its own uid or root; ``server_uid=`` names another). On the fast
lane the kernel says who accepted the connection (``SO_PEERCRED``), checked
before anything is sent. The gRPC lane connects by path inside grpc's core,
which tells nobody who answered (grpc/grpc#28755), so there the socket file
and its directory must belong to a trusted user and the directory must not
let others replace the file; checked before every call, since grpc
reconnects on its own. That leaves one window: a trusted server's socket
removed and a squatter's bound between the check and grpc's reconnect, in a
directory others may write (only a sticky one passes: there they cannot
remove our file, only create one where none is).

Servers: each fast-lane connection's peer must be a user allowed to connect
(its own uid, root, and members of the socket group when one is set), as
containerd's ttrpc checks; the socket file's mode says the same, so this
holds even where the file's mode was loosened by hand. Membership counts the
groups the peer had when it connected, as the kernel keeps them with the
connection (``SO_PEERGROUPS``), not those of whatever process has its pid
by the time the server looks.
"""

from __future__ import annotations

from array import array
import ctypes
from dataclasses import dataclass
import errno
import os
from pathlib import Path
import socket
import stat
import struct
from typing import Any

import grpc

from ._libc import function
from .exceptions import UntrustedServerError

__all__ = ['PeerCredentials', 'PeerRule', 'check_server_connection', 'check_server_socket', 'foreign_link',
           'peer_credentials', 'socket_peer', 'trusted_server_uids', 'untrusted']

#: struct ucred: pid_t (signed), uid_t and gid_t (unsigned: ids from 2**31 up are users too).
_UCRED = struct.Struct('iII')
#: Linux's ``SO_PEERGROUPS`` (4.13 and later; the generic number, which
#: x86 and ARM use). Python's socket module does not name it.
_SO_PEERGROUPS = 59
#: What Python's getsockopt() reads at most (1024 bytes): 256 groups. A peer
#: in more is read with ctypes, into room for the kernel's NGROUPS_MAX.
_GROUPS_BYTES = 1024
_NGROUPS_MAX = 65536
_getsockopt = function('getsockopt', ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                       ctypes.POINTER(ctypes.c_uint32))


@dataclass(frozen=True)
class PeerCredentials:
    """The process at the other end of a Unix socket when it connected
    (or accepted): its pid, effective uid, effective gid and supplementary
    groups (``None`` where they were not read, or the kernel did not tell
    them: see :func:`socket_peer`)."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] | None = frozenset()


def socket_peer(sock: socket.socket, *, groups: bool) -> PeerCredentials:
    """The ``SO_PEERCRED`` and (with ``groups``) ``SO_PEERGROUPS`` of a
    connected Unix socket: what the peer was when it connected (a server:
    when it listened), whatever it did since.

    :param groups: read the peer's supplementary groups, one more system
        call (two for a peer in more than 256 groups); a caller that checks
        the uid or pid alone (a client checking its server) leaves them
        ``None``. They are ``None`` too where the kernel does not tell them
        (before Linux 4.13, or a sandbox that refuses the option): a rule
        needing them then refuses, and says why.
    """
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    if not groups:
        return PeerCredentials(pid, uid, gid, None)
    raw: bytes | None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _GROUPS_BYTES)
    except OSError as error:
        raw = _many_peer_groups(sock.fileno()) if error.errno == errno.ERANGE else None
    return PeerCredentials(pid, uid, gid, None if raw is None else frozenset(array('I', raw)))


def _many_peer_groups(fd: int) -> bytes | None:
    """``SO_PEERGROUPS`` of a peer in more groups than Python's getsockopt() reads."""
    size = ctypes.c_uint32(_NGROUPS_MAX * 4)
    groups = ctypes.create_string_buffer(size.value)
    if _getsockopt(fd, socket.SOL_SOCKET, _SO_PEERGROUPS, groups, ctypes.byref(size)) != 0:
        return None  # (cannot fail where the smaller read said ERANGE)
    return groups.raw[:size.value]


def peer_credentials(context: Any) -> PeerCredentials | None:
    """Who made the call a handler serves: pid, uid, gid and groups of the
    client process when it connected, on the fast lane; ``None`` on the gRPC
    lane, whose runtime does not tell (grpc/grpc#28755).

    :param context: the handler's ``context`` argument.
    """
    return getattr(context, 'peer_credentials', None)


def trusted_server_uids(server_uid: int | None) -> frozenset[int]:
    """The uids a client accepts as its server's: ``server_uid`` alone if
    given, else its own effective uid and root.

    :raises TypeError, ValueError: ``server_uid`` is not a uid.
    """
    if server_uid is None:
        return frozenset({os.geteuid(), 0})
    if not isinstance(server_uid, int) or isinstance(server_uid, bool):
        raise TypeError(f'server_uid must be an int uid, not {type(server_uid).__name__}')
    if not 0 <= server_uid < 2**32:
        raise ValueError(f'server_uid must be a uid from 0 to {2**32 - 1}, not {server_uid}')
    return frozenset({server_uid})


def untrusted(what: str, path: str, found: int, trusted: frozenset[int],
               why: str = '') -> UntrustedServerError:
    """The error for ``what`` at ``path``, owned by uid ``found``, not one of ``trusted``."""
    expected = ' or '.join(str(uid) for uid in sorted(trusted))
    return UntrustedServerError(
        grpc.StatusCode.UNAVAILABLE,
        f'{what} {path!r} belongs to uid {found}, not to the expected server user (uid {expected})'
        f'{why}; nothing was sent (server_uid= names another server user)')


def check_server_connection(sock: socket.socket, path: str, trusted: frozenset[int]) -> None:
    """Refuse a fast-lane connection accepted by an untrusted process.

    :raises UntrustedServerError: the peer's uid is not in ``trusted``.
    """
    peer = socket_peer(sock, groups=False)
    if peer.uid not in trusted:
        raise untrusted('the process serving', path, peer.uid, trusted, f' (pid {peer.pid})')
    _check_links(path, trusted)


def foreign_link(path: Path, owners: frozenset[int]) -> tuple[Path, int] | None:
    """The first symbolic link on ``path`` (its last part or a directory
    above it) that a user not in ``owners`` made, with that user; ``None``.
    Whoever makes one chooses where the path leads (the kernel follows it
    where fs.protected_symlinks is off, or in a directory that is not sticky)."""
    for part in (path, *path.parents):
        try:
            info = os.lstat(part)
        except OSError:
            continue
        if stat.S_ISLNK(info.st_mode) and info.st_uid not in owners:
            return part, info.st_uid
    return None


def _check_links(path: str, trusted: frozenset[int]) -> None:
    """Refuse a socket path that leads through another user's symbolic link:
    it may point at any server, another module's too."""
    found = foreign_link(Path(path), trusted | {0})
    if found is not None:
        link, owner = found
        raise untrusted('the symbolic link', str(link), owner, trusted | {0}, f' on the way to {path!r}')


def check_server_socket(path: str, trusted: frozenset[int]) -> os.stat_result | None:
    """Refuse a gRPC-lane socket that an untrusted user owns or could have
    replaced; its status if it is there, ``None`` if not (a missing one is
    the caller's to refuse).

    :raises UntrustedServerError: the socket file or its directory is owned
        by an untrusted user, or the directory is writable by others and not
        sticky.
    """
    _check_links(path, trusted)
    try:
        info = os.stat(path)
        directory = os.stat(Path(path).parent)
    except OSError:
        return None
    if info.st_uid not in trusted:
        raise untrusted('the socket file', path, info.st_uid, trusted)
    if directory.st_uid not in trusted | {0}:
        raise untrusted('the directory of socket', path, directory.st_uid, trusted | {0})
    if directory.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not directory.st_mode & stat.S_ISVTX:
        raise UntrustedServerError(
            grpc.StatusCode.UNAVAILABLE,
            f'the directory of socket {path!r} (mode {stat.S_IMODE(directory.st_mode):04o}) lets '
            'other users replace the socket: not trusted; nothing was sent')
    return info


@dataclass(frozen=True)
class PeerRule:
    """Who may connect to a server: these uids, and members of ``group``.

    :param uids: allowed effective uids (the server's own and root by default).
    :param group: the socket group, if one is set.
    """

    uids: frozenset[int]
    group: int | None = None

    @classmethod
    def default(cls, group: int | None) -> 'PeerRule':
        """The server's own uid and root, and ``group``'s members."""
        return cls(frozenset({os.geteuid(), 0}), group)

    def refusal(self, peer: PeerCredentials) -> str | None:
        """Why ``peer`` may not connect; ``None`` if it may."""
        if peer.uid in self.uids:
            return None
        if self.group is not None and (peer.gid == self.group or self.group in (peer.groups or ())):
            return None
        allowed = ', '.join(str(uid) for uid in sorted(self.uids))
        group = '' if self.group is None else f' or a member of group {self.group}'
        unknown = '' if self.group is None or peer.groups is not None else (
            '; the kernel did not tell its supplementary groups (SO_PEERGROUPS, Linux 4.13)')
        return (f'pid {peer.pid} uid {peer.uid} gid {peer.gid} is not an allowed peer '
                f'(uid {allowed}{group}){unknown}')

