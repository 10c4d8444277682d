"""What busy polling buys and what it costs: 64 B calls on the fast lane with
polling off and on, on the server's event loop and in the client, side by
side, with the CPU time each side spends per call.

Three servers of the section's own: ``busy-poll-on`` (the default loop,
polling for :data:`~vyra_base_ipc.DEFAULT_BUSY_POLL`), ``busy-poll-off``
(``busy_poll=0``, a plain asyncio loop) and ``busy-poll-100us`` (polling for
100 µs, the window before the default). Variants of each client mode, calls
interleaved in blocks as in :mod:`bench.overhead`:

``sync``   ``SyncIPCHandler``: ``off`` (neither polls), ``server`` (only the
           server polls), ``both`` (the defaults).
``async``  ``IPCHandler`` on a stock asyncio loop: ``off``, ``server``,
           ``both`` (the defaults: the waiting call keeps the loop awake).
``async-polling-loop``  ``IPCHandler`` on :func:`vyra_base_ipc.new_event_loop`
           (its own process): ``both``.
``sync-buffer``  ``SyncIPCHandler`` calling ``Mirror`` with a 64 B
           ``SharedBuffer`` (allocated, written, sent, answered with itself,
           its view read, closed): ``off``, ``100us`` (both poll for 100 µs),
           ``both`` (the defaults). What the default window covers that a
           narrower one did not.

CPU per call is the process time (user + system, all threads) each side used
over the variant's blocks, divided by its calls; the server's is asked with
the ``CpuTime`` call between blocks. ``idle`` (sync mode): each server's CPU
use in percent over half a second without calls, after the blocks.

Child: ``python -m bench.busypoll SPEC`` with ``{"mode", "addresses",
"client_options", "rounds", "block", "warmup"}``; prints one JSON line.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import sys
import time
from typing import Any, Callable

from .overhead import round_order
from .payloads import make_payload
from .tally import Tally

__all__ = ['BUSY_POLL_SERVERS', 'LABELS', 'MODES', 'main', 'measure_busy_poll']

#: The section's servers: name -> ``busy_poll`` of their event loop (None: the default).
BUSY_POLL_SERVERS: dict[str, float | None] = {'busy-poll-on': None, 'busy-poll-off': 0.0,
                                               'busy-poll-100us': 100e-6}
#: Client modes -> variant -> (server, client busy_poll: None for the default).
MODES: dict[str, dict[str, tuple[str, float | None]]] = {
    'sync': {'off': ('busy-poll-off', 0.0), 'server': ('busy-poll-on', 0.0),
             'both': ('busy-poll-on', None)},
    'async': {'off': ('busy-poll-off', 0.0), 'server': ('busy-poll-on', 0.0),
              'both': ('busy-poll-on', None)},
    'async-polling-loop': {'both': ('busy-poll-on', None)},
    'sync-buffer': {'off': ('busy-poll-off', 0.0), '100us': ('busy-poll-100us', 100e-6),
                    'both': ('busy-poll-on', None)},
}
#: What each ``mode/variant`` is, for the tables.
LABELS = {
    'sync/off': 'SyncIPCHandler, nobody polls',
    'sync/server': 'SyncIPCHandler, only the server polls',
    'sync/both': 'SyncIPCHandler, both poll (the defaults)',
    'async/off': "IPCHandler on asyncio's loop, nobody polls",
    'async/server': "IPCHandler on asyncio's loop, only the server polls",
    'async/both': "IPCHandler on asyncio's loop, both poll (the defaults)",
    'async-polling-loop/both': 'IPCHandler on vyra_base_ipc.new_event_loop(), both poll',
    'sync-buffer/off': 'SyncIPCHandler, 64 B SharedBuffer (Mirror), nobody polls',
    'sync-buffer/100us': 'SyncIPCHandler, 64 B SharedBuffer (Mirror), both poll for 100 µs',
    'sync-buffer/both': 'SyncIPCHandler, 64 B SharedBuffer (Mirror), both poll (the defaults)',
}
_PAYLOAD = 64
_PAYLOAD_BYTES = make_payload(_PAYLOAD)
_TIMEOUT = 30.0
_IDLE_SECONDS = 0.5


def _handlers(mode: str, addresses: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    from vyra_base_ipc import IPCHandler, SyncIPCHandler
    from vyra_bench import bench_pb2_grpc

    handlers = {}
    for variant, (server, busy_poll) in MODES[mode].items():
        extra = {} if busy_poll is None else {'busy_poll': busy_poll}
        handler_type = SyncIPCHandler if mode.startswith('sync') else IPCHandler
        handlers[variant] = handler_type(addresses[server], bench_pb2_grpc.BenchServiceStub,
                                         timeout=_TIMEOUT, **options, **extra)
    return handlers


def _cpu_time(handler: Any) -> float:
    from vyra_bench import bench_pb2

    return handler.call_method('CpuTime', bench_pb2.Blob()).seconds


def _echo(handler: Any) -> int:
    from vyra_bench import bench_pb2

    return len(handler.call_method('Echo', bench_pb2.Blob(data=_PAYLOAD_BYTES)).data)


def _mirror(handler: Any) -> int:
    from vyra_base_ipc import SharedBuffer, shared_buffer
    from vyra_bench import bench_pb2

    with SharedBuffer.allocate(_PAYLOAD) as buffer:
        buffer.view()[:] = _PAYLOAD_BYTES
        reply, received = handler.call_method('Mirror', bench_pb2.BufferRequest(data=buffer.ref),
                                              buffers=[buffer], return_buffers=True)
        return len(shared_buffer(reply.data, received))


def _measure_sync(handlers: dict[str, Any], rounds: int, block: int, warmup: int,
                  call_once: Callable[[Any], int] = _echo, idle: bool = True) -> dict[str, Any]:
    from vyra_bench import bench_pb2

    for handler in handlers.values():
        handler.connect()
        for _ in range(warmup):
            call_once(handler)
    tallies = {variant: Tally(_PAYLOAD) for variant in handlers}
    gc.collect()
    for round_index in range(rounds):
        for variant in round_order(list(handlers), round_index):
            handler, tally = handlers[variant], tallies[variant]
            call, record = handler.call_method, tally.latencies.append
            tally.open_block(call('CpuTime', bench_pb2.Blob()).seconds)
            for _ in range(block):
                start = time.perf_counter_ns()
                if call_once(handler) != _PAYLOAD:
                    raise RuntimeError(f'{variant}: short reply')
                record(time.perf_counter_ns() - start)
            tally.close_block(call('CpuTime', bench_pb2.Blob()).seconds)
    result: dict[str, Any] = {'variants': {variant: tally.report() for variant, tally in tallies.items()}}
    if idle:
        # One handler per server: how much CPU each uses while nobody calls.
        by_server = {MODES['sync'][variant][0]: handler for variant, handler in handlers.items()}
        result['idle'] = _idle_cpu({server: functools.partial(_cpu_time, handler)
                                    for server, handler in by_server.items()})
    for handler in handlers.values():
        handler.disconnect()
    return result


async def _measure_async(handlers: dict[str, Any], rounds: int, block: int,
                         warmup: int) -> dict[str, Any]:
    from vyra_bench import bench_pb2

    request = bench_pb2.Blob(data=make_payload(_PAYLOAD))
    for handler in handlers.values():
        await handler.connect()
        for _ in range(warmup):
            await handler.call_method('Echo', request)
    tallies = {variant: Tally(_PAYLOAD) for variant in handlers}
    gc.collect()
    for round_index in range(rounds):
        for variant in round_order(list(handlers), round_index):
            call, tally = handlers[variant].call_method, tallies[variant]
            record = tally.latencies.append
            tally.open_block((await call('CpuTime', bench_pb2.Blob())).seconds)
            for _ in range(block):
                start = time.perf_counter_ns()
                if len((await call('Echo', request)).data) != _PAYLOAD:
                    raise RuntimeError(f'{variant}: short reply')
                record(time.perf_counter_ns() - start)
            tally.close_block((await call('CpuTime', bench_pb2.Blob())).seconds)
    for handler in handlers.values():
        await handler.disconnect()
    return {'variants': {variant: tally.report() for variant, tally in tallies.items()}}


def _idle_cpu(cpu_time: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Each server's CPU use in percent over :data:`_IDLE_SECONDS` without calls."""
    before = {server: read() for server, read in cpu_time.items()}
    began = time.perf_counter()
    time.sleep(_IDLE_SECONDS)
    elapsed = time.perf_counter() - began
    return {server: round((read() - before[server]) / elapsed * 100, 1)
            for server, read in cpu_time.items()}


def measure_busy_poll(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure the variants of ``spec['mode']`` in this process (see the module docstring)."""
    mode = spec['mode']
    if mode not in MODES:
        raise ValueError(f'mode must be one of {", ".join(MODES)}, not {mode!r}')
    handlers = _handlers(mode, spec['addresses'], spec.get('client_options', {}))
    args = (handlers, spec['rounds'], spec['block'], spec['warmup'])
    if mode == 'sync':
        result = _measure_sync(*args)
    elif mode == 'sync-buffer':
        result = _measure_sync(*args, call_once=_mirror, idle=False)
    elif mode == 'async':
        result = asyncio.run(_measure_async(*args))
    else:
        from vyra_base_ipc import run

        result = run(_measure_async(*args))
    return {'mode': mode, 'payload_bytes': _PAYLOAD,
            'calls_per_variant': spec['rounds'] * spec['block'], **result}


def main() -> None:
    """The child: measure the JSON spec in ``sys.argv[1]``, print the result
    as one JSON line."""
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(json.dumps(measure_busy_poll(json.loads(sys.argv[1]))), flush=True)


if __name__ == '__main__':
    main()
