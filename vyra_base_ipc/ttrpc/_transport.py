"""An asyncio transport for Unix stream sockets that passes file descriptors.

asyncio's own socket transports read with ``recv()``, which drops any
descriptors (``SCM_RIGHTS``) that arrive, and have no way to send them. This
one reads with ``recvmsg()`` and writes with ``sendmsg()``; it is otherwise a
plain selector transport: non-blocking socket, ``add_reader``/``add_writer``
on the running loop, a write buffer with flow control
(``pause_writing``/``resume_writing`` on its protocol).

Every fast-lane socket, this transport's and the blocking client's, gets a
larger send buffer (:func:`enlarge_send_buffer`).

Protocols used with it get ``fds_received(fds)`` (owning the descriptors)
right before the ``data_received(data)`` of the bytes they arrived with.
Descriptors passed to :meth:`UnixTransport.write` go out with the first byte
of that data and are closed by the transport once sent (or when it closes).
"""

from __future__ import annotations

import array
import asyncio
import collections
import errno
import fcntl
import logging
import socket
import struct
import termios
import threading
from typing import Any, Callable, Sequence

from .._log_limit import log_limited
from .._payload import MAX_FDS_PER_MESSAGE, close_fds

__all__ = ['CUT_OFF_FDS', 'MSG_CTRUNC', 'SEND_BUFFER_BYTES', 'UnixTransport', 'accept_connections',
           'buffered_recvmsg', 'enlarge_send_buffer']

_logger = logging.getLogger(__name__)

#: Bytes read per ``recvmsg()``.
READ_SIZE = 256 * 1024
#: Descriptors accepted per read; more is a protocol violation (the kernel
#: closes the excess and reports MSG_CTRUNC). The kernel hands over the
#: descriptors of at most one sendmsg() per recvmsg(), so writers pass at most
#: this many per sendmsg().
MAX_FDS_PER_READ = MAX_FDS_PER_MESSAGE
_ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_READ * array.array('i').itemsize)
_MSG_CMSG_CLOEXEC = int(getattr(socket, 'MSG_CMSG_CLOEXEC', 0x40000000))
#: ``socket.MSG_CTRUNC`` as a plain int: testing a flag against the IntFlag
#: runs enum's Python code (~2 us) on every read that passed descriptors.
MSG_CTRUNC = int(socket.MSG_CTRUNC)
_HIGH_WATER = 64 * 1024
_LOW_WATER = 16 * 1024
#: accept() failing for lack of resources: pause accepting this long (the
#: pending connection would make the listener readable again at once).
ACCEPT_RETRY_DELAY = 1.0
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

#: The send buffer asked for on every fast-lane socket. Linux doubles what it
#: is asked for and caps the request at ``net.core.wmem_max``: 2 MiB where
#: that is 1 MiB or more (4 MiB on the Linux 6.18 test VM), twice the 208 KiB
#: default where it is 208 KiB too. 2 MiB holds the whole frame of a message
#: up to 1 MiB, the largest that travels inline while shared memory is on.
SEND_BUFFER_BYTES = 1 << 20


#: Why a connection closes whose peer's descriptors were cut off in a read.
CUT_OFF_FDS = (f'file descriptors the peer passed were cut off (MSG_CTRUNC): more than {MAX_FDS_PER_READ} '
               'at once, or none free here (RLIMIT_NOFILE)')


def enlarge_send_buffer(sock: socket.socket) -> None:
    """Ask the kernel for a send buffer of :data:`SEND_BUFFER_BYTES` on
    ``sock`` (never a smaller one than it has; a socket that refuses keeps
    its own).

    Why: the default (208 KiB) takes a 1 MiB frame in five writes with four
    sleeps until the reader has emptied three quarters of it (the POLLOUT
    of a Unix socket), each a wakeup of both ends, and a server keeps the
    frame (and its pages) until the last write. The buffer is a limit, not
    memory: the kernel holds only what the peer has not read yet.
    """
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 2 * SEND_BUFFER_BYTES:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    except OSError as error:
        _logger.debug('send buffer left as it is: %s', error)


