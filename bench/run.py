"""``python -m bench [--quick | --smoke] [--out DIR] [--only KEYS] [--sections S]``: measure
every transport on every payload, the async clients with several calls in
flight, the cold start of each client kind, the overhead budget, busy polling,
server streams with their cancellation, and the peers (pyzmq, iceoryx2,
zenoh) side by side with the floor; print the
table; write ``results.json``, ``results.md`` (a summary for the README) and
``latency.png`` into ``--out`` (default ``bench/results/``).

Each server runs in its own process for the whole run; each measured client
in a fresh process of its own; transports one after the other, never at the
same time. Modes differ only in call counts: ``--quick`` finishes in one
to two minutes on a 2-core machine, ``--smoke`` (for the test suite) in seconds
and measures nothing meaningful.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
import datetime
import importlib.util
import json
from pathlib import Path
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from .busypoll import BUSY_POLL_SERVERS
from .busypoll import MODES as BUSY_POLL_MODES
from .coldstart import COLD_START_CLIENTS, summarize_runs
from .overhead import OVERHEAD_SERVERS
from .payloads import LARGE_PAYLOAD, PAYLOAD_SIZES
from .peers import PEER_SERVERS, peer_variants, remove_leftovers, shared_memory_files, with_floor_ratios
from .processes import BenchEnvironment, Servers, run_child
from .protogen import compile_bench_protos
from .report import (
    CONCURRENCY_TARGET,
    FAST_LANE_CONCURRENCY_TARGET,
    concurrency_check,
    fast_lane_checks,
    machine,
    markdown_summary,
    peer_checks,
    peer_references,
    print_report,
    shared_memory_checks,
    write_json,
)
from .servers import ROS_SERVICE
from .stats import ROW_COLUMNS
from .streaming import MODES as STREAMING_MODES
from .streaming import stream_checks
from .transports import LANES, LARGE_PAYLOAD_LANES, Transport, ipc_server_options, transports

__all__ = ['MODES', 'Mode', 'main', 'plan_cases', 'run']

DEFAULT_OUT = Path(__file__).resolve().parent / 'results'
#: Parts of a run: the round-trip table, the overhead budget, the cold starts,
#: explicit zero-copy buffers, busy polling on and off, server streams, the peers.
SECTIONS = ('rows', 'overhead', 'cold-start', 'zero-copy', 'busy-poll', 'streaming', 'peers')
#: glibc's names for what vyra_base_ipc.keep_freed_memory() sets with mallopt().
KEEP_FREED_MEMORY_ENV = {'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': str(1 << 30),  # its default limit
                         'MALLOC_ARENA_MAX': '1'}
#: Calls in flight for the asynchronous clients.
CONCURRENCY = (1, 8, 64)


@dataclass(frozen=True)
class Mode:
    """Call counts of one kind of run.

    :param calls: timed calls per payload size, one at a time.
    :param warmup: untimed calls before them.
    :param concurrent_payloads: payloads also measured with 8 and 64 in flight.
    :param concurrent_calls: timed calls of those rows.
    :param cold_runs: fresh processes per cold-start transport.
    :param overhead_rounds: interleaved blocks per overhead variant.
    :param overhead_block: calls per block.
    :param large_calls: timed calls with :data:`~bench.payloads.LARGE_PAYLOAD`
        (lanes that carry it), after one untimed call.
    :param zero_copy_calls: timed calls per buffer size of the zero-copy section.
    :param busy_poll_rounds: interleaved blocks per busy-poll variant.
    :param busy_poll_block: calls per block.
    :param stream_messages: messages per timed stream, by message size.
    :param stream_rounds: timed streams per variant and message size.
    :param stream_cancels: watches left per variant (cancel latency).
    :param peer_rounds: interleaved rounds of the peers' 64 B part.
    :param peer_block: calls per variant and round of that part.
    :param peer_large: calls per variant and round of the peers' large part, by payload size.
    :param peer_large_rounds: interleaved rounds of that part.
    :param peer_large_warmup: untimed calls per variant before each of its sizes.
    """

    name: str
    calls: dict[int, int]
    warmup: dict[int, int]
    concurrent_payloads: tuple[int, ...]
    concurrent_calls: int
    cold_runs: int
    overhead_rounds: int
    overhead_block: int
    large_calls: int
    zero_copy_calls: int
    busy_poll_rounds: int
    busy_poll_block: int
    stream_messages: dict[int, int]
    stream_rounds: int
    stream_cancels: int
    peer_rounds: int = 1
    peer_block: int = 1
    peer_large: dict[int, int] = field(default_factory=dict)
    peer_large_rounds: int = 1
    peer_large_warmup: int = 1


_K, _M = 1024, 1024 * 1024
MODES = {
    'full': Mode('full', {64: 5000, 64 * _K: 2000, _M: 300, 10 * _M: 40},
                 {64: 500, 64 * _K: 200, _M: 30, 10 * _M: 5}, (64, 64 * _K), 5000, 10, 40, 100,
                 10, 200, 20, 250, {64: 20000, 64 * _K: 2000}, 10, 50,
                 peer_rounds=40, peer_block=125, peer_large={_M: 20, 10 * _M: 5, 100 * _M: 1},
                 peer_large_rounds=10, peer_large_warmup=2),
    'quick': Mode('quick', {64: 1000, 64 * _K: 300, _M: 40, 10 * _M: 8},
                  {64: 200, 64 * _K: 30, _M: 5, 10 * _M: 2}, (64,), 1000, 3, 20, 50,
                  3, 50, 10, 100, {64: 5000, 64 * _K: 500}, 4, 15,
                  peer_rounds=20, peer_block=50, peer_large={_M: 10, 10 * _M: 3, 100 * _M: 1},
                  peer_large_rounds=5, peer_large_warmup=2),
    'smoke': Mode('smoke', dict.fromkeys(PAYLOAD_SIZES, 3), dict.fromkeys(PAYLOAD_SIZES, 1),
                  (64,), 16, 1, 2, 3, 1, 3, 1, 3, {64: 20, 64 * _K: 4}, 1, 2,
                  # Two rounds, so that the rotation is run; 1 MiB only: seconds.
                  peer_rounds=2, peer_block=3, peer_large={_M: 2}, peer_large_rounds=2,
                  peer_large_warmup=1),
}


def _count(counts: dict[int, int], size: int) -> int:
    """The call count for ``size``: that of the smallest payload size not below it."""
    return counts[min(listed for listed in counts if listed >= size)]


def plan_cases(transport: Transport, mode: Mode) -> list[dict[str, int]]:
    """The rows one transport is measured for, in order."""
    cases = [{'payload_bytes': size, 'concurrency': 1, 'calls': _count(mode.calls, size),
              'warmup': _count(mode.warmup, size)} for size in transport.sizes or PAYLOAD_SIZES]
    if transport.lane in LARGE_PAYLOAD_LANES:
        cases.append({'payload_bytes': LARGE_PAYLOAD, 'concurrency': 1, 'calls': mode.large_calls,
                      'warmup': 1})
    if transport.asynchronous:
        cases += [{'payload_bytes': size, 'concurrency': concurrency,
                   'calls': mode.concurrent_calls, 'warmup': mode.warmup[size]}
                  for size in mode.concurrent_payloads for concurrency in CONCURRENCY[1:]]
    return cases


def _iceoryx2_prefix(workdir: Path) -> str:
    """The name prefix of this run's iceoryx2 files in ``/dev/shm`` (unique:
    from the run's temporary directory)."""
    return f'vyra_bench_{workdir.name.removeprefix("vyra-bench-")}_'


