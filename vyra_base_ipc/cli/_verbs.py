"""What each verb does; each returns the process's exit status.

Exit status: 0 done, 1 the call or server failed (a non-OK status, nobody
serving, NOT_SERVING), 2 the command itself is wrong (usage, bad JSON,
unknown method), as argparse uses 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
import statistics
import sys
import time
from typing import Iterator, Sequence, TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .. import SyncIPCHandler
from ..address import grpc_target
from ..exceptions import IPCError
from ..introspection_pb2 import Stats, StatsRequest
from ..introspection_pb2_grpc import IntrospectionStub
from ._messages import Reflection, message_text, method_line, parse_request, service_text, stub_class, to_json
from ._targets import DEFAULT_DIRECTORY, discover, resolve_target, user_services

__all__ = ['UsageError', 'call', 'describe', 'health', 'list_servers', 'ping', 'stats']


class UsageError(Exception):
    """The command cannot be run as given (exit status 2)."""


@contextlib.contextmanager
def _reflection(target: str) -> Iterator[Reflection]:
    socket_path = resolve_target(target)
    with grpc.insecure_channel(grpc_target(socket_path)) as channel:
        try:
            yield Reflection(channel)
        except grpc.RpcError as error:
            raise IPCError(error.code(), f'reflection on {socket_path}: {error.details()}') from None


def _client(args: argparse.Namespace, stub: type) -> SyncIPCHandler:
    return SyncIPCHandler(resolve_target(args.target), stub, lane=args.lane, timeout=args.timeout)


def list_servers(args: argparse.Namespace, out: TextIO) -> int:
    """``list [DIR...]``: the servers in the directories, one line each."""
    entries = discover([Path(directory) for directory in args.directories] or [DEFAULT_DIRECTORY])
    if args.json:
        print(json.dumps([entry.as_json() for entry in entries], indent=2), file=out)
        return 0
    if not entries:
        print('no IPC server sockets found', file=out)
        return 0
    rows = [('MODULE', 'STATE', 'PID', 'UID', 'LANES', 'SOCKET', 'SERVICES')]
    for entry in entries:
        rows.append((entry.module, entry.state + (f' ({entry.detail})' if entry.detail else ''),
                     str(entry.pid or '-'), str(entry.uid),
                     'grpc+ttrpc' if entry.ttrpc_socket_path else 'grpc', entry.socket_path,
                     ', '.join(entry.services) or '-'))
    _table(rows, out)
    return 0


def describe(args: argparse.Namespace, out: TextIO) -> int:
    """``describe TARGET [SERVICE[/METHOD]]``: services, methods, messages."""
    with _reflection(args.target) as reflection:
        if not args.symbol:
            for name in user_services(reflection.services()):
                for line in service_text(reflection.service(name)):
                    print(line, file=out)
            return 0
        symbol = args.symbol.strip('/')
        if symbol in reflection.services():
            for line in service_text(reflection.service(symbol)):
                print(line, file=out)
            return 0
        try:
            method = reflection.method(symbol)
        except LookupError as error:
            raise UsageError(str(error)) from None
        print(method_line(method), file=out)
        seen: set[str] = set()
        for message in (method.input_type, method.output_type):
            for line in message_text(message, seen):
                print(line, file=out)
    return 0


def call(args: argparse.Namespace, out: TextIO) -> int:
    """``call TARGET SERVICE/METHOD [REQUEST]``: one call, JSON out."""
    text = args.request
    if text == '-':
        text = sys.stdin.read()
    elif text.startswith('@'):
        try:
            text = Path(text[1:]).read_text()
        except OSError as error:
            raise UsageError(f'cannot read the request from {text[1:]}: {error.strerror}') from None
    with _reflection(args.target) as reflection:
        try:
            method = reflection.method(args.method)
        except LookupError as error:
            raise UsageError(str(error)) from None
        try:
            request = parse_request(text, method)
        except ValueError as error:
            raise UsageError(str(error)) from None
        stub = stub_class(method.containing_service)
    metadata = tuple(_metadata(item) for item in args.metadata)
    with _client(args, stub) as client:
        if method.server_streaming:
            for response in client.stream_method(method.name, request, metadata=metadata):
                print(to_json(response), file=out, flush=True)
        else:
            print(to_json(client.call_method(method.name, request, metadata=metadata)), file=out)
    return 0


def health(args: argparse.Namespace, out: TextIO) -> int:
    """``health TARGET [SERVICE]``: SERVING or not (exit 1 if not)."""
    with _client(args, health_pb2_grpc.HealthStub) as client:
        answer = client.call_method('Check', health_pb2.HealthCheckRequest(service=args.service))
        lane = client.lane_in_use
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    if args.json:
        print(json.dumps({'service': args.service, 'status': status, 'lane': lane}), file=out)
    else:
        print(f'{args.service or "(server)"}: {status} (lane {lane})', file=out)
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


def ping(args: argparse.Namespace, out: TextIO) -> int:
    """``ping TARGET``: round trips of health checks; p50/p99/max and a histogram."""
    if args.count < 1:
        raise UsageError(f'--count must be at least 1, not {args.count}')
    request = health_pb2.HealthCheckRequest()
    times = []
    progress = _Progress(args.count, sys.stderr if sys.stderr.isatty() and args.count >= 1000 else None)
    with _client(args, health_pb2_grpc.HealthStub) as client:
        client.call_method('Check', request)  # connected, and the lane chosen
        for _ in range(args.count):
            started = time.perf_counter()
            client.call_method('Check', request)
            times.append(time.perf_counter() - started)
            progress.step()
        lane = client.lane_in_use
    progress.done()
    ordered = sorted(times)
    summary = {'lane': lane, 'count': len(times), 'p50_us': _us(statistics.median(ordered)),
               'p99_us': _us(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]),
               'max_us': _us(ordered[-1])}
    if args.json:
        print(json.dumps(summary), file=out)
        return 0
    print(f'{summary["count"]} health checks on the {lane} lane of {resolve_target(args.target)}: '
          f'p50 {summary["p50_us"]} µs, p99 {summary["p99_us"]} µs, max {summary["max_us"]} µs', file=out)
    for line in _histogram(ordered):
        print(line, file=out)
    return 0


def stats(args: argparse.Namespace, out: TextIO) -> int:
    """``stats TARGET``: the server's live metrics."""
    with _client(args, IntrospectionStub) as client:
        answer: Stats = client.call_method('GetStats', StatsRequest())
    if args.json:
        print(to_json(answer), file=out)
        return 0
    print(f'up {answer.uptime_seconds:.0f} s', file=out)
    lanes = [('LANE', 'CONNECTIONS', 'IN', 'OUT', 'SHM IN', 'SHM OUT')]
    for lane in answer.lanes:
        lanes.append((lane.lane, str(lane.connections), _bytes(lane.inline_bytes_received),
                      _bytes(lane.inline_bytes_sent), _bytes(lane.shared_memory_bytes_received),
                      _bytes(lane.shared_memory_bytes_sent)))
    _table(lanes, out)
    print(file=out)
    methods = [('METHOD', 'LANE', 'CALLS', 'RUNNING', 'ERRORS', 'P50', 'P99', 'MAX')]
    for method in sorted(answer.methods, key=lambda entry: (entry.method, entry.lane)):
        errors = ', '.join(f'{name} {count}' for name, count in sorted(method.errors.items())) or '0'
        methods.append((method.method, method.lane, str(method.calls), str(method.in_flight), errors,
                        _duration(method.latency_p50_seconds), _duration(method.latency_p99_seconds),
                        _duration(method.latency_max_seconds)))
    if len(methods) == 1:
        print('no calls yet', file=out)
    else:
        _table(methods, out)
    return 0


