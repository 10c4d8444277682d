"""HTTP/2 and gRPC encoded by hand (RFC 9113, RFC 7541, gRPC over HTTP/2), for
tests that talk to the gRPC lane's socket as a peer grpc would not be: the
few frame types needed, HPACK literals without indexing (servers are told
``SETTINGS_HEADER_TABLE_SIZE = 0``, so that their answers decode without a
dynamic table)."""

from __future__ import annotations

import struct

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