def _start_servers(servers: Servers, workdir: Path, needed: set[str], pin: bool) -> dict[str, Any]:
    sockets = workdir / 'sockets'
    sockets.mkdir(mode=0o700)
    for name, kind in PEER_SERVERS.items():
        if name in needed and kind == 'iceoryx2':
            servers.start(name, kind, f'vyra-bench/{name}', name.removeprefix('iceoryx2-'),
                          f'{workdir / "iceoryx2"}/', _iceoryx2_prefix(workdir), pin=pin)
        elif name in needed:
            servers.start(name, kind, str(sockets / f'{name}.sock'), pin=pin)
    if 'socket' in needed:
        servers.start('socket', 'socket', str(sockets / 'echo.sock'), pin=pin)
    if 'socket-stream' in needed:
        servers.start('socket-stream', 'socket-stream', str(sockets / 'stream.sock'), pin=pin)
    for minimal in ('ttrpc-minimal', 'ttrpc-minimal-aio'):
        if minimal in needed:
            servers.start(minimal, minimal, str(sockets / f'{minimal}.sock'), pin=pin)
    if 'protobuf-alone' in needed:
        servers.start('protobuf-alone', 'protobuf-alone', str(sockets / 'protobuf-alone.sock'), pin=pin)
    if 'grpc' in needed:
        servers.start('grpc', 'grpc', str(sockets / 'grpc.sock'), pin=pin)
    if 'ipc' in needed:
        servers.start('ipc', 'ipc', str(sockets / 'bench_ipc.sock'), json.dumps(ipc_server_options()),
                      pin=pin)
    if 'rclpy' in needed:
        servers.start('rclpy', 'rclpy', ROS_SERVICE, pin=pin)
    for name, (kind, _) in OVERHEAD_SERVERS.items():
        if name in needed:
            extra = [json.dumps(ipc_server_options())] if kind == 'ipc' else []
            servers.start(name, kind, str(sockets / f'{name}.sock'), *extra, pin=True)
    for name, busy_poll in BUSY_POLL_SERVERS.items():
        if name in needed:
            options = {**ipc_server_options(), **({} if busy_poll is None else {'busy_poll': busy_poll})}
            servers.start(name, 'ipc', str(sockets / f'{name}.sock'), json.dumps(options), pin=pin)
    ready = servers.wait_ready()
    return {
        'socket': ready.get('socket', {}).get('path'),
        'grpc': ready.get('grpc', {}).get('path'),
        'tcp': ready.get('grpc', {}).get('tcp'),
        'ipc': ready.get('ipc', {}).get('path'),
        'socket-stream': ready.get('socket-stream', {}).get('path'),
        'ttrpc-minimal': ready.get('ttrpc-minimal', {}).get('path'),
        'ttrpc-minimal-aio': ready.get('ttrpc-minimal-aio', {}).get('path'),
        'protobuf-alone': ready.get('protobuf-alone', {}).get('path'),
        **{name: ready.get(name, {}).get('path') for name in [*OVERHEAD_SERVERS, *BUSY_POLL_SERVERS]},
        'ros': ROS_SERVICE,
        # iceoryx2: {service, root, prefix, mode}; the others: their path.
        **{name: ({key: value for key, value in ready[name].items() if key != 'pid'}
                  if kind == 'iceoryx2' else ready[name]['path'])
           for name, kind in PEER_SERVERS.items() if name in ready},
    }


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _measure_rows(env: BenchEnvironment, measured: list[Transport], addresses: dict[str, Any],
                  mode: Mode, pin: bool) -> list[dict[str, Any]]:
    rows = []
    for transport in measured:
        began = time.monotonic()
        spec = {'transport': transport.to_json(), 'addresses': addresses,
                'cases': plan_cases(transport, mode)}
        output = run_child(env, 'bench.worker', [json.dumps(spec)], f'worker-{transport.key}',
                           timeout=600, pin=pin)
        for result in output['results']:
            row = {'transport': transport.key, 'label': transport.label, 'client': transport.client,
                   'server': transport.server, 'address': transport.address, 'lane': transport.lane,
                   **result}
            rows.append({column: row[column] for column in ROW_COLUMNS})
        _log(f'  {transport.key}: {time.monotonic() - began:.1f} s')
    return rows


