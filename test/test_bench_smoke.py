"""The benchmark suite runs end to end: one tiny ``python -m bench --smoke``
run whose JSON holds every row, column and section. No timing is asserted:
the numbers of a smoke run mean nothing."""

from __future__ import annotations

from collections import Counter
import importlib.util
import json
import os
from pathlib import Path
import select
import subprocess
import sys

import pytest

from ros_env import private_domain_id

REPO = Path(__file__).resolve().parent.parent

#: Rows every run must have (issue 5): the floor, bare grpcio over UDS and
#: TCP, this package's clients on the gRPC lane, and a ROS 2 service.
REQUIRED_TRANSPORTS = {
    'socket-uds', 'grpc-sync-uds', 'grpc-aio-uds', 'ipc-sync-grpc', 'ipc-aio-grpc',
    'ipc-sync-ttrpc', 'ipc-aio-ttrpc', 'ipc-sync-shm', 'ipc-aio-shm', 'grpc-sync-tcp',
    'grpc-aio-tcp', 'rclpy-dds', 'rclpy-trigger',
}
#: Lanes that are measured once the package offers them, skipped with a reason until then.
LATER_LANE_TRANSPORTS: set[str] = set()
PAYLOADS = {64, 64 * 1024, 1024 * 1024, 10 * 1024 * 1024}
#: Only shared memory carries 100 MiB (issue 7).
LARGE_PAYLOAD_TRANSPORTS = {'ipc-sync-shm', 'ipc-aio-shm'}
COLUMNS = ['transport', 'label', 'client', 'server', 'address', 'lane', 'payload_bytes',
           'concurrency', 'calls', 'p50_us', 'p99_us', 'mean_us', 'calls_per_s', 'mib_per_s']
COLD_START = {'socket-uds', 'grpc-aio-uds', 'ipc-sync-grpc', 'ipc-aio-grpc', 'ipc-sync-ttrpc',
              'ipc-aio-ttrpc', 'rclpy-dds'}
OVERHEAD_VARIANTS = {'stub/grpc', 'stub/ipc', 'stub+deadline/ipc', 'handler/ipc'}
#: Busy polling off and on, by client mode (issue 6: what polling buys and costs).
BUSY_POLL_VARIANTS = {'sync': {'off', 'server', 'both'}, 'async': {'off', 'server', 'both'},
                      'async-polling-loop': {'both'}, 'sync-buffer': {'off', '100us', 'both'}}


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    """``python -m bench --smoke`` once, measuring the vyra_base_ipc this test
    imports; its results.json, output directory and stdout."""
    import vyra_base_ipc

    out = tmp_path_factory.mktemp('bench')
    env = dict(os.environ)
    # Only for `bench` itself: vyra_base_ipc is the one given as --package-root.
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [env.get('PYTHONPATH'), str(REPO)]))
    chart = importlib.util.find_spec('matplotlib') is not None
    command = [sys.executable, '-m', 'bench', '--smoke', '--out', str(out), '--domain-id', str(private_domain_id()),
               '--package-root', str(Path(vyra_base_ipc.__file__).resolve().parent.parent)]
    if not chart:
        command.append('--no-chart')
    completed = subprocess.run(command, cwd=out, env=env, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=100)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads((out / 'results.json').read_text()), out, completed.stdout


@pytest.mark.ros
def test_every_transport_has_a_row_per_payload_and_concurrency(smoke_run) -> None:
    results, _, _ = smoke_run
    measured = set(results['transports'])
    assert REQUIRED_TRANSPORTS <= measured, f"not measured: {results['skipped']}"
    skipped = {entry['transport'] for entry in results['skipped']}
    assert LATER_LANE_TRANSPORTS <= measured | skipped
    assert all(entry['reason'] for entry in results['skipped'])
    rows = {(row['transport'], row['payload_bytes'], row['concurrency']) for row in results['rows']}
    expected = {(key, size, 1) for key in measured - {'rclpy-trigger'} for size in PAYLOADS}
    expected.add(('rclpy-trigger', 0, 1))  # a Trigger call carries no payload
    expected |= {(key, 64, concurrency) for key in measured if '-aio-' in key
                 for concurrency in (8, 64)}
    expected |= {(key, 100 * 1024 * 1024, 1) for key in LARGE_PAYLOAD_TRANSPORTS}
    assert expected <= rows, f'missing rows: {sorted(expected - rows)}'


