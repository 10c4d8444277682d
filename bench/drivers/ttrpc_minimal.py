"""Minimal ttrpc clients (:mod:`bench.minimal_ttrpc`): one connection, one
call at a time, the envelope built and parsed in the fewest steps, nothing
checked, no deadline (as the floor's client: the benchmark's child has a
time limit of its own). Blocking (``ttrpc-minimal``) and on asyncio's loop
(``ttrpc-minimal-aio``: a protocol that resolves one future per answer).
They call the server named by the transport: ``ttrpc-minimal``,
``ttrpc-minimal-aio``, or an :class:`IPCServer`'s fast lane (``ipc``, or
``busy-poll-off``: one whose loop does not poll)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Awaitable, Callable

from ..minimal_ttrpc import HEADER, decode_reply, encode_request
from .socket_echo import SocketDriver

__all__ = ['MinimalTtrpcAioDriver', 'MinimalTtrpcDriver']

#: The servers that are :class:`IPCServer`\ s: ``ipc``, and the one of the
#: busy-poll section that does not poll (whose CPU per call is its work).
IPC_SERVERS = ('ipc', 'busy-poll-off')


def _address(addresses: dict[str, Any], transport: dict[str, Any]) -> str:
    server = transport['server']
    if server in IPC_SERVERS:
        from vyra_base_ipc.address import default_ttrpc_socket_path

        return str(default_ttrpc_socket_path(addresses[server]))
    return str(addresses[server])


class MinimalTtrpcDriver(SocketDriver):
    """Blocking: ``sendall`` the frame, read the header, then the data (one
    connection, opened and closed as the floor's)."""

    def __init__(self, addresses: dict[str, Any], transport: dict[str, Any]) -> None:
        super().__init__(addresses, transport)
        self._path = _address(addresses, transport)
        self._stream_id = 1

    def _call(self, payload: bytes) -> bytes:
        sock = self._sock
        assert sock is not None
        stream_id, self._stream_id = self._stream_id, self._stream_id + 2
        sock.sendall(encode_request(stream_id, payload))
        header = _receive(sock, HEADER.size)
        length, answered, _, _ = HEADER.unpack(header)
        if answered != stream_id:
            raise RuntimeError(f'answer to stream {answered}, not {stream_id}')
        return decode_reply(_receive(sock, length))

    def echo(self, payload: bytes) -> Callable[[], int]:
        call = self._call

        def echo_call() -> int:
            return len(call(payload))
        return echo_call

    def roundtrip(self, payload: bytes) -> bytes:
        return self._call(payload)


def _receive(sock: socket.socket, size: int) -> bytes:
    data = sock.recv(size)
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            raise ConnectionError('the server closed the connection')
        data += more
    return data


class _Answers(asyncio.Protocol):
    """Cuts frames from the stream; each resolves the waiting future."""

    def __init__(self) -> None:
        self.buffer = b''
        self.waiting: asyncio.Future[bytes] | None = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= HEADER.size:
            length = HEADER.unpack_from(self.buffer)[0]
            end = HEADER.size + length
            if len(self.buffer) >= end and self.waiting is not None:
                frame, self.buffer = self.buffer[HEADER.size:end], self.buffer[end:]
                self.waiting.set_result(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_exception(ConnectionError('the server closed the connection'))


class MinimalTtrpcAioDriver:
    """asyncio's loop: ``transport.write`` the frame, await the answer's future."""

    asynchronous = True

    def __init__(self, addresses: dict[str, Any], transport: dict[str, Any]) -> None:
        self._path = _address(addresses, transport)
        self._transport: asyncio.Transport | None = None
        self._answers = _Answers()
        self._stream_id = 1

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_unix_connection(lambda: self._answers, self._path)
        self._transport = transport

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def _call(self, payload: bytes) -> bytes:
        assert self._transport is not None
        stream_id, self._stream_id = self._stream_id, self._stream_id + 2
        waiting = self._answers.waiting = asyncio.get_running_loop().create_future()
        self._transport.write(encode_request(stream_id, payload))
        return decode_reply(await waiting)

    def echo(self, payload: bytes) -> Callable[[], Awaitable[int]]:
        call = self._call

        async def echo_call() -> int:
            return len(await call(payload))
        return echo_call

    async def roundtrip(self, payload: bytes) -> bytes:
        return await self._call(payload)