def _measure_overhead(env: BenchEnvironment, addresses: dict[str, Any],
                      mode: Mode) -> dict[str, Any]:
    grpc_lane = next(lane for lane in LANES if lane.name == 'grpc')
    results = {}
    for kind in ('async', 'sync'):
        spec = {'mode': kind, 'addresses': addresses, 'client_options': grpc_lane.client_options(),
                'rounds': mode.overhead_rounds, 'block': mode.overhead_block,
                'warmup': mode.overhead_block}
        # Always pinned, like its servers: see bench.overhead.
        results[kind] = run_child(env, 'bench.overhead', [json.dumps(spec)], f'overhead-{kind}',
                                  timeout=600, pin=True)
        results[kind]['pinned'] = env.can_pin and not env.one_cpu
    return results


def _busy_poll_available() -> bool:
    # (A --package-root copy may predate busy polling.)
    return any(lane.name == 'ttrpc' and lane.unavailable() is None for lane in LANES) and any(
        importlib.util.find_spec(name) is not None
        for name in ('vyra_base_ipc._event_loop', 'vyra_base_ipc.event_loop'))


def _measure_busy_poll(env: BenchEnvironment, addresses: dict[str, Any], mode: Mode,
                       pin: bool) -> dict[str, Any]:
    lanes = {lane.name: lane for lane in LANES}
    results = {}
    for client_mode in BUSY_POLL_MODES:
        # Buffers need shared memory (the clients' default); the rest, the framing alone.
        lane = lanes['shm' if client_mode == 'sync-buffer' else 'ttrpc']
        if lane.unavailable():
            continue
        spec = {'mode': client_mode, 'addresses': addresses, 'client_options': lane.client_options(),
                'rounds': mode.busy_poll_rounds, 'block': mode.busy_poll_block,
                'warmup': mode.busy_poll_block}
        results[client_mode] = run_child(env, 'bench.busypoll', [json.dumps(spec)],
                                         f'busy-poll-{client_mode}', timeout=600, pin=pin)
    return results


