"""The results as a table on stdout and as JSON: rows, cold start, overhead
budget, busy polling, server streams, the concurrency check, and what was
skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path
import platform
import sys
from typing import Any, Iterable, TextIO

from .busypoll import LABELS
from .payloads import size_label
from .report_peers import peer_checks, peer_markdown, peer_references, print_peers
from .stats import ROW_COLUMNS
from .streaming import LABELS as STREAM_LABELS

__all__ = ['CONCURRENCY_TARGET', 'FAST_LANE_CONCURRENCY_TARGET', 'REFERENCE_TRANSPORT',
           'TRIGGER_TRANSPORT', 'concurrency_check', 'fast_lane_checks', 'peer_checks', 'peer_references',
           'shared_memory_checks', 'machine', 'markdown_summary', 'print_report',
           'write_json']

#: Rows are compared with this transport at the same payload (the ``vs ROS 2`` column).
REFERENCE_TRANSPORT = 'rclpy-dds'
#: 64 calls in flight reach at least this many times the calls/s of
#: sequential calls: issue 5 asks 2× of the gRPC lane, issue 6 3× of the fast
#: lane (one connection, calls answered by stream id).
CONCURRENCY_TARGET = 2.0
FAST_LANE_CONCURRENCY_TARGET = 3.0


def _version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        'cpu': _cpu_model(),
        'cores': os.cpu_count(),
        'kernel': platform.release(),
        'python': platform.python_version(),
        'grpcio': _version('grpcio'),
        'protobuf': _version('protobuf'),
        'rclpy': _version('ros-rclpy'),
        'rmw': os.environ.get('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp (default)'),
        'fastdds': _version('ros-fastdds'),
        # The peers section's libraries (None: not installed, skipped).
        'pyzmq': _version('pyzmq'),
        'iceoryx2': _version('iceoryx2'),
        'eclipse-zenoh': _version('eclipse-zenoh'),
    }


def concurrency_check(rows: Iterable[dict[str, Any]], transport: str, payload_bytes: int = 64,
                      target: float = CONCURRENCY_TARGET) -> dict[str, Any] | None:
    """calls/s with 64 in flight against sequential calls, for one transport."""
    by_concurrency = {row['concurrency']: row for row in rows
                      if row['transport'] == transport and row['payload_bytes'] == payload_bytes}
    if 1 not in by_concurrency or 64 not in by_concurrency:
        return None
    sequential = by_concurrency[1]['calls_per_s']
    result = {'transport': transport, 'payload_bytes': payload_bytes, 'target': target,
              'calls_per_s': {str(c): row['calls_per_s'] for c, row in sorted(by_concurrency.items())},
              'ratio_64_vs_1': round(by_concurrency[64]['calls_per_s'] / sequential, 2)}
    result['meets_target'] = result['ratio_64_vs_1'] >= target
    return result


#: The reference of the fast lane's latency target: the smallest ROS 2 call.
TRIGGER_TRANSPORT = 'rclpy-trigger'


def fast_lane_checks(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each client kind: its fast lane's 64 B p50 against an rclpy
    ``Trigger`` call and against its own gRPC lane, same run (targets:
    at most 0.5× and 0.25×; the sync client's moonshot: 50 µs)."""
    rows = [row for row in rows if row['concurrency'] == 1]
    small = {row['transport']: row['p50_us'] for row in rows if row['payload_bytes'] == 64}
    # A Trigger call carries no payload: its one row.
    trigger = next((row['p50_us'] for row in rows if row['transport'] == TRIGGER_TRANSPORT), None)
    checks = []
    for kind in ('sync', 'aio'):
        fast, grpc_lane = small.get(f'ipc-{kind}-ttrpc'), small.get(f'ipc-{kind}-grpc')
        if fast is None:
            continue
        checks.append({
            'transport': f'ipc-{kind}-ttrpc', 'p50_us': fast,
            'vs_trigger': round(fast / trigger, 3) if trigger else None,
            'vs_grpc_lane': round(fast / grpc_lane, 3) if grpc_lane else None,
            'targets': {'vs_trigger': 0.5, 'vs_grpc_lane': 0.25,
                        **({'p50_us': 50.0} if kind == 'sync' else {})},
        })
    return checks


def _fast_lane_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for check in fast_lane_checks(results['rows']):
        parts = [f"`{check['transport']}` 64 B round trip {_ms(check['p50_us'])}"]
        if check['vs_trigger'] is not None:
            parts.append(f"{check['vs_trigger']:.2f}× an rclpy Trigger call (target ≤ 0.5×)")
        if check['vs_grpc_lane'] is not None:
            parts.append(f"{check['vs_grpc_lane']:.2f}× its gRPC lane (target ≤ 0.25×)")
        lines.append('; '.join(parts) + '.')
    return lines


