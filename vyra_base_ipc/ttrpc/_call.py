"""What both fast-lane clients share above the socket.

:class:`~vyra_base_ipc.ttrpc.AsyncConnection` and
:class:`~vyra_base_ipc.ttrpc.SyncConnection` differ in how they wait and how
they read the socket; everything else is here, written once: preparing a
request, routing received frames to their calls (:class:`ClientCore`),
reading a call's answer (:class:`Outcome`), shared memory on receipt, the
Hello, flow control and CANCEL frames. The errors a call raises are
:mod:`._errors`'.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Callable, Sequence, Union

from google.protobuf.message import DecodeError
import grpc

from .._deadline import Deadline
from .._methods import Method, MethodKind
from .._options import DEFAULT_TIMEOUT, validate_max_message_bytes, validate_timeout
from .._payload import (
    Pieces,
    SharedMemoryError,
    SharedMemoryOptions,
    close_fds,
    usable_options,
)
from .._peer import trusted_server_uids
from .._shared_buffer import ReceivedBuffers, SharedBuffer, check_buffers, inline_request
from ..address import StrPath, validate_socket_path
from ..exceptions import IPCError, IPCUnavailableError, MessageTooLargeError, error_from_status
from . import _hello
from ._errors import (
    SenderFailed,
    deadline_passed,
    idle_error,
    lost,
    received_too_large,
    timeout_error,
    undecodable,
)
from ._flow import ReceiveWindow, SendCredit, message_cost, validate_stream_window
from ._frames import (
    FLAG_NO_DATA,
    FLAG_REMOTE_CLOSED,
    FLAG_REMOTE_OPEN,
    FLAG_SHARED_MEMORY,
    HEADER,
    MAX_STREAM_ID,
    Frame,
    FrameDecoder,
    MessageType,
    OversizedFrame,
    encode_cancel,
    encode_frame,
    window_increment,
)
from ._messages import (
    Metadata,
    code_of,
    decode_response,
    metadata_to_wire,
    ok_payload,
    ok_payload_size,
    request_parts,
    request_prefix,
)
from ._pieces import serialized
from ._received import HeldMappings, resolve_shared
from ._shared_memory import MemfdGate, inline, outgoing

__all__ = ['ClientCore', 'ClientStream', 'Item', 'Outcome', 'Prepared', 'unary_response']

_REQUEST = int(MessageType.REQUEST)
_RESPONSE = int(MessageType.RESPONSE)
_DATA = int(MessageType.DATA)
_WINDOW_UPDATE = int(MessageType.WINDOW_UPDATE)
_RELEASE = int(MessageType.RELEASE)
CLOSE_SEND = FLAG_REMOTE_CLOSED | FLAG_NO_DATA

#: What a call receives: a frame, an oversized frame's header, or an error.
Item = Union[Frame, OversizedFrame, IPCError]

#: The call that agrees on the extensions of a connection.
HELLO = Method(name=_hello.HELLO_METHOD, path=_hello.HELLO_PATH, kind=MethodKind.UNARY_UNARY,
               request_serializer=None, response_deserializer=None)


# -- requests ----------------------------------------------------------------------------------

class Prepared:
    """A call's request frame, checked and encoded but for its stream id,
    with the descriptors to pass with it (owned until sent: :meth:`discard`
    on failure)."""

    __slots__ = ('method', 'deadline', 'flags', 'fds', 'lends', 'segments', '_parts', '_size')

    def __init__(self, method: Method, deadline: Deadline | None, metadata: Metadata | None,
                 payload: bytes | Pieces, agreement: _hello.Agreement = _hello.PLAIN,
                 buffers: Sequence[SharedBuffer] = ()) -> None:
        if deadline is not None and deadline.expired():
            # Nothing is sent (grpc does not start such a call either): a quick server could
            # otherwise answer before the client's timer for the deadline ran.
            raise timeout_error(method)
        self.method = method
        self.deadline = deadline
        self.lends: list[int] = []
        self.segments = agreement.segments
        # (A message in pieces joined: one copy, as protobuf would make.)
        data = inline(payload, agreement, buffers)  # the one place that decides
        if data is not None:
            frame_flags = 0  # as outgoing() would say: not asked, to save a call
            self.fds: list[int] = []
        else:
            try:
                data, self.fds, frame_flags = outgoing(payload, agreement, buffers, self.lends)
            except SharedMemoryError as error:
                raise error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error),
                                        method=method.path) from None
        kind = method.kind
        #: The request frame's flags: how the call's messages follow.
        self.flags = frame_flags | (FLAG_REMOTE_OPEN if kind.request_streaming
                                    else FLAG_REMOTE_CLOSED if kind.response_streaming else 0)
        # The header's place is kept first: frame() joins it and the
        # envelope in one go (one copy of the payload).
        parts = request_parts(_request_prefix(method.path), data,
                              0 if deadline is None else deadline.timeout_nano(),
                              metadata_to_wire(metadata) if metadata else ())
        self._size = sum(map(len, parts))
        parts.insert(0, b'')
        self._parts = parts

    def frame(self, stream_id: int, before: bytes = b'') -> bytes:
        """The request frame on ``stream_id``, after ``before`` (frames to
        send ahead of it, in the same copy)."""
        parts = self._parts
        parts[0] = before + HEADER.pack(self._size, stream_id, _REQUEST, self.flags)
        return b''.join(parts)

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def discard(self) -> None:
        close_fds(self.take_fds())
        if self.lends and self.segments is not None:
            self.segments.cancel(self.lends)


def prepare(method: Method, request: Any, deadline: Deadline | None, metadata: Metadata | None,
            limit: int, agreement: _hello.Agreement, buffers: Sequence[SharedBuffer] = ()
            ) -> Prepared:
    """The request frame of a call. A unary request is serialized into it
    (explicit buffers go inline into the message, a copy, where the
    connection cannot pass them); a request stream follows in data frames."""
    if method.kind.request_streaming:
        if buffers:
            check_buffers(method.path, True, buffers)
        return Prepared(method, deadline, metadata, b'')
    if buffers:  # (the usual request has none: nothing to check or copy in)
        if agreement.shared_memory is None:
            request = inline_request(method.path, False, request, buffers)
        else:
            check_buffers(method.path, False, buffers)
    payload = serialize(method, request, limit, agreement)
    return Prepared(method, deadline, metadata, payload, agreement, buffers)


def data_frame(stream_id: int, method: Method, message: Any, limit: int,
               agreement: _hello.Agreement) -> tuple[bytes, list[int], int]:
    """A streamed request message as a data frame: (frame, descriptors, cost against the window)."""
    payload = serialize(method, message, limit, agreement)
    data, fds, flags = outgoing(payload, agreement)
    return encode_frame(stream_id, _DATA, flags, data), fds, message_cost(len(payload))


def close_send_frame(stream_id: int) -> bytes:
    """The frame that ends a request stream."""
    return encode_frame(stream_id, _DATA, CLOSE_SEND)


_PREFIXES: dict[str, bytes] = {}


def _request_prefix(path: str) -> bytes:
    """The encoded service and method names that begin every request of ``path``."""
    prefix = _PREFIXES.get(path)
    if prefix is None:
        service, _, name = path.lstrip('/').rpartition('/')
        if not service or not name:
            raise ValueError(f'method path {path!r} is not of the form /package.Service/Method')
        prefix = _PREFIXES[path] = request_prefix(service, name)
    return prefix


def serialize(method: Method, message: Any, limit: int, agreement: _hello.Agreement = _hello.PLAIN
              ) -> bytes | Pieces:
    """A request message's bytes, or its :mod:`._pieces` on a connection with ``agreement``.

    :raises MessageTooLargeError: larger than ``limit``; nothing was sent.
    """
    serializer = method.request_serializer
    payload = message if serializer is None else serialized(serializer, message, agreement.shared_memory)
    if len(payload) > limit:
        raise MessageTooLargeError(len(payload), limit, method=method.path)
    return payload


def deserialize(method: Method, payload: bytes | memoryview) -> Any:
    """The response message of ``payload``.

    :raises IPCRemoteError: INTERNAL, in grpc's words, when it does not
        parse as the method's response type (a stub of another version).
    """
    deserialize = method.response_deserializer
    if deserialize is None:
        return payload
    try:
        # Protobuf parses any buffer: a view of shared memory is not copied first.
        return deserialize(payload)  # type: ignore[arg-type]
    except DecodeError as error:
        raise undecodable(method, error) from None


def check_kind(method: Method, response_streaming: bool) -> None:
    """:raises TypeError: not a Method, or called with the wrong one of call()/stream()."""
    if not isinstance(method, Method):
        raise TypeError(f'method must be a vyra_base_ipc._methods.Method, not {type(method).__name__}')
    if method.kind.response_streaming != response_streaming:
        use = 'stream' if method.kind.response_streaming else 'call'
        raise TypeError(f'{method.path} is a {method.kind.value} method: call it with {use}()')


def connect_arguments(socket_path: StrPath, max_message_bytes: int, timeout: float | None,
                      shared_memory: SharedMemoryOptions | None, stream_window: int,
                      server_uid: int | None
                      ) -> tuple[str, int, float, SharedMemoryOptions | None, int, frozenset[int]]:
    """The checked arguments of a connect(): path, message limit, timeout,
    shared-memory options usable here, stream window, the server uids trusted.

    :raises TypeError, ValueError: invalid arguments.
    """
    return (os.fspath(validate_socket_path(socket_path)), validate_max_message_bytes(max_message_bytes),
            DEFAULT_TIMEOUT if timeout is None else validate_timeout(timeout),
            usable_options(shared_memory), validate_stream_window(stream_window),
            trusted_server_uids(server_uid))


# -- answers -----------------------------------------------------------------------------------

class Outcome:
    """Interprets the items of one call."""

    __slots__ = ('method', 'limit')

    def __init__(self, method: Method, limit: int) -> None:
        self.method = method
        self.limit = limit

    def unary(self, item: Item, return_buffers: bool = False) -> Any:
        """The response of a unary-response call from its first item; with
        ``return_buffers``, ``(response, ReceivedBuffers)``."""
        frame = self._frame(item)
        if frame.type != _RESPONSE:
            raise error_from_status(grpc.StatusCode.INTERNAL,
                                    f'protocol error: got a frame of type {frame.type} instead of the '
                                    'response', method=self.method.path)
        response = deserialize(self.method, self._response(frame))
        buffers: ReceivedBuffers | None = frame.buffers
        if return_buffers:
            return response, buffers if buffers is not None else ReceivedBuffers()
        if buffers is not None:
            buffers.close()  # nobody asked for them
        return response

    def streamed(self, item: Item) -> tuple[bool, bytes | memoryview | None]:
        """(stream ended, payload or None) for one item of a response stream."""
        frame = self._frame(item)
        if frame.type == _DATA:
            ended = bool(frame.flags & FLAG_REMOTE_CLOSED)
            if frame.flags & FLAG_NO_DATA:
                return ended, None
            if len(frame.data) > self.limit:  # (within the frame limit, which leaves room for envelopes)
                raise self._too_large(len(frame.data))
            return ended, frame.data
        if frame.type == _RESPONSE:
            # A stream may end with an OK response; only a non-empty payload
            # in it is a last message (an empty one is the bare end).
            return True, self._response(frame) or None
        raise error_from_status(grpc.StatusCode.INTERNAL,
                                f'protocol error: got a frame of type {frame.type} on a response stream',
                                method=self.method.path)

    def too_late(self, stream: ClientStream, forgotten: bool) -> bool:
        """Whether the caller of ``stream``, whose deadline has passed, is
        to get no more of it: none of the messages queued or still unread,
        unless the server had ended the call (``forgotten`` by the core)
        successfully, as gRPC gives a call that completed in time."""
        if not stream.items or not forgotten:
            return True
        last = stream.items[-1]
        if last.__class__ is not Frame:
            return True
        if last.type == _DATA:
            return not last.flags & FLAG_REMOTE_CLOSED
        ok = last.flags & FLAG_SHARED_MEMORY or ok_payload(last.data) is not None
        return last.type != _RESPONSE or not ok

    def _frame(self, item: Item) -> Frame:
        if isinstance(item, IPCError):
            raise item.error if isinstance(item, SenderFailed) else item
        if isinstance(item, OversizedFrame):  # skipped unread: a response's message sized as an OK one's
            size = ok_payload_size(item.length) if item.type == _RESPONSE else None
            raise self._too_large(item.length if size is None else size)
        return item

    def _response(self, frame: Frame) -> bytes | memoryview:
        if frame.flags & FLAG_SHARED_MEMORY:
            return frame.data  # resolved on arrival: the message itself
        payload = ok_payload(frame.data)
        if payload is None:
            try:
                code, message, payload, details = decode_response(frame.data)
            except DecodeError as error:
                raise error_from_status(grpc.StatusCode.INTERNAL, f'malformed response from server: {error}',
                                        method=self.method.path) from None
            if code:
                raise error_from_status(code_of(code), message, method=self.method.path,
                                        status_details=details)
        if len(payload) > self.limit:
            raise self._too_large(len(payload))
        return payload

    def _too_large(self, size: int) -> IPCError:
        return error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 received_too_large(size, self.limit, server=False), method=self.method.path)


def unary_response(method: Method, limit: int, item: Item, return_buffers: bool = False) -> Any:
    """``Outcome(method, limit).unary(item, return_buffers)``, with the usual
    answer (an inline OK response of under 16 KiB, no buffers asked for) read
    without an Outcome per call (a blocking call: 103,200 -> 99,300 instructions)."""
    if item.__class__ is Frame and not return_buffers:
        _, kind, flags, data, buffers = item  # (unpacked: a named field costs a call)
        if kind == _RESPONSE and not flags & FLAG_SHARED_MEMORY and buffers is None:
            payload = ok_payload(data)
            if payload is not None and len(payload) <= limit:
                return deserialize(method, payload)
    return Outcome(method, limit).unary(item, return_buffers)


def message_size(item: Item) -> int | None:
    """The size of the message a data item carries (for flow control), or
    ``None`` if it carries none."""
    if item.__class__ is Frame and item.type == _DATA and not item.flags & FLAG_NO_DATA:
        return len(item.data)
    return None


# -- one call, one connection ------------------------------------------------------------------

class ClientStream:
    """What a client keeps of one call: received items, and on a
    flow-controlled connection the credit for its request stream and the
    window it grants for its response stream. Subclasses wake the waiter."""

    __slots__ = ('items', 'credit', 'window', 'expired', 'held')

    def __init__(self) -> None:
        self.items: collections.deque[Item] = collections.deque()
        self.credit: SendCredit | None = None
        self.window: ReceiveWindow | None = None
        #: The caller leaves because the call's deadline passed.
        self.expired = False
        #: Mappings its items hold, counted in its connection's
        #: :class:`~._received.HeldMappings` until taken (:meth:`HeldMappings.taken`).
        self.held = 0

    def push(self, item: Item) -> None:
        """Add an item (from the thread that read it) and wake the waiter."""
        self.items.append(item)
        self.wake()

    def wake(self) -> None:
        raise NotImplementedError

    def timed_out(self, deadline: Deadline | None, method: Method, idle_timeout: float | None) -> IPCError:
        """The error of a wait for the next item that ended: its idle timeout,
        unless its deadline passed (then the call is :attr:`expired`)."""
        self.expired = deadline_passed(deadline, idle_timeout)
        return timeout_error(method) if self.expired else idle_error(method, idle_timeout)  # type: ignore[arg-type]

    def taken(self, item: Item) -> int:
        """Count an item the caller took; the window increment to grant now, or 0."""
        window = self.window
        if window is None:
            return 0
        size = message_size(item)
        return 0 if size is None else window.taken(size)


# A call's target: a stream, or for the asyncio client's unary calls a
# future (the fast path).
Target = Any


class ClientCore:
    """The state of a client connection that both clients share: the calls
    in flight by stream id, the agreement with the server, and the routing
    of received frames to calls. The owner serializes access (the asyncio
    client by its event loop, the blocking one by its state lock) and
    delivers items its way (``deliver(target, item)``).

    :param decoder: the connection's frame decoder (for the descriptors of
        shared-memory frames).
    :param shared_memory: the options offered in the Hello, ``None`` if not.
    :param stream_window: the window offered per response stream.
    """

    __slots__ = ('path', 'message_limit', 'decoder', 'offered', 'stream_window', 'agreement',
                 'streams', 'next_id', 'exhausted', 'hello', 'deliver', 'memfd_gate', 'held')

    def __init__(self, path: str, message_limit: int, decoder: FrameDecoder,
                 shared_memory: SharedMemoryOptions | None, stream_window: int,
                 deliver: Callable[[Target, Item], None], unread: Callable[[], int]) -> None:
        self.path = path
        self.message_limit = message_limit
        self.decoder = decoder
        self.offered = shared_memory
        self.stream_window = stream_window
        self.agreement = _hello.PLAIN
        self.streams: dict[int, Target] = {}
        self.next_id = 1
        #: Whether a new call needs a new connection (its ids are used up, or
        #: it was retired: as an HTTP/2 client's after GOAWAY).
        self.exhausted = False
        #: The Hello's target while nobody has settled its answer.
        self.hello: Target = None
        self.deliver = deliver
        # Requests in new memfds: two messages of them unread at most (see MemfdGate).
        self.memfd_gate = MemfdGate(2 * message_limit, unread)
        #: Mappings held by messages its response streams' callers did not read yet.
        self.held = HeldMappings()

    def hello_request(self) -> Prepared:
        """The Hello, sent first on the connection (its answer settles the agreement)."""
        return Prepared(HELLO, None, None, _hello.offer(self.offered, self.stream_window))

    def settle(self, item: Item) -> None:
        """Take the answer to the Hello: the extensions agreed (none if the
        server is not vyra_base_ipc's)."""
        self.hello = None
        self.streams.pop(1, None)
        try:
            answer = Outcome(HELLO, self.message_limit).unary(item)
            self.agreement = _hello.settle(answer, self.offered, self.stream_window, self.memfd_gate)
        except (IPCError, DecodeError):
            self.agreement = _hello.PLAIN  # another ttrpc server: plain ttrpc

    def register(self, target: Target, prepared: Prepared) -> int:
        """Allocate the next stream id for the call ``prepared`` and route its frames to ``target``.

        :raises IPCUnavailableError: the connection's stream ids are used up
            (``prepared`` is discarded).
        """
        stream_id = self.next_id
        if stream_id >= MAX_STREAM_ID:
            if stream_id > MAX_STREAM_ID:
                prepared.discard()
                raise lost(self.path, f'its stream ids are used up ({MAX_STREAM_ID}): open a new connection')
            self.exhausted = True  # (this call takes the last one)
        method = prepared.method
        self.next_id += 2
        self.streams[stream_id] = target
        if isinstance(target, ClientStream):
            agreement = self.agreement
            if agreement.send_window and method.kind.request_streaming:
                target.credit = SendCredit(agreement.send_window)
            if method.kind.response_streaming:  # (bounded also where the server did not agree)
                target.window = ReceiveWindow(agreement.receive_window, self.message_limit,
                                              self.stream_window)
        return stream_id

    def finish(self, stream_id: int, stream: ClientStream | None = None) -> bytes | None:
        """Forget a call (what ``stream`` did not read goes with it); the
        CANCEL frame to send if the server may still be working on it (its
        last frame has not arrived), else ``None``. If the
        caller leaves because the deadline passed (the target is ``expired``)
        the CANCEL says so, and the server ends the call DEADLINE_EXCEEDED:
        its own copy of the deadline, started as the request arrived, may
        not have passed yet."""
        target = self.streams.pop(stream_id, None)
        if isinstance(target, ClientStream) and target.credit is not None:
            target.credit.close()
        if stream is not None and stream.held:  # (its mappings let go now, not when it is collected)
            self.held.let_go(stream.held)
            stream.held = 0
            stream.items.clear()
        if target is None or not self.agreement.cancel:
            return None
        return encode_cancel(stream_id, target.expired)

    def release_frame(self) -> bytes:
        """RELEASE frames for the server's segments this end let go of (b'' if none)."""
        segments = self.agreement.segments
        return b'' if segments is None else segments.release_frame()

    def end_segments(self) -> None:
        """The connection is gone: give back every lend (:meth:`SegmentLink.close`)."""
        if self.agreement.segments is not None:
            self.agreement.segments.close()

    def fail_all(self, error: IPCUnavailableError) -> None:
        """The connection is gone: every call gets ``error``."""
        self.end_segments()
        streams, self.streams = self.streams, {}
        for target in streams.values():
            if isinstance(target, ClientStream) and target.credit is not None:
                target.credit.close()
            self.deliver(target, error)

    def route(self, item: Frame | OversizedFrame) -> str | None:
        """Hand a received frame to its call (frames in the order they
        arrived); return why the connection must break (the server is out
        of step), else ``None``. A call's last frame also forgets the call:
        it needs no CANCEL."""
        streams = self.streams
        stream_id = item.stream_id
        if stream_id >= self.next_id or (not stream_id & 1 and stream_id):
            # (No server opens streams: ids are the client's, odd, and only increase.) A frame
            # the server could not have sent in step: the bytes that follow are no frames either.
            return (f'the server is out of step: a frame of type {item.type} on a stream this client '
                    f'never opened ({stream_id})')
        routed: Item = item
        if item.__class__ is Frame:
            frame: Frame = item
            if frame.flags & FLAG_SHARED_MEMORY:
                if self.offered is None:
                    return 'shared memory from a server that was not offered it'
                try:
                    routed = resolve_shared(frame, self.decoder.take_fds, self.message_limit,
                                             self.offered.max_bytes, self.agreement.segments)
                except ValueError as error:
                    return str(error)
            elif frame.type == _RELEASE:
                segments = self.agreement.segments
                return None if segments is None else segments.released(frame.data)
            elif frame.type == _WINDOW_UPDATE:
                target = streams.get(stream_id)
                if isinstance(target, ClientStream) and target.credit is not None:
                    target.credit.grant(window_increment(frame))
                return None
            elif not _REQUEST <= frame.type <= _DATA:
                return None  # unknown here (a later extension's, a CANCEL): ignored, as MessageType says
            if frame.type == _RESPONSE or (frame.type == _DATA and frame.flags & FLAG_REMOTE_CLOSED):
                target = streams.pop(stream_id, None)
                if isinstance(target, ClientStream) and target.credit is not None:
                    target.credit.close()
            else:
                target = streams.get(stream_id)
                window = target.window if isinstance(target, ClientStream) else None
                if window is not None:
                    if window.overrun:
                        return None  # dropped: the call failed, the caller's finish() cancels it
                    if routed.__class__ is not Frame:  # refused (shared memory): the call ends with it,
                        window.overrun = True  # and what follows is dropped, not queued behind it
                    elif window.received(len(routed.data)):
                        self._overrun(stream_id, target, window)
                        return None
        else:
            target = streams.get(stream_id)
        if target is not None:  # else: a call that ended, or a stray frame
            if routed is not item and isinstance(routed, Frame) and isinstance(target, ClientStream):
                routed = self.held.hold(target, routed)  # (resolved from shared memory: maybe counted)
            self.deliver(target, routed)
        return None

    def _overrun(self, stream_id: int, target: Target, window: ReceiveWindow) -> None:
        # The server sent past its credit: the call fails once the caller has
        # taken what came within it; what comes after is dropped.
        window.overrun = True
        if target.credit is not None:
            target.credit.close()
        self.deliver(target, error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                               window.overrun_reason(stream_id)))