# -- output ---------------------------------------------------------------------------


def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print('  '.join(cells).rstrip(), file=out)


def _metadata(item: str) -> tuple[str, str]:
    key, separator, value = item.partition('=')
    if not separator or not key:
        raise UsageError(f'--metadata takes key=value, not {item!r}')
    return key.lower(), value


def _us(seconds: float) -> int:
    return round(seconds * 1e6)


def _duration(seconds: float) -> str:
    return f'{seconds * 1e3:.2f} ms' if seconds >= 1e-3 else f'{seconds * 1e6:.0f} µs'


def _bytes(count: int) -> str:
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if count < 1024 or unit == 'GiB':
            return f'{count:.0f} {unit}' if unit == 'B' else f'{count:.1f} {unit}'
        count /= 1024  # type: ignore[assignment]
    return str(count)


def _histogram(ordered: list[float], buckets: int = 8, width: int = 40) -> Iterator[str]:
    """A text histogram of round-trip times, in equal steps from min to max."""
    low, high = ordered[0], ordered[-1]
    step = (high - low) / buckets or 1e-9
    counts = [0] * buckets
    for value in ordered:
        counts[min(int((value - low) / step), buckets - 1)] += 1
    peak = max(counts)
    for index, count in enumerate(counts):
        start = _us(low + index * step)
        yield f'{start:>8} µs | {"#" * max(1 if count else 0, round(count / peak * width)):<{width}} {count}'


class _Progress:
    """A progress bar on a terminal (never in pipes)."""

    def __init__(self, total: int, stream: TextIO | None) -> None:
        self.total, self.stream, self.done_count = total, stream, 0

    def step(self) -> None:
        self.done_count += 1
        if self.stream is not None and self.done_count % max(1, self.total // 50) == 0:
            filled = self.done_count * 30 // self.total
            self.stream.write(f'\r[{"=" * filled}{" " * (30 - filled)}] {self.done_count}/{self.total}')
            self.stream.flush()

    def done(self) -> None:
        if self.stream is not None:
            self.stream.write('\n')


def describe_error(error: BaseException) -> str:
    """One line for an error of a verb."""
    if isinstance(error, IPCError):
        return f'{error.code.name}: {error.details}' + (f' ({error.method})' if error.method else '')
    return str(error)