#: The payload whose shared-memory speed-up the issue asks for.
_LARGE = 10 * 1024 * 1024


def shared_memory_checks(rows: Iterable[dict[str, Any]],
                         zero_copy: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """For each client kind with a shared-memory row: its 10 MiB p50 against
    the gRPC lane of the same client and against the ROS 2 service, and its
    100 MiB p50 (targets: 5× and 10× faster); the same for the 10 MiB round
    trip with explicit SharedBuffers (``SyncIPCHandler``)."""
    single = {(row['transport'], row['payload_bytes']): row['p50_us'] for row in rows
              if row['concurrency'] == 1}
    checks = []
    explicit = next((row['round_trip_p50_ms'] * 1e3 for row in zero_copy
                     if row['bytes'] == _LARGE and 'round_trip_p50_ms' in row), None)
    if explicit:
        grpc_lane, ros = single.get(('ipc-sync-grpc', _LARGE)), single.get((REFERENCE_TRANSPORT, _LARGE))
        checks.append({
            'transport': 'SharedBuffer round trip (SyncIPCHandler)', 'p50_us_10mib': explicit,
            'faster_than_grpc_lane': round(grpc_lane / explicit, 2) if grpc_lane else None,
            'faster_than_ros': round(ros / explicit, 2) if ros else None,
            'p50_us_100mib': next((row['round_trip_p50_ms'] * 1e3 for row in zero_copy
                                   if row['bytes'] > _LARGE and 'round_trip_p50_ms' in row), None),
            'targets': {'faster_than_grpc_lane': 5.0, 'faster_than_ros': 10.0},
        })
    for kind in ('sync', 'aio'):
        shm = single.get((f'ipc-{kind}-shm', _LARGE))
        if shm is None:
            continue
        grpc_lane = single.get((f'ipc-{kind}-grpc', _LARGE))
        ros = single.get((REFERENCE_TRANSPORT, _LARGE))
        large = [p50 for (key, size), p50 in single.items() if key == f'ipc-{kind}-shm' and size > _LARGE]
        checks.append({
            'transport': f'ipc-{kind}-shm', 'p50_us_10mib': shm,
            'faster_than_grpc_lane': round(grpc_lane / shm, 2) if grpc_lane else None,
            'faster_than_ros': round(ros / shm, 2) if ros else None,
            'p50_us_100mib': large[0] if large else None,
            'targets': {'faster_than_grpc_lane': 5.0, 'faster_than_ros': 10.0},
        })
    return checks


def _shared_memory_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for check in shared_memory_checks(results['rows'], results.get('zero_copy', ())):
        name = check['transport']
        name = f'`{name}`' if name.startswith('ipc-') else name
        parts = [f"{name} 10 MiB round trip {_ms(check['p50_us_10mib'])}"]
        if check['faster_than_grpc_lane']:
            parts.append(f"{check['faster_than_grpc_lane']:.1f}× faster than the gRPC lane "
                         '(target 5×)')
        if check['faster_than_ros']:
            parts.append(f"{check['faster_than_ros']:.1f}× faster than the ROS 2 service (target 10×)")
        if check['p50_us_100mib']:
            parts.append(f"100 MiB {_ms(check['p50_us_100mib'])}")
        lines.append('; '.join(parts) + '.')
    for row in results.get('zero_copy', []):
        inline = row.get('grpc_inline_call_p50_ms')
        lines.append(
            f"Zero-copy `SharedBuffer` of {size_label(row['bytes'])}: copied into shared memory once "
            f"in {row['copy_into_shared_memory_ms']:,.1f} ms, then a call passing it takes "
            f"{row['call_p50_ms']:,.2f} ms"
            + (f' (inline on the gRPC lane: {inline:,.1f} ms)' if inline else '')
            + f"; the handler's view is backed by `{row['handler_backing'] or 'heap memory'}`.")
    return lines


def _reference(rows: list[dict[str, Any]]) -> dict[int, float]:
    return {row['payload_bytes']: row['p50_us'] for row in rows
            if row['transport'] == REFERENCE_TRANSPORT and row['concurrency'] == 1}


def _table(headers: list[str], lines: list[list[str]], out: TextIO) -> None:
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(headers)]
    aligned = [str.ljust] + [str.rjust] * (len(headers) - 1)

    def fmt(cells: list[str]) -> str:
        columns = zip(cells, widths, aligned, strict=True)
        return '  '.join(align(cell, width) for cell, width, align in columns)
    print(fmt(headers), file=out)
    print('  '.join('-' * width for width in widths), file=out)
    for line in lines:
        print(fmt(line), file=out)


