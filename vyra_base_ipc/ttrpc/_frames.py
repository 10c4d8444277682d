"""ttrpc message frames: the 10-byte header and an incremental decoder.

Wire format (containerd/ttrpc ``PROTOCOL.md``): every frame is a big-endian
header ``uint32 data length, uint32 stream id, uint8 message type, uint8
flags`` followed by ``data length`` bytes. Client-initiated streams have odd
ids, increasing on the wire. The decoder is transport-neutral: it is fed
bytes (and the file descriptors that arrived with them) and returns whole
frames, so it works under an asyncio protocol, a blocking socket, or
``recvmsg``.

Descriptors (``SCM_RIGHTS``) ride with the first bytes of the frame they
belong to, but a read may return them together with the tail of an earlier
frame, so they cannot be tied to frames by position. They queue up in
arrival order instead; a frame flagged :data:`FLAG_SHARED_MEMORY` says how
many it owns and its receiver takes that many with
:meth:`FrameDecoder.take_fds`, in frame order.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, Callable, NamedTuple, Sequence, Union

__all__ = [
    'DEFAULT_MAX_DATA_LENGTH',
    'FLAG_DEADLINE_EXCEEDED',
    'FLAG_NO_DATA',
    'FLAG_REMOTE_CLOSED',
    'FLAG_REMOTE_OPEN',
    'FLAG_SHARED_MEMORY',
    'FORGET_BIT',
    'MAX_BATCH_FDS',
    'MAX_QUEUED_FDS',
    'MAX_STREAM_ID',
    'MAX_WINDOW',
    'Frame',
    'FrameDecoder',
    'HEADER',
    'HEADER_SIZE',
    'MessageType',
    'OversizedFrame',
    'encode_cancel',
    'encode_frame',
    'encode_release',
    'encode_window_update',
    'oversized_message',
    'released_ids',
    'window_increment',
]

#: ``>IIBB``: data length, stream id, message type, flags.
HEADER = struct.Struct('>IIBB')
HEADER_SIZE = HEADER.size

#: The protocol's default limit on a frame's data (4 MiB); larger frames are
#: rejected unless both ends are configured for more.
DEFAULT_MAX_DATA_LENGTH = 4 << 20

#: Request: the client sends no more data (the request payload is all).
#: Data: the last data frame of the sender.
FLAG_REMOTE_CLOSED = 0x01
#: Request: the client will send data frames after the request.
FLAG_REMOTE_OPEN = 0x02
#: Data: the frame carries no message (a bare close); an empty message is a
#: zero-length frame without this flag.
FLAG_NO_DATA = 0x04
#: Cancel (vyra_base_ipc's extension): the client leaves because the call's
#: deadline passed. The server ends the call DEADLINE_EXCEEDED, as its own
#: copy of the deadline would a moment later, not CANCELLED.
FLAG_DEADLINE_EXCEEDED = 0x01
#: vyra_base_ipc's extension, used only after both ends agreed on it: the
#: frame's message payload is replaced by a ``SharedMemoryManifest`` and
#: descriptors were passed with the frame (see :mod:`vyra_base_ipc._payload`).
FLAG_SHARED_MEMORY = 0x80

#: Descriptors a connection may hold received but not yet claimed by a frame;
#: a peer sending more is broken or hostile.
MAX_QUEUED_FDS = 256
#: Descriptors a sender puts into one batch of frames (they all travel ahead
#: of the batch's frames, so well below :data:`MAX_QUEUED_FDS`).
MAX_BATCH_FDS = MAX_QUEUED_FDS // 2


class MessageType(enum.IntEnum):
    """Frame types. Unknown types are ignored by receivers (forward compatibility)."""

    REQUEST = 0x01
    RESPONSE = 0x02
    DATA = 0x03
    #: vyra_base_ipc's extension (agreed in the Hello): the client leaves the
    #: stream; no data. The server cancels the call and sends nothing more on it.
    CANCEL = 0x10
    #: vyra_base_ipc's extension (agreed in the Hello): the receiver of a
    #: stream's messages grants its sender more bytes (data: big-endian uint32).
    WINDOW_UPDATE = 0x11
    #: vyra_base_ipc's extension (agreed in the Hello): on stream 0, the
    #: receiver of pooled shared memory gives lent segments back to their
    #: owner, and the owner names its segments that are gone (data: big-endian
    #: uint64 each, a lend id, or a segment id with :data:`FORGET_BIT` set).
    RELEASE = 0x12


class Frame(NamedTuple):
    """One received frame.

    :ivar buffers: for a frame that came with shared memory, once resolved:
        the :class:`~vyra_base_ipc.ReceivedBuffers` that came with it
        (``data`` is then the message itself).
    """

    stream_id: int
    type: int
    flags: int
    data: bytes
    buffers: Any = None


class OversizedFrame(NamedTuple):
    """A frame whose declared length exceeded the limit. Its data is skipped
    (the connection stays in sync); the receiver answers on ``stream_id``.

    :ivar head: for a REQUEST frame, when the decoder keeps heads
        (:attr:`FrameDecoder.request_head`): its first bytes, up to that
        many; else empty.
    """

    stream_id: int
    type: int
    flags: int
    length: int
    limit: int
    head: bytes = b''


def oversized_message(length: int, limit: int) -> str:
    """The status message containerd's implementation sends for an oversized
    frame, so that both implementations report it alike."""
    return f'message length {length} exceed maximum message size of {limit}'


def encode_frame(stream_id: int, message_type: int, flags: int, data: bytes = b'') -> bytes:
    """Return the header and ``data`` as one bytes object (one write, one syscall)."""
    return HEADER.pack(len(data), stream_id, message_type, flags) + data


_INCREMENT = struct.Struct('>I')
#: The largest credit a stream can have (as HTTP/2's flow-control windows).
MAX_WINDOW = 2**31 - 1
#: The last stream id of a connection (ids only increase): a client's odd
#: ids last 2**31 calls, about 25 days at a thousand calls a second.
MAX_STREAM_ID = 2**32 - 1


def encode_window_update(stream_id: int, increment: int) -> bytes:
    """A WINDOW_UPDATE frame granting ``increment`` more bytes on ``stream_id``."""
    return HEADER.pack(4, stream_id, MessageType.WINDOW_UPDATE, 0) + _INCREMENT.pack(increment)


def window_increment(frame: Frame) -> int:
    """The increment a WINDOW_UPDATE frame grants; 0 for a malformed one
    (which then grants nothing)."""
    return _INCREMENT.unpack(frame.data)[0] if len(frame.data) == 4 else 0


#: In a RELEASE frame's data: the id names a segment of the sender that is
#: gone (the receiver unmaps it), not a lend.
FORGET_BIT = 1 << 63


def encode_release(ids: Sequence[int]) -> bytes:
    """A RELEASE frame giving back the segments lent under ``ids``."""
    if len(ids) == 1:  # the usual frame: a call's one lend
        return _RELEASE_ONE + _ID.pack(ids[0])
    return HEADER.pack(8 * len(ids), 0, MessageType.RELEASE, 0) + struct.pack(f'>{len(ids)}Q', *ids)


def released_ids(data: bytes) -> tuple[int, ...] | None:
    """The lend ids a RELEASE frame's data names; ``None`` if malformed."""
    if len(data) == 8:
        return _ID.unpack(data)
    if len(data) % 8:
        return None
    return struct.unpack(f'>{len(data) // 8}Q', data)


