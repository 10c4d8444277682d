"""The peers section in the report: its two tables (ratio to the floor of
the same run first) and issue 18's targets, checked against the same run."""

from __future__ import annotations

from typing import Any, TextIO

from .payloads import size_label
from .peers import FLOOR

__all__ = ['PEER_TARGETS', 'REFERENCES', 'peer_checks', 'peer_markdown', 'peer_references', 'print_peers']

_M = 1024 * 1024
#: Issue 18's targets: (what, part, payload, transport, reference, what is
#: compared, at most). ``p50``: the ratio of the p50s; ``cpu``: of the CPU per
#: call of both sides together.
PEER_TARGETS: tuple[tuple[str, str, int, str, str, str, float], ...] = (
    ('SyncIPCHandler, 64 B: at most 2x the floor', 'small', 64, 'ipc-sync-ttrpc', FLOOR, 'p50', 2.0),
    ('IPCHandler, 64 B: at most 1.5x SyncIPCHandler', 'small', 64, 'ipc-aio-ttrpc', 'ipc-sync-ttrpc',
     'p50', 1.5),
    ('IPCHandler, 64 B: faster than pyzmq', 'small', 64, 'ipc-aio-ttrpc', 'zmq-req-rep', 'p50', 1.0),
    ('IPCHandler on uvloop, 64 B: at most 1.5x SyncIPCHandler', 'small', 64, 'ipc-aio-uvloop',
     'ipc-sync-ttrpc', 'p50', 1.5),
    ('IPCHandler on uvloop, 64 B: faster than pyzmq', 'small', 64, 'ipc-aio-uvloop', 'zmq-req-rep',
     'p50', 1.0),
    ("SyncIPCHandler, 64 B: CPU per call (both sides) at or below pyzmq's", 'small', 64, 'ipc-sync-ttrpc',
     'zmq-req-rep', 'cpu', 1.0),
    ("IPCHandler, 64 B: CPU per call (both sides) at or below pyzmq's", 'small', 64, 'ipc-aio-ttrpc',
     'zmq-req-rep', 'cpu', 1.0),
    ('SyncIPCHandler, 64 B: within 2x of spinning iceoryx2 (moonshot)', 'small', 64, 'ipc-sync-ttrpc',
     'iceoryx2-spin', 'p50', 2.0),
    ('transparent shared memory, 10 MiB: at most 1.5x the floor', 'large', 10 * _M, 'ipc-sync-shm', FLOOR,
     'p50', 1.5),
    ('transparent shared memory, 100 MiB: at most 1.5x the floor', 'large', 100 * _M, 'ipc-sync-shm', FLOOR,
     'p50', 1.5),
    ('explicit SharedBuffer, 10 MiB: within 2x of iceoryx2 slices', 'large', 10 * _M,
     'ipc-sync-shared-buffer', 'iceoryx2-slice', 'p50', 2.0),
    ('explicit SharedBuffer, 100 MiB: within 2x of iceoryx2 slices', 'large', 100 * _M,
     'ipc-sync-shared-buffer', 'iceoryx2-slice', 'p50', 2.0),
    ("explicit SharedBuffer, 10 MiB: faster than zenoh's explicit shared memory", 'large', 10 * _M,
     'ipc-sync-shared-buffer', 'zenoh-shm', 'p50', 1.0),
    ("explicit SharedBuffer, 100 MiB: faster than zenoh's explicit shared memory", 'large', 100 * _M,
     'ipc-sync-shared-buffer', 'zenoh-shm', 'p50', 1.0),
)

