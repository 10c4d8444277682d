"""The floor: a blocking Unix socket client of the plain echo server."""

from __future__ import annotations

import socket
from typing import Any, Callable

from ..framing import HEADER, recv_exact

__all__ = ['SocketDriver']


class SocketDriver:
    """One connection, blocking; request frames are built once per payload."""

    asynchronous = False

    def __init__(self, addresses: dict[str, Any], transport: dict[str, Any]) -> None:
        self._path = addresses['socket']
        self._sock: socket.socket | None = None

    def open(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(self._path)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def echo(self, payload: bytes) -> Callable[[], int]:
        assert self._sock is not None
        sock = self._sock
        frame = HEADER.pack(len(payload)) + payload
        header = memoryview(bytearray(HEADER.size))
        reply = memoryview(bytearray(len(payload)))
        unpack = HEADER.unpack

        def call() -> int:
            sock.sendall(frame)
            if not recv_exact(sock, header):
                raise ConnectionError('echo server closed the connection')
            (size,) = unpack(header)
            if not recv_exact(sock, reply[:size]):
                raise ConnectionError('echo server closed the connection')
            return size
        self._reply = reply
        return call

    def roundtrip(self, payload: bytes) -> bytes:
        call = self.echo(payload)
        size = call()
        return bytes(self._reply[:size])