class _ThreadBuffer(threading.local):
    """The read buffer of the current thread (see :func:`buffered_recvmsg`)."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_SIZE))


_thread_buffer = _ThreadBuffer()


def buffered_recvmsg(sock: socket.socket, ancillary_size: int, flags: int
            ) -> tuple[bytes, list[tuple[int, int, bytes]], int, Any]:
    """``sock.recvmsg(READ_SIZE, ancillary_size, flags)``: data, ancillary
    data, flags, address.

    Read into a buffer kept per thread (reads of one thread never overlap,
    and the bytes are copied out at once): ``recvmsg(256 KiB)`` allocates
    that much for every read and shrinks it to what came, and glibc serves
    such a block with ``mmap``, ``mremap`` and ``munmap`` (three system
    calls and a page fault per read, more than the rest of a small call
    costs) unless its dynamic mmap threshold happened to rise earlier in
    the process.
    """
    view = _thread_buffer.view
    size, ancillary, message_flags, address = sock.recvmsg_into([view], ancillary_size, flags)
    return view[:size].tobytes(), ancillary, message_flags, address


def received_fds(ancillary: Sequence[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors in ``recvmsg()`` ancillary data (the caller owns them)."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            fds.extend(array.array('i', data[:len(data) - len(data) % _FD_SIZE]))
    return fds


def rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """``sendmsg()`` ancillary data passing ``fds``."""
    return [(_SOL_SOCKET, _SCM_RIGHTS, array.array('i', fds).tobytes())] if fds else []


_SOL_SOCKET, _SCM_RIGHTS = socket.SOL_SOCKET, socket.SCM_RIGHTS
#: The bytes of a descriptor in ancillary data (a C int).
_FD_SIZE = array.array('i').itemsize


class UnixTransport(asyncio.Transport):
    """A connected ``AF_UNIX`` stream socket as an asyncio transport that
    passes descriptors. Runs on (and only on) the loop it was made on.

    :param sock: a connected socket; the transport owns it and makes it non-blocking.
    :param protocol: gets ``connection_made`` (soon), ``fds_received``,
        ``data_received``, ``eof_received``, ``pause_writing``/``resume_writing``
        and ``connection_lost``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol: asyncio.Protocol) -> None:
        super().__init__({'socket': sock})
        sock.setblocking(False)
        enlarge_send_buffer(sock)
        self._loop = loop
        self._sock = sock
        self._fileno = sock.fileno()
        self._protocol: Any = protocol
        self._buffer: collections.deque[list[Any]] = collections.deque()  # [memoryview, fds]
        self._buffered = 0
        self._closing = False
        self._lost = False
        self._reading = True
        self._protocol_paused = False
        # buffered_recvmsg()'s buffer: that of the thread made on, the loop's
        # (see above), the only one that reads.
        self._read_into = [_thread_buffer.view]
        loop.call_soon(self._start)

    def _start(self) -> None:
        if self._lost:
            return
        self._protocol.connection_made(self)
        if not self._closing and self._reading:
            self._loop.add_reader(self._fileno, self._read_ready)

    # -- reading ----------------------------------------------------------------------

    def _read_ready(self) -> None:
        # buffered_recvmsg() inline, its buffer looked up once: there is a
        # read per call, and this part of a call is only Python overhead.
        read_into = self._read_into
        try:
            size, ancillary, flags, _ = self._sock.recvmsg_into(read_into, _ANCILLARY_SIZE, _MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._fatal(error)
            return
        if flags & MSG_CTRUNC:  # (with no ancillary data at all if none fitted)
            close_fds(received_fds(ancillary))
            cut = ConnectionError(CUT_OFF_FDS)
            # (a peer may cause it at will, by connecting again: limited)
            log_limited(_logger, logging.WARNING, 'descriptors cut', 'fast-lane connection closed: %s', cut)
            self._fatal(cut)
            return
        if ancillary:
            fds = received_fds(ancillary)
            if fds:
                self._protocol.fds_received(fds)
                if self._lost:
                    return
        if size:
            self._protocol.data_received(read_into[0][:size].tobytes())
            return
        self._loop.remove_reader(self._fileno)
        self._reading = False
        if not self._protocol.eof_received():
            self.close()

    def pause_reading(self) -> None:
        if self._reading and not self._closing:
            self._reading = False
            self._loop.remove_reader(self._fileno)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fileno, self._read_ready)

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    # -- writing ----------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Send ``data``, passing ``fds`` with its first bytes (in groups of
        at most :data:`MAX_FDS_PER_READ`, one byte each but the last). Takes
        ownership of ``fds``: they are closed once sent, or when the
        transport closes."""
        if not fds and not self._buffer and not self._closing and not self._lost:
            # The usual write (an answer, nothing queued): sent here, without
            # the calls and tests of _write() (with FramedConnection._write's
            # cheaper test, 1.2k of a small call's ~89k instructions on the
            # server, measured).
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as error:
                self._fatal(error)
                return
            if sent < len(data):
                self._queue(memoryview(data)[sent:], [])
            return
        if self._closing or self._lost:
            close_fds(fds)
            return
        if len(fds) > MAX_FDS_PER_READ:
            view = memoryview(data)
            groups = [list(fds[start:start + MAX_FDS_PER_READ])
                      for start in range(0, len(fds), MAX_FDS_PER_READ)]
            if len(view) < len(groups):
                close_fds(fds)
                raise ValueError(f'{len(fds)} descriptors need at least {len(groups)} bytes to travel with')
            for index, group in enumerate(groups[:-1]):
                self._write(view[index:index + 1], group)
            self._write(view[len(groups) - 1:], groups[-1])
            return
        self._write(data, fds)

    def _write(self, data: bytes | bytearray | memoryview, fds: Sequence[int]) -> None:
        if self._closing or self._lost:
            close_fds(fds)
            return
        if not self._buffer:
            try:
                sent = self._sock.sendmsg([data], rights(fds)) if fds else self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as error:
                close_fds(fds)
                self._fatal(error)
                return
            else:
                if fds:
                    close_fds(fds)
                    fds = ()
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        self._queue(memoryview(data), list(fds))

    def _queue(self, data: memoryview, fds: list[int]) -> None:
        """Keep what could not be sent yet for :meth:`_write_ready`."""
        if not self._buffer:
            self._loop.add_writer(self._fileno, self._write_ready)
        self._buffer.append([data, fds])
        self._buffered += len(data)
        if not self._protocol_paused and self._buffered > _HIGH_WATER:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def _write_ready(self) -> None:
        buffer = self._buffer
        while buffer:
            entry = buffer[0]
            data, fds = entry
            try:
                sent = self._sock.sendmsg([data], rights(fds)) if fds else self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                self._fatal(error)
                return
            if fds:
                close_fds(fds)
                entry[1] = []
            self._buffered -= sent
            if sent < len(data):
                entry[0] = data[sent:]
                break
            buffer.popleft()
        if not buffer:
            self._loop.remove_writer(self._fileno)
        if self._protocol_paused and self._buffered <= _LOW_WATER:
            self._protocol_paused = False
            self._protocol.resume_writing()
        if not buffer and self._closing:
            self._lose(None)

    def can_write_eof(self) -> bool:
        return False

    def has_unread_data(self) -> bool:
        """Whether bytes wait in the socket that have not been read (reading
        paused, or the loop busy elsewhere)."""
        if not self._reading:
            return True
        try:
            return bool(self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing there (EAGAIN), or the socket is gone
            return False

    def unread_by_peer(self) -> int:
        """Bytes written that the peer has not read yet: those buffered here
        and those in the socket (:func:`unread_in_socket`)."""
        return self._buffered + unread_in_socket(self._fileno)

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return _LOW_WATER, _HIGH_WATER

    # -- closing ----------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Close once what was written has been sent; idempotent."""
        if self._closing or self._lost:
            return
        self._closing = True
        if self._reading:
            self._loop.remove_reader(self._fileno)
        if not self._buffer:
            self._loop.call_soon(self._lose, None)

    def abort(self) -> None:
        """Close at once, dropping what was not sent yet."""
        self._lose(None)

    def drop(self) -> None:
        """Close the socket at once, from any thread, for a transport whose
        loop no longer runs (it may be closed): its peer sees the connection
        end now rather than when the loop is collected. The protocol is not
        told (its ``connection_lost`` would work with the dead loop); what was
        not sent is dropped, with the descriptors it would have passed.
        Idempotent."""
        if self._lost:
            return
        self._let_go()
        self._sock.close()

    def _fatal(self, error: BaseException) -> None:
        if not isinstance(error, (ConnectionError, BrokenPipeError)):
            _logger.debug('fast-lane socket error: %s', error)
        self._lose(error)

    def _lose(self, error: BaseException | None) -> None:
        if self._lost:
            return
        self._let_go()
        try:
            self._protocol.connection_lost(error)
        finally:
            self._sock.close()

    def _let_go(self) -> None:
        """Lost: the socket off the loop, what was not sent dropped with its descriptors."""
        self._lost = self._closing = True
        if not self._loop.is_closed():  # (drop(): a closed loop has no registrations left)
            self._loop.remove_reader(self._fileno)
            self._loop.remove_writer(self._fileno)
        for _, fds in self._buffer:
            close_fds(fds)
        self._buffer.clear()
        self._buffered = 0


