"""Blocking reads and writes on the blocking client's socket, each within a
deadline; and the stream of one call, whose thread sleeps while another reads."""

from __future__ import annotations

import math
import os
import select
import socket
import struct
import threading
from typing import Any, Callable

from .._busy_poll import BusyPoll
from .._deadline import Deadline
from .._peer import check_server_connection
from ._call import ClientStream
from ._errors import connect_error, not_accepted
from ._transport import MAX_FDS_PER_READ, buffered_recvmsg, enlarge_send_buffer, rights

__all__ = ['FRAME_END_TIMEOUT', 'BlockingSocket', 'Received', 'SendTimeout', 'SocketTimeout', 'SyncStream',
           'Unsent', 'connect_socket']

#: How long the rest of a frame already partly sent may take once its sender
#: has no deadline of its own (a control frame; a request stream whose caller
#: left) before the connection counts as broken.
FRAME_END_TIMEOUT = 5.0

_ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_READ * 4)
_MSG_CMSG_CLOEXEC = getattr(socket, 'MSG_CMSG_CLOEXEC', 0x40000000)
# Plain ints: the socket module's flags are IntFlag members, whose | costs
# ~0.5 us each time.
_DONTWAIT = int(socket.MSG_DONTWAIT)
_RECEIVE = int(_MSG_CMSG_CLOEXEC)
_RECEIVE_NOW = int(_MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
#: What socket.recvmsg() returns: data, ancillary data, flags, address.
Received = tuple[bytes, list[tuple[int, int, bytes]], int, Any]


def connect_socket(path: str, timeout: float, trusted: frozenset[int]) -> socket.socket:
    """A blocking socket connected to the server on ``path`` within
    ``timeout`` seconds, its server's user checked against ``trusted``.

    :raises IPCUnavailableError: no socket, nobody listening, not allowed.
    :raises UntrustedServerError: the server runs as another user.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except socket.timeout:
        sock.close()
        raise not_accepted(path, timeout) from None
    except OSError as error:
        sock.close()
        raise connect_error(path, error) from None
    try:
        check_server_connection(sock, path, trusted)
    except BaseException:
        sock.close()
        raise
    return sock


class SyncStream(ClientStream):
    """Items received for one call; its waiter sleeps on ``condition``
    (made the first time it has to wait: a lone caller never does).
    ``abandoned`` once its caller left; ``sender`` if it has a request stream."""

    __slots__ = ('condition', 'waiting', 'abandoned', 'sender')

    def __init__(self) -> None:
        super().__init__()
        self.condition: threading.Condition | None = None
        self.waiting = self.abandoned = self.sender = False

    def wake(self) -> None:  # (state lock held)
        if self.waiting:
            self.condition.notify()  # type: ignore[union-attr]


class SocketTimeout(Exception):
    """The deadline passed before anything could be read."""


class SendTimeout(Exception):
    """The deadline passed before all the data could be written;
    ``sent_any`` says whether part of it was (the frame stream is then out
    of step)."""

    def __init__(self, sent_any: bool) -> None:
        super().__init__(sent_any)
        self.sent_any = sent_any


class Unsent(OSError):
    """The socket failed before any of the data was written."""


class BlockingSocket:
    """A connected stream socket in blocking mode, used by one sending and
    one reading thread at a time (the connection's send lock and reading
    turn decide which).

    Deadlines are kept by SO_RCVTIMEO and MSG_DONTWAIT rather than a socket
    timeout: a thread asleep in recv() is woken as the sender's 'sync'
    wakeup (often on the sender's CPU), one asleep in poll() is not; on the
    test machine poll()+recv() cost ~35 us more per round trip.

    The socket's send buffer is enlarged (:func:`enlarge_send_buffer`), so
    that a frame of up to 1 MiB leaves in one write without waiting for
    the server to read.
    """

    def __init__(self, sock: socket.socket, busy_poll: float) -> None:
        sock.settimeout(None)
        enlarge_send_buffer(sock)
        self.sock = sock
        # Wakes a sender waiting for room in the socket (wake()).
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poll_out = select.poll()
        self._poll_out.register(sock.fileno(), select.POLLOUT)
        self._poll_out.register(self._wakeup, select.POLLIN)
        poll_in = select.poll()
        poll_in.register(sock.fileno(), select.POLLIN)
        self._poll_in = poll_in.poll
        # Wakes a reader that a request stream's sender may have to tell it
        # failed (wake_reader()): one asleep in recv() cannot be woken.
        self._reader_wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        poll_woken = select.poll()
        poll_woken.register(sock.fileno(), select.POLLIN)
        poll_woken.register(self._reader_wakeup, select.POLLIN)
        self._poll_in_or_woken = poll_woken.poll
        self._busy_poll = BusyPoll(busy_poll)
        # The receive timeout set on the socket (SO_RCVTIMEO), 0 for none.
        self._receive_timeout: float | None = None

    def send_now(self, data: bytes) -> int:
        """Write what the socket takes without waiting; the number of bytes taken."""
        try:
            return self.sock.send(data, _DONTWAIT)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        """Close the socket and the wake-up descriptors. Idempotent."""
        self.sock.close()
        if self._wakeup >= 0:
            os.close(self._wakeup)
            os.close(self._reader_wakeup)
            self._wakeup = self._reader_wakeup = -1

    def wake(self) -> None:
        """Make a sender waiting for room in the socket ask its ``left()`` again."""
        if self._wakeup >= 0:
            os.eventfd_write(self._wakeup, 1)

    def wake_reader(self) -> None:
        """Make a :meth:`receive` that is ``wakeable`` return (``None``) now
        or, if none is waiting, the next one."""
        if self._reader_wakeup >= 0:
            os.eventfd_write(self._reader_wakeup, 1)

    def send_all(self, data: bytes | memoryview, deadline: Deadline | None, fds: list[int],
                 left: Callable[[], bool] | None = None) -> None:
        """Write all of ``data`` by ``deadline``, passing ``fds`` with its first byte.

        While the socket is full, a sender whose ``left()`` turns true (it
        is asked again on :meth:`wake`) gives up: at once if none of
        ``data`` was written, else it ends the frame it began within
        :data:`FRAME_END_TIMEOUT`.

        :raises SendTimeout: the deadline passed first.
        :raises Unsent: the socket failed before any of ``data`` was written.
        :raises OSError: the socket failed later.
        """
        sock = self.sock
        if not fds:
            # The usual case first: the socket takes the whole frame at once.
            try:
                sent = sock.send(data, _DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError as error:
                raise Unsent(error.errno, error.strerror) from None
            if sent == len(data):
                return
            view = memoryview(data)[sent:]
            sent_any = sent > 0
        else:
            view = memoryview(data)
            sent_any = False
        while view:
            try:
                if fds and not sent_any:
                    sent = sock.sendmsg([view], rights(fds), _DONTWAIT)
                else:
                    sent = sock.send(view, _DONTWAIT)
            except BlockingIOError:
                if left is not None and left():
                    if not sent_any:
                        return
                    left = None
                    deadline = Deadline.after(FRAME_END_TIMEOUT) if deadline is None \
                        else deadline.earlier(FRAME_END_TIMEOUT)
                if not self._wait_writable(deadline):
                    raise SendTimeout(sent_any) from None
                continue
            except OSError as error:
                if sent_any:
                    raise
                raise Unsent(error.errno, error.strerror) from None
            sent_any = True
            view = view[sent:]

    def _wait_writable(self, deadline: Deadline | None) -> bool:
        """Wait for room in the socket or a wake(); False if the deadline passed first."""
        timeout = -1 if deadline is None else max(0, math.ceil(deadline.remaining() * 1000))
        ready = self._poll_out.poll(timeout)
        if len(ready) > 1 or ready and ready[0][0] == self._wakeup:
            try:
                os.eventfd_read(self._wakeup)
            except OSError:
                pass  # closed meanwhile (the connection broke): the send fails next
        return bool(ready)

    def receive(self, deadline: Deadline | None, wakeable: bool = False) -> Received | None:
        """Read what has arrived, polling for up to the busy-poll time
        before sleeping; ``None`` if the read woke before ``deadline``
        with nothing (read again). A ``wakeable`` read sleeps in poll()
        rather than recv() (a wakeup later), so that :meth:`wake_reader`
        can end it.

        :raises SocketTimeout: the deadline passed.
        :raises OSError: the socket failed.
        """
        timeout = None if deadline is None else deadline.remaining()
        try:
            sleep = self._receive_wakeable if wakeable else self._receive_blocking
            return self._busy_poll.wait(self._receive_now, sleep, timeout)
        except (BlockingIOError, TimeoutError):  # SO_RCVTIMEO expired
            if deadline is not None and deadline.expired():
                raise SocketTimeout() from None
            return None

    def _receive_blocking(self, timeout: float | None) -> Received:
        self._limit_receive(timeout)
        return buffered_recvmsg(self.sock, _ANCILLARY_SIZE, _RECEIVE)

    def _receive_wakeable(self, timeout: float | None) -> Received | None:
        ready = self._poll_in_or_woken(-1 if timeout is None else max(0, math.ceil(timeout * 1000)))
        if any(fd == self._reader_wakeup for fd, _ in ready):
            try:
                os.eventfd_read(self._reader_wakeup)
            except OSError:
                pass  # (closed meanwhile: the connection broke)
            return None
        if not ready:
            raise TimeoutError  # as when SO_RCVTIMEO expires
        return self._receive_now()

    def _receive_now(self) -> Received | None:
        # poll() first: a recvmsg() that finds nothing raises, which costs
        # ~4 times what poll() does, and polling mostly finds nothing.
        if not self._poll_in(0):
            return None
        try:
            return buffered_recvmsg(self.sock, _ANCILLARY_SIZE, _RECEIVE_NOW)
        except BlockingIOError:
            return None

    def _limit_receive(self, timeout: float | None) -> None:
        """Make the next recv() return within ``timeout`` seconds
        (SO_RCVTIMEO; ``None``: no limit).

        The option is set only when it must change: a value set for an
        earlier call is kept while it ends no later than 1 ms after this
        deadline and no sooner than 50 ms before it (then the read just
        wakes early and is repeated), so calls with one usual timeout cost
        no extra system call.
        """
        if timeout is None:
            wanted = 0.0
        else:
            wanted = timeout
            if wanted <= 0:
                raise SocketTimeout()
        current = self._receive_timeout
        if current is not None:
            if wanted == 0.0 and current == 0.0:
                return
            if current and wanted and wanted - 0.05 <= current <= wanted + 0.001:
                return
        seconds = int(wanted)
        microseconds = int((wanted - seconds) * 1e6)
        if wanted and not seconds and not microseconds:
            microseconds = 1  # 0 would mean no timeout at all
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                             struct.pack('@ll', seconds, microseconds))
        self._receive_timeout = wanted