@pytest.mark.ros
def test_every_row_has_every_column_with_sane_values(smoke_run) -> None:
    results, _, _ = smoke_run
    assert results['columns'] == COLUMNS
    for row in results['rows']:
        assert list(row) == COLUMNS
        assert row['calls'] > 0
        assert 0 < row['p50_us'] <= row['p99_us']
        assert row['calls_per_s'] > 0


@pytest.mark.ros
def test_cold_start_overhead_and_concurrency_sections_are_complete(smoke_run) -> None:
    results, _, _ = smoke_run
    assert {entry['transport'] for entry in results['cold_start']} == COLD_START
    for entry in results['cold_start']:
        assert entry['runs'] >= 1
        assert 0 <= entry['connect_ms']['p50'] <= entry['first_reply_ms']['p50'] \
            <= entry['total_ms']['p50']
    assert set(results['overhead']) == {'sync', 'async'}
    for budget in results['overhead'].values():
        assert set(budget['variants']) == OVERHEAD_VARIANTS
        assert set(budget['ratios']) == {'total', 'client', 'server', 'deadline'}
    targets = {check['transport']: check['target'] for check in results['concurrency']}
    assert targets['ipc-aio-grpc'] == 2.0  # issue 5
    assert targets['ipc-aio-ttrpc'] == targets['ipc-aio-shm'] == 3.0  # issue 6
    assert results['meta']['machine']['cores'] >= 1


