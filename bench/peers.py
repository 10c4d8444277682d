"""Peers side by side: what a Python robotics developer would use instead
of this package, against its clients and the plain-socket floor, interleaved
in rounds, with the CPU time both sides spend per call.

Two parts, each one client process (``python -m bench.peers SPEC``) holding
one client of every variant:

``small``  64 B round trips: the floor, ``SyncIPCHandler`` and ``IPCHandler``
           (stock asyncio loop, and uvloop) on the fast lane, a minimal Python ttrpc
           (:mod:`bench.minimal_ttrpc`: client and server, and its clients
           against ``IPCServer``), pyzmq REQ/REP over
           ``ipc://``, iceoryx2 request-response waiting on events and
           spinning, eclipse-zenoh get/queryable over a unix socket.
``large``  echo of 1, 10 and 100 MiB: the floor, the fast lane's transparent
           shared memory (the default), an explicit ``SharedBuffer`` per call
           (from the pool: ``allocate`` and one write into its view, and
           ``copy_from``; ``Mirror`` answers with it), pyzmq ``copy=False``,
           iceoryx2 slices (loan, write, send), zenoh bytes, and zenoh's
           explicit shared-memory provider (alloc, write, get).

Every variant's server is a process of its own (:mod:`bench.servers`,
:mod:`bench.peer_servers`), up for the whole run. In round ``r`` the variants
run one block of calls each in :func:`bench.overhead.round_order` (an order
that changes every round: each variant follows each other one equally
often), as the overhead and busy-poll sections do, so that a noisy
neighbour slows all of them alike. CPU per call (:class:`bench.tally.Tally`):
the client's is this process's time over the variant's blocks (all threads:
pyzmq's I/O thread and zenoh's runtime are in it), the server's is its
process CPU clock read by pid (:func:`bench.tally.process_cpu_seconds`)
before and after each block. A peer whose package is missing is skipped
with the reason (``bench/requirements.txt`` lists them); the floor and the
package's own variants are always measured.

Child: ``python -m bench.peers SPEC`` with ``{"part", "variants",
"addresses", "pids", "sizes", "rounds", "blocks", "warmup"}``; prints one
JSON line ``{"rows": [...]}``.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import importlib.util
import json
import os
from pathlib import Path
import sys
import time
from time import perf_counter_ns
from typing import Any, Callable, Iterable

from .drivers import load_driver
from .overhead import round_order
from .payloads import make_payload
from .tally import Tally, process_cpu_seconds
from .transports import LANES, Lane, Transport

__all__ = ['FLOOR', 'PARTS', 'PEER_SERVERS', 'main', 'measure_part', 'peer_variants',
           'remove_leftovers', 'shared_memory_files', 'with_floor_ratios']

#: Every part's reference: the plain Unix socket echo.
FLOOR = 'socket-uds'
#: The parts of the section.
PARTS = ('small', 'large')
#: Servers of the peers: name -> server kind in :mod:`bench.servers`.
PEER_SERVERS = {'zmq': 'zmq', 'iceoryx2-event': 'iceoryx2', 'iceoryx2-spin': 'iceoryx2', 'zenoh': 'zenoh'}
#: Pause after a block before the server's CPU time is read (see _measure_size):
#: longer than any server here polls (this package's servers: 200 µs by default).
_SETTLE = 0.002
#: Import name -> what to install (bench/requirements.txt).
_PACKAGES = {'zmq': 'pyzmq', 'iceoryx2': 'iceoryx2', 'zenoh': 'eclipse-zenoh', 'uvloop': 'uvloop'}


def _lane(name: str) -> Lane:
    return next(lane for lane in LANES if lane.name == name)


def _candidates(part: str) -> list[tuple[Transport, Callable[[], str | None]]]:
    """The variants of ``part`` and, for each, why it cannot be measured here."""
    fast, shm = _lane('ttrpc'), _lane('shm')

    def always() -> str | None:
        return None

    def module(name: str) -> Callable[[], str | None]:
        def missing() -> str | None:
            if importlib.util.find_spec(name) is None:
                return f'not installed: {name} (pip install {_PACKAGES[name]})'
            return None
        return missing

    floor = Transport(FLOOR, 'plain Unix socket echo (the floor)', 'socket', 'socket', 'uds')
    if part == 'small':
        return [
            (floor, always),
            (Transport('ipc-sync-ttrpc', 'SyncIPCHandler, fast lane', 'ipc-sync', 'ipc', 'uds',
                       'ttrpc', options=fast.client_options() if not fast.unavailable() else {}),
             fast.unavailable),
            (Transport('ipc-aio-ttrpc', "IPCHandler, fast lane, asyncio's loop", 'ipc-aio', 'ipc', 'uds',
                       'ttrpc', asynchronous=True,
                       options=fast.client_options() if not fast.unavailable() else {}),
             fast.unavailable),
            (Transport('ipc-aio-uvloop', 'IPCHandler, fast lane, uvloop', 'ipc-aio', 'ipc', 'uds',
                       'ttrpc', asynchronous=True, loop='uvloop',
                       options=fast.client_options() if not fast.unavailable() else {}),
             lambda: fast.unavailable() or module('uvloop')()),
            # For reference: the protocol's Python floor, and this package's server under it.
            (Transport('ttrpc-minimal', 'minimal Python ttrpc client and server (blocking, no features)',
                       'ttrpc-minimal', 'ttrpc-minimal', 'uds', 'ttrpc'), always),
            (Transport('ttrpc-minimal-aio-server',
                       "minimal Python ttrpc client (blocking) to the minimal server on asyncio's loop",
                       'ttrpc-minimal', 'ttrpc-minimal-aio', 'uds', 'ttrpc'), always),
            (Transport('ttrpc-minimal-ipc', 'minimal Python ttrpc client (blocking) to IPCServer',
                       'ttrpc-minimal', 'ipc', 'uds', 'ttrpc'), fast.unavailable),
            (Transport('ttrpc-minimal-ipc-sleeping',
                       'minimal Python ttrpc client (blocking) to IPCServer, its loop not polling',
                       'ttrpc-minimal', 'busy-poll-off', 'uds', 'ttrpc'), fast.unavailable),
            (Transport('ttrpc-minimal-aio-ipc', "minimal Python ttrpc client (asyncio's loop) to IPCServer",
                       'ttrpc-minimal-aio', 'ipc', 'uds', 'ttrpc', asynchronous=True), fast.unavailable),
            (Transport('zmq-req-rep', 'pyzmq REQ/REP over ipc://', 'zmq', 'zmq', 'ipc'), module('zmq')),
            (Transport('iceoryx2-event', 'iceoryx2 request-response, waiting on events', 'iceoryx2',
                       'iceoryx2-event', 'shm'), module('iceoryx2')),
            (Transport('iceoryx2-spin', 'iceoryx2 request-response, spinning', 'iceoryx2',
                       'iceoryx2-spin', 'shm'), module('iceoryx2')),
            (Transport('zenoh-get', 'eclipse-zenoh get/queryable, unix socket', 'zenoh', 'zenoh', 'uds'),
             module('zenoh')),
        ]
    if part != 'large':
        raise ValueError(f'part must be one of {", ".join(PARTS)}, not {part!r}')
    shm_options = shm.client_options() if not shm.unavailable() else {}
    return [
        (floor, always),
        (Transport('ipc-sync-shm', 'SyncIPCHandler, fast lane, transparent shared memory (default)',
                   'ipc-sync', 'ipc', 'uds', 'shm', options=shm_options), shm.unavailable),
        (Transport('ipc-sync-shared-buffer',
                   'SyncIPCHandler, explicit SharedBuffer (allocate, write, Mirror)',
                   'ipc-sync-shared-buffer', 'ipc', 'uds', 'shm', options=shm_options), shm.unavailable),
        (Transport('ipc-sync-shared-buffer-copy', 'SyncIPCHandler, explicit SharedBuffer (copy_from, Mirror)',
                   'ipc-sync-shared-buffer-copy', 'ipc', 'uds', 'shm',
                   options={**shm_options, 'copy_from': True}), shm.unavailable),
        (Transport('zmq-zero-copy', 'pyzmq REQ/REP, copy=False', 'zmq', 'zmq', 'ipc',
                   options={'copy': False}), module('zmq')),
        (Transport('iceoryx2-slice', 'iceoryx2 slices (loan, write, send), waiting on events', 'iceoryx2',
                   'iceoryx2-event', 'shm'), module('iceoryx2')),
        (Transport('zenoh-bytes', 'eclipse-zenoh bytes (its shared memory, used by itself)', 'zenoh',
                   'zenoh', 'uds'), module('zenoh')),
        (Transport('zenoh-shm', 'eclipse-zenoh, explicit shared-memory provider (alloc, write, get)',
                   'zenoh', 'zenoh', 'uds', options={'shm': True}), module('zenoh')),
        # For reference: what the transparent path cannot go below.
        (Transport('protobuf-alone',
                   "protobuf's own work for an echo, payload not sent (bench/protobuf_alone.py)",
                   'protobuf-alone', 'protobuf-alone', 'uds'), always),
    ]


#: Variants whose server spins: on one CPU it can only take turns with its client.
SPINNING = frozenset({'iceoryx2-spin'})


def peer_variants(part: str, one_cpu: bool = False) -> tuple[list[Transport], list[dict[str, str]]]:
    """The variants of ``part`` to measure, and ``{transport, reason}`` for
    those skipped (with ``one_cpu``, the :data:`SPINNING` ones too)."""
    measured, skipped = [], []
    for transport, unavailable in _candidates(part):
        reason = unavailable()
        if reason is None and one_cpu and transport.key in SPINNING:
            reason = 'its server spins: on one CPU (--one-cpu) it only takes turns with its client'
        if reason is None:
            measured.append(transport)
        else:
            skipped.append({'transport': transport.key, 'reason': reason})
    return measured, skipped


def with_floor_ratios(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with ``vs_floor``: p50 over the floor's p50 at the same payload
    (``None`` where the floor has no row)."""
    rows = list(rows)
    floor = {row['payload_bytes']: row['p50_us'] for row in rows if row['transport'] == FLOOR}
    return [{**row, 'vs_floor': round(row['p50_us'] / floor[row['payload_bytes']], 3)
             if floor.get(row['payload_bytes']) else None} for row in rows]


