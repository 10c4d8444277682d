"""A ttrpc peer written from the specification, for tests that speak the
protocol frame by frame over a real socket.

Frames are packed here with ``struct``, not with the package's encoder, so
that the tests check the package against an independent reading of the wire
format: a 10-byte big-endian header (data length uint32, stream id uint32,
type uint8, flags uint8), then the data; descriptors travel beside the bytes
as ``SCM_RIGHTS``. Envelopes are the messages of
protos/vyra_base_ipc/ttrpc.proto.

:class:`Peer` drives one connection (either end): ``peer.send(stream_id,
type, flags, data, fds)`` sends any frame, ``peer.read_frame(stream_id)``
returns the next whole frame (of that stream), with the descriptors that
came with it. :class:`PeerServer` hands every connection it accepts to a
function of the test.
"""

from __future__ import annotations

import array
import os
from pathlib import Path
import socket
import struct
import threading
from typing import Callable, NamedTuple, Sequence

from vyra_base_ipc import ttrpc_pb2

HEADER = struct.Struct('>IIBB')
#: Frame types.
REQUEST, RESPONSE, DATA = 1, 2, 3
#: Flags: of a data frame or of the request that opens a stream.
REMOTE_CLOSED, REMOTE_OPEN, NO_DATA = 1, 2, 4
#: This package's extension: the message travels in shared memory.
SHARED = 0x80


def frame_bytes(stream_id: int, message_type: int, flags: int, data: bytes = b'', *,
                length: int | None = None) -> bytes:
    """One frame on the wire; ``length`` overrides the true data length (a lying header)."""
    return HEADER.pack(len(data) if length is None else length, stream_id, message_type, flags) + data


def request_envelope(service: str, method: str, payload: bytes = b'', *, timeout_nano: int = 0) -> bytes:
    return ttrpc_pb2.Request(service=service, method=method, payload=payload,
                             timeout_nano=timeout_nano).SerializeToString()


def response_envelope(payload: bytes = b'', *, code: int = 0, message: str = '') -> bytes:
    return ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=code, message=message),
                              payload=payload).SerializeToString()


class Frame(NamedTuple):
    stream_id: int
    type: int
    flags: int
    data: bytes
    fds: list[int]  # the descriptors received up to this frame, now owned by the reader


class Answer(NamedTuple):
    """A Response frame, decoded."""

    stream_id: int
    code: int
    message: str
    payload: bytes
    flags: int
    fds: list[int]


class Peer:
    """One end of a ttrpc connection, driven by hand (blocking)."""

    def __init__(self, sock: socket.socket, timeout: float | None = 20.0) -> None:
        self.sock = sock
        sock.settimeout(timeout)
        self._buffer = bytearray()
        self._fds: list[int] = []
        self._pending: list[Frame] = []  # read while looking for another stream's frame

    @classmethod
    def connect(cls, path: Path, timeout: float | None = 20.0) -> 'Peer':
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except BaseException:
            sock.close()
            raise
        return cls(sock, timeout)

    def __enter__(self) -> 'Peer':
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- sending --------------------------------------------------------------------------

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """``data`` as it is (a frame or not), with descriptors passed alongside."""
        sent = 0
        if fds:
            sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               array.array('i', fds).tobytes())])
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def send(self, stream_id: int, message_type: int, flags: int, data: bytes = b'',
             fds: Sequence[int] = ()) -> None:
        """Any frame: arbitrary type, flags, stream id and data."""
        self.send_raw(frame_bytes(stream_id, message_type, flags, data), fds)

    def request(self, stream_id: int, service: str, method: str, payload: bytes = b'', *,
                flags: int = 0, timeout_nano: int = 0, fds: Sequence[int] = ()) -> None:
        self.send(stream_id, REQUEST, flags, request_envelope(service, method, payload,
                                                              timeout_nano=timeout_nano), fds)

    def respond(self, stream_id: int, payload: bytes = b'', *, code: int = 0, message: str = '',
                flags: int = 0, fds: Sequence[int] = ()) -> None:
        self.send(stream_id, RESPONSE, flags, response_envelope(payload, code=code, message=message), fds)

    # -- receiving ------------------------------------------------------------------------

    def _fill(self) -> None:
        data, ancillary, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(64 * 4))
        for level, kind, raw in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                numbers = array.array('i')
                numbers.frombytes(raw[:len(raw) - len(raw) % numbers.itemsize])
                self._fds.extend(numbers)
        if not data:
            raise ConnectionError('closed by the other end')
        self._buffer += data

    def _next_frame(self) -> Frame:
        while len(self._buffer) < HEADER.size:
            self._fill()
        length, stream_id, message_type, flags = HEADER.unpack_from(self._buffer)
        while len(self._buffer) < HEADER.size + length:
            self._fill()
        data = bytes(self._buffer[HEADER.size:HEADER.size + length])
        del self._buffer[:HEADER.size + length]
        fds, self._fds = self._fds, []
        return Frame(stream_id, message_type, flags, data, fds)

    def read_frame(self, stream_id: int | None = None) -> Frame:
        """The next whole frame, or the next one of ``stream_id`` (frames of
        other streams read meanwhile are kept, in order, for later reads)."""
        for index, frame in enumerate(self._pending):
            if stream_id is None or frame.stream_id == stream_id:
                return self._pending.pop(index)
        while True:
            frame = self._next_frame()
            if stream_id is None or frame.stream_id == stream_id:
                return frame
            self._pending.append(frame)

    def answer(self, stream_id: int | None = None) -> Answer:
        """The next frame (of ``stream_id``), which must be a Response."""
        frame = self.read_frame(stream_id)
        assert frame.type == RESPONSE, f'expected a response, got a frame of type {frame.type}'
        response = ttrpc_pb2.Response.FromString(frame.data)
        return Answer(frame.stream_id, response.status.code, response.status.message, response.payload,
                      frame.flags, frame.fds)

    def frames_until_closed(self) -> list[Frame]:
        """Every frame the other end sends before it closes the connection."""
        frames = []
        while True:
            try:
                frames.append(self.read_frame())
            except socket.timeout:
                raise AssertionError('the connection was not closed') from None
            except ConnectionError:
                return frames

    def close(self) -> None:
        for fd in self._fds + [fd for frame in self._pending for fd in frame.fds]:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds, self._pending = [], []
        self.sock.close()


class PeerServer:
    """A ttrpc 'server' in threads of this process: every connection it
    accepts on ``path`` goes to ``handle(peer)`` in a thread of its own.
    :meth:`close` stops it and fails with whatever a handler raised."""

    def __init__(self, path: Path, handle: Callable[[Peer], None]) -> None:
        self.path = path
        self.handle = handle
        self.failures: list[BaseException] = []
        self._peers: list[Peer] = []
        self._threads: list[threading.Thread] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            peer = Peer(sock, timeout=None)
            self._peers.append(peer)
            thread = threading.Thread(target=self._serve, args=(peer,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, peer: Peer) -> None:
        try:
            self.handle(peer)
        except BaseException as error:  # reported by close()
            self.failures.append(error)
        finally:
            peer.close()

    def close(self) -> None:
        """Stop accepting, end every connection and wait for the handlers."""
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._acceptor.join(timeout=20)
        for peer in self._peers:
            try:
                peer.sock.shutdown(socket.SHUT_RDWR)  # wakes a handler reading
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=20)
        self.listener.close()
        assert not self.failures, self.failures
