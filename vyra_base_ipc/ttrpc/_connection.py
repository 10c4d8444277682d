"""One framed ttrpc connection on an event loop, for either end.

What the server's connections and the asyncio client's share (containerd's
``channel.go`` is the same idea): decoding frames and the descriptors that
come with them, sending frames in batches, flow of pause/resume/drain
between the socket and the senders, and clean-up when the connection is
lost. The two ends plug in by :meth:`FramedConnection.frame_received` and
:meth:`FramedConnection.lost`.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Sequence, Union

from .._payload import close_fds
from ._frames import MAX_BATCH_FDS, Frame, FrameDecoder, OversizedFrame, encode_window_update
from ._hello import PLAIN, Agreement
from ._transport import UnixTransport

__all__ = ['BATCH_BYTES', 'FramedConnection']

#: Frames held back for one write are written once they reach this many bytes.
BATCH_BYTES = 64 * 1024


class FramedConnection(asyncio.Protocol):
    """A connection that sends and receives ttrpc frames; runs on one event loop.

    Subclasses handle received frames (:meth:`frame_received`) and count the
    calls in flight (:meth:`in_flight`, for batching); :meth:`send` may be
    called from the loop's thread only.

    :param frame_limit: the largest frame data accepted.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, frame_limit: int) -> None:
        self.loop = loop
        self.decoder = FrameDecoder(frame_limit)
        self.transport: UnixTransport | None = None
        #: Lost or closing: nothing is sent any more.
        self.closed = False
        #: The extensions agreed with the peer (see the Hello).
        self.agreement: Agreement = PLAIN
        #: Whether descriptors from the peer are accepted (shared memory
        #: offered or agreed); any other descriptor breaks the connection.
        self.accepts_fds = False
        #: True while the peer does not read what was written.
        self.write_paused = False
        #: Set while writing is not paused, for senders in other threads.
        self.writable = threading.Event()
        self.writable.set()
        #: True while data_received handles a read of several frames: sends
        #: then wait for its end.
        self.receiving = False
        #: True between hold() and flush_held(): frames that pass descriptors
        #: wait for flush_held() (see send()).
        self.holding = False
        #: Bytes of written frames the peer may leave unread before the
        #: connection is closed (None: no limit, the client's case).
        self.queue_limit: int | None = None
        # (A dict as an ordered set: a waiter cancelled leaves at once.)
        self._drain_waiters: dict[asyncio.Future[None], None] = {}
        # Frames held back to leave in one write (see send()), and the
        # descriptors that go with them.
        self._pending: list[bytes] = []
        self._pending_fds: list[int] = []
        self._pending_bytes = 0
        self._flush_scheduled = False

    # -- what an end provides ---------------------------------------------------------

    def frame_received(self, item: Union[Frame, OversizedFrame]) -> None:
        """Handle one received frame (in order)."""
        raise NotImplementedError

    def in_flight(self) -> int:
        """How many calls are in flight on the connection."""
        raise NotImplementedError

    def lost(self, exc: Exception | None) -> None:
        """The connection is gone (after the shared clean-up)."""

    def violation(self, reason: str) -> None:
        """The peer broke the protocol in a way that leaves the connection
        out of step: close it at once."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, UnixTransport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.write_paused = False
        self.writable.set()
        self._wake_drainers()
        close_fds(self.decoder.take_fds())
        close_fds(self._pending_fds)
        self._pending_fds = []
        self._pending.clear()
        self.lost(exc)

    def drop(self) -> None:
        """For a connection whose loop no longer runs (it may be closed):
        close its socket and the descriptors this end holds (received and not
        claimed by a frame, or waiting to be sent), at once and from any
        thread. Nothing of the loop runs: its calls stay as the loop left
        them, and :meth:`lost` is not called. Idempotent."""
        self.closed = True
        if self.transport is not None:
            self.transport.drop()
        close_fds(self.decoder.take_fds())
        close_fds(self._pending_fds)
        self._pending_fds = []
        self._pending.clear()

    def fds_received(self, fds: list[int]) -> None:
        """Descriptors passed with the bytes that follow; queued until their
        frames take them."""
        why = self.decoder.add_fds(fds, self.accepts_fds)
        if why is not None:
            self.violation(why)

    def unread_by_peer(self) -> int:
        """Bytes written that the peer has not read yet (1 before the
        connection is made: nothing is known to be read)."""
        return 1 if self.transport is None else self.transport.unread_by_peer()

    def hold(self) -> None:
        """Until :meth:`flush_held`, frames that pass descriptors (answers in
        shared memory) wait, and lends given back do not wake the loop: at
        :meth:`flush_held` both leave in one write, so that a peer reading an
        answer also reads the RELEASE of the lends its call had made (an
        answer with the request's buffer: the client may use that segment
        again for its next call at once). On the loop's thread; around the
        handling of a read, and around an answer in shared memory sent
        outside one (:meth:`Call.answer`)."""
        segments = self.agreement.segments
        if segments is not None:
            segments.held = True
        self.holding = True

    def flush_held(self) -> None:
        """Send what :meth:`hold` kept, and the frames batched meanwhile."""
        self.holding = False
        segments = self.agreement.segments  # (maybe agreed by a Hello meanwhile)
        if segments is not None:
            segments.held = False
            releases = segments.release_frame()
            if releases:
                self.send(releases)
        if self._pending:
            self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            items = self.decoder.feed(data)
        except MemoryError:
            # This peer's frames cannot be held: drop it, not the process.
            self._pending.clear()
            self.violation('out of memory while receiving its frames')
            return
        self.frames_received(items)

    def frames_received(self, items: Sequence[Union[Frame, OversizedFrame]]) -> None:
        """Handle frames (in order) as those of one read: what they send
        leaves in one write."""
        self.hold()
        try:
            # The answers to the frames of one read leave in one write. A
            # read of one frame (a call at a time) has nothing to batch
            # with: what it sends is written at once, so that a call's
            # answer leaves before the bookkeeping of its end, not after.
            self.receiving = len(items) > 1
            for item in items:
                if self.closed:
                    return
                self.frame_received(item)
        except MemoryError:
            self._pending.clear()
            self.violation('out of memory while handling its frames')
        finally:
            self.receiving = False
            self.flush_held()

    def eof_received(self) -> bool:
        return False  # half-closed by the peer: close (in-flight calls end)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.writable.clear()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.writable.set()
        self._wake_drainers()

    async def drain(self) -> None:
        """Wait until the peer has read enough of what was written (or the
        connection is gone). A wait cancelled leaves nothing behind."""
        if self.write_paused and not self.closed:
            waiter = self.loop.create_future()
            self._drain_waiters[waiter] = None
            try:
                await waiter
            finally:
                # Calls that time out while a peer reads nothing would
                # otherwise pile up their waiters until it reads again.
                self._drain_waiters.pop(waiter, None)

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, {}
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- sending ----------------------------------------------------------------------

    def send(self, frame: bytes, fds: Sequence[int] = ()) -> None:
        """Write a frame, passing ``fds`` (owned from here on) with its first
        byte; dropped if the connection is closed.

        A lone call's frame is written at once. While other calls are in
        flight, or while a read's frames are being handled, frames wait for
        the end of this turn of the event loop (or until 64 KiB gathered) and
        leave in one write: a send on a Unix socket costs about as much as
        handling a small call, so 64 answers in one write instead of 64 is
        most of the throughput of concurrent calls. A frame that passes
        descriptors waits, between :meth:`hold` and :meth:`flush_held`, for
        the latter.
        """
        if self.receiving or self.in_flight() > 1 or (fds and self.holding):
            self._pending.append(frame)
            self._pending_bytes += len(frame)
            if fds:
                # They leave with the first byte of the batch: before their
                # frame, which is all the receiver needs (see _frames).
                self._pending_fds.extend(fds)
            if self._pending_bytes >= BATCH_BYTES or len(self._pending_fds) >= MAX_BATCH_FDS:
                self._flush()  # a full batch: the transport's flow control takes over
            elif not self.holding and not self._flush_scheduled:
                self._flush_scheduled = True
                self.loop.call_soon(self._flush)
        elif self._pending:
            self._pending.append(frame)
            self._pending_fds.extend(fds)
            self._flush()
        else:
            self._write(frame, fds)

    def send_window_update(self, stream_id: int, increment: int) -> None:
        """Grant the peer ``increment`` more bytes on ``stream_id``."""
        self.send(encode_window_update(stream_id, increment))

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending = self._pending
        if pending:
            # (A lone frame, the usual batch of a call at a time, is not copied.)
            frames = pending[0] if len(pending) == 1 else b''.join(pending)
            fds, self._pending_fds = self._pending_fds, []
            self._pending.clear()
            self._pending_bytes = 0
            self._write(frames, fds)

    def _write(self, data: bytes, fds: Sequence[int]) -> None:
        transport = self.transport
        if not self.closed and transport is not None:
            transport.write(data, fds)  # (which drops them if it is closing)
            # (transport._buffered: get_write_buffer_size() without a call.)
            if self.queue_limit is not None and transport._buffered > self.queue_limit:
                self.violation(f'the peer left {transport.get_write_buffer_size()} bytes of answers '
                               f'unread (limit {self.queue_limit})')
        else:
            close_fds(fds)

    def close(self) -> None:
        """Close once what was written has been sent."""
        self._flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
