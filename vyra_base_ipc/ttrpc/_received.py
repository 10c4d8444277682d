"""What a fast-lane client does with a frame it received in shared memory.

Both clients route frames through :class:`~vyra_base_ipc.ttrpc._call.ClientCore`;
a frame flagged :data:`~vyra_base_ipc.ttrpc._frames.FLAG_SHARED_MEMORY` is
resolved here as it arrives: its message fetched from shared memory
(:func:`~vyra_base_ipc.ttrpc._shared_memory.unpack`), or the error its call
gets instead; a small streamed message copied out of its mapping.
"""

from __future__ import annotations

from typing import Callable

from google.protobuf.message import DecodeError
import grpc

from .._payload import SharedMemoryError, TooLargeError
from ..exceptions import IPCError, error_from_status
from ._frames import Frame, MessageType
from ._messages import decode_response
from ._segment_link import SegmentLink
from ._shared_memory import unpack

__all__ = ['STREAMED_COPY_BELOW', 'resolve_shared']

#: A streamed message in shared memory smaller than this is copied out as it
#: arrives, its mapping and lend let go at once: a stream's window counts a
#: message at its size, not at the page and the mapping it takes, and a server
#: sending one-byte messages each in a memfd of its own made one stream hold
#: 20,000 mappings, a third of ``vm.max_map_count`` (65,530), past which no
#: memory can be mapped in the process. Above it a stream holds at most its
#: window and one message over this many bytes of mappings (272 by default);
#: below it a copy costs less than a mapping.
STREAMED_COPY_BELOW = 64 * 1024


def resolve_shared(frame: Frame, take_fds: Callable[[int], list[int]], message_limit: int,
                   buffer_limit: int, segments: SegmentLink | None) -> Frame | IPCError:
    """A frame a client received flagged :data:`._frames.FLAG_SHARED_MEMORY`
    with its message fetched from shared memory (as a read-only view; a
    streamed one of less than :data:`STREAMED_COPY_BELOW` bytes copied out,
    its mapping let go), or the error to give its call.
    Must run as frames arrive, in order: it takes the frame's descriptors.

    :raises ValueError: the descriptors the frame came with cannot be
        counted (an error or another frame type flagged as shared memory, a
        malformed envelope or manifest), or fewer arrived than it announced:
        left queued, they would go to the next frame's call, so the
        connection is out of step and must close.
    """
    if frame.type == MessageType.RESPONSE:
        try:
            code, message, manifest, _ = decode_response(frame.data)
        except DecodeError as error:
            raise ValueError(f'malformed response in shared memory from server: {error}') from None
        if code:
            raise ValueError(f'shared memory on an error response (status {code}: {message})')
    elif frame.type == MessageType.DATA:
        manifest = frame.data
    else:
        raise ValueError(f'shared memory on a frame of type {frame.type}')
    streamed = frame.type == MessageType.DATA
    try:
        payload, buffers = unpack(manifest, take_fds, message_limit, buffer_limit, 'the response', segments,
                                  server=False, streamed=streamed)
    except TooLargeError as error:
        return error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
    except SharedMemoryError as error:
        return error_from_status(grpc.StatusCode.INTERNAL, str(error))
    if streamed and len(payload) < STREAMED_COPY_BELOW and payload.__class__ is memoryview:
        payload = bytes(payload)  # (the view gone: unmapped, its lend given back)
    return Frame(frame.stream_id, frame.type, frame.flags, payload, buffers)  # type: ignore[arg-type]
