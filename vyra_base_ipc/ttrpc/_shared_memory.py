"""Frames whose message and buffers travel as shared memory (flag 0x80).

vyra_base_ipc's extension of ttrpc, used only between two ends that agreed
on it with a Hello call: the frame's message payload is replaced by a
``SharedMemoryManifest`` and the descriptors of the memfds are passed with
the frame's first bytes (``SCM_RIGHTS``), in order: the message's own (if it
is above the threshold), then one per :class:`~vyra_base_ipc.SharedBuffer`.
Receivers take a frame's descriptors with
:meth:`~vyra_base_ipc.ttrpc._frames.FrameDecoder.take_fds` as frames arrive,
in order, and check each one before mapping it
(:func:`~vyra_base_ipc._payload.map_sealed`). With pooled segments agreed
(:mod:`._segment_link`), the message and pooled buffers are lent segments
of the sender's pool instead of new memfds.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

from .. import ttrpc_pb2
from .._log_limit import log_limited
from .._payload import (
    MAX_BUFFERS_PER_MESSAGE,
    Pieces,
    SharedMemoryError,
    TooLargeError,
    close_fds,
    map_sealed,
    seal_bytes,
)
from .._segment_pool import segment_pool, size_class
from .._shared_buffer import ReceivedBuffers, SharedBuffer
from ._errors import received_too_large
from ._frames import FLAG_SHARED_MEMORY
from ._hello import Agreement
from ._segment_link import SegmentLink

__all__ = ['MemfdGate', 'inline', 'joined', 'outgoing', 'pack', 'unpack']

_logger = logging.getLogger(__name__)

Manifest = ttrpc_pb2.SharedMemoryManifest


class MemfdGate:
    """Whether a message may go to the peer in a new memfd (no pooled
    segment for it) rather than inline: such a memfd travels in a frame of
    a few bytes, which the socket's flow control hardly slows. At most
    ``limit`` bytes of them go out until the peer has read everything sent
    to it (``unread()`` returns 0); meanwhile messages go inline, where flow
    control holds a peer that does not read. Not locked: threads that send
    at once may each pass the check (the blocking client's bound is then
    that many messages more)."""

    __slots__ = ('limit', '_unread', '_sent')

    def __init__(self, limit: int, unread: Callable[[], int]) -> None:
        self.limit = limit
        self._unread = unread
        self._sent = 0

    def __call__(self, size: int) -> bool:
        if self._sent + size > self.limit:
            if self._unread():
                return False
            self._sent = 0  # all read: what the peer holds now is its own doing
        self._sent += size
        return True


def inline(payload: bytes | Pieces, agreement: Agreement, buffers: Sequence[SharedBuffer] = ()
           ) -> bytes | None:
    """A message's bytes (:func:`joined`) if it goes inline with ``buffers``
    on a connection with ``agreement`` (no shared memory agreed, or at most
    its threshold and no buffers), as :func:`outgoing` would send them;
    else ``None``. The test and the bytes in one call: most messages go so,
    and a call less is ~0.6 % of a small call's instructions on the server
    (callgrind)."""
    options = agreement.shared_memory
    if options is None or (len(payload) <= options.threshold and not buffers):
        return bytes(payload) if isinstance(payload, Pieces) else payload
    return None


def outgoing(payload: bytes | Pieces, agreement: Agreement, buffers: Sequence[SharedBuffer] = (),
             lends: list[int] | None = None, hand_over: bool = False) -> tuple[bytes, list[int], int]:
    """How a message (serialized, or in :class:`Pieces`) goes out on a
    connection with ``agreement``: ``(frame data, descriptors to pass,
    flags)``.

    Inline unless the connection agreed on shared memory and the message is
    above its threshold or has ``buffers``. A large message for which no
    shared memory can be made (out of descriptors or memory) goes inline,
    with a warning; buffers cannot.

    :param lends: receives the ids of the lends made (for
        :meth:`~vyra_base_ipc.ttrpc._segment_link.SegmentLink.cancel` if the
        frame is never sent).
    :param hand_over: ``buffers`` are not sent again (see :meth:`SharedBuffer.lend_to`).
    :raises SharedMemoryError: ``buffers`` could not be passed.
    """
    data = inline(payload, agreement, buffers)
    if data is not None:
        return data, [], 0
    options = agreement.shared_memory
    assert options is not None  # else it went inline
    try:
        packed = pack(payload, options.threshold, buffers, agreement.segments, lends, agreement.new_memfd,
                      hand_over)
    except SharedMemoryError as error:
        if buffers:
            raise
        log_limited(_logger, logging.WARNING, 'sending inline',  # (at most one in 10 s)
                    'sending %d bytes inline: %s', len(payload), error)
        return joined(payload), [], 0
    if packed is None:  # no new memfd for it now
        return joined(payload), [], 0
    manifest, fds = packed
    return manifest, fds, FLAG_SHARED_MEMORY


def pack(payload: bytes | Pieces, threshold: int, buffers: Sequence[SharedBuffer] = (),
         link: SegmentLink | None = None, lends: list[int] | None = None,
         new_memfd: Callable[[int], bool] | None = None, hand_over: bool = False
         ) -> tuple[bytes, list[int]] | None:
    """The manifest and descriptors that replace ``payload`` in a frame, or
    ``None`` if it goes inline as it is (not above ``threshold``, or no new
    memfd for it, and no buffers).

    With ``link`` (pooled segments agreed), the message is copied into a
    segment of this process's pool and lent, and so are pooled buffers;
    without, or when the pool is exhausted, it is written into a new memfd
    sealed against writes, if ``new_memfd(size)`` allows (else it stays in
    the frame). The caller owns the returned descriptors (passes them with
    the frame, then closes them); ``hand_over`` as for :func:`outgoing`.

    :raises SharedMemoryError: shared memory could not be created.
    """
    size = len(payload)
    if size <= threshold and not buffers:
        return None
    fds: list[int] = []
    made: list[int] = []
    try:
        manifest = Manifest()
        placed = _lend_payload(payload, link, fds, new_memfd) if size > threshold else None
        if placed is not None:
            lend, segment_id = placed
            if lend:
                made.append(lend)
                manifest.payload_lend = lend
                manifest.payload_segment = segment_id
            manifest.payload_size = size
        elif not buffers:
            return None
        else:
            manifest.payload = joined(payload)
        for buffer in buffers:
            fd, lend, segment_id = buffer.lend_to(link, new_memfd, hand_over)
            fds.append(fd)
            if lend:
                made.append(lend)
            manifest.buffers.add(handle=buffer.handle, size=buffer.size, lend=lend, segment=segment_id)
    except BaseException:
        close_fds(fds)
        if link is not None:
            link.cancel(made)
        raise
    if lends is not None:
        lends.extend(made)
    return manifest.SerializeToString(), fds


def _lend_payload(payload: bytes | Pieces, link: SegmentLink | None, fds: list[int],
                  new_memfd: Callable[[int], bool] | None) -> tuple[int, int] | None:
    """Put a message into shared memory, its descriptor into ``fds``: a
    pooled segment lent on ``link`` (return the lend id and the segment's),
    else a new sealed memfd (return zeros) if ``new_memfd`` allows (else
    ``None``: it stays in the frame)."""
    segment = None
    pool = segment_pool()
    if link is not None and link.may_lend(size_class(len(payload)), pool):
        try:
            # The one copy (of a message in Pieces, of its large bytes fields
            # as read out of it): protobuf's Python runtime serializes only into bytes.
            segment = pool.acquire(len(payload), payload)
        except SharedMemoryError as error:
            _logger.debug('no pooled segment: %s', error)
    if segment is None:
        if new_memfd is not None and not new_memfd(len(payload)):
            return None
        fds.append(seal_bytes(payload))
        return 0, 0
    try:
        fds.append(os.dup(segment.fd))
    except BaseException:
        segment.unuse()
        raise
    assert link is not None
    return link.lend(segment), segment.id


def joined(payload: bytes | Pieces) -> bytes:
    """A payload's bytes (:class:`Pieces` joined, anything else as it is)."""
    return bytes(payload) if isinstance(payload, Pieces) else payload


def unpack(data: bytes, take_fds: Callable[[int], list[int]], message_limit: int, buffer_limit: int,
           what: str, link: SegmentLink | None = None, *, server: bool, streamed: bool = False
           ) -> tuple[bytes | memoryview, ReceivedBuffers | None]:
    """Resolve a received manifest: the message payload (a read-only view of
    shared memory, or bytes) and the explicit buffers (``None`` if none).

    ``take_fds(n)`` returns the frame's ``n`` descriptors (it raises
    :class:`ValueError` if fewer arrived: the connection is out of step and
    must close, as for a manifest that cannot be read). The message's descriptor is closed
    here whatever happens (its mapping lives on in the returned view); the
    buffers' descriptors pass to the returned :class:`ReceivedBuffers`, or
    are closed if anything fails. Segments lent (with pooled segments
    agreed, ``link``) go back to their owner once their views are gone.

    :param message_limit: largest message accepted, in bytes.
    :param buffer_limit: largest explicit buffer accepted, in bytes.
    :param what: names the message in errors, e.g. ``'the request of /pkg.Service/Method'``.
    :param server: whether this end is the server (its errors say ``SERVER:``, else ``CLIENT:``).
    :param streamed: the message is one of a stream, which carries no buffers
        (:func:`~vyra_base_ipc.attach_buffers` copies them inline there):
        buffers are refused, before anything is mapped.
    :raises TooLargeError: the message or a buffer is over its limit (for the
        message, in grpc's words for a message it received inline).
    :raises ValueError: malformed manifest, or fewer descriptors than it
        announces: which descriptors are the frame's is unknown.
    :raises SharedMemoryError: a lend without agreement,
        or a buffer that fails the checks of
        :func:`~vyra_base_ipc._payload.map_sealed`.
    """
    try:
        manifest = Manifest.FromString(data)
    except Exception as error:  # DecodeError
        # How many descriptors came with it is unknown: the next frame would take them.
        raise ValueError(f'{what}: malformed shared-memory manifest: {error}') from None
    # Each field read once: every read of a message field makes a new object.
    entries = manifest.buffers
    entry_count = len(entries)
    payload_size = manifest.payload_size
    position = 1 if payload_size else 0  # fds[position:] are the buffers'
    count = position + entry_count
    fds = take_fds(count) if count else []
    made = 0  # buffers made: fds[position:position + made] are theirs now
    viewed = 0  # lends (the message's first) whose views now hold them: given back when those go
    try:
        if entry_count > MAX_BUFFERS_PER_MESSAGE:  # (their descriptors are closed below)
            raise SharedMemoryError(f'{what}: {entry_count} shared buffers; at most '
                                    f'{MAX_BUFFERS_PER_MESSAGE} travel with a message')
        if entry_count and streamed:
            # Unbounded otherwise: a stream's window counts its messages, not their buffers, and
            # each buffer holds a descriptor and a mapping until the caller takes its message.
            raise SharedMemoryError(f'{what}: {entry_count} shared buffers with a streamed message '
                                    '(only the message of a unary call carries buffers)')
        payload: bytes | memoryview
        if payload_size:
            if payload_size > message_limit:
                raise TooLargeError(received_too_large(payload_size, message_limit, server=server))
            lend = manifest.payload_lend
            payload = (link.receive(fds[0], payload_size, lend, manifest.payload_segment, what, True)
                       if lend and link is not None else _map(fds[0], payload_size, lend, link, what, True))
            viewed = 1
        else:
            payload = manifest.payload
        if not entry_count:
            return payload, None
        buffers: dict[int, SharedBuffer] = {}
        nbytes = 0
        for entry in entries:
            handle, size, lend = entry.handle, entry.size, entry.lend
            name = f'{what}, shared buffer {made} ({handle:#018x})'
            if size > buffer_limit:
                raise TooLargeError(f'{"SERVER" if server else "CLIENT"}: {name}: {size} bytes is more than '
                                    f'the limit of {buffer_limit} (SharedMemoryOptions.max_bytes)')
            fd = fds[position + made]
            view = (link.receive(fd, size, lend, entry.segment, name) if lend and link is not None
                    else _map(fd, size, lend, link, name))
            buffers[handle] = SharedBuffer(fd, size, handle, view=view, managed=True, lent=bool(lend))
            made += 1
            viewed += 1
            nbytes += size
        if len(buffers) < made:  # a handle twice: the last buffer of it counts
            nbytes = sum(buffer.size for buffer in buffers.values())
        return payload, ReceivedBuffers._adopt(buffers, nbytes)
    except (TooLargeError, SharedMemoryError):
        if link is not None:
            # Refused before a view held them: give back the lends of the
            # message and buffers not mapped, else the sender's segments stay
            # lent (and out of its pool) for as long as the connection lives.
            lends = ([manifest.payload_lend] if payload_size else []) + [
                entry.lend for entry in entries[:MAX_BUFFERS_PER_MESSAGE]]
            link.decline(lend for lend in lends[viewed:] if lend)
        raise
    finally:
        # The message's descriptor, and those of the buffers not made (something failed).
        if position or made < entry_count:
            close_fds(fds[:position] + fds[position + made:])


def _map(fd: int, size: int, lend: int, link: SegmentLink | None, what: str, populate: bool = False
         ) -> memoryview:
    # What is not a lend on this connection's link: a new sealed memfd, or refused.
    if not lend:
        return map_sealed(fd, size, what, populate)
    assert link is None
    raise SharedMemoryError(f'{what}: a lent segment on a connection that did not agree on them')