def _measure_streaming(env: BenchEnvironment, addresses: dict[str, Any], mode: Mode,
                       pin: bool) -> dict[str, Any]:
    results = {}
    for client_mode in STREAMING_MODES:
        began = time.monotonic()
        spec = {'mode': client_mode, 'addresses': addresses, 'messages': mode.stream_messages,
                'rounds': mode.stream_rounds, 'cancels': mode.stream_cancels}
        results[client_mode] = run_child(env, 'bench.streaming', [json.dumps(spec)],
                                         f'streaming-{client_mode}', timeout=600, pin=pin)
        _log(f'  streaming {client_mode}: {time.monotonic() - began:.1f} s')
    return results


def _measure_peers(env: BenchEnvironment, parts: dict[str, list[Transport]], addresses: dict[str, Any],
                   pids: dict[str, int], mode: Mode, pin: bool) -> dict[str, Any]:
    plans = {
        'small': {'sizes': [64], 'rounds': mode.peer_rounds, 'blocks': {'64': mode.peer_block},
                  'warmup': {'64': mode.warmup[64]}},
        'large': {'sizes': sorted(mode.peer_large), 'rounds': mode.peer_large_rounds,
                  'blocks': {str(size): block for size, block in mode.peer_large.items()},
                  'warmup': dict.fromkeys(map(str, mode.peer_large), mode.peer_large_warmup)},
    }
    results = {}
    for part, variants in parts.items():
        began = time.monotonic()
        spec = {'part': part, 'variants': [variant.to_json() for variant in variants],
                'addresses': addresses, 'pids': pids, **plans[part]}
        rows = run_child(env, 'bench.peers', [json.dumps(spec)], f'peers-{part}', timeout=900,
                         pin=pin)['rows']
        results[part] = {**plans[part], 'rows': with_floor_ratios(rows)}
        _log(f'  peers {part}: {time.monotonic() - began:.1f} s')
    return results


