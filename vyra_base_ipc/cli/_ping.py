"""``vyra-ipc ping TARGET [--count N]``: round trips of health checks on
the lane asked for: p50, p99, max and a histogram."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import TextIO

from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._args import EXIT_OK, UsageError, Verb, add_json, add_lane, add_target
from ._output import EscapingStream, Progress, duration, histogram, histogram_lines
from ._targets import client, resolve_target

__all__ = ['LONG_RUN', 'VERB']

#: Pings from which a terminal shows a progress bar.
LONG_RUN = 1000


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_target(parser)
    parser.add_argument('--count', '-c', type=int, default=100, metavar='N',
                        help=f'health checks to time (default 100; from {LONG_RUN} on, a terminal shows '
                             'a progress bar)')
    add_lane(parser)
    add_json(parser)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    if args.count < 1:
        raise UsageError(f'--count must be at least 1, not {args.count}')
    path = resolve_target(args.target)
    request = health_pb2.HealthCheckRequest()
    times = []
    tty = out.isatty() and not args.json and args.count >= LONG_RUN
    # The bar's carriage returns are this program's own: they go to the stream beneath.
    drawn_on = out.raw if isinstance(out, EscapingStream) else out
    progress = Progress(args.count, drawn_on if tty else None, 'ping ')
    with client(path, health_pb2_grpc.HealthStub, args.lane, args.timeout) as handler:
        handler.call_method('Check', request)  # connected and the lane chosen before timing
        try:
            for _ in range(args.count):
                started = time.perf_counter()
                handler.call_method('Check', request)
                times.append(time.perf_counter() - started)
                progress.step()
        finally:
            progress.done()
        lane = handler.lane_in_use
    ordered = sorted(times)
    p50, p99 = statistics.median(ordered), ordered[math.ceil(0.99 * len(ordered)) - 1]
    buckets = histogram(ordered)
    if args.json:
        print(json.dumps({
            'socket_path': str(path), 'lane': lane, 'count': len(ordered),
            'p50_us': _us(p50), 'p99_us': _us(p99), 'max_us': _us(ordered[-1]), 'min_us': _us(ordered[0]),
            'histogram': [{'le_us': _us(bound), 'count': count} for bound, count in buckets]}), file=out)
        return EXIT_OK
    print(f'{len(ordered)} health checks of {path} on the {lane} lane', file=out)
    print(f'p50 {duration(p50)}   p99 {duration(p99)}   max {duration(ordered[-1])}   '
          f'min {duration(ordered[0])}', file=out)
    for line in histogram_lines(buckets):
        print(line, file=out)
    return EXIT_OK


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 1)


VERB = Verb('ping', 'round trips of health checks: p50, p99, max and a histogram', _add_arguments, _run)