@pytest.mark.ros
def test_table_summary_and_chart_are_written_next_to_the_json(smoke_run) -> None:
    results, out, stdout = smoke_run
    summary = (out / 'results.md').read_text()
    for key in results['transports']:
        assert key in stdout
        assert f'`{key}`' in summary
    assert 'Overhead budget' in stdout
    if importlib.util.find_spec('matplotlib') is not None:
        assert (out / 'latency.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.ros
def test_the_package_under_test_is_the_one_measured(smoke_run) -> None:
    import vyra_base_ipc

    results, _, _ = smoke_run
    assert results['meta']['package'] == str(Path(vyra_base_ipc.__file__).resolve().parent)


@pytest.mark.ros
def test_shared_memory_section_compares_lanes_and_shows_zero_copy(smoke_run) -> None:
    results, out, stdout = smoke_run
    assert {check['transport'] for check in results['shared_memory']} == LARGE_PAYLOAD_TRANSPORTS | {
        'SharedBuffer round trip (SyncIPCHandler)'}
    for check in results['shared_memory']:
        assert check['faster_than_grpc_lane'] > 0 and check['faster_than_ros'] > 0
        assert check['p50_us_100mib'] > 0
    sizes = [row['bytes'] for row in results['zero_copy']]
    assert sizes == [1 << 20, 10 << 20, 100 << 20]
    # The handler's view maps the sender's memfd: nothing was copied.
    assert all(row['zero_copy'] and 'memfd:' in row['handler_backing'] for row in results['zero_copy'])
    assert all(row['round_trip_p50_ms'] > 0 for row in results['zero_copy'])
    assert 'Large payloads: shared memory' in stdout
    assert 'Zero-copy `SharedBuffer`' in (out / 'results.md').read_text()


@pytest.mark.ros
def test_fast_lane_section_compares_small_calls_with_trigger_and_grpc(smoke_run) -> None:
    results, _, stdout = smoke_run
    checks = {check['transport']: check for check in results['fast_lane']}
    assert set(checks) == {'ipc-sync-ttrpc', 'ipc-aio-ttrpc'}
    for check in checks.values():
        assert check['vs_trigger'] > 0 and check['vs_grpc_lane'] > 0
    assert 'an rclpy Trigger call' in stdout


@pytest.mark.ros
def test_busy_poll_section_shows_latency_and_cpu_of_both_sides(smoke_run) -> None:
    results, out, stdout = smoke_run
    measured = results['busy_poll']
    assert set(measured) == set(BUSY_POLL_VARIANTS)
    for mode, variants in BUSY_POLL_VARIANTS.items():
        assert set(measured[mode]['variants']) == set(variants)
        for row in measured[mode]['variants'].values():
            assert row['calls'] == measured[mode]['calls_per_variant'] > 0
            assert row['p50_us'] > 0 and row['client_cpu_us_per_call'] >= 0
            assert row['server_cpu_us_per_call'] >= 0
    assert set(measured['sync']['idle']) == {'busy-poll-on', 'busy-poll-off'}
    assert 'Busy polling, fast lane' in stdout
    markdown = (out / 'results.md').read_text()
    assert 'SyncIPCHandler, both poll (the defaults)' in markdown
    assert 'SharedBuffer (Mirror), both poll for 100 µs' in markdown
    assert 'Idle servers' in markdown


@pytest.mark.ros
def test_streaming_section_compares_lanes_with_grpc_aio_and_a_socket_and_times_leaving(smoke_run) -> None:
    results, out, stdout = smoke_run
    streaming = results['streaming']
    assert set(streaming) == {'sync', 'async'}
    assert set(streaming['sync']['variants']) == {'ipc-sync-ttrpc', 'ipc-sync-grpc', 'socket'}
    assert set(streaming['async']['variants']) == {'ipc-aio-ttrpc', 'ipc-aio-grpc', 'grpc-aio', 'socket'}
    for measured in streaming.values():
        for rates in measured['variants'].values():
            assert set(rates) == {'64', '65536'}
            assert all(rate['streams'] == measured['rounds'] and rate['msgs_per_s'] > 0
                       for rate in rates.values())
        # Every watch left was cancelled on the server (a watch never ends by itself).
        for variant, cancel in measured['cancel'].items():
            assert cancel['not_cancelled'] == 0, variant
            assert cancel['cancels'] > 0 and 0 <= cancel['p50_us'] <= cancel['max_us']
    assert set(streaming['async']['cancel']) == {'ipc-aio-ttrpc', 'ipc-aio-grpc', 'grpc-aio'}
    checks = {check['client']: check for check in results['fast_lane_streams']}
    assert set(checks) == {'sync', 'async'}
    assert all(check['target'] == 3.0 and check['vs_grpc_lane'] > 0 for check in checks.values())
    assert 'Server streams, sync clients' in stdout
    assert 'Leaving a watch' in stdout
    assert '| IPCHandler, fast lane |' in (out / 'results.md').read_text()


#: Issue 18.5: the peers section's variants. Ours and the floor in every run;
#: a peer only where its package is installed (bench/requirements.txt), else
#: skipped with the reason. Import name of each peer's package.
PEER_SMALL = {'socket-uds': None, 'ipc-sync-ttrpc': None, 'ipc-aio-ttrpc': None, 'ipc-aio-uvloop': 'uvloop',
              'ttrpc-minimal': None, 'ttrpc-minimal-aio-server': None, 'ttrpc-minimal-ipc': None,
              'ttrpc-minimal-ipc-sleeping': None, 'ttrpc-minimal-aio-ipc': None,
              'zmq-req-rep': 'zmq', 'iceoryx2-event': 'iceoryx2', 'iceoryx2-spin': 'iceoryx2',
              'zenoh-get': 'zenoh'}
PEER_LARGE = {'socket-uds': None, 'ipc-sync-shm': None, 'ipc-sync-shared-buffer': None,
              'ipc-sync-shared-buffer-copy': None,
              'zmq-zero-copy': 'zmq', 'iceoryx2-slice': 'iceoryx2', 'zenoh-bytes': 'zenoh',
              'zenoh-shm': 'zenoh', 'protobuf-alone': None}


def _installed(module: str | None) -> bool:
    return module is None or importlib.util.find_spec(module) is not None


@pytest.mark.ros
@pytest.mark.parametrize('part, variants, sizes', [('small', PEER_SMALL, [64]),
                                                    ('large', PEER_LARGE, [1024 * 1024])])
def test_peers_section_has_a_sane_row_per_installed_peer_and_skips_the_others(
        smoke_run, part, variants, sizes) -> None:
    results, _, _ = smoke_run
    measured = results['peers'][part]
    rows = {(row['transport'], row['payload_bytes']): row for row in measured['rows']}
    expected = {key for key, module in variants.items() if _installed(module)}
    assert set(rows) == {(key, size) for key in expected for size in sizes}
    skipped = {entry['transport']: entry['reason'] for entry in results['skipped']}
    for key in set(variants) - expected:
        assert skipped[key].startswith('not installed: ')
    for (_, size), row in rows.items():
        block = measured['blocks'][str(size)]
        assert row['calls'] == measured['rounds'] * block > 0
        assert 0 < row['p50_us'] <= row['p99_us']
        assert row['client_cpu_us_per_call'] >= 0 and row['server_cpu_us_per_call'] >= 0
        # Every call made the client and its server (another process) work.
        assert row['client_cpu_us_per_call'] + row['server_cpu_us_per_call'] > 0
        assert row['vs_floor'] > 0
    assert all(rows[('socket-uds', size)]['vs_floor'] == 1.0 for size in sizes)


@pytest.mark.ros
def test_peers_section_prints_ratios_to_the_floor_and_leaves_no_shared_memory(smoke_run) -> None:
    results, out, stdout = smoke_run
    assert 'Peers, 64 B round trips' in stdout and 'Peers, large payloads' in stdout
    markdown = (out / 'results.md').read_text()
    assert '| variant | payload | × floor |' in markdown
    assert '(`iceoryx2-spin`)' in markdown or not _installed('iceoryx2')
    checks = {check['check']: check for check in results['peer_checks']}
    assert 'SyncIPCHandler, 64 B: at most 2x the floor' in checks
    assert all(check['ratio'] > 0 for check in checks.values())
    # Beside them, the minimal Python ttrpc's ratios (those of pyzmq only where it is installed).
    references = {entry['reference']: entry['ratio'] for entry in results['peer_references']}
    assert len(references) == (8 if _installed('zmq') else 6) and all(ratio > 0 for ratio in references.values())
    assert 'For reference, a minimal Python ttrpc' in stdout
    prefix = results['peers']['cleanup']['iceoryx2_prefix']
    assert not list(Path('/dev/shm').glob(f'{prefix}*'))


def test_a_peer_that_is_not_installed_is_skipped_with_the_package_to_install(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))  # bench/ is not installed: the source tree's
    from bench.peers import peer_variants

    for module in ('zmq', 'iceoryx2', 'zenoh', 'uvloop'):
        monkeypatch.setitem(sys.modules, module, None)  # find_spec() then finds nothing
    for part, variants in (('small', PEER_SMALL), ('large', PEER_LARGE)):
        measured, skipped = peer_variants(part)
        assert {transport.key for transport in measured} == {
            key for key, module in variants.items() if module is None}
        reasons = {entry['transport']: entry['reason'] for entry in skipped}
        assert set(reasons) == {key for key, module in variants.items() if module is not None}
        assert reasons[next(key for key in reasons if key.startswith('zmq'))] == \
            'not installed: zmq (pip install pyzmq)'