def _number(value: float) -> str:
    return f'{value:,.0f}' if value >= 100 else f'{value:,.1f}'


def print_report(results: dict[str, Any], out: TextIO = sys.stdout) -> None:
    """The human view of ``results`` (as written by :func:`write_json`)."""
    meta = results['meta']
    print(f"\n# vyra_base_ipc benchmark ({meta['mode']}): {meta['machine']['cpu']}, "
          f"{meta['machine']['cores']} cores, Python {meta['machine']['python']}, "
          f"grpcio {meta['machine']['grpcio']}, rclpy {meta['machine']['rclpy']}", file=out)
    if meta.get('keep_freed_memory'):
        print('Every process with malloc set as vyra_base_ipc.keep_freed_memory() sets it '
              '(--keep-freed-memory)', file=out)
    if meta.get('one_cpu'):
        print('Every client and server on one CPU (--one-cpu): a call costs the CPU time of both sides',
              file=out)
    elif meta.get('pinned'):
        print('Clients pinned to one CPU, servers to the others (--pin)', file=out)
    rows = results['rows']
    reference = _reference(rows)
    lines = []
    for row in rows:
        ref = reference.get(row['payload_bytes']) if row['concurrency'] == 1 else None
        lines.append([row['transport'], size_label(row['payload_bytes']), str(row['concurrency']),
                      _number(row['p50_us']), _number(row['p99_us']), _number(row['calls_per_s']),
                      _number(row['mib_per_s']), f"{row['p50_us'] / ref:.2f}x" if ref else ''])
    print('\n## Round trips (latency in µs; "vs ROS 2" = p50 / rclpy-dds p50, same payload)\n',
          file=out)
    _table(['transport', 'payload', 'in flight', 'p50 µs', 'p99 µs', 'calls/s', 'MiB/s',
            'vs ROS 2'], lines, out)

    if results['cold_start']:
        print('\n## Time to first successful call from a cold client (ms, median / worst)\n',
              file=out)
        _table(['transport', 'runs', 'process start → reply', 'client → reply', 'of it connect'],
               [[c['transport'], str(c['runs']),
                 f"{c['total_ms']['p50']:.0f} / {c['total_ms']['max']:.0f}",
                 f"{c['first_reply_ms']['p50']:.1f} / {c['first_reply_ms']['max']:.1f}",
                 f"{c['connect_ms']['p50']:.1f} / {c['connect_ms']['max']:.1f}"]
                for c in results['cold_start']], out)

    for mode, budget in results['overhead'].items():
        variants, ratios = budget['variants'], budget['ratios']
        pinned = ', client and servers pinned to separate CPUs' if budget.get('pinned') else ''
        print(f'\n## Overhead budget, {mode}, 64 B, interleaved '
              f"({budget['calls_per_variant']} calls each{pinned})\n", file=out)
        _table(['variant', 'p50 µs', 'p99 µs', 'calls/s'],
               [[name, _number(v['p50_us']), _number(v['p99_us']), _number(v['calls_per_s'])]
                for name, v in variants.items()], out)
        verdict = 'within' if budget['within_budget'] else 'OVER'
        print(f"\ntotal {ratios['total']:.2f}x ({verdict} the {budget['budget']:.2f}x budget) = "
              f"client {ratios['client']:.2f}x * server {ratios['server']:.2f}x; "
              f"a deadline alone costs {ratios['deadline']:.2f}x", file=out)

    fast_lane = _fast_lane_lines(results)
    if fast_lane:
        print('\n## Small calls: the fast lane against ROS 2 and gRPC\n', file=out)
        for line in fast_lane:
            print(line, file=out)

    shared_memory = _shared_memory_lines(results)
    if shared_memory:
        print('\n## Large payloads: shared memory\n', file=out)
        for line in shared_memory:
            print(line, file=out)

    busy_poll = _busy_poll_rows(results)
    if busy_poll:
        print('\n## Busy polling, fast lane, 64 B, interleaved (CPU µs per call of each side)\n',
              file=out)
        _table(['variant', 'p50 µs', 'p99 µs', 'client CPU', 'server CPU'], busy_poll, out)
        print(f'\n{_idle_line(results)}', file=out)

    for mode, (streams, cancels) in _streaming_rows(results).items():
        print(f'\n## Server streams, {mode} clients, interleaved (messages/s, median of '
              f'{_stream_count(results, mode)} streams each)\n', file=out)
        _table(['variant', '64 B msgs/s', 'of floor', '64 KiB msgs/s', '64 KiB MiB/s'], streams, out)
        print('\nLeaving a watch (client leaves → handler ended, µs):\n', file=out)
        _table(['variant', 'p50', 'p90', 'max', 'not cancelled'], cancels, out)
    for line in _stream_check_lines(results):
        print(f'\n{line}', file=out)

    if results['concurrency']:
        print('\n## Concurrency (64 B, calls/s by calls in flight)\n', file=out)
        for check in results['concurrency']:
            verdict = 'meets' if check['meets_target'] else 'MISSES'
            counts = ', '.join(f'{c}: {_number(v)}' for c, v in check['calls_per_s'].items())
            print(f"{check['transport']}: {counts}; 64 vs 1 = {check['ratio_64_vs_1']:.2f}x "
                  f"({verdict} the {check['target']:.0f}x target)", file=out)

    print_peers(results, _table, out)

    for skipped in results['skipped']:
        print(f"\nskipped {skipped['transport']}: {skipped['reason']}", file=out)
    print(f"\n{meta['note']}", file=out)


