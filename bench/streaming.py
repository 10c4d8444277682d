"""Server streams: messages per second on both lanes against a bare grpc.aio
stream and a plain socket, and how soon a stream the caller leaves ends on
the server.

Throughput: one server stream (``Stream``) of ``messages`` messages of 64 B,
then of 64 KiB, per variant and round; messages per second over the whole
stream (call made → last message read). The variants of one client mode run
in one process, one stream each per round, in an order rotated every round
(:func:`bench.overhead.round_order`):

``sync``   ``SyncIPCHandler`` on the fast lane and on the gRPC lane; the
           plain socket stream (the floor).
``async``  ``IPCHandler`` on the fast lane and on the gRPC lane; a bare
           ``grpc.aio`` stub on the bare gRPC server; the plain socket stream.

Cancel latency: the client reads three messages of an endless ``Watch`` (a
message every millisecond), notes the time and leaves the stream (``close()``
or ``aclose()``, what ``break`` and garbage collection do; ``cancel()`` for the
bare stub); the server's handler notes when it ended, whatever ended it; the
client asks ``WatchEnded`` for that time. Both times are ``CLOCK_MONOTONIC``,
one clock for every process of the machine. A watch still running after
:data:`_CANCEL_WAIT` seconds counts as ``not_cancelled``.

Child: ``python -m bench.streaming SPEC`` with ``{"mode", "addresses",
"client_options", "messages", "rounds", "cancels"}``; prints one JSON line.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import socket
import statistics
import sys
import time
from typing import Any, Callable, Iterator

from .framing import HEADER, STREAM_REQUEST, recv_exact
from .overhead import round_order
from .stats import percentile

__all__ = ['FAST_LANE_STREAM_TARGET', 'LABELS', 'MODES', 'main', 'measure_streaming',
           'stream_checks']

#: Variants of each client mode: name -> the server they stream from.
MODES: dict[str, dict[str, str]] = {
    'sync': {'ipc-sync-ttrpc': 'ipc', 'ipc-sync-grpc': 'ipc', 'socket': 'socket-stream'},
    'async': {'ipc-aio-ttrpc': 'ipc', 'ipc-aio-grpc': 'ipc', 'grpc-aio': 'grpc',
              'socket': 'socket-stream'},
}
#: What each variant is, for the tables.
LABELS = {
    'ipc-sync-ttrpc': 'SyncIPCHandler, fast lane',
    'ipc-sync-grpc': 'SyncIPCHandler, gRPC lane',
    'ipc-aio-ttrpc': 'IPCHandler, fast lane',
    'ipc-aio-grpc': 'IPCHandler, gRPC lane',
    'grpc-aio': 'bare grpc.aio stub and server',
    'socket': 'plain socket stream (floor)',
}
#: Issue 14: 64 B messages/s of the fast lane at least this many times the gRPC lane's.
FAST_LANE_STREAM_TARGET = 3.0
#: Seconds a left watch may keep running before it counts as not cancelled.
_CANCEL_WAIT = 2.0
#: The deadline of every stream: far beyond any measurement, so that only
#: leaving ends a watch (and copies without ``timeout=None`` work too).
_TIMEOUT = 60.0
_SMALL, _LARGE = 64, 64 * 1024
_MESSAGES_READ_BEFORE_LEAVING = 3
#: The prefix of this package's client variants, by mode.
_CLIENTS = {'sync': 'ipc-sync', 'async': 'ipc-aio'}


class _SocketStream:
    """The floor: a blocking socket, a stream request, ``count`` frames read."""

    def __init__(self, path: str) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.connect(path)
        self._header = memoryview(bytearray(HEADER.size))
        self._body = bytearray()

    def stream(self, count: int, size: int) -> int:
        """Read a stream of ``count`` messages of ``size`` bytes; the messages read."""
        if len(self._body) < size:
            self._body = bytearray(size)
        body = memoryview(self._body)
        self._socket.sendall(STREAM_REQUEST.pack(count, size, 0))
        for received in range(count):
            if not recv_exact(self._socket, self._header):
                return received
            if not recv_exact(self._socket, body[:HEADER.unpack(self._header)[0]]):
                return received
        return count

    def close(self) -> None:
        self._socket.close()


def _handlers(mode: str, addresses: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    from vyra_base_ipc import IPCHandler, SyncIPCHandler
    from vyra_bench import bench_pb2_grpc

    handler_type = SyncIPCHandler if mode == 'sync' else IPCHandler
    handlers = {}
    for variant in MODES[mode]:
        if variant.startswith('ipc-'):
            lane = variant.rsplit('-', 1)[1]
            handlers[variant] = handler_type(addresses['ipc'], bench_pb2_grpc.BenchServiceStub,
                                             timeout=_TIMEOUT, **{**options, 'lane': lane})
    return handlers


class _Results:
    """What the streams and watches of one client mode measured."""

    def __init__(self, variants: list[str], leavers: list[str]) -> None:
        self._rates: dict[str, dict[int, list[float]]] = {variant: {_SMALL: [], _LARGE: []}
                                                          for variant in variants}
        self._cancel_ns: dict[str, list[int]] = {variant: [] for variant in leavers}
        self._missed = dict.fromkeys(leavers, 0)

    def streamed(self, variant: str, size: int, count: int, received: int, seconds: float | None) -> None:
        """A stream of ``count`` messages of ``size`` bytes brought ``received``
        in ``seconds`` (``None``: a warm-up, checked but not counted).

        :raises RuntimeError: messages were missing.
        """
        if received != count:
            raise RuntimeError(f'{variant}: {received} of {count} messages of {size} bytes arrived')
        if seconds is not None:
            self._rates[variant][size].append(count / seconds)

    def left(self, variant: str, cancel_ns: int | None) -> None:
        """A watch was left; ``cancel_ns`` until its handler ended (``None``: it did not)."""
        if cancel_ns is None:
            self._missed[variant] += 1
        else:
            self._cancel_ns[variant].append(cancel_ns)

    def report(self) -> dict[str, Any]:
        """``{"variants": {variant: {size: rates}}, "cancel": {variant: latencies}}``."""
        variants = {variant: {str(size): {'streams': len(rates),
                                          'msgs_per_s': round(statistics.median(rates), 1),
                                          'mib_per_s': round(statistics.median(rates) * size / 2**20, 1)}
                              for size, rates in by_size.items() if rates}
                    for variant, by_size in self._rates.items()}
        cancel: dict[str, dict[str, Any]] = {}
        for variant, latencies in self._cancel_ns.items():
            values = sorted(latencies)
            cancel[variant] = {'cancels': len(values), 'not_cancelled': self._missed[variant]}
            if values:
                cancel[variant].update({f'{name}_us': round(percentile(values, fraction) / 1e3, 1)
                                        for name, fraction in (('p50', 0.5), ('p90', 0.9), ('max', 1.0))})
        return {'variants': variants, 'cancel': cancel}


def _stream_plan(variants: list[str], messages: dict[int, int],
                 rounds: int) -> Iterator[tuple[str, int, int, bool]]:
    """``(variant, size, count, timed)`` of every stream in order: a short
    untimed one per variant and size, then the rounds, rotated."""
    for variant in variants:
        for size in messages:
            yield variant, size, 2, False
    for round_index in range(rounds):
        for variant in round_order(variants, round_index):
            for size, count in messages.items():
                yield variant, size, count, True


def _watch_plan(variants: list[str], cancels: int) -> Iterator[tuple[str, int]]:
    """``(variant, watch id)`` of every watch to leave, rotated each round."""
    ids = itertools.count(1)
    for round_index in range(cancels):
        for variant in round_order(variants, round_index):
            yield variant, next(ids)


# -- sync ------------------------------------------------------------------------------


def _measure_sync(addresses: dict[str, Any], options: dict[str, Any], messages: dict[int, int],
                  rounds: int, cancels: int) -> dict[str, Any]:
    from vyra_bench import bench_pb2

    handlers = _handlers('sync', addresses, options)
    floor = _SocketStream(addresses['socket-stream'])

    def streamer(variant: str) -> Callable[[int, int], int]:
        if variant == 'socket':
            return floor.stream
        handler = handlers[variant]
        return lambda count, size: sum(1 for message in handler.stream_method(
            'Stream', bench_pb2.StreamRequest(count=count, size=size)) if len(message.data) == size)

    streams = {variant: streamer(variant) for variant in MODES['sync']}
    results = _Results(list(streams), list(handlers))
    try:
        for handler in handlers.values():
            handler.connect()
        gc.collect()
        for variant, size, count, timed in _stream_plan(list(streams), messages, rounds):
            began = time.perf_counter()
            received = streams[variant](count, size)
            results.streamed(variant, size, count, received, time.perf_counter() - began if timed else None)
        for variant, watch_id in _watch_plan(list(handlers), cancels):
            results.left(variant, _leave_watch_sync(handlers[variant], watch_id, bench_pb2))
    finally:
        for handler in handlers.values():
            handler.disconnect()
        floor.close()
    return results.report()


def _leave_watch_sync(handler: Any, watch_id: int, bench_pb2: Any) -> int | None:
    """Read three messages of a watch, leave it; ns until its handler ended (None: it did not)."""
    watch = handler.stream_method('Watch', bench_pb2.StreamRequest(size=_SMALL, id=watch_id))
    for _ in range(_MESSAGES_READ_BEFORE_LEAVING):
        next(watch)
    left = time.monotonic_ns()
    watch.close()
    deadline = time.monotonic() + _CANCEL_WAIT
    while time.monotonic() < deadline:
        ended = handler.call_method('WatchEnded', bench_pb2.StreamRequest(id=watch_id)).monotonic_ns
        if ended:
            return max(0, ended - left)
        time.sleep(0.0005)
    return None


# -- async -----------------------------------------------------------------------------


async def _measure_async(addresses: dict[str, Any], options: dict[str, Any],
                         messages: dict[int, int], rounds: int, cancels: int) -> dict[str, Any]:
    import grpc

    from vyra_bench import bench_pb2, bench_pb2_grpc

    from .servers import MAX_MESSAGE_BYTES

    handlers = _handlers('async', addresses, options)
    floor = _SocketStream(addresses['socket-stream'])
    limits = [('grpc.max_send_message_length', MAX_MESSAGE_BYTES),
              ('grpc.max_receive_message_length', MAX_MESSAGE_BYTES)]
    channel = grpc.aio.insecure_channel(f"unix:{addresses['grpc']}", options=limits)
    bare = bench_pb2_grpc.BenchServiceStub(channel)

    async def count_messages(responses: Any, size: int) -> int:
        return sum([1 async for message in responses if len(message.data) == size])

    def streamer(variant: str) -> Callable[[int, int], Any]:
        if variant == 'socket':
            async def socket_stream(count: int, size: int) -> int:
                return floor.stream(count, size)
            return socket_stream
        if variant == 'grpc-aio':
            return lambda count, size: count_messages(bare.Stream(
                bench_pb2.StreamRequest(count=count, size=size), timeout=_TIMEOUT), size)
        handler = handlers[variant]
        return lambda count, size: count_messages(handler.stream_method(
            'Stream', bench_pb2.StreamRequest(count=count, size=size)), size)

    streams = {variant: streamer(variant) for variant in MODES['async']}
    leavers = {**{variant: _watch_leaver(handler, bench_pb2) for variant, handler in handlers.items()},
               'grpc-aio': _bare_watch_leaver(bare, bench_pb2)}
    results = _Results(list(streams), list(leavers))
    try:
        for handler in handlers.values():
            await handler.connect()
        await channel.channel_ready()
        gc.collect()
        for variant, size, count, timed in _stream_plan(list(streams), messages, rounds):
            began = time.perf_counter()
            received = await streams[variant](count, size)
            results.streamed(variant, size, count, received, time.perf_counter() - began if timed else None)
        for variant, watch_id in _watch_plan(list(leavers), cancels):
            results.left(variant, await leavers[variant](watch_id))
    finally:
        for handler in handlers.values():
            await handler.disconnect()
        await channel.close()
        floor.close()
    return results.report()


async def _await_end(watch_id: int, left: int, ask: Callable[[Any], Any], bench_pb2: Any) -> int | None:
    deadline = time.monotonic() + _CANCEL_WAIT
    while time.monotonic() < deadline:
        ended = (await ask(bench_pb2.StreamRequest(id=watch_id))).monotonic_ns
        if ended:
            return max(0, ended - left)
        await asyncio.sleep(0.0005)
    return None


def _watch_leaver(handler: Any, bench_pb2: Any) -> Callable[[int], Any]:
    async def leave(watch_id: int) -> int | None:
        watch = handler.stream_method('Watch', bench_pb2.StreamRequest(size=_SMALL, id=watch_id))
        for _ in range(_MESSAGES_READ_BEFORE_LEAVING):
            await anext(watch)
        left = time.monotonic_ns()
        await watch.aclose()
        return await _await_end(watch_id, left, lambda request: handler.call_method('WatchEnded', request),
                                bench_pb2)
    return leave


def _bare_watch_leaver(stub: Any, bench_pb2: Any) -> Callable[[int], Any]:
    async def leave(watch_id: int) -> int | None:
        call = stub.Watch(bench_pb2.StreamRequest(size=_SMALL, id=watch_id), timeout=_TIMEOUT)
        for _ in range(_MESSAGES_READ_BEFORE_LEAVING):
            await call.read()
        left = time.monotonic_ns()
        call.cancel()
        return await _await_end(watch_id, left, lambda request: stub.WatchEnded(request, timeout=_TIMEOUT),
                                bench_pb2)
    return leave


# -- checks ----------------------------------------------------------------------------


def stream_checks(streaming: dict[str, Any]) -> list[dict[str, Any]]:
    """Per client mode: 64 B messages/s of the fast lane against the gRPC lane
    and the floor, and whether the fast lane meets :data:`FAST_LANE_STREAM_TARGET`."""
    checks = []
    for mode, measured in streaming.items():
        variants = measured['variants']
        rate = {variant: variants[variant][str(_SMALL)]['msgs_per_s'] for variant in variants}
        fast, grpc_lane = rate[f'{_CLIENTS[mode]}-ttrpc'], rate[f'{_CLIENTS[mode]}-grpc']
        ratio = fast / grpc_lane
        checks.append({'client': mode, 'payload_bytes': _SMALL, 'fast_lane_msgs_per_s': fast,
                       'grpc_lane_msgs_per_s': grpc_lane, 'floor_msgs_per_s': rate['socket'],
                       'vs_grpc_lane': round(ratio, 2), 'of_floor': round(fast / rate['socket'], 2),
                       'target': FAST_LANE_STREAM_TARGET,
                       'meets_target': ratio >= FAST_LANE_STREAM_TARGET})
    return checks


def measure_streaming(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure the variants of ``spec['mode']`` in this process (see the module docstring)."""
    mode = spec['mode']
    if mode not in MODES:
        raise ValueError(f'mode must be one of {", ".join(MODES)}, not {mode!r}')
    messages = {int(size): count for size, count in spec['messages'].items()}
    args = (spec['addresses'], spec.get('client_options', {}), messages, spec['rounds'], spec['cancels'])
    result = _measure_sync(*args) if mode == 'sync' else asyncio.run(_measure_async(*args))
    return {'mode': mode, 'messages': {str(size): count for size, count in messages.items()},
            'rounds': spec['rounds'], **result}


def main() -> None:
    """The child: measure the JSON spec in ``sys.argv[1]``, print the result
    as one JSON line."""
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(json.dumps(measure_streaming(json.loads(sys.argv[1]))), flush=True)


if __name__ == '__main__':
    main()