#: The sizes of the references to protobuf's own work: those of the targets.
_LARGE_SIZES = (('10 MiB', 10 * _M), ('100 MiB', 100 * _M))
#: Ratios for reference beside the targets, in the same run on the same
#: machine: what a minimal Python ttrpc (:mod:`bench.minimal_ttrpc`), a
#: client or server of no features, reaches; and protobuf's own work for an
#: echo (:mod:`bench.protobuf_alone`), which the transparent path cannot go
#: below. (what, part, payload, transport, reference, what is compared: as
#: for :data:`PEER_TARGETS`, or ``server-cpu``, the CPU per call of the servers)
REFERENCES: tuple[tuple[str, str, int, str, str, str], ...] = (
    ('minimal Python ttrpc client and server, 64 B, x the floor', 'small', 64, 'ttrpc-minimal', FLOOR,
     'p50'),
    ('minimal Python ttrpc client to IPCServer, 64 B, x the floor', 'small', 64, 'ttrpc-minimal-ipc',
     FLOOR, 'p50'),
    ('minimal Python ttrpc client to IPCServer, 64 B, x the same client to its minimal server '
     '(what our server adds)',
     'small', 64, 'ttrpc-minimal-ipc', 'ttrpc-minimal', 'p50'),
    ("minimal server on asyncio's loop, 64 B, server CPU per call x the same server in threads "
     '(what asyncio costs)', 'small', 64, 'ttrpc-minimal-aio-server', 'ttrpc-minimal', 'server-cpu'),
    ("IPCServer, its loop not polling, 64 B, server CPU per call x the minimal server on asyncio's loop "
     "(what our server's code costs)", 'small', 64, 'ttrpc-minimal-ipc-sleeping', 'ttrpc-minimal-aio-server',
     'server-cpu'),
    ('SyncIPCHandler, 64 B, x the minimal client to IPCServer (what our client adds)', 'small', 64,
     'ipc-sync-ttrpc', 'ttrpc-minimal-ipc', 'p50'),
    ('minimal asyncio ttrpc client to IPCServer, 64 B, x pyzmq', 'small', 64, 'ttrpc-minimal-aio-ipc',
     'zmq-req-rep', 'p50'),
    ("minimal Python ttrpc client and server, 64 B, CPU per call (both sides) x pyzmq's", 'small', 64,
     'ttrpc-minimal', 'zmq-req-rep', 'cpu'),
    *((f"protobuf's own work for an echo, {label}, x the floor", 'large', size, 'protobuf-alone', FLOOR,
       'p50') for label, size in _LARGE_SIZES),
    *((f"transparent shared memory, {label}, x protobuf's own work (what the rest adds)", 'large', size,
       'ipc-sync-shm', 'protobuf-alone', 'p50') for label, size in _LARGE_SIZES),
)

def _value(row: dict[str, Any], measure: str) -> float:
    if measure == 'cpu':
        return float(row['client_cpu_us_per_call'] + row['server_cpu_us_per_call'])
    if measure == 'server-cpu':
        return float(row['server_cpu_us_per_call'])
    return float(row['p50_us'])


def _ratio(peers: dict[str, Any], part: str, size: int, transport: str, reference: str,
           measure: str) -> float | None:
    """``transport``'s p50 or CPU per call over ``reference``'s; ``None`` without both rows."""
    rows = {row['transport']: row for row in peers.get(part, {}).get('rows', [])
            if row['payload_bytes'] == size}
    if transport not in rows or reference not in rows or not _value(rows[reference], measure):
        return None
    return round(_value(rows[transport], measure) / _value(rows[reference], measure), 3)