def _busy_poll_rows(results: dict[str, Any]) -> list[list[str]]:
    """``[label, p50, p99, client CPU, server CPU]`` per busy-poll variant."""
    rows = []
    for mode, measured in results.get('busy_poll', {}).items():
        for variant, row in measured['variants'].items():
            rows.append([LABELS.get(f'{mode}/{variant}', f'{mode}/{variant}'), _number(row['p50_us']),
                         _number(row['p99_us']), _number(row['client_cpu_us_per_call']),
                         _number(row['server_cpu_us_per_call'])])
    return rows


def _idle_line(results: dict[str, Any]) -> str:
    idle = next((measured['idle'] for measured in results.get('busy_poll', {}).values()
                 if 'idle' in measured), {})
    return ('Idle servers (half a second without calls): ' +
            ', '.join(f'{server} {percent:.1f} % CPU' for server, percent in idle.items()) + '.')


def _streaming_rows(results: dict[str, Any]) -> dict[str, tuple[list[list[str]], list[list[str]]]]:
    """By client mode: ``[label, 64 B msgs/s, of floor, 64 KiB msgs/s, MiB/s]``
    per variant and ``[label, p50, p90, max, not cancelled]`` per left watch."""
    tables = {}
    for mode, measured in results.get('streaming', {}).items():
        variants = measured['variants']
        floor = variants['socket']['64']['msgs_per_s']
        streams = [[STREAM_LABELS.get(variant, variant), _number(rates['64']['msgs_per_s']),
                    f"{rates['64']['msgs_per_s'] / floor:.2f}×", _number(rates['65536']['msgs_per_s']),
                    _number(rates['65536']['mib_per_s'])] for variant, rates in variants.items()]
        cancels = [[STREAM_LABELS.get(variant, variant), *(_number(cancel[key]) if key in cancel else '-'
                                                            for key in ('p50_us', 'p90_us', 'max_us')),
                    str(cancel['not_cancelled'])] for variant, cancel in measured['cancel'].items()]
        tables[mode] = (streams, cancels)
    return tables


def _stream_count(results: dict[str, Any], mode: str) -> int:
    return int(results['streaming'][mode]['rounds'])


def _stream_check_lines(results: dict[str, Any]) -> list[str]:
    return [f"Server stream of 64 B messages, {check['client']} client: the fast lane makes "
            f"{check['vs_grpc_lane']:.1f}× the messages/s of the gRPC lane "
            f"({_number(check['fast_lane_msgs_per_s'])} vs {_number(check['grpc_lane_msgs_per_s'])}; "
            f"{'meets' if check['meets_target'] else 'MISSES'} the {check['target']:.0f}× target), "
            f"{check['of_floor']:.2f}× a plain socket stream's."
            for check in results.get('fast_lane_streams', [])]


