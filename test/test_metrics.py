"""The server's counters read from other threads than the ones that update
them: ``IPCServer.stats()``, ``/diagnostics`` (from the ROS executor's
thread) and ``GetStats`` read them while calls end on the event loop and in
``def`` handlers' worker threads."""

from __future__ import annotations

import sys
import threading
import time
from typing import Iterator

import grpc
import pytest

from vyra_base_ipc._metrics import UNKNOWN_METHOD, MethodMetrics, ServerMetrics

#: Rounds of the race below: before the fix, about 1 round in 80 failed (dozens here).
ROUNDS = 5_000
CODES = [code.value[0] for code in grpc.StatusCode if code is not grpc.StatusCode.OK]


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Threads switch as often as the interpreter lets them: a read that is
    not atomic is caught between two updates of another thread."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def test_a_snapshot_taken_while_calls_end_with_new_codes_never_fails(fast_switching: None) -> None:
    # The first call of a method ending with a status adds that status to
    # its errors; a snapshot iterating them in another thread then failed
    # with "dictionary changed size during iteration" (GetStats answered
    # UNKNOWN, the /diagnostics timer raised in the node's executor).
    failures: list[BaseException] = []
    until = time.monotonic() + 30
    for _ in range(ROUNDS):
        if time.monotonic() > until:
            break
        metrics = ServerMetrics(['grpc'])
        method = metrics.method('/s/M', 'grpc')
        go = threading.Event()

        def end_calls(metrics: ServerMetrics = metrics, method: MethodMetrics = method,
                      go: threading.Event = go) -> None:
            go.wait()
            for code in CODES:  # (as the server's event loop counts, beside the snapshots' thread)
                method.ended(method.started(), code)
            metrics.unknown_method('grpc')  # a new method, as a peer calling one the server lacks adds

        writer = threading.Thread(target=end_calls)
        writer.start()
        go.set()
        try:
            while writer.is_alive():
                metrics.snapshot({'grpc': 0})
        except RuntimeError as error:
            failures.append(error)
        writer.join()
    assert not failures, f'{len(failures)} snapshots failed, first: {failures[0]!r}'
    stats = metrics.snapshot({'grpc': 0})
    assert {entry.method: entry.calls for entry in stats.methods} == {'/s/M': len(CODES), UNKNOWN_METHOD: 1}