@pytest.mark.parametrize('count', range(2, 10))
def test_rounds_put_each_variant_first_and_behind_each_other_equally_often(count: int) -> None:
    # A block's numbers depend on the block before it (caches, pages): a
    # plain rotation kept every variant behind the same one in every round.
    from bench.overhead import round_order

    variants = [f'v{index}' for index in range(count)]
    rounds = [round_order(variants, index) for index in range(2 * count if count % 2 else count)]
    assert all(sorted(order) == variants for order in rounds)
    firsts = Counter(order[0] for order in rounds)
    neighbours = Counter(pair for order in rounds for pair in zip(order[:-1], order[1:], strict=True))
    assert set(firsts) == set(variants) and len(set(firsts.values())) == 1
    assert len(neighbours) == count * (count - 1) and len(set(neighbours.values())) == 1


def test_keep_freed_memory_option_sets_what_keep_freed_memory_sets() -> None:
    from vyra_base_ipc import DEFAULT_KEEP_FREED_MEMORY

    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [env.get('PYTHONPATH'), str(REPO)]))
    completed = subprocess.run(
        [sys.executable, '-c', 'import json; from bench.run import KEEP_FREED_MEMORY_ENV as E; print(json.dumps(E))'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True)
    # glibc reads the three settings keep_freed_memory() makes from these variables at start.
    assert json.loads(completed.stdout) == {'MALLOC_MMAP_MAX_': '0', 'MALLOC_ARENA_MAX': '1',
                                            'MALLOC_TRIM_THRESHOLD_': str(DEFAULT_KEEP_FREED_MEMORY)}


def test_one_cpu_option_puts_every_child_on_one_cpu_and_skips_spinning_peers(tmp_path) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip('needs two CPUs to tell one from all')
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [env.get('PYTHONPATH'), str(REPO)]))
    # In a child: colcon test cannot import bench (see the test above).
    script = """
import json, os, subprocess, sys
from pathlib import Path
from bench.peers import peer_variants
from bench.processes import BenchEnvironment
from bench.run import main
env = BenchEnvironment(Path(sys.argv[1]), Path(sys.argv[1]), one_cpu=True)
affinities = {}
for role, pin in (('client', False), ('server', False), ('server', True)):
    child = subprocess.run([sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)))'],
                           preexec_fn=env.affinity(role, pin), capture_output=True, text=True, check=True)
    affinities[f'{role} {pin}'] = json.loads(child.stdout)
skipped = {entry['transport']: entry['reason'] for entry in peer_variants('small', one_cpu=True)[1]}
try:
    main(['--pin', '--one-cpu'])
except SystemExit as exit:
    refused = exit.code
print(json.dumps({'affinities': affinities, 'skipped': skipped, 'refused': refused,
                  'first': min(os.sched_getaffinity(0))}))
"""
    completed = subprocess.run([sys.executable, '-c', script, str(tmp_path)], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.splitlines()[-1])
    assert set(map(tuple, result['affinities'].values())) == {(result['first'],)}
    expected = '--one-cpu' if _installed('iceoryx2') else 'not installed'
    assert expected in result['skipped']['iceoryx2-spin']
    assert result['refused'] == 2  # argparse's usage error
    assert 'exclude each other' in completed.stderr


@pytest.mark.parametrize(('options', 'kept'), [('{}', True), ('{"keep_freed_memory": false}', False)])
def test_ipc_server_of_the_benchmark_keeps_freed_memory_as_the_node_does(tmp_path, options: str,
                                                                        kept: bool) -> None:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [env.get('PYTHONPATH'), str(REPO), str(tmp_path)]))
    subprocess.run([sys.executable, '-c', 'import sys; from pathlib import Path; '
                    'from bench.protogen import compile_bench_protos; compile_bench_protos(Path(sys.argv[1]))',
                    str(tmp_path)], cwd=REPO, env=env, check=True, timeout=60)
    server = subprocess.Popen([sys.executable, '-m', 'bench.servers', 'ipc', str(tmp_path / 'bench.sock'),
                               options], cwd=tmp_path, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdin is not None
    try:
        readable, _, _ = select.select([server.stdout], [], [], 60)
        assert readable, 'the server printed no ready line within 60 s'
        ready = json.loads(server.stdout.readline())['ready']
    finally:
        server.stdin.close()  # its signal to stop
        server.wait(timeout=30)
        server.stdout.close()
    # glibc here (the package's own test says so): keep_freed_memory() applies.
    assert ready['keep_freed_memory'] is kept