def _measure_cold_start(env: BenchEnvironment, measured: list[Transport],
                        addresses: dict[str, Any], mode: Mode, pin: bool) -> list[dict[str, Any]]:
    by_key = {transport.key: transport for transport in measured}
    summaries = []
    for key in COLD_START_CLIENTS:
        if key not in by_key:
            continue
        spec = json.dumps({'transport': by_key[key].to_json(), 'addresses': addresses})
        spawned, marks = [], []
        for run_index in range(mode.cold_runs):
            log = env.log(f'cold-{key}-{run_index}')
            with open(log, 'wb') as log_file:
                spawned.append(time.monotonic())
                completed = subprocess.run([sys.executable, '-m', 'bench.coldstart', spec],
                                           cwd=env.workdir, env=env.env, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.PIPE, stderr=log_file, timeout=120,
                                           preexec_fn=env.affinity('client', pin))
            if completed.returncode != 0:
                raise RuntimeError(f'cold start of {key} failed:\n{log.read_text(errors="replace")}')
            marks.append(json.loads(completed.stdout.decode().strip().splitlines()[-1]))
        summaries.append(summarize_runs(key, spawned, marks))
        _log(f'  cold start {key}: {mode.cold_runs} runs')
    return summaries


def _package_root() -> Path:
    # Children import vyra_base_ipc from where this process found it (the
    # source tree, an installed tree, or --package-root), never by accident
    # from whatever comes first on their own path.
    import vyra_base_ipc

    return Path(vyra_base_ipc.__file__).resolve().parent.parent


