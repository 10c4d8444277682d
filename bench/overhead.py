"""The overhead budget (issue 5, point 2), measured side by side: this
package's client against the bare grpcio stub, 64 B, in one process, calls of
the variants interleaved in short blocks so that a noisy neighbour slows all
of them alike.

Variants of each mode (``sync``: blocking stub and ``SyncIPCHandler``;
``async``: grpc.aio stub and ``IPCHandler``):

``stub/grpc``       bare stub → bare grpc.aio server: plain grpcio.
``stub/ipc``        bare stub → IPCServer: the server's share.
``stub+deadline/ipc`` bare stub with a deadline → IPCServer: what the
                    deadline every IPC call carries costs by itself.
``handler/ipc``     IPCHandler or SyncIPCHandler → IPCServer.

``total`` = handler/ipc ÷ stub/grpc is the budget (≤ 1.10); ``client`` =
handler/ipc ÷ stub/ipc and ``server`` = stub/ipc ÷ stub/grpc split it.

Every variant talks to a server process of its own (identical IPCServers for
the three ``/ipc`` variants), each over one connection, and the section always
pins its client to one CPU and its servers to the others. Unpinned, which core
each server's threads happened to share with the client swung the ratios by up
to ±12 % from run to run; pinned, identical setups agree within ±3 %. (Pinned
round trips are also about 30 % faster than unpinned ones on 2 cores: compare
ratios, not these absolute numbers with the table.)

Child: ``python -m bench.overhead SPEC`` with ``{"mode", "addresses",
"client_options", "rounds", "block", "warmup"}``; prints one JSON line.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
from time import perf_counter_ns
from typing import Any, Sequence

from .drivers import load_driver
from .payloads import make_payload
from .stats import Sample, summarize

__all__ = ['BUDGET', 'OVERHEAD_SERVERS', 'VARIANTS', 'main', 'measure_overhead', 'round_order']

#: Issue 5: the package's clients may cost at most 10 % over the bare stub.
BUDGET = 1.10
VARIANTS = ('stub/grpc', 'stub/ipc', 'stub+deadline/ipc', 'handler/ipc')
#: The section's own servers: name -> (server kind, variant that calls it).
OVERHEAD_SERVERS = {
    'overhead-grpc': ('grpc', 'stub/grpc'),
    'overhead-ipc-stub': ('ipc', 'stub/ipc'),
    'overhead-ipc-deadline': ('ipc', 'stub+deadline/ipc'),
    'overhead-ipc-handler': ('ipc', 'handler/ipc'),
}
_PAYLOAD = 64


def _drivers(mode: str, addresses: dict[str, Any], client_options: dict[str, Any]) -> dict[str, Any]:
    stub = load_driver('grpc-aio' if mode == 'async' else 'grpc-sync')
    handler = load_driver('ipc-aio' if mode == 'async' else 'ipc-sync')
    return {
        'stub/grpc': stub({'grpc': addresses['overhead-grpc']}, {'address': 'uds'}),
        'stub/ipc': stub({'grpc': addresses['overhead-ipc-stub']}, {'address': 'uds'}),
        'stub+deadline/ipc': stub({'grpc': addresses['overhead-ipc-deadline']},
                                  {'address': 'uds', 'options': {'timeout': 30.0}}),
        'handler/ipc': handler({'ipc': addresses['overhead-ipc-handler']},
                               {'options': client_options}),
    }


def _ratios(p50: dict[str, float]) -> dict[str, float]:
    return {
        'total': round(p50['handler/ipc'] / p50['stub/grpc'], 3),
        'client': round(p50['handler/ipc'] / p50['stub/ipc'], 3),
        'server': round(p50['stub/ipc'] / p50['stub/grpc'], 3),
        'deadline': round(p50['stub+deadline/ipc'] / p50['stub/ipc'], 3),
    }


def _report(latencies: dict[str, list[int]], walls: dict[str, int]) -> dict[str, Any]:
    variants = {name: summarize(Sample(values, walls[name]), _PAYLOAD)
                for name, values in latencies.items()}
    ratios = _ratios({name: row['p50_us'] for name, row in variants.items()})
    return {'variants': variants, 'ratios': ratios, 'budget': BUDGET,
            'within_budget': ratios['total'] <= BUDGET}


def round_order(variants: Sequence[str], round_index: int) -> list[str]:
    """The order of the variants' blocks in round ``round_index``: the rows
    of a balanced Latin square (Williams), one per round, so that over
    ``n`` rounds (``2n`` for an odd number of variants) each variant goes
    first as often as any other and follows each other variant equally
    often. What a block measures depends on what ran before it (caches,
    pages, a peer's threads); a plain rotation would keep every variant
    behind the same one in every round."""
    count = len(variants)
    if count < 2:
        return list(variants)
    # First row 0, 1, n-1, 2, n-2, ...; the others add the row's number.
    first = [0] + [(column + 1) // 2 if column % 2 else count - column // 2 for column in range(1, count)]
    row = round_index % (2 * count if count % 2 else count)
    order = [variants[(index + row) % count] for index in first]
    if row >= count:  # an odd number: the second square is the first one mirrored
        order.reverse()
    return order


def _measure_sync(drivers: dict[str, Any], rounds: int, block: int, warmup: int) -> dict[str, Any]:
    payload = make_payload(_PAYLOAD)
    calls = {}
    for name, driver in drivers.items():
        driver.open()
        calls[name] = driver.echo(payload)
        for _ in range(warmup):
            calls[name]()
    latencies: dict[str, list[int]] = {name: [] for name in drivers}
    walls = dict.fromkeys(drivers, 0)
    gc.collect()
    for round_index in range(rounds):
        for name in round_order(VARIANTS, round_index):
            call, record = calls[name], latencies[name].append
            begin = perf_counter_ns()
            for _ in range(block):
                start = perf_counter_ns()
                if call() != _PAYLOAD:
                    raise RuntimeError(f'{name}: short reply')
                record(perf_counter_ns() - start)
            walls[name] += perf_counter_ns() - begin
    for driver in drivers.values():
        driver.close()
    return _report(latencies, walls)


async def _measure_async(drivers: dict[str, Any], rounds: int, block: int,
                         warmup: int) -> dict[str, Any]:
    payload = make_payload(_PAYLOAD)
    calls = {}
    for name, driver in drivers.items():
        await driver.open()
        calls[name] = driver.echo(payload)
        for _ in range(warmup):
            await calls[name]()
    latencies: dict[str, list[int]] = {name: [] for name in drivers}
    walls = dict.fromkeys(drivers, 0)
    gc.collect()
    for round_index in range(rounds):
        for name in round_order(VARIANTS, round_index):
            call, record = calls[name], latencies[name].append
            begin = perf_counter_ns()
            for _ in range(block):
                start = perf_counter_ns()
                if await call() != _PAYLOAD:
                    raise RuntimeError(f'{name}: short reply')
                record(perf_counter_ns() - start)
            walls[name] += perf_counter_ns() - begin
    for driver in drivers.values():
        await driver.close()
    return _report(latencies, walls)


def measure_overhead(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure the variants of ``spec['mode']`` in this process (see the module docstring)."""
    mode = spec['mode']
    if mode not in ('sync', 'async'):
        raise ValueError(f"mode must be 'sync' or 'async', not {mode!r}")
    drivers = _drivers(mode, spec['addresses'], spec.get('client_options', {}))
    args = (drivers, spec['rounds'], spec['block'], spec['warmup'])
    result = asyncio.run(_measure_async(*args)) if mode == 'async' else _measure_sync(*args)
    return {'mode': mode, 'payload_bytes': _PAYLOAD,
            'calls_per_variant': spec['rounds'] * spec['block'], **result}


def main() -> None:
    """The child: measure the JSON spec in ``sys.argv[1]``, print the result
    as one JSON line."""
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(json.dumps(measure_overhead(json.loads(sys.argv[1]))), flush=True)


if __name__ == '__main__':
    main()