# -- the measuring child -----------------------------------------------------------


class _Variant:
    """One client of the part, sync or async (run on ``loop``), with its server's pid."""

    def __init__(self, transport: dict[str, Any], addresses: dict[str, Any], pid: int,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.key = transport['key']
        # A client on uvloop gets a loop of its own (its handler's connections
        # belong to the loop it ran on); the others share the part's.
        self._own_loop = _uvloop().new_event_loop() if transport.get('loop') == 'uvloop' else None
        loop = self._own_loop or loop
        self.driver = load_driver(transport['client'])(addresses, transport)
        self.pid = pid
        self._loop = loop
        self._async = self.driver.asynchronous
        self.begin_block: Callable[[], None] = getattr(self.driver, 'begin_block', lambda: None)
        self.end_block: Callable[[], None] = getattr(self.driver, 'end_block', lambda: None)

    def _run(self, result: Any) -> Any:
        return self._loop.run_until_complete(result) if self._async else result

    def open(self) -> None:
        self._run(self.driver.open())

    def close(self) -> None:
        try:
            self._run(self.driver.close())
        finally:
            if self._own_loop is not None:
                self._own_loop.close()

    def verify(self, payload: bytes) -> None:
        """One round trip whose reply must equal ``payload``."""
        self.begin_block()
        try:
            reply = self._run(self.driver.roundtrip(payload))
        finally:
            self.end_block()
        if reply != payload:
            raise RuntimeError(f'{self.key}: reply of {len(reply)} bytes differs from the '
                               f'{len(payload)}-byte request')

    def prepare(self, payload: bytes) -> None:
        """Make the call for ``payload`` (once per size: a driver may build
        frames or receive buffers of the payload's size for it)."""
        self._call, self._expected = self.driver.echo(payload), len(payload)

    def block(self, count: int, record: Callable[[int], None] | None) -> None:
        """``count`` calls of the prepared payload one after the other, each
        timed into ``record``."""
        call, expected = self._call, self._expected
        if self._async:
            self._loop.run_until_complete(_async_block(self.key, call, expected, count, record))
            return
        for _ in range(count):
            start = perf_counter_ns()
            length = call()
            if record is not None:
                record(perf_counter_ns() - start)
            if length != expected:
                raise RuntimeError(f'{self.key}: reply carried {length} bytes, expected {expected}')


def _uvloop() -> Any:
    import uvloop
    return uvloop


async def _async_block(key: str, call: Callable[[], Any], expected: int, count: int,
                       record: Callable[[int], None] | None) -> None:
    for _ in range(count):
        start = perf_counter_ns()
        length = await call()
        if record is not None:
            record(perf_counter_ns() - start)
        if length != expected:
            raise RuntimeError(f'{key}: reply carried {length} bytes, expected {expected}')


def _measure_size(variants: dict[str, _Variant], size: int, rounds: int, block: int,
                  warmup: int) -> list[dict[str, Any]]:
    payload = make_payload(size)
    for variant in variants.values():
        variant.verify(payload)
        variant.prepare(payload)
        variant.begin_block()
        variant.block(warmup, None)
        variant.end_block()
    tallies = {key: Tally(size) for key in variants}
    gc.collect()
    for round_index in range(rounds):
        for key in round_order(list(variants), round_index):
            variant, tally = variants[key], tallies[key]
            variant.begin_block()
            tally.open_block(process_cpu_seconds(variant.pid))
            variant.block(block, tally.latencies.append)
            tally.end_calls()
            variant.end_block()
            # Read from outside, a process's CPU clock counts a thread that
            # has run without a break since its last tick (4 ms at HZ=250) only
            # at the next one: a server busy-polling through a whole block
            # would look almost free. Once it sleeps (parked, or its poll
            # window over) its clock is exact; what it polled after the last
            # call is counted too, as the block's cost.
            time.sleep(_SETTLE)
            tally.close_block(process_cpu_seconds(variant.pid))
    return [{'transport': key, 'payload_bytes': size, **tally.report()} for key, tally in tallies.items()]


def measure_part(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Measure every size of ``spec`` in this process (see the module docstring)."""
    loop = asyncio.new_event_loop()
    variants = {}
    try:
        for transport in spec['variants']:
            variant = _Variant(transport, spec['addresses'], spec['pids'][transport['server']], loop)
            variant.open()  # before the next is made: one opened is one to close
            variants[variant.key] = variant
        rows = []
        for size in spec['sizes']:
            rows += _measure_size(variants, size, spec['rounds'], spec['blocks'][str(size)],
                                  spec['warmup'][str(size)])
        labels = {transport['key']: transport['label'] for transport in spec['variants']}
        return [{'transport': row['transport'], 'label': labels[row['transport']], **row} for row in rows]
    finally:
        for variant in variants.values():
            variant.close()
        loop.close()


# -- what the peers leave behind ---------------------------------------------------


def shared_memory_files() -> set[str]:
    """The zenoh shared-memory files in ``/dev/shm`` now."""
    return {path.name for path in Path('/dev/shm').glob('*.zenoh')}


def remove_leftovers(iceoryx2_prefix: str, zenoh_before: set[str]) -> list[str]:
    """Remove what the peers' servers and clients left in ``/dev/shm`` after
    they ended: iceoryx2's segments of this run (named by its unique prefix),
    and zenoh's segments made during the run (not in ``zenoh_before``) that no
    process holds any more. zenoh keeps a shared ``flock`` on every segment in
    use; one we can lock exclusively belongs to nobody (zenoh issue 2787: a
    receiver's segments outlive their processes). Returns the names removed."""
    removed = []
    shm = Path('/dev/shm')
    for path in shm.glob(f'{iceoryx2_prefix}*'):
        path.unlink(missing_ok=True)
        removed.append(path.name)
    for name in sorted(shared_memory_files() - zenoh_before):
        path = shm / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # still in use by a process of someone else
        else:
            path.unlink(missing_ok=True)
            removed.append(name)
        finally:
            os.close(fd)
    return removed


def main() -> None:
    """The child: measure the JSON spec in ``sys.argv[1]``, print the rows as
    one JSON line."""
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(json.dumps({'rows': measure_part(json.loads(sys.argv[1]))}), flush=True)


if __name__ == '__main__':
    main()
