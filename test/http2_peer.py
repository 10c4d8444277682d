"""HTTP/2 and gRPC encoded by hand (RFC 9113, RFC 7541, gRPC over HTTP/2), for
tests that talk to the gRPC lane's socket as a peer grpc would not be: the
few frame types needed, HPACK literals without indexing (servers are told
``SETTINGS_HEADER_TABLE_SIZE = 0``, so that their answers decode without a
dynamic table)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
import socket
import struct
from urllib.parse import unquote

PREFACE = b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
PADDED, PRIORITY = 0x8, 0x20


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack('>I', len(payload))[1:] + struct.pack('>BBI', kind, flags, stream) + payload


#: Our SETTINGS: no dynamic HPACK table in the server's answers, no push.
CLIENT_SETTINGS = frame(SETTINGS, 0, 0, struct.pack('>HIHI', 0x1, 0, 0x2, 0))

#: The largest flow-control window HTTP/2 has (RFC 9113, 6.9.1).
MAX_WINDOW = 2**31 - 1

#: SETTINGS and a WINDOW_UPDATE of a peer that lets the server send as much as
#: HTTP/2 allows, on every stream and on the connection: what it then does not
#: read fills the socket (grpc's own client grows its windows as it reads).
OPEN_WINDOWS = (frame(SETTINGS, 0, 0, struct.pack('>HIHIHI', 0x1, 0, 0x2, 0, 0x4, MAX_WINDOW))
                + frame(WINDOW_UPDATE, 0, 0, struct.pack('>I', MAX_WINDOW - 65535)))


def hpack_integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out, value = bytearray([first | limit]), value - limit
    while value >= 0x80:
        out.append(0x80 | (value & 0x7f))
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literal(name: bytes, value: bytes) -> bytes:
    """A header as "literal without indexing, new name", no Huffman coding."""
    return (b'\x00' + hpack_integer(len(name), 7) + name + hpack_integer(len(value), 7) + value)


def grpc_request_headers(path: str, *extra: tuple[bytes, bytes]) -> bytes:
    return b''.join(hpack_literal(name, value) for name, value in (
        (b':method', b'POST'), (b':scheme', b'http'), (b':path', path.encode()),
        (b':authority', b'localhost'), (b'content-type', b'application/grpc'), (b'te', b'trailers'),
        *extra))


def grpc_message(payload: bytes, *, compressed: bool = False, length: int | None = None) -> bytes:
    """The gRPC length-prefixed message; ``length`` may lie about the payload."""
    return struct.pack('>BI', int(compressed), len(payload) if length is None else length) + payload


def grpc_call(stream: int, path: str, body: bytes, *extra_headers: tuple[bytes, bytes]) -> bytes:
    """HEADERS and one DATA frame ending the stream: a complete unary call."""
    return (frame(HEADERS, END_HEADERS, stream, grpc_request_headers(path, *extra_headers))
            + frame(DATA, END_STREAM, stream, body))


class HpackError(AssertionError):
    """The server's header block uses something this small decoder does not know."""


#: The static-table entries a gRPC server uses in its answers (RFC 7541 appendix A).
_STATIC = {8: (':status', '200'), 31: ('content-type', '')}


def hpack_decode(block: bytes) -> list[tuple[str, str]]:
    """Decode a header block sent under ``SETTINGS_HEADER_TABLE_SIZE = 0``."""
    headers, at = [], 0

    def integer(prefix_bits: int) -> int:
        nonlocal at
        limit = (1 << prefix_bits) - 1
        value = block[at] & limit
        at += 1
        if value < limit:
            return value
        shift = 0
        while True:
            byte = block[at]
            at += 1
            value += (byte & 0x7f) << shift
            shift += 7
            if not byte & 0x80:
                return value

    def string() -> str:
        nonlocal at
        if block[at] & 0x80:
            raise HpackError(f'Huffman-coded string in {block!r}')
        length = integer(7)
        text = block[at:at + length].decode('latin-1')
        at += length
        return text

    def name(index: int) -> str:
        if index == 0:
            return string()
        if index > 61:
            raise HpackError(f'dynamic table index {index} despite a table size of 0')
        return _STATIC.get(index, (f'static#{index}', ''))[0]

    while at < len(block):
        first = block[at]
        if first & 0x80:                      # indexed field
            index = integer(7)
            if index > 61:
                raise HpackError(f'dynamic table index {index} despite a table size of 0')
            headers.append(_STATIC.get(index, (f'static#{index}', '')))
        elif first & 0x40:                    # literal, incremental indexing (evicted at once)
            field_name = name(integer(6))
            headers.append((field_name, string()))
        elif first & 0x20:                    # dynamic table size update
            integer(5)
        else:                                 # literal without indexing / never indexed
            field_name = name(integer(4))
            headers.append((field_name, string()))
    return headers