def write_json(results: dict[str, Any], path: Path) -> None:
    """Write ``results`` with the row column list alongside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**results, 'columns': list(ROW_COLUMNS)}, indent=2) + '\n')


def _ms(value_us: float) -> str:
    return f'{value_us / 1e3:,.1f} ms' if value_us >= 1000 else f'{value_us:,.0f} µs'


def markdown_summary(results: dict[str, Any]) -> str:
    """A compact Markdown view for the README: p50 by payload with the ratio to
    the ROS 2 service, the cold starts, the overhead budget and concurrency."""
    meta = results['meta']
    machine_info = meta['machine']
    rows = [row for row in results['rows'] if row['concurrency'] == 1]
    sizes = sorted({row['payload_bytes'] for row in rows})
    reference = _reference(rows)
    by_key: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault(row['transport'], {})[row['payload_bytes']] = row
    lines = [
        f"Measured with `python -m bench --{meta['mode']}` ({meta['date'][:10]}) on "
        f"{machine_info['cores']} × {machine_info['cpu']}, Linux {machine_info['kernel']}, "
        f"Python {machine_info['python']}, grpcio {machine_info['grpcio']}, "
        f"rclpy {machine_info['rclpy']}, Fast DDS {machine_info['fastdds']}.",
        '',
        'p50 round trip, one call at a time (in brackets: time relative to the ROS 2 service '
        'with the same payload; below 1× is faster):',
        '',
        '| transport | ' + ' | '.join(size_label(size) for size in sizes) + ' |',
        '| --- |' + ' ---: |' * len(sizes),
    ]
    for key, label in results['transports'].items():
        cells = []
        for size in sizes:
            row = by_key.get(key, {}).get(size)
            if row is None:
                cells.append('')
                continue
            ref = reference.get(size)
            ratio = f" ({row['p50_us'] / ref:.2f}×)" if ref and key != REFERENCE_TRANSPORT else ''
            cells.append(_ms(row['p50_us']) + ratio)
        lines.append(f'| {label} (`{key}`) | ' + ' | '.join(cells) + ' |')
    if results['cold_start']:
        lines += ['', 'Time to the first successful call of a fresh process, median / worst of '
                  f"{results['cold_start'][0]['runs']} runs:", '',
                  '| client | process start → first reply | client created → first reply |',
                  '| --- | ---: | ---: |']
        lines += [f"| `{c['transport']}` | {c['total_ms']['p50']:,.0f} / {c['total_ms']['max']:,.0f} ms "
                  f"| {c['first_reply_ms']['p50']:,.1f} / {c['first_reply_ms']['max']:,.1f} ms |"
                  for c in results['cold_start']]
    for mode, budget in results['overhead'].items():
        ratios = budget['ratios']
        lines += ['', f"Overhead, {mode}, 64 B: this package's client and server take "
                  f"{ratios['total']:.2f}× the time of a bare grpcio stub and server "
                  f"(client {ratios['client']:.2f}×, server {ratios['server']:.2f}×; "
                  f"the deadline every call carries {ratios['deadline']:.2f}×)."]
    for line in _fast_lane_lines(results) + _shared_memory_lines(results):
        lines += ['', line]
    busy_poll = _busy_poll_rows(results)
    if busy_poll:
        lines += ['', 'Busy polling, fast lane, 64 B, interleaved; CPU time per call of each side:', '',
                  '| variant | p50 | p99 | client CPU | server CPU |', '| --- | ---: | ---: | ---: | ---: |']
        lines += [f'| {label} | {p50} µs | {p99} µs | {client} µs | {server} µs |'
                  for label, p50, p99, client, server in busy_poll]
        lines += ['', _idle_line(results)]
    for mode, (streams, cancels) in _streaming_rows(results).items():
        lines += ['', f'Server streams, {mode} clients, interleaved; messages/s (median of '
                  f'{_stream_count(results, mode)} streams each) and the time from the client leaving '
                  'a watch to its handler ending:', '',
                  '| variant | 64 B msgs/s | of floor | 64 KiB msgs/s | 64 KiB MiB/s |',
                  '| --- | ---: | ---: | ---: | ---: |']
        lines += ['| ' + ' | '.join(row) + ' |' for row in streams]
        lines += ['', '| leaving a watch | p50 µs | p90 µs | max µs | not cancelled |',
                  '| --- | ---: | ---: | ---: | ---: |']
        lines += ['| ' + ' | '.join(row) + ' |' for row in cancels]
    for line in _stream_check_lines(results):
        lines += ['', line]
    for check in results['concurrency']:
        lines += ['', f"Concurrency: `{check['transport']}` with 64 calls in flight makes "
                  f"{check['ratio_64_vs_1']:.1f}× the calls/s of sequential calls "
                  f"({_number(check['calls_per_s']['64'])} vs {_number(check['calls_per_s']['1'])})."]
    lines += peer_markdown(results)
    return '\n'.join(lines) + '\n'
