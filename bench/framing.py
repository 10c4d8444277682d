"""The plain Unix socket's framing: a 4-byte big-endian length, then the
payload; a stream is asked for with one :data:`STREAM_REQUEST`. Shared by the
socket servers and their clients."""

from __future__ import annotations

import socket
import struct

__all__ = ['HEADER', 'STREAM_REQUEST', 'recv_exact', 'send_frame']

HEADER = struct.Struct('>I')
#: Messages, their size, and 8 unused bytes (where the gRPC request has its id).
STREAM_REQUEST = struct.Struct('>IIQ')


def recv_exact(conn: socket.socket, buffer: memoryview) -> bool:
    """Fill ``buffer`` from ``conn``; ``False`` if the peer closed first."""
    received = 0
    size = len(buffer)
    while received < size:
        count = conn.recv_into(buffer[received:])
        if count == 0:
            return False
        received += count
    return True


def send_frame(conn: socket.socket, header: bytes | bytearray, body: bytes | memoryview) -> None:
    """Send header and body with one ``sendmsg`` where the kernel takes it all."""
    sent = conn.sendmsg([header, body])
    if sent < len(header):
        conn.sendall(header[sent:])
        conn.sendall(body)
    elif sent < len(header) + len(body):
        conn.sendall(memoryview(body)[sent - len(header):])