def peer_checks(peers: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of :data:`PEER_TARGETS` whose two rows this run has:
    ``{check, ratio, target, met}``."""
    checks = []
    for text, part, size, transport, reference, measure, target in PEER_TARGETS:
        ratio = _ratio(peers, part, size, transport, reference, measure)
        if ratio is None:
            continue
        # "Faster than" (a p50 target of 1.0) is strict; "at most" is not.
        met = ratio < target if (measure, target) == ('p50', 1.0) else ratio <= target
        checks.append({'check': text, 'ratio': ratio, 'target': target, 'met': met})
    return checks


def peer_references(peers: dict[str, Any]) -> list[dict[str, Any]]:
    """Each ratio of :data:`REFERENCES` whose two rows this run has: ``{reference, ratio}``."""
    found = ((text, _ratio(peers, *where)) for text, *where in REFERENCES)
    return [{'reference': text, 'ratio': ratio} for text, ratio in found if ratio is not None]

def _time(us: float) -> str:
    return f'{us / 1e3:,.2f} ms' if us >= 1000 else f'{us:,.1f} µs'


def _rows(peers: dict[str, Any], part: str) -> list[list[str]]:
    """``[variant, payload, x floor, p50, p99, client CPU, server CPU]`` per row of ``part``."""
    lines = []
    for row in peers.get(part, {}).get('rows', []):
        ratio = f"{row['vs_floor']:.2f}×" if row.get('vs_floor') is not None else ''
        lines.append([f"{row['label']} (`{row['transport']}`)", size_label(row['payload_bytes']), ratio,
                      _time(row['p50_us']), _time(row['p99_us']), _time(row['client_cpu_us_per_call']),
                      _time(row['server_cpu_us_per_call'])])
    return lines


_HEADERS = ['variant', 'payload', '× floor', 'p50', 'p99', 'client CPU/call', 'server CPU/call']
_TITLES = {
    'small': 'Peers, 64 B round trips, interleaved ({calls}; × floor = p50 / the plain socket echo '
             'of the same run)',
    'large': 'Peers, large payloads, interleaved ({calls}; × floor = p50 / the plain socket echo of '
             'the same run, same size)',
}


def _calls(peers: dict[str, Any], part: str) -> str:
    """How many calls each variant made, by payload size."""
    counts = {row['payload_bytes']: row['calls'] for row in peers.get(part, {}).get('rows', [])}
    return ', '.join(f'{calls} calls each at {size_label(size)}' for size, calls in sorted(counts.items()))


def _check_lines(results: dict[str, Any]) -> list[str]:
    return [f"{check['check']}: {check['ratio']:.2f}× ({'met' if check['met'] else 'MISSED'})"
            for check in results.get('peer_checks', [])]


def _reference_lines(results: dict[str, Any]) -> list[str]:
    return [f"{entry['reference']}: {entry['ratio']:.2f}×" for entry in results.get('peer_references', [])]


_REFERENCES_TITLE = ('For reference, a minimal Python ttrpc (bench/minimal_ttrpc.py: no features) and '
                     'protobuf alone (bench/protobuf_alone.py), this run:')


def print_peers(results: dict[str, Any], table: Any, out: TextIO) -> None:
    """The peers' tables and target checks; ``table(headers, lines, out)``
    prints an aligned table."""
    peers = results.get('peers', {})
    for part in ('small', 'large'):
        lines = _rows(peers, part)
        if lines:
            print(f'\n## {_TITLES[part].format(calls=_calls(peers, part))}\n', file=out)
            table(_HEADERS, [[cell.replace('`', '') for cell in line] for line in lines], out)
    checks = _check_lines(results)
    if checks:
        print('\nIssue 18 targets, this run:', file=out)
        for line in checks:
            print(f'  {line}', file=out)
    references = _reference_lines(results)
    if references:
        print(f'\n{_REFERENCES_TITLE}', file=out)
        for line in references:
            print(f'  {line}', file=out)


def peer_markdown(results: dict[str, Any]) -> list[str]:
    """The same as Markdown lines (empty without a peers section)."""
    peers = results.get('peers', {})
    lines: list[str] = []
    for part in ('small', 'large'):
        rows = _rows(peers, part)
        if rows:
            lines += ['', f'{_TITLES[part].format(calls=_calls(peers, part))}:', '',
                      '| ' + ' | '.join(_HEADERS) + ' |', '| --- |' + ' ---: |' * (len(_HEADERS) - 1)]
            lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    checks = _check_lines(results)
    if checks:
        lines += ['', 'Issue 18 targets, this run:', '']
        lines += [f'- {line}' for line in checks]
    references = _reference_lines(results)
    if references:
        lines += ['', _REFERENCES_TITLE, '']
        lines += [f'- {line}' for line in references]
    return lines
