"""What a local peer can make a server spend, beyond connections, frames,
readers, threads and descriptors (test_fault_limits.py, test_bounds.py):
log lines at the peer's rate, counters keyed by names the peer chooses.

Each attack is bounded in count and runs against a real server process on
its own sockets; the tests count lines and table entries, never time.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
import re
from typing import Any

import pytest

from conftest import ServerProcess, StartServer, start_lanes, until
from ttrpc_peer import Peer
from vyra_base_ipc import IPCRemoteError, SyncIPCHandler

#: The first bytes of an HTTP/2 client: a protocol violation on the fast lane.
HTTP2_PREFACE = b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'


def lines_with(server: ServerProcess, text: str) -> list[str]:
    return [line for line in server.log().splitlines() if text in line]


def told(lines: list[str]) -> int:
    """How many records ``lines`` stand for: each, and the ``[N more like
    this in the last S s]`` it says were held back."""
    return sum(1 + int(match.group(1)) if (match := re.search(r'\[(\d+) more like this in the last', line))
               else 1 for line in lines)


def test_connections_closed_for_bad_frames_are_logged_once_then_counted(start_server: StartServer,
                                                                        socket_path: Path, echo: Any) -> None:
    """2,000 connections, each closed for a protocol violation, log the
    first violation and no more than a summary line; the server serves on."""
    server = start_server(socket_path)
    server.wait_serving(ttrpc=True)
    for _ in range(2000):
        with Peer.connect(server.ttrpc_path) as peer:
            peer.send_raw(HTTP2_PREFACE)
            assert peer.frames_until_closed() == []  # closed once the violation was logged
    with SyncIPCHandler(socket_path=socket_path, service_stub=echo.Stub,
                        lane='ttrpc') as client:
        assert client.call_method('Echo', echo.pb.EchoRequest(text='still here')).text == 'still here'
    assert server.stop() == 0
    closed = lines_with(server, 'ttrpc connection closed: an HTTP/2 (gRPC) client')
    # The first at once, the others told by number (at the latest by the stopping server).
    assert len(closed) <= 3, closed[:5]
    assert told(closed) == 2000, closed


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_handler_raising_on_every_call_is_logged_once_then_counted(start_server: StartServer,
                                                                     socket_dir: Path, echo: Any, lane: str
                                                                     ) -> None:
    """A handler that raises on a peer's input, 300 calls: every caller gets
    the exception in its status, the log one traceback and at most a summary
    (grpc's own server logs each)."""
    server = start_lanes(start_server, socket_dir)
    with SyncIPCHandler(server.grpc_path, echo.Stub, lane=lane,
                        ttrpc_socket_path=server.ttrpc_path) as client:
        for method in ('Echo', 'EchoSync'):
            for _ in range(150):
                with pytest.raises(IPCRemoteError, match='boom'):
                    client.call_method(method, echo.pb.EchoRequest(text='raise'))
    assert server.stop() == 0
    for method in ('Echo', 'EchoSync'):
        logged = lines_with(server, f'Unexpected [ValueError] raised by servicer method '
                                    f'[/vyra.ipc.test.EchoService/{method}]')
        assert len(logged) <= 3, logged[:5]
        assert told(logged) == 150, logged
    assert len(lines_with(server, 'Traceback')) <= 6


# -- the limit itself, in this process -------------------------------------------------------


@pytest.fixture
def fresh_limits(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``vyra_base_ipc._log_limit`` with no kinds seen and a short period."""
    from vyra_base_ipc import _log_limit

    monkeypatch.setattr(_log_limit, '_kinds', {})
    monkeypatch.setattr(_log_limit, 'PERIOD', 0.3)
    return _log_limit


def test_held_records_are_told_by_the_event_loop_once_the_period_is_over(fresh_limits: Any,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger('test_peer_costs.flood')

    async def flood() -> None:
        for index in range(50):
            fresh_limits.log_limited(logger, logging.WARNING, 'a', 'bad frame %d', index)
        fresh_limits.log_limited(logger, logging.WARNING, 'b', 'another kind')  # its first: at once
        assert [record.getMessage() for record in caplog.records] == ['bad frame 0', 'another kind']
        await until(lambda: len(caplog.records) == 3, 10, 'the held records told')

    asyncio.run(flood())
    told = caplog.records[2].getMessage()
    assert told.startswith('bad frame 49 [48 more like this in the last '), told


def test_kinds_are_bounded_and_a_new_kind_is_logged_at_once(fresh_limits: Any, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger('test_peer_costs.kinds')
    monkeypatch.setattr(fresh_limits, 'MAX_KINDS', 8)
    for kind in range(8):
        assert fresh_limits.log_limited(logger, logging.WARNING, kind, 'kind %d', kind)
    # Past the bound the new kinds share a limit: the first of them logged, the others held.
    assert [fresh_limits.log_limited(logger, logging.WARNING, kind, 'kind %d', kind)
            for kind in range(8, 100)].count(True) == 1
    assert len(fresh_limits._kinds) <= 9
    monkeypatch.setattr(fresh_limits, 'PERIOD', 0.0)  # every kind quiet for a period: forgotten
    assert fresh_limits.log_limited(logger, logging.WARNING, 'late', 'a new kind')
    assert 'late' in fresh_limits._kinds and len(fresh_limits._kinds) <= 9
