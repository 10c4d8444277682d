"""Protobuf's own work for an echo, for reference: what the transparent
shared-memory path cannot go below, whatever carries the bytes.

The transparent path hands protobuf messages in and out, so an echo of a
``Blob`` takes protobuf's Python runtime through four steps, each copying the
payload: the client serializes the request (upb writes an arena, then copies
it into new ``bytes``), the server parses it (into its arena) and serializes
the same message as its answer (the benchmark's handler returns the request),
and the client parses the answer and reads ``data`` (a copy out of the
arena). The server of this module (``python -m bench.servers protobuf-alone
PATH``) does those steps in one process, on a payload it was given once, and
answers each call with a small frame: the payload itself never travels, so a
call costs protobuf's copies and a round trip of a few bytes.

The process keeps freed memory (:func:`vyra_base_ipc.keep_freed_memory`), as
the fairest case: in one process with glibc's defaults the four steps'
blocks are given back and faulted in anew on every call, which no two-process
echo pays in full. The row it makes (``protobuf-alone``, ``python -m bench
--sections peers``) is the floor of the transparent path's row of the same
run; the plain socket echo copies the payload four times (in and out of the
kernel, both ways), this at least seven.

Requests on the plain socket's framing (:mod:`bench.framing`), a body of one
byte and then: ``R`` + payload (the steps on it; the answer carries what the
client's read of ``data`` gave, and the payload is kept for the next calls)
or ``T`` (the steps on the kept payload; the answer carries the length read,
8 bytes big-endian).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from .framing import HEADER, recv_exact, send_frame

__all__ = ['LENGTH', 'ROUNDTRIP', 'TIMED', 'echo_steps', 'serve_connection']

#: A request's first byte: the steps on the payload that follows, answered with the result.
ROUNDTRIP = b'R'
#: A request's first byte: the steps on the kept payload, answered with :data:`LENGTH`.
TIMED = b'T'
#: The answer to a :data:`TIMED` request: the length of ``data`` read at the end.
LENGTH = struct.Struct('>Q')


def echo_steps(blob_type: Any, request: Any) -> bytes:
    """Protobuf's steps of an echo of ``request`` (a ``Blob``): serialize,
    parse (from a ``memoryview``, as the transparent path parses a mapping),
    serialize again, parse, read ``data``."""
    received = blob_type.FromString(memoryview(request.SerializeToString()))
    answer = blob_type.FromString(memoryview(received.SerializeToString()))
    return answer.data


def serve_connection(conn: socket.socket) -> None:
    """Answer ``conn``'s requests until it closes (see the module docstring)."""
    from vyra_bench import bench_pb2

    header = bytearray(HEADER.size)
    request = bench_pb2.Blob()
    with conn:
        while recv_exact(conn, memoryview(header)):
            body = memoryview(bytearray(HEADER.unpack(header)[0]))
            if not recv_exact(conn, body):
                return
            if body[:1] == ROUNDTRIP:
                request = bench_pb2.Blob(data=bytes(body[1:]))
                data = echo_steps(bench_pb2.Blob, request)
                send_frame(conn, HEADER.pack(len(data)), data)
            else:
                length = len(echo_steps(bench_pb2.Blob, request))
                send_frame(conn, HEADER.pack(LENGTH.size), LENGTH.pack(length))
