"""A minimal ttrpc in Python, for reference: what the protocol costs in Python
with none of this package's work around it.

The server (``python -m bench.servers ttrpc-minimal PATH``) takes a thread
per connection, reads each request frame with blocking calls, parses the
envelope and the ``Blob``, answers with the ``Blob`` serialized again in an
OK response, and checks nothing else (no deadlines, metadata, limits, peers,
shared memory or flow control). The clients (:mod:`bench.drivers.ttrpc_minimal`)
build the envelope, send it and parse the answer in the fewest steps, one
call at a time; the server they call is this one or :class:`IPCServer`'s
fast lane, which serves containerd's clients as they are.

The same server on asyncio's loop (``python -m bench.servers
ttrpc-minimal-aio PATH``: :class:`ServerProtocol`) answers each request in the
``data_received`` that brought it, as :class:`IPCServer` answers a handler
that does not wait.

The rows they make (``python -m bench --sections peers``) split a call's cost:
``minimal → minimal`` is the Python floor of the protocol, ``minimal →
IPCServer`` adds this package's server, ``SyncIPCHandler → IPCServer`` its
client too. The server's share is split by CPU time per call (a polling
loop's time depends on its client's, so neither server polls there): the
minimal server on asyncio's loop against the same in threads (what asyncio
costs), and :class:`IPCServer` with ``busy_poll=0`` against the former (what
its code costs).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import struct
from typing import Any

from .framing import recv_exact

__all__ = ['HEADER', 'REQUEST', 'RESPONSE', 'ServerProtocol', 'answer', 'decode_reply', 'encode_request',
           'serve_connection']

#: ``>IIBB``: data length, stream id, message type, flags.
HEADER = struct.Struct('>IIBB')
REQUEST, RESPONSE = 1, 2
#: What every request calls: the benchmark's echo.
SERVICE, METHOD = 'vyra.ipc.bench.BenchService', 'Echo'


@functools.cache  # (imported once, not on every call)
def _modules() -> tuple[Any, Any]:
    from vyra_base_ipc import ttrpc_pb2
    from vyra_bench import bench_pb2
    return ttrpc_pb2, bench_pb2


def encode_request(stream_id: int, payload: bytes) -> bytes:
    """The frame of an ``Echo`` request carrying ``payload`` in its ``Blob``."""
    ttrpc_pb2, bench_pb2 = _modules()
    data = ttrpc_pb2.Request(service=SERVICE, method=METHOD,
                             payload=bench_pb2.Blob(data=payload).SerializeToString()).SerializeToString()
    return HEADER.pack(len(data), stream_id, REQUEST, 0) + data


def decode_reply(data: bytes | memoryview) -> bytes:
    """The echoed bytes of a response frame's data.

    :raises RuntimeError: the response is not OK.
    """
    ttrpc_pb2, bench_pb2 = _modules()
    response = ttrpc_pb2.Response.FromString(data)
    if response.status.code:
        raise RuntimeError(f'Echo failed: {response.status.code} {response.status.message}')
    data_out: bytes = bench_pb2.Blob.FromString(response.payload).data
    return data_out


def answer(data: bytes | memoryview, stream_id: int) -> bytes:
    """The response frame to the request frame's ``data`` on ``stream_id``."""
    ttrpc_pb2, bench_pb2 = _modules()
    request = ttrpc_pb2.Request.FromString(data)
    if (request.service, request.method) == (SERVICE, METHOD):
        response = ttrpc_pb2.Response(payload=bench_pb2.Blob.FromString(request.payload).SerializeToString())
    else:
        response = ttrpc_pb2.Response()
        response.status.code = 12  # UNIMPLEMENTED
        response.status.message = f'{request.service}/{request.method}'
    body = response.SerializeToString()
    return HEADER.pack(len(body), stream_id, RESPONSE, 0) + body


def serve_connection(conn: socket.socket) -> None:
    """Answer the requests of one connection until its peer closes it."""
    header = memoryview(bytearray(HEADER.size))
    with conn:
        while recv_exact(conn, header):
            length, stream_id, _, _ = HEADER.unpack(header)
            data = memoryview(bytearray(length))
            if not recv_exact(conn, data):
                return
            conn.sendall(answer(data, stream_id))


class ServerProtocol(asyncio.Protocol):
    """The minimal server on an event loop: cuts the frames out of what
    arrives and answers each at once, in the same turn of the loop."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = b''

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep ``transport``, to answer on."""
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        """Answer every whole request frame in what came so far; keep the rest."""
        buffer = self._buffer + data if self._buffer else data
        start = 0
        while len(buffer) - start >= HEADER.size:
            length, stream_id, _, _ = HEADER.unpack_from(buffer, start)
            end = start + HEADER.size + length
            if len(buffer) < end:
                break
            assert self._transport is not None
            self._transport.write(answer(memoryview(buffer)[start + HEADER.size:end], stream_id))
            start = end
        self._buffer = buffer[start:]
