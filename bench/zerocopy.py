"""Explicit zero-copy buffers: ``python -m bench.zerocopy SPEC``.

``SPEC`` is JSON: ``{"address": IPC socket, "calls": N}``. For each size in
:data:`ZERO_COPY_SIZES` the child puts a NumPy array into a
:class:`~vyra_base_ipc.SharedBuffer` once (timed: the one copy) and passes it
``N`` times to ``BenchService/Touch``, whose handler reads its first and
last byte and reports the file behind its view (``/proc/self/maps``). If
nothing is copied, a call costs the same at 1 MiB and at 100 MiB, apart from
mapping the pages. For comparison, the same call on the gRPC lane, where the
buffer's bytes travel inline (``SharedBufferRef.inline_data``), is measured
at the sizes gRPC accepts.

The **round trip** is the echo of the table done with buffers: the client
puts the array into a new SharedBuffer (the one copy, timed), passes it to
``BenchService/Mirror``, whose handler answers with the very buffer it got,
and maps the answer. Prints one JSON line ``{"zero_copy": [row, ...]}``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

__all__ = ['ZERO_COPY_SIZES', 'backing_file', 'main']

#: 1 MiB, 10 MiB, 100 MiB.
ZERO_COPY_SIZES = (1 << 20, 10 << 20, 100 << 20)
#: Sizes also measured inline on the gRPC lane (below its message size limit).
_INLINE_SIZES = (1 << 20, 10 << 20)
#: The fast lane client's max_message_bytes: above the largest buffer.
_ZERO_COPY_MESSAGE_BYTES = 128 << 20


def backing_file(view: Any) -> str:
    """The file mapped at ``view``'s first byte in this process, from
    ``/proc/self/maps`` (``''`` for anonymous memory or if unknown)."""
    try:
        import numpy
    except ImportError:
        return ''
    if not len(view):
        return ''
    address = numpy.frombuffer(view, numpy.uint8).ctypes.data
    with open('/proc/self/maps') as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, _, end = fields[0].partition('-')
            if int(start, 16) <= address < int(end, 16):
                return fields[5].strip() if len(fields) > 5 else ''
    return ''


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3)


def _measure(handler: Any, request: Any, buffers: list[Any], calls: int) -> tuple[float, Any]:
    reply = handler.call_method('Touch', request, buffers=buffers, timeout=60)
    samples = []
    for _ in range(calls):
        began = time.perf_counter()
        handler.call_method('Touch', request, buffers=buffers, timeout=60)
        samples.append(time.perf_counter() - began)
    return _median_ms(samples), reply


def _round_trip(handler: Any, array: Any, calls: int) -> float:
    from vyra_base_ipc import SharedBuffer, shared_buffer
    from vyra_bench import bench_pb2

    samples = []
    for index in range(calls + 1):
        began = time.perf_counter()
        with SharedBuffer.copy_from(array) as buffer:
            reply, received = handler.call_method('Mirror', bench_pb2.BufferRequest(data=buffer.ref),
                                                  buffers=[buffer], return_buffers=True, timeout=60)
            view = shared_buffer(reply.data, received)
            if (len(view), view[0], view[-1]) != (array.nbytes, array[0], array[-1]):
                raise RuntimeError(f'Mirror of {array.nbytes} bytes answered {len(view)} bytes')
        if index:  # the first one warms up
            samples.append(time.perf_counter() - began)
        del view, received
    return _median_ms(samples)


def run(address: str, calls: int) -> list[dict[str, Any]]:
    import numpy

    from vyra_base_ipc import SharedBuffer, SyncIPCHandler
    from vyra_bench import bench_pb2, bench_pb2_grpc

    rows = []
    # A request is held to max_message_bytes with its buffers counted inline
    # (as on the gRPC lane), so the 100 MiB buffer needs it raised.
    fast = SyncIPCHandler(address, bench_pb2_grpc.BenchServiceStub, lane='ttrpc',
                          max_message_bytes=_ZERO_COPY_MESSAGE_BYTES)
    inline = SyncIPCHandler(address, bench_pb2_grpc.BenchServiceStub, lane='grpc')
    with fast, inline:
        for size in ZERO_COPY_SIZES:
            array = numpy.arange(size, dtype=numpy.uint8)
            began = time.perf_counter()
            buffer = SharedBuffer.copy_from(array)
            copy_ms = (time.perf_counter() - began) * 1e3
            with buffer:
                request = bench_pb2.BufferRequest(data=buffer.ref)
                call_ms, reply = _measure(fast, request, [buffer], calls)
                if (reply.size, reply.first_byte, reply.last_byte) != (size, array[0], array[-1]):
                    raise RuntimeError(f'Touch of {size} bytes saw {reply}')
                row = {'bytes': size, 'copy_into_shared_memory_ms': round(copy_ms, 3),
                       'call_p50_ms': call_ms, 'handler_backing': reply.backing,
                       'zero_copy': 'memfd:' in reply.backing,
                       'round_trip_p50_ms': _round_trip(fast, array, max(1, calls // 5))}
                if size in _INLINE_SIZES:
                    row['grpc_inline_call_p50_ms'], _ = _measure(inline, request, [buffer],
                                                                 max(1, calls // 10))
                rows.append(row)
    return rows


def main() -> None:
    """``python -m bench.zerocopy SPEC``, as the module docstring says."""
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    spec = json.loads(sys.argv[1])
    print(json.dumps({'zero_copy': run(spec['address'], spec['calls'])}), flush=True)


if __name__ == '__main__':
    main()
