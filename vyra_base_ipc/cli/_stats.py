"""``vyra-ipc stats TARGET``: the server's metrics (``vyra.ipc.Introspection/
GetStats``): per lane connections, bytes and calls refused at the server's
limits, the shared-memory segment pool, per method and lane calls, calls
running, errors by status and latency."""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Iterator, TextIO

from ..introspection_pb2 import MethodStats, Stats, StatsRequest
from ..introspection_pb2_grpc import IntrospectionStub
from ._args import EXIT_OK, Verb, add_json, add_lane, add_target
from ._messages import to_json
from ._output import duration, size, table, uptime
from ._targets import client, resolve_target

__all__ = ['VERB', 'lines']


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_target(parser)
    add_lane(parser)
    add_json(parser)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    with client(resolve_target(args.target), IntrospectionStub, args.lane, args.timeout) as handler:
        answer: Stats = handler.call_method('GetStats', StatsRequest())
    if args.json:
        print(to_json(answer), file=out)
    else:
        for line in lines(answer):
            print(line, file=out)
    return EXIT_OK


def lines(stats: Stats) -> Iterator[str]:
    """The metrics as text: a table of lanes, then one of methods (each
    method on a line of its own, its lanes below it)."""
    yield f'up {uptime(stats.uptime_seconds)}'
    lanes = [('LANE', 'CONNECTIONS', 'IN', 'OUT', 'SHM IN', 'SHM OUT', 'REFUSED')]
    lanes += [(lane.lane, str(lane.connections), size(lane.inline_bytes_received),
               size(lane.inline_bytes_sent), size(lane.shared_memory_bytes_received),
               size(lane.shared_memory_bytes_sent), str(lane.calls_refused)) for lane in stats.lanes]
    yield from table(lanes, right=range(1, 7))
    pool = stats.segment_pool
    if pool.created:
        yield (f'segment pool {size(pool.bytes)} ({size(pool.free_bytes)} free): made {pool.created}, '
               f'reused {pool.reused}, full {pool.exhausted}')
    yield ''
    by_method: dict[str, list[MethodStats]] = defaultdict(list)
    for method in stats.methods:
        by_method[method.method].append(method)
    if not by_method:
        yield 'no calls yet'
        return
    rows = [('METHOD, LANE', 'CALLS', 'RUNNING', 'P50', 'P99', 'MAX', 'ERRORS')]
    owners: list[str | None] = [None]
    for name in sorted(by_method):
        for method in sorted(by_method[name], key=lambda entry: entry.lane):
            errors = ', '.join(f'{status} {count}' for status, count in sorted(method.errors.items()))
            rows.append((f'  {method.lane}', str(method.calls), str(method.in_flight),
                         duration(method.latency_p50_seconds), duration(method.latency_p99_seconds),
                         duration(method.latency_max_seconds), errors or '-'))
            owners.append(name)
    shown = None
    for owner, text in zip(owners, table(rows, right=range(1, 6)), strict=True):
        if owner is not None and owner != shown:
            shown = owner
            yield owner.lstrip('/')
        yield text


VERB = Verb('stats', "the server's metrics: calls, errors, latency per method and lane; connections and "
                     'bytes per lane', _add_arguments, _run)