def run(mode: Mode, out: Path, only: set[str] | None = None, chart: bool = True,
        package_root: Path | None = None, sections: tuple[str, ...] = SECTIONS,
        pin: bool = False, keep_freed_memory: bool = False, one_cpu: bool = False,
        domain_id: int | None = None) -> dict[str, Any]:
    """Measure everything ``mode`` asks for; write ``results.json``,
    ``results.md`` (and ``latency.png``) into ``out``; return the results.

    :param only: transport keys to measure (rows and cold starts).
    :param package_root: measure the ``vyra_base_ipc`` found in this
        directory; by default the one this process imports.
    :param sections: which of :data:`SECTIONS` to measure.
    :param pin: clients on one CPU, servers on the others, for the rows and
        cold starts too (the overhead section is always pinned).
    :param one_cpu: every process of the run (servers, clients, peers) on
        one CPU, as the scheduler often places a client and the server it
        wakes: a call then costs the CPU time of both sides. Not with ``pin``.
    :param keep_freed_memory: every process of the run (servers, clients,
        peers) with glibc's malloc set as :func:`vyra_base_ipc.keep_freed_memory`
        sets it, through the environment variables glibc reads at start.
    :param domain_id: the run's ROS domain (see :class:`~bench.processes.BenchEnvironment`).
    :raises ValueError: for unknown transport keys or sections.
    """
    if pin and one_cpu:
        raise ValueError('pin (client and servers on separate CPUs) and one_cpu exclude each other')
    unknown_sections = set(sections) - set(SECTIONS)
    if unknown_sections:
        raise ValueError(f'unknown sections: {", ".join(sorted(unknown_sections))}; '
                         f'known: {", ".join(SECTIONS)}')
    began = time.monotonic()
    if package_root is not None:
        sys.path.insert(0, str(package_root))  # the lanes are learned from that copy too
    package_root = _package_root()
    measured, skipped = transports()
    if only:
        unknown = only - {transport.key for transport in measured} - {s['transport'] for s in skipped}
        if unknown:
            raise ValueError(f'unknown transports: {", ".join(sorted(unknown))}')
        measured = [transport for transport in measured if transport.key in only]
        skipped = [entry for entry in skipped if entry['transport'] in only]
    workdir = Path(tempfile.mkdtemp(prefix='vyra-bench-', dir='/tmp'))
    zenoh_before = shared_memory_files()
    peers: dict[str, Any] = {}
    try:
        env = BenchEnvironment(workdir, compile_bench_protos(workdir / 'protos'), domain_id,
                               package_root=package_root, one_cpu=one_cpu)
        if keep_freed_memory:
            env.env.update(KEEP_FREED_MEMORY_ENV)
        needed = {transport.server for transport in measured
                  if 'rows' in sections or 'cold-start' in sections}
        zero_copy_lane = any(lane.name == 'shm' and lane.unavailable() is None for lane in LANES)
        if 'zero-copy' in sections and zero_copy_lane:
            needed.add('ipc')
        if 'overhead' in sections:
            needed |= set(OVERHEAD_SERVERS)
        busy_poll_measured = 'busy-poll' in sections and _busy_poll_available()
        if busy_poll_measured:
            needed |= set(BUSY_POLL_SERVERS)
        if 'streaming' in sections:
            needed |= {'ipc', 'grpc', 'socket-stream'}
        peer_parts: dict[str, list[Transport]] = {}
        if 'peers' in sections:
            for part in ('small', 'large'):
                peer_parts[part], peers_skipped = peer_variants(part, one_cpu)
                listed = {entry['transport'] for entry in skipped}
                skipped += [entry for entry in peers_skipped if entry['transport'] not in listed]
                needed |= {variant.server for variant in peer_parts[part]}
        with Servers(env) as servers:
            addresses = _start_servers(servers, workdir, needed, pin)
            _log(f'servers up after {time.monotonic() - began:.1f} s; measuring:')
            rows = _measure_rows(env, measured, addresses, mode, pin) if 'rows' in sections else []
            overhead = _measure_overhead(env, addresses, mode) if 'overhead' in sections else {}
            cold_start = (_measure_cold_start(env, measured, addresses, mode, pin)
                          if 'cold-start' in sections else [])
            zero_copy = (run_child(env, 'bench.zerocopy',
                                   [json.dumps({'address': addresses['ipc'],
                                                'calls': mode.zero_copy_calls})],
                                   'zero-copy', timeout=600, pin=pin)['zero_copy']
                         if 'zero-copy' in sections and zero_copy_lane else [])
            busy_poll = _measure_busy_poll(env, addresses, mode, pin) if busy_poll_measured else {}
            streaming = (_measure_streaming(env, addresses, mode, pin) if 'streaming' in sections
                         else {})
            pids = {name: info['pid'] for name, info in servers.ready.items()}
            peers = _measure_peers(env, peer_parts, addresses, pids, mode, pin) if peer_parts else {}
    except BaseException:
        _log(f'logs kept in {workdir / "logs"}')
        raise
    finally:
        if 'peers' in sections:
            # The servers have stopped: what their libraries left in /dev/shm.
            removed = remove_leftovers(_iceoryx2_prefix(workdir), zenoh_before)
            if peers:
                peers['cleanup'] = {'iceoryx2_prefix': _iceoryx2_prefix(workdir), 'removed': removed}
    shutil.rmtree(workdir, ignore_errors=True)

    checks = [check for transport in measured if transport.asynchronous and transport.server == 'ipc'
              if (check := concurrency_check(
                  rows, transport.key,
                  target=CONCURRENCY_TARGET if transport.lane in (None, 'grpc')
                  else FAST_LANE_CONCURRENCY_TARGET)) is not None]
    results = {
        'meta': {
            'mode': mode.name,
            'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'machine': machine(),
            'package': str(package_root / 'vyra_base_ipc'),
            'pinned': pin,
            'one_cpu': one_cpu,
            'keep_freed_memory': keep_freed_memory,
            'seconds': round(time.monotonic() - began, 1),
            'note': 'Other processes may share this machine: absolute numbers are noisy, '
                    'ratios measured in the same run are what to compare.',
        },
        'transports': {transport.key: transport.label for transport in measured},
        'rows': rows,
        'cold_start': cold_start,
        'overhead': overhead,
        'zero_copy': zero_copy,
        'busy_poll': busy_poll,
        'streaming': streaming,
        'fast_lane_streams': stream_checks(streaming),
        'fast_lane': fast_lane_checks(rows),
        'shared_memory': shared_memory_checks(rows, zero_copy),
        'concurrency': checks,
        'peers': peers,
        'peer_checks': peer_checks(peers),
        'peer_references': peer_references(peers),
        'skipped': skipped,
    }
    write_json(results, out / 'results.json')
    (out / 'results.md').write_text(markdown_summary(results))
    (out / 'latency.png').unlink(missing_ok=True)  # never leave an older run's chart beside these results
    if chart and rows:
        from .chart import write_chart
        try:
            write_chart(results, out / 'latency.png')
        except ImportError as error:  # matplotlib is optional: bench/requirements.txt
            print(f'no chart: {error}; pip install -r bench/requirements.txt for latency.png',
                  file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> None:
    """``python -m bench``: parse the options (``argv``, default
    ``sys.argv[1:]``), run the benchmark and write its results."""
    parser = argparse.ArgumentParser(prog='python -m bench', description=__doc__.split('\n\n')[0])
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument('--quick', action='store_true', help='fewer calls: one to two minutes')
    speed.add_argument('--smoke', action='store_true', help='a few calls per row: seconds')
    parser.add_argument('--out', type=Path, default=DEFAULT_OUT,
                        help='directory for results.json, results.md and latency.png (default: %(default)s)')
    parser.add_argument('--only', default='',
                        help='comma-separated transport keys to measure')
    parser.add_argument('--sections', default=','.join(SECTIONS),
                        help='comma-separated parts to measure (default: %(default)s)')
    parser.add_argument('--no-chart', action='store_true', help='do not write latency.png')
    parser.add_argument('--pin', action='store_true',
                        help='pin clients to one CPU and servers to the others in every section '
                             '(the overhead budget always is)')
    parser.add_argument('--one-cpu', action='store_true',
                        help='run every client and server on one CPU, where the scheduler often puts '
                             "a client and the server it wakes (a call then costs both sides' CPU "
                             'time); not with --pin')
    parser.add_argument('--keep-freed-memory', action='store_true',
                        help='run every process with malloc set as vyra_base_ipc.keep_freed_memory() '
                             'sets it (large blocks from the heap, freed memory kept)')
    parser.add_argument('--domain-id', type=int, default=None,
                        help="the run's ROS_DOMAIN_ID (default: a random one of 150..230)")
    parser.add_argument('--package-root', type=Path, default=None,
                        help='import vyra_base_ipc from this directory (to measure a changed copy)')
    options = parser.parse_args(argv)
    mode = MODES['quick' if options.quick else 'smoke' if options.smoke else 'full']
    only = {key.strip() for key in options.only.split(',') if key.strip()} or None
    sections = tuple(part.strip() for part in options.sections.split(',') if part.strip())
    try:
        results = run(mode, options.out.resolve(), only, chart=not options.no_chart,
                      package_root=options.package_root.resolve() if options.package_root else None,
                      sections=sections, pin=options.pin, keep_freed_memory=options.keep_freed_memory,
                      one_cpu=options.one_cpu, domain_id=options.domain_id)
    except ValueError as error:
        parser.error(str(error))
    print_report(results)
    written = 'results.json, results.md' + (' and latency.png' if (options.out / 'latency.png').exists()
                                            else '')
    print(f"\n{written} in {options.out} ({results['meta']['seconds']} s)")


if __name__ == '__main__':
    main()
