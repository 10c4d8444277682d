"""The fast lane's blocking client: :class:`SyncConnection`."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any, Callable, Iterator, Sequence
import warnings

from .._busy_poll import DEFAULT_BUSY_POLL, validate_busy_poll
from .._deadline import Deadline, Timeout, deadline_of, wait_deadline
from .._fork_safety import this_process
from .._methods import Method
from .._options import DEFAULT_MAX_MESSAGE_BYTES
from .._payload import SharedMemoryOptions, close_fds
from .._request_stream import RequestStream
from .._shared_buffer import SharedBuffer
from ..address import StrPath
from ..exceptions import IPCError, IPCTimeoutError, IPCUnavailableError, no_answer
from ._blocking_socket import (
    FRAME_END_TIMEOUT,
    BlockingSocket,
    SendTimeout,
    SocketTimeout,
    SyncStream,
    Unsent,
    connect_socket,
)
from ._call import (
    HELLO,
    ClientCore,
    Item,
    Outcome,
    Prepared,
    check_kind,
    close_send_frame,
    connect_arguments,
    data_frame,
    deserialize,
    prepare,
    unary_response,
)
from ._errors import SenderFailed, closed, forked_error, lost, timeout_error, unsent, wait_error
from ._flow import DEFAULT_STREAM_WINDOW
from ._frames import FLAG_SHARED_MEMORY, Frame, FrameDecoder, encode_window_update
from ._messages import ENVELOPE_ALLOWANCE, Metadata
from ._transport import CUT_OFF_FDS, MSG_CTRUNC, received_fds, unread_in_socket

__all__ = ['SyncConnection']


class SyncConnection:
    """One ttrpc connection for blocking code; thread-safe.

    Open it with :meth:`connect`. Any number of threads may call at once
    over the one connection. No background thread reads: a calling thread
    waiting for its answer reads the socket for everyone and hands answers to
    the other waiting threads, so a lone call is one write and one read
    (the fast path of a request/response protocol). The reading thread polls
    the socket for up to ``busy_poll`` seconds before it sleeps, so that a
    quick answer costs no wakeup; it backs off while answers take longer.
    Request streams are sent from a short-lived helper thread per call.

    Every call blocks for at most its deadline (``timeout`` in seconds, or a
    deadline; ``None`` for none). With a vyra_base_ipc server, a call left
    early (a stream left, the deadline passed) is cancelled on the server
    and streams are flow-controlled, as for :class:`AsyncConnection`. A
    broken connection stays broken: :attr:`is_closed` turns true and calls
    raise :class:`IPCUnavailableError`. After ``fork()`` the child must open
    its own connection (:attr:`is_closed` is true there).
    """

    #: The lane's name, as ``lane=`` takes it.
    lane = 'ttrpc'

    def __init__(self, socket_path: str, sock: socket.socket, max_message_bytes: int,
                 shared_memory: SharedMemoryOptions | None = None,
                 stream_window: int = DEFAULT_STREAM_WINDOW, busy_poll: float = DEFAULT_BUSY_POLL) -> None:
        self.socket_path = socket_path
        self.max_message_bytes = max_message_bytes
        self._sock = sock
        self._pid = this_process.pid
        self._decoder = FrameDecoder(max_message_bytes + ENVELOPE_ALLOWANCE)
        # (Reentrant only so that _finish() can tell that its own thread holds it.)
        self._send_lock, self._state_lock = threading.Lock(), threading.RLock()
        # (state lock) The calls, the agreement, the routing of frames.
        self._core = ClientCore(socket_path, max_message_bytes, self._decoder, shared_memory,
                                stream_window, SyncStream.push, lambda: unread_in_socket(sock.fileno()))
        # (state lock) Control frames waiting for the send lock.
        self._control: list[bytes] = []
        self._reading = False
        self._retired = False  # (closed with its last call in flight: see retire())
        self._error: IPCUnavailableError | None = None
        self._hello_lock = threading.Lock()
        self._io = BlockingSocket(sock, busy_poll)

    @classmethod
    def connect(cls, socket_path: StrPath, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                timeout: float | None = None,
                shared_memory: SharedMemoryOptions | None = SharedMemoryOptions(),
                stream_window: int = DEFAULT_STREAM_WINDOW,
                busy_poll: float = DEFAULT_BUSY_POLL, server_uid: int | None = None) -> 'SyncConnection':
        """Connect to the ttrpc server on ``socket_path`` and offer it this
        package's extensions, as :meth:`AsyncConnection.connect` does.

        :param timeout: seconds to wait for the connection to be accepted
            (default :data:`~vyra_base_ipc.DEFAULT_TIMEOUT`).
        :param busy_poll: seconds the thread waiting for an answer polls the
            socket before it sleeps (:mod:`vyra_base_ipc._busy_poll`); 0 never.
        :param server_uid: as for :meth:`AsyncConnection.connect`.
        :raises UntrustedServerError: the server runs as another user.
        :raises IPCUnavailableError: no socket, nobody listening, not allowed.
        :raises TypeError, ValueError: invalid arguments.
        """
        path, limit, timeout, shared, window, trusted = connect_arguments(
            socket_path, max_message_bytes, timeout, shared_memory, stream_window, server_uid)
        validate_busy_poll(busy_poll)
        connection = cls(path, connect_socket(path, timeout, trusted), limit, shared, window, busy_poll)
        # Sent now, settled by the first call (see AsyncConnection.connect).
        core = connection._core
        core.hello = SyncStream()
        try:
            connection._open(core.hello, core.hello_request(), None)
        except BaseException:
            connection.close()
            raise
        return connection

    @property
    def shared_memory(self) -> SharedMemoryOptions | None:
        """As :attr:`AsyncConnection.shared_memory`."""
        return self._core.agreement.shared_memory

    @property
    def cancels(self) -> bool:
        """As :attr:`AsyncConnection.cancels`."""
        return self._core.agreement.cancel

    @property
    def is_closed(self) -> bool:
        """Whether the connection was closed, broke, was retired or used up its stream
        ids (calls in flight go on), or belongs to the parent of this (forked) process."""
        return self._error is not None or self._pid != this_process.pid or self._core.exhausted

    def retire(self) -> None:
        """Take no new calls (:attr:`is_closed` turns true); close once those in flight have ended.
        A call that took the connection before and finds it closed raises :class:`NothingSent`."""
        with self._state_lock:  # (calls start under it: one is in flight, or finds the connection closed)
            self._core.exhausted = self._retired = True
            if not self._core.streams:
                self.close()

    def close(self) -> None:
        """Close the connection; calls in flight fail with
        :class:`IPCUnavailableError`. Idempotent."""
        self._broken(closed(self.socket_path))

    def __enter__(self) -> 'SyncConnection':
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        sock = getattr(self, '_sock', None)
        if sock is not None and sock.fileno() >= 0 and getattr(self, '_pid', None) == this_process.pid:
            _warn(f'unclosed ttrpc SyncConnection to {self.socket_path!r}', ResourceWarning, source=self)
            getattr(self, '_io', sock).close()  # (the socket alone if __init__ failed)

    # -- calls ------------------------------------------------------------------------

    def call(self, method: Method, request: Any, *, timeout: Timeout = None,
             metadata: Metadata | None = None, buffers: Sequence[SharedBuffer] = (),
             return_buffers: bool = False) -> Any:
        """Call a unary-response method (``unary_unary`` or ``stream_unary``);
        block for at most the deadline.

        :param request: the request message; for ``stream_unary`` an iterable
            of them (consumed in a helper thread).
        :param buffers, return_buffers: as for :meth:`AsyncConnection.call`.
        :raises TypeError: the method streams responses (use :meth:`stream`).
        :raises IPCUnavailableError, IPCTimeoutError, IPCRemoteError: the call failed.
        """
        try:
            deadline = deadline_of(timeout)
            if method.__class__ is not Method or method.kind.response_streaming or self._core.hello:
                self._begin(method, False, deadline)  # (else it has nothing to do: 2 calls less)
            prepared = prepare(method, request, deadline, metadata, self.max_message_bytes,
                               self._core.agreement, buffers)
            stream = SyncStream()
            stream_id = self._open(stream, prepared, request)
            try:
                item = self._next(stream, deadline, method)
            finally:
                self._finish(stream_id, stream)
            response = unary_response(method, self.max_message_bytes, item, return_buffers)
            if item.__class__ is Frame and item.flags & FLAG_SHARED_MEMORY:
                del item  # parsed: what it lent goes back now, not with the next request
                self._send_control(self._core.release_frame())
            return response
        except IPCError as error:
            # One error object fails every call of a broken connection: name this call.
            raise error.for_method(method.path) from None

    def stream(self, method: Method, request: Any, *, timeout: Timeout = None,
               metadata: Metadata | None = None, idle_timeout: float | None = None) -> Iterator[Any]:
        """Call a response-streaming method; iterate over its responses.

        Deadline, ``idle_timeout`` and leaving early as for :meth:`AsyncConnection.stream`.

        :param request: the request message; for ``stream_stream`` an iterable
            of them (consumed in a helper thread, concurrently with receiving).
        :raises TypeError: the method does not stream responses (use :meth:`call`).
        :raises IPCUnavailableError, IPCTimeoutError, IPCRemoteError: the call failed.
        """
        try:
            deadline = deadline_of(timeout)
            self._begin(method, True, deadline, idle_timeout)
            outcome = Outcome(method, self.max_message_bytes)
            prepared = prepare(method, request, deadline, metadata, self.max_message_bytes,
                               self._core.agreement)
            stream = SyncStream()
            stream_id = self._open(stream, prepared, request)
            try:
                while True:
                    if deadline is not None and deadline.expired() and \
                            outcome.too_late(stream, stream_id not in self._core.streams):
                        stream.expired = True
                        raise timeout_error(method)
                    item = self._next(stream, deadline, method, idle_timeout)
                    ended, payload = outcome.streamed(item)
                    if not ended:
                        increment = stream.taken(item)
                        control = self._core.release_frame() + (  # not kept for the next request
                            encode_window_update(stream_id, increment) if increment else b'')
                        if control:
                            self._send_control(control)
                    if payload is not None:
                        yield deserialize(method, payload)
                    if ended:
                        return
            finally:
                self._finish(stream_id, stream)
        except IPCError as error:
            # One error object fails every call of a broken connection: name this call.
            raise error.for_method(method.path) from None

    def probe(self, deadline: Deadline) -> None:
        """As :meth:`AsyncConnection.probe <vyra_base_ipc.ttrpc.AsyncConnection.probe>`, blocking."""
        try:
            self._begin(HELLO, False, deadline)
        except IPCTimeoutError:
            raise no_answer(self.socket_path, deadline.timeout) from None

    def _begin(self, method: Method, response_streaming: bool, deadline: Deadline | None,
               idle_timeout: float | None = None) -> None:
        """Checks every call starts with; the first call of the connection
        (of any thread) also waits for the answer to its Hello (within the
        deadline, and a stream's idle timeout)."""
        check_kind(method, response_streaming)
        if self._core.hello is None:
            return
        wait = wait_deadline(deadline, idle_timeout)
        if not self._hello_lock.acquire(timeout=-1 if wait is None else max(wait.remaining(), 0)):
            raise wait_error(method, deadline, idle_timeout)
        try:
            hello = self._core.hello
            if hello is not None:
                item = self._next(hello, deadline, method, idle_timeout)
                with self._state_lock:
                    self._core.settle(item)
        finally:
            self._hello_lock.release()

    def _open(self, stream: SyncStream, prepared: Prepared, request: Any) -> int:
        """Send the request of a new call; start its request stream's sender."""
        method = prepared.method
        try:
            if self._pid != this_process.pid:
                # Checked before taking any lock: a lock held at fork() time by
                # another thread of the parent is never released in the child.
                raise forked_error()
            self._acquire_send(prepared.deadline, method)
        except BaseException:
            prepared.discard()
            raise
        try:
            with self._state_lock:
                if self._error is not None:
                    prepared.discard()  # (and a retired connection's call may go again: see retire())
                    raise unsent(self._error, self._retired)
                stream_id = self._core.register(stream, prepared)
            try:
                # The server's segments this end let go of leave with the request.
                self._send_locked(prepared.frame(stream_id, self._core.release_frame()),
                                  prepared.deadline, method, prepared.take_fds())
            except BaseException:
                self._finish(stream_id, stream)
                raise
        finally:
            self._release_send()
        if method.kind.request_streaming:
            stream.sender = True
            threading.Thread(target=self._send_requests, args=(stream_id, stream, prepared, request),
                             name=f'ttrpc-send-{stream_id}', daemon=True).start()
        return stream_id

    def _finish(self, stream_id: int, stream: SyncStream) -> None:
        """The caller is done with a call: tell the server if it may still be at work."""
        stream.abandoned = True
        if self._state_lock._is_owned():  # type: ignore[attr-defined]  # (as threading.Condition asks it)
            # The garbage collector finalized a stream left in a reference
            # cycle while this thread held the lock, mid-change: finish once it is free.
            with contextlib.suppress(RuntimeError):  # (no new threads at interpreter exit)
                threading.Thread(target=self._finish, args=(stream_id, stream), daemon=True,
                                 name=f'ttrpc-finish-{stream_id}').start()
            return
        if stream.sender:  # it may wait for room in the socket, holding the send lock
            with self._state_lock:  # (not closed meanwhile)
                self._io.wake()
        if stream_id in self._core.streams or stream.window is not None:  # (see HeldMappings)
            with self._state_lock:
                cancel = self._core.finish(stream_id, stream)
            if cancel is not None:
                self._send_control(cancel)
        if self._retired:
            with self._state_lock:  # (as in retire())
                if not self._core.streams:
                    self.close()  # its last call ended

    # -- sending ----------------------------------------------------------------------

    def _acquire_send(self, deadline: Deadline | None, method: Method) -> None:
        if self._send_lock.acquire(blocking=False):  # the usual case: nobody sends
            return
        if not self._send_lock.acquire(timeout=-1 if deadline is None else max(deadline.remaining(), 0)):
            raise timeout_error(method)

    def _release_send(self) -> None:
        """Let go of the send lock, after sending the control frames queued
        meanwhile (a thread that queues one while another sends leaves it to
        the sender)."""
        while True:
            try:
                sent = self._send_queued_control() if self._control else True
            finally:
                self._send_lock.release()
            if not sent or not self._control or not self._send_lock.acquire(blocking=False):
                return

    def _send_control(self, frame: bytes) -> None:
        """Send small frames (CANCEL, WINDOW_UPDATE, RELEASE), if any, without
        waiting for other senders: now if nobody sends, else by the thread that does."""
        with self._state_lock:
            if not frame or self._error is not None or self._pid != this_process.pid:
                return
            self._control.append(frame)
        if self._send_lock.acquire(blocking=False):
            self._release_send()

    def _send_queued_control(self) -> bool:
        """(send lock held) Send the queued control frames if the socket
        takes them now; False if it took none (they stay queued, for the
        next sender or the next read)."""
        if not self._control:  # (no lock: one queued meanwhile is seen after the release)
            return True
        with self._state_lock:
            if not self._control or self._error is not None:
                return True
            data, self._control = b''.join(self._control), []
        try:
            sent = self._io.send_now(data)
        except OSError as error:
            self._broken(lost(self.socket_path, error))
            return True
        if sent == 0:
            with self._state_lock:
                self._control.insert(0, data)
            return False
        if sent < len(data):
            try:  # a frame begun must be ended
                self._send_locked(data[sent:], Deadline.after(FRAME_END_TIMEOUT), None, [])
            except IPCError:
                pass  # the connection is broken now
        return True

    def _send_locked(self, data: bytes, deadline: Deadline | None, method: Method | None,
                     fds: list[int], stream: SyncStream | None = None) -> None:
        """Write all of ``data`` within the call's deadline (send lock held),
        passing ``fds`` (closed here, whatever happens) with its first byte:
        a control frame (no ``method``), a message of ``stream``'s request
        stream (until its caller left: :meth:`BlockingSocket.send_all`), or
        the frame opening a ``method``'s call (:class:`NothingSent` if none of it left).

        A frame written only in part cannot be taken back: if the deadline
        passes mid-frame the connection is closed (the frames are out of step).
        """
        try:
            self._io.send_all(data, deadline, fds, None if stream is None else lambda: stream.abandoned)
        except SendTimeout as timeout:
            if timeout.sent_any:
                self._broken(lost(self.socket_path, 'a frame could not be sent in time'))
            if method is None:
                raise self._error or lost(self.socket_path, 'sending timed out') from None
            raise timeout_error(method) from None
        except OSError as error:
            self._broken(lost(self.socket_path, error))
            failure = self._error or closed(self.socket_path)  # the first: 'was closed' if closed here
            if isinstance(error, Unsent) and method is not None and stream is None:
                raise unsent(failure) from None
            raise failure from None
        finally:
            if fds:
                close_fds(fds)

    def _send_requests(self, stream_id: int, stream: SyncStream, prepared: Prepared, requests: Any) -> None:
        method = prepared.method
        deadline = prepared.deadline
        shared = self._core.agreement
        credit = stream.credit
        try:
            for message in RequestStream(method, requests):
                if credit is not None and credit.credit <= 0:
                    if not credit.wait_blocking(None if deadline is None else max(deadline.remaining(), 0)):
                        return  # the call's deadline passed: its caller says so
                if stream.abandoned:
                    return
                frame, fds, cost = data_frame(stream_id, method, message, self.max_message_bytes, shared)
                self._send_frame(frame, fds, deadline, method, stream)
                if credit is not None:
                    credit.spend(cost)
            if not stream.abandoned:
                self._send_frame(close_send_frame(stream_id), [], deadline, method, stream)
        except Exception as error:  # the connection's, or the caller's iterator's: as the asyncio sender says
            with self._state_lock:
                stream.push(error if isinstance(error, IPCError) else SenderFailed(error))
                self._io.wake_reader()  # (its caller may be the thread asleep reading)
            if not isinstance(error, IPCError) and not shared.cancel:
                with contextlib.suppress(IPCError):
                    self._send_frame(close_send_frame(stream_id), [], deadline, method, stream)

    def _send_frame(self, frame: bytes, fds: list[int], deadline: Deadline | None, method: Method,
                    stream: SyncStream) -> None:
        try:
            self._acquire_send(deadline, method)
        except BaseException:
            close_fds(fds)
            raise
        try:
            if self._error is not None:
                close_fds(fds)
                raise self._error
            self._send_locked(frame, deadline, method, fds, stream)
        finally:
            self._release_send()

    # -- receiving --------------------------------------------------------------------

    def _next(self, stream: SyncStream, deadline: Deadline | None, method: Method,
              idle_timeout: float | None = None) -> Item:
        """The next item of ``stream``: wait for another thread to read it,
        or read the socket ourselves while nobody else does.

        :raises IPCTimeoutError: the deadline passed, or no item came within
            ``idle_timeout`` seconds.
        """
        wait_until = wait_deadline(deadline, idle_timeout)
        with self._state_lock:
            while True:
                if stream.items:
                    item = self._take(stream)
                    if not self._reading:
                        self._wake_a_waiter()
                    return item
                if self._error is not None:
                    raise self._error
                if not self._reading:
                    self._reading = True
                    break
                remaining = None if wait_until is None else wait_until.remaining()
                if remaining is not None and remaining <= 0:
                    raise stream.timed_out(deadline, method, idle_timeout)
                if stream.condition is None:
                    stream.condition = threading.Condition(self._state_lock)
                stream.waiting = True
                try:
                    stream.condition.wait(remaining)
                finally:
                    stream.waiting = False
        handed_over: Item | None = None
        try:
            while True:
                handed_over = self._read(wait_until, stream)
                if self._control and self._send_lock.acquire(blocking=False):
                    self._release_send()  # left queued while the socket was full
                if handed_over is not None:
                    return handed_over
                with self._state_lock:
                    if stream.items:
                        return self._take(stream)
                    if self._error is not None:
                        raise self._error
        except SocketTimeout:
            raise stream.timed_out(deadline, method, idle_timeout) from None
        finally:
            if handed_over is None:  # (else _read() gave up the turn already)
                with self._state_lock:
                    self._reading = False
                    self._wake_a_waiter()
                    if self._error is not None:
                        self._close_socket()  # deferred by _broken() while we were reading

    def _take(self, stream: SyncStream) -> Item:
        # (state lock held) The next item for the caller; the mappings it held no longer count.
        item = stream.items.popleft()
        if stream.held:
            self._core.held.taken(stream, item)
        return item

    def _wake_a_waiter(self) -> None:
        # (state lock held) Someone must read for the threads still waiting.
        for other in self._core.streams.values():
            if other.waiting:
                other.condition.notify()
                return

    def _read(self, deadline: Deadline | None, stream: SyncStream) -> Item | None:
        """Read once (as the reading thread) and hand out what arrived; an
        item of the reader's own ``stream`` is returned, the reading turn
        given up in the lock hold that routed it (one lock, not three).

        :raises SocketTimeout: the deadline passed.
        """
        if self._error is not None:
            return None
        decoder = self._decoder
        try:
            received = self._io.receive(deadline, wakeable=stream.sender)
        except OSError as error:
            self._broken(lost(self.socket_path, error))
            return None
        if received is None:
            return None
        data, ancillary, flags, _ = received
        if ancillary or flags & MSG_CTRUNC:  # (no ancillary data at all if none fitted)
            why = decoder.add_fds(received_fds(ancillary), self._core.offered is not None)
            if why is not None or flags & MSG_CTRUNC:
                self._broken(lost(self.socket_path, CUT_OFF_FDS if flags & MSG_CTRUNC else why))
                return None
        if not data:
            self._broken(lost(self.socket_path, 'closed by the server'))
            return None
        reason = None
        with self._state_lock:
            for item in decoder.feed(data):
                reason = self._core.route(item)
                if reason is not None:
                    break
            if reason is None and stream.items and self._error is None:
                self._reading = False
                if self._core.streams:  # (a lone call has gone from them: no call to make)
                    self._wake_a_waiter()
                return self._take(stream)
        if reason is not None:
            self._broken(lost(self.socket_path, reason))
        return None

    def _broken(self, error: IPCUnavailableError) -> None:
        with self._state_lock:
            if self._error is not None:
                return
            self._error = error
            self._control.clear()
            self._core.end_segments()
            for stream in self._core.streams.values():
                if stream.credit is not None:
                    stream.credit.close()
                if stream.condition is not None:
                    stream.condition.notify_all()
            if self._pid == this_process.pid:
                try:
                    # Wakes a thread blocked in poll() on this socket.
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if not self._reading:
                # (Otherwise the reading thread closes it when it stops: its
                # poll() must not see the descriptor number reused.)
                self._close_socket()

    def _close_socket(self) -> None:
        # (state lock held, nobody reading) Descriptors of frames that never came go too.
        self._io.close()
        close_fds(self._decoder.take_fds())

