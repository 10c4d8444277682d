"""The plain Unix socket echo's framing: a 4-byte big-endian length, then the
payload. Shared by the echo server and its client driver."""

from __future__ import annotations

import socket
import struct

__all__ = ['HEADER', 'recv_exact', 'send_frame']

HEADER = struct.Struct('>I')


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