_ID = struct.Struct('>Q')
#: The header of a RELEASE frame of one id.
_RELEASE_ONE = HEADER.pack(8, 0, MessageType.RELEASE, 0)


def encode_cancel(stream_id: int, expired: bool = False) -> bytes:
    """A CANCEL frame for ``stream_id``; ``expired``: the client leaves
    because the call's deadline passed (:data:`FLAG_DEADLINE_EXCEEDED`)."""
    return HEADER.pack(0, stream_id, MessageType.CANCEL, FLAG_DEADLINE_EXCEEDED if expired else 0)


#: ``Frame(...)`` without the NamedTuple's ``__new__``, a Python function:
#: 100 ns less for the frame of every call (all fields given, in order).
_new_frame: Callable[[type, tuple[Any, ...]], Any] = tuple.__new__


class FrameDecoder:
    """Turns a byte stream into :class:`Frame` and :class:`OversizedFrame` items.

    Not thread-safe: one reader feeds it. A header declaring more than
    ``max_length`` bytes yields an :class:`OversizedFrame` at once and the
    following ``length`` bytes are discarded as they arrive, without being
    buffered, so a peer cannot make the receiver allocate beyond the limit.

    The one exception: while :attr:`request_head` is set, an oversized
    REQUEST frame yields its :class:`OversizedFrame` once that many of its
    first bytes have arrived, with them (``head``), so that the receiver can
    tell the size of the message inside without the rest.

    :param max_length: the largest frame data accepted.
    """

    __slots__ = ('max_length', 'request_head', '_buffer', '_skip', '_fds', 'fds_taken', '_oversized', '_head',
                 '_head_missing')

    def __init__(self, max_length: int = DEFAULT_MAX_DATA_LENGTH) -> None:
        self.max_length = max_length
        #: Bytes of an oversized REQUEST frame's start kept for its
        #: :class:`OversizedFrame` (0: none; it is yielded at its header).
        self.request_head = 0
        self._buffer = bytearray()
        self._skip = 0
        # The oversized REQUEST frame whose head is still arriving, the head
        # so far, and how many of its bytes are still to come.
        self._oversized: OversizedFrame | None = None
        self._head = bytearray()
        self._head_missing = 0
        self._fds: list[int] = []
        #: Descriptors frames have taken so far (a peer whose descriptors
        #: wait unclaimed makes no progress here).
        self.fds_taken = 0

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buffer)

    @property
    def mid_frame(self) -> bool:
        """Whether the stream stopped inside a frame (a truncated frame if the
        peer is gone)."""
        return bool(self._buffer) or self._skip > 0

    @property
    def queued_fds(self) -> int:
        """Descriptors received and not yet taken."""
        return len(self._fds)

    def take_fds(self, count: int | None = None) -> list[int]:
        """Return and forget the next ``count`` received descriptors (all of
        them if ``None``: for closing them when the connection ends). The
        caller owns them.

        :raises ValueError: fewer than ``count`` have arrived (the peer did not
            send what its frame announced); none are taken.
        """
        if count is None:
            fds, self._fds = self._fds, []
            return fds
        if count > len(self._fds):
            raise ValueError(f'the frame announced {count} file descriptors, '
                             f'{len(self._fds)} arrived with it')
        fds = self._fds[:count]
        del self._fds[:count]
        self.fds_taken += count
        return fds

    def add_fds(self, fds: Sequence[int], accepted: bool = True) -> str | None:
        """Queue descriptors that arrived (ahead of the bytes of their
        frames) for :meth:`take_fds`. Return why the connection must close
        (in both clients' and the server's words), else ``None``: its peer
        was not to pass any (not ``accepted``: shared memory not agreed), or
        more than :data:`MAX_QUEUED_FDS` wait unclaimed."""
        self._fds.extend(fds)
        if not accepted:
            return 'file descriptors from a peer that did not agree on shared memory'
        if len(self._fds) > MAX_QUEUED_FDS:
            return f'more than {MAX_QUEUED_FDS} file descriptors not claimed by any frame'
        return None

    def feed(self, data: bytes) -> list[Union[Frame, OversizedFrame]]:
        """Add received bytes; return the frames they complete, in order
        (descriptors that came with them go to :meth:`add_fds` first)."""
        buffer = self._buffer
        if not buffer and not self._skip and len(data) >= HEADER_SIZE:
            # The usual read: exactly one whole frame.
            length, stream_id, message_type, flags = HEADER.unpack_from(data)
            if length == len(data) - HEADER_SIZE and length <= self.max_length:
                return [_new_frame(Frame, (stream_id, message_type, flags, bytes(data[HEADER_SIZE:]), None))]
        frames: list[Union[Frame, OversizedFrame]] = []
        if self._skip:
            skipped = min(self._skip, len(data))
            if self._head_missing:
                self._take_head(data[:min(skipped, self._head_missing)], frames)
            self._skip -= skipped
            data = data[skipped:]
            if not data:
                return frames
        whole: memoryview | None = None
        if buffer:
            buffer += data
            # Frames are cut from a view of the buffer: a slice of the
            # bytearray itself would be a copy that bytes() copies again,
            # and each copy of a large frame is new memory whose pages
            # fault in (glibc gives freed large blocks back to the kernel).
            whole = memoryview(buffer)
        view: bytes | memoryview = data if whole is None else whole
        position = 0
        end = len(view)
        unpack = HEADER.unpack_from
        while end - position >= HEADER_SIZE:
            length, stream_id, message_type, flags = unpack(view, position)
            if length > self.max_length:
                oversized = OversizedFrame(stream_id, message_type, flags, length, self.max_length)
                position += HEADER_SIZE
                skipped = min(length, end - position)
                if message_type == MessageType.REQUEST and self.request_head:
                    self._oversized, self._head_missing = oversized, min(length, self.request_head)
                    self._take_head(view[position:position + min(skipped, self._head_missing)], frames)
                else:
                    frames.append(oversized)
                position += skipped
                self._skip = length - skipped
                if self._skip:
                    break
                continue
            start = position + HEADER_SIZE
            if end - start < length:
                break
            position = start + length
            payload = bytes(view[start:position])
            frames.append(_new_frame(Frame, (stream_id, message_type, flags, payload, None)))
        if whole is not None:
            whole.release()  # (a bytearray with a view cannot be resized)
            del buffer[:position]
        elif position < end and not self._skip:
            buffer += view[position:]
        return frames

    def _take_head(self, data: bytes | memoryview, frames: list[Union[Frame, OversizedFrame]]) -> None:
        """Keep ``data``, the next bytes of the head still missing (no more
        than are missing); once it is whole, add its frame to ``frames``."""
        self._head += data
        self._head_missing -= len(data)
        if not self._head_missing:
            frames.append(self._oversized._replace(head=bytes(self._head)))  # type: ignore[union-attr]
            self._oversized = None
            self._head.clear()
