"""Ending the gRPC lane's connections of a server whose event loop ended;
waiting until its clients have read what it sent them (:func:`read_by_peers`).

grpc.aio stops a server only by coroutines on the loop it started on; once
that loop is dead, grpc core keeps the listening socket and every accepted
connection open, and a call in flight on one waits for its deadline (or for
ever). Those descriptors are grpc core's: closing one would let grpc core go
on with a number the process may reuse for another file. ``shutdown()`` is
safe instead: it acts on the socket, not on the descriptor, so grpc core sees
end-of-file and errors on its own descriptors and closes them itself, and the
clients see their connections end (UNAVAILABLE at once).

The sockets are found by their address: a Unix socket accepted from a
listener carries the listener's path as its own (``getsockname()``), and
the gRPC lane binds a private path no other socket of the process has
(:meth:`~._socket_file.SocketFile.private_bind_path`). Each descriptor is
inspected through a duplicate of it (our own descriptor of the same socket,
closed here): a number grpc core closes and the process reuses meanwhile is
then inspected and shut down as what it is now, never as what it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
from pathlib import Path
import resource
import socket
import stat
import struct
import sys
import termios
from typing import Iterator

from ._socket_file import FD_DIR

__all__ = ['count_connections', 'end_connections', 'read_by_peers']

_logger = logging.getLogger(__name__)

#: Without FD_DIR, the descriptors below this number are inspected (fstat()
#: each: a tenth of a second); grpc core's sockets take the lowest free numbers.
SCAN_LIMIT = 65536
#: How often :func:`read_by_peers` looks (each look: a readlink() and a few
#: system calls per descriptor of the process).
_READ_POLL = 0.002
#: SIOCOUTQ (Linux's number, termios's TIOCOUTQ): of a Unix stream socket, the
#: bytes sent that its peer has not read yet (they stay charged to the sender).
_SIOCOUTQ = termios.TIOCOUTQ
#: The variable by which grpc core's poller is chosen (grpc's doc/environment_variables.md).
_POLL_STRATEGY = 'GRPC_POLL_STRATEGY'


def end_connections(bound_path: Path) -> int:
    """Shut down (``SHUT_RDWR``) this process's sockets bound at ``bound_path``:
    first the listening socket (a connect to it, through a descriptor of its
    file held elsewhere, is refused from then on), then the connections
    waiting in its backlog (accepted here, so ours to close), then every
    connection accepted before. Closes no descriptor but its own. Logs a
    warning where the process's descriptors could not all be inspected. The
    listener is left as it is where grpc core does not poll with epoll (see
    :func:`_edge_triggered_poller`).

    :returns: how many connections were ended.
    """
    path = os.fspath(bound_path)
    _warn_unless_all_inspected(path)
    ended = 0
    try:
        if _edge_triggered_poller():
            for listener in _sockets_at(path, listening=True):
                listener.shutdown(socket.SHUT_RDWR)
                ended += _drain(listener)
        else:
            _logger.info('gRPC lane of %s: its listening socket is left open (grpc core polls with poll(), '
                         '%s=%r: it would find one shut down ready for ever and spin); a client that holds '
                         'a descriptor of the removed socket file can still connect', path, _POLL_STRATEGY,
                         os.environ.get(_POLL_STRATEGY))
        for connection in _sockets_at(path, listening=False):
            connection.shutdown(socket.SHUT_RDWR)
            ended += 1
    except OSError as error:  # EMFILE from _sockets_at() (shutdown() fails on none: seen on Linux)
        _logger.warning("could not end the gRPC lane's connections (of %s): %s; a call in flight on one "
                        'may wait for its deadline', path, error.strerror or error)
    return ended


def count_connections(bound_path: Path) -> int:
    """This process's connections accepted from the socket bound at
    ``bound_path``, found among its descriptors as :func:`end_connections`
    finds them (``/proc/self/fd``, else ``fstat()`` of each number: a tenth
    of a second, off the event loop), each socket once however many
    descriptors it has; 0 at the open-file limit."""
    try:
        return len({os.fstat(found.fileno()).st_ino
                    for found in _sockets_at(os.fspath(bound_path), listening=False)})
    except OSError:  # EMFILE: none can be inspected
        return 0


async def read_by_peers(bound_path: Path, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds until the peer of every connection of
    this process accepted at ``bound_path`` has read all that was sent to it
    (:data:`_SIOCOUTQ` of each is 0), looking every :data:`_READ_POLL` s;
    whether they had. Counts the bytes in the sockets, not those grpc core
    has yet to write."""
    loop = asyncio.get_running_loop()
    until = loop.time() + timeout
    while _unread_by_peers(os.fspath(bound_path)):
        if loop.time() >= until:
            return False
        await asyncio.sleep(_READ_POLL)
    return True