def unread_in_socket(fileno: int) -> int:
    """Bytes sent on a Unix socket that its peer has not read yet
    (``SIOCOUTQ``, counting the kernel's overhead); 0 if it is gone."""
    try:
        return int(struct.unpack('i', fcntl.ioctl(fileno, termios.TIOCOUTQ, b'\0\0\0\0'))[0])
    except (OSError, ValueError):  # (closed: -1)
        return 0


def accept_connections(loop: asyncio.AbstractEventLoop, listener: socket.socket,
                       protocol_factory: Callable[[], asyncio.Protocol]) -> Callable[[], None]:
    """Accept connections on a listening ``AF_UNIX`` socket (made
    non-blocking here), each with a :class:`UnixTransport` and a new
    protocol. Returns the function that stops accepting and closes the
    listener (idempotent)."""
    listener.setblocking(False)
    fileno = listener.fileno()
    retry: list[asyncio.TimerHandle] = []

    def accept() -> None:
        for _ in range(64):  # then let other callbacks run
            try:
                connection, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as error:
                if error.errno not in _OUT_OF_RESOURCES:
                    raise
                # Keep serving who is connected; try again later.
                _logger.warning('fast lane cannot accept connections for %g s: %s',
                                ACCEPT_RETRY_DELAY, error)
                loop.remove_reader(fileno)
                retry.append(loop.call_later(ACCEPT_RETRY_DELAY, resume))
                return
            UnixTransport(loop, connection, protocol_factory())

    def resume() -> None:
        retry.clear()
        if listener.fileno() >= 0:
            loop.add_reader(fileno, accept)

    def stop() -> None:
        for handle in retry:
            handle.cancel()
        retry.clear()
        if listener.fileno() >= 0:
            loop.remove_reader(fileno)
            listener.close()

    loop.add_reader(fileno, accept)
    return stop
