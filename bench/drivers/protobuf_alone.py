"""The client of :mod:`bench.protobuf_alone`: protobuf's own work for an echo,
the payload not sent (a row for reference beside the transparent path's)."""

from __future__ import annotations

from typing import Any, Callable

from ..framing import HEADER, recv_exact
from ..protobuf_alone import LENGTH, ROUNDTRIP, TIMED
from .socket_echo import SocketDriver

__all__ = ['ProtobufAloneDriver']


class ProtobufAloneDriver(SocketDriver):
    """Blocking, one connection (opened and closed as the floor's)."""

    def __init__(self, addresses: dict[str, Any], transport: dict[str, Any]) -> None:
        super().__init__(addresses, transport)
        self._path = addresses['protobuf-alone']

    def _request(self, body: bytes) -> bytes:
        sock = self._sock
        assert sock is not None
        sock.sendall(HEADER.pack(len(body)) + body)
        header = memoryview(bytearray(HEADER.size))
        if recv_exact(sock, header):
            reply = memoryview(bytearray(HEADER.unpack(header)[0]))
            if recv_exact(sock, reply):
                return bytes(reply)
        raise ConnectionError('the protobuf-alone server closed the connection')

    def echo(self, payload: bytes) -> Callable[[], int]:
        self.roundtrip(payload)  # (the server keeps the payload for the calls)
        request = self._request

        def call() -> int:
            return int(LENGTH.unpack(request(TIMED))[0])
        return call

    def roundtrip(self, payload: bytes) -> bytes:
        return self._request(ROUNDTRIP + payload)