def _unread_by_peers(path: str) -> int:
    """The bytes this process's connections accepted at ``path`` have sent
    that their peers have not read (0 where they cannot be inspected)."""
    unread = 0
    try:
        for connection in _sockets_at(path, listening=False):
            with contextlib.suppress(OSError):
                unread += struct.unpack('i', fcntl.ioctl(connection.fileno(), _SIOCOUTQ, b'\0' * 4))[0]
    except OSError:  # EMFILE: none can be inspected
        return 0
    return unread


def _edge_triggered_poller() -> bool:
    """Whether grpc core polls with epoll (edge-triggered, its default on
    Linux), as :data:`_POLL_STRATEGY` chooses: its first entry grpc knows.

    A listener shut down is readable (and hung up) from then on: a poller
    that reports that level again and again (``poll``) would have grpc core
    try to accept for ever; epoll reports it once."""
    for strategy in os.environ.get(_POLL_STRATEGY, 'all').split(','):
        if strategy in ('all', 'epoll1'):  # (grpc falls back to poll only where epoll cannot be made)
            return True
        if strategy in ('poll', 'none'):
            return False
    return False  # (none grpc knows: not known to be epoll)


def _drain(listener: socket.socket) -> int:
    """Accept and close the connections waiting on a listener that was shut
    down (no more can arrive); their clients see them end. Only if grpc core
    made it non-blocking (as it does): a blocking accept would wait here."""
    if not fcntl.fcntl(listener.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK:
        return 0
    # (Python's view of it too, whatever socket.setdefaulttimeout() says:
    # with a timeout, accept() would poll a listener that is shut down.)
    listener.setblocking(False)
    count = 0
    while True:
        try:
            waiting, _ = listener.accept()
        except OSError:  # EAGAIN: none left
            return count
        with waiting:
            with contextlib.suppress(OSError):
                waiting.shutdown(socket.SHUT_RDWR)
        count += 1


def _sockets_at(path: str, *, listening: bool) -> Iterator[socket.socket]:
    """Each Unix stream socket of this process bound at ``path`` (listening or
    not), as a socket object on a duplicate of its descriptor, closed when the
    caller takes the next one.

    :raises OSError: a descriptor cannot be duplicated (EMFILE: the process
        is at its open-file limit).
    """
    for fd in _socket_descriptors():
        try:
            duplicate = os.dup(fd)
        except OSError as error:
            if error.errno == errno.EBADF:  # closed since it was listed
                continue
            raise
        # Family and type given, with SOCK_NONBLOCK: made from a descriptor
        # alone, under socket.setdefaulttimeout(), Python would set O_NONBLOCK
        # on it, which the duplicate shares with the original (another part of
        # the process's blocking socket). Family and type are read from it.
        found = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, 0, duplicate)
        with found:
            try:
                kind = (found.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN),
                        found.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE))
            except OSError:  # (not a socket any more: the number was reused meanwhile)
                continue
            if (kind == (socket.AF_UNIX, socket.SOCK_STREAM)
                    and found.getsockname() == path
                    and bool(found.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)) == listening):
                yield found


def _socket_descriptors() -> Iterator[int]:
    """The numbers of this process's descriptors that are sockets (each may
    be closed or reused by the time it is used). Where FD_DIR exists, those
    listed there whose link says ``socket:``: it asks no file system, where
    ``fstat()`` of a file on a network or FUSE mount that does not answer
    waits for it (for ever). Else, by ``fstat()``, among the numbers below
    the open-file limit, at most :data:`SCAN_LIMIT`."""
    try:
        names = os.listdir(FD_DIR)
    except OSError:  # (no /proc; or EMFILE: none could be duplicated anyway)
        for fd in range(min(_open_file_limit(), SCAN_LIMIT)):
            try:
                mode = os.fstat(fd).st_mode
            except OSError:  # EBADF: none open under that number
                continue
            if stat.S_ISSOCK(mode):
                yield fd
        return
    for name in names:
        try:
            link = os.readlink(f'{FD_DIR}/{name}')
        except OSError:  # ENOENT: closed since it was listed
            continue
        if link.startswith('socket:'):
            yield int(name)


def _open_file_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return sys.maxsize if soft == resource.RLIM_INFINITY else soft


def _warn_unless_all_inspected(path: str) -> None:
    """Say so where :func:`_socket_descriptors` leaves numbers out."""
    if not os.path.isdir(FD_DIR) and _open_file_limit() > SCAN_LIMIT:
        _logger.warning("%s cannot be read: descriptors from %d up (the open-file limit is %d) are not "
                        "inspected for the gRPC lane's connections (of %s); a call in flight on one of "
                        'those waits for its deadline', FD_DIR, SCAN_LIMIT, _open_file_limit(), path)