@dataclass
class StreamResult:
    headers: list[tuple[str, str]] = field(default_factory=list)
    data: bytes = b''
    reset: int | None = None
    ended: bool = False

    @property
    def grpc_status(self) -> int | None:
        for name, value in self.headers:
            if name == 'grpc-status':
                return int(value)
        return None

    @property
    def grpc_message(self) -> str:
        return next((unquote(value) for name, value in self.headers if name == 'grpc-message'), '')


def take_frame(data: bytes) -> tuple[tuple[int, int, int, bytes], bytes] | None:
    """The frame at the start of ``data`` (type, flags, stream, payload) and
    what follows it, or ``None`` if ``data`` does not hold a whole one."""
    if len(data) < 9 or len(data) < 9 + (length := int.from_bytes(data[:3], 'big')):
        return None
    return (data[3], data[4], int.from_bytes(data[5:9], 'big') & 0x7fffffff, data[9:9 + length]), data[9 + length:]


class RawConnection:
    """One HTTP/2 connection to the server over a plain Unix socket."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buffer = b''
        self._header_block: tuple[int, int, bytearray] | None = None
        self.goaway = False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> 'RawConnection':
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frames(self) -> Iterator[tuple[int, int, int, bytes]]:
        """Frames until the server closes the connection; acknowledges SETTINGS and PING."""
        while True:
            while (taken := take_frame(self._buffer)) is not None:
                (kind, flags, stream, payload), self._buffer = taken
                if kind == SETTINGS and not flags & ACK:
                    self.send(frame(SETTINGS, ACK, 0, b''))
                elif kind == PING and not flags & ACK:
                    self.send(frame(PING, ACK, 0, payload))
                yield kind, flags, stream, payload
            chunk = self.sock.recv(65536)
            if not chunk:
                return
            self._buffer += chunk

    def results(self, streams: set[int]) -> dict[int, StreamResult]:
        """Read until every stream in ``streams`` ended, the connection did, or
        nothing arrived for the socket's timeout (then the streams that did
        not end are left ``ended=False``)."""
        results = {stream: StreamResult() for stream in streams}
        try:
            self._read_results(results)
        except TimeoutError:
            pass
        return results

    def _read_results(self, results: dict[int, StreamResult]) -> None:
        pending = set(results)
        for kind, flags, stream, payload in self.frames():
            result = results.get(stream)
            if kind == GOAWAY:
                self.goaway = True
            if result is None:
                continue
            if kind in (HEADERS, CONTINUATION):
                if kind == HEADERS:
                    if flags & PADDED:
                        payload = payload[1:len(payload) - payload[0]]
                    if flags & PRIORITY:
                        payload = payload[5:]
                    self._header_block = (stream, flags, bytearray(payload))
                else:
                    assert self._header_block is not None and self._header_block[0] == stream
                    self._header_block[2].extend(payload)
                    flags |= self._header_block[1] & END_STREAM
                if flags & END_HEADERS:
                    result.headers += hpack_decode(bytes(self._header_block[2]))
                    if self._header_block[1] & END_STREAM:
                        result.ended = True
            elif kind == DATA:
                if flags & PADDED:
                    payload = payload[1:len(payload) - payload[0]]
                result.data += payload
                if flags & END_STREAM:
                    result.ended = True
            elif kind == RST_STREAM:
                result.reset = int.from_bytes(payload, 'big')
                result.ended = True
            if result.ended:
                pending.discard(stream)
                if not pending:
                    return
