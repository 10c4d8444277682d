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

import grpc
import pytest

from conftest import ServerProcess, StartServer, start_lanes, until, wait_for
import http2_peer as h2
from ttrpc_peer import DATA, REMOTE_OPEN, REQUEST, SHARED, Peer, frame_bytes, request_envelope
from vyra_base_ipc import IPCRemoteError, SyncIPCHandler
from vyra_base_ipc._metrics import UNKNOWN_METHOD
from vyra_base_ipc.introspection_pb2 import StatsRequest
from vyra_base_ipc.introspection_pb2_grpc import IntrospectionStub

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
    first violation and no more than a summary line; a violation of another
    kind meanwhile is logged at once; the server serves on."""
    server = start_server(socket_path)
    server.wait_serving(ttrpc=True)
    for _ in range(2000):
        with Peer.connect(server.ttrpc_path) as peer:
            peer.send_raw(HTTP2_PREFACE)
            assert peer.frames_until_closed() == []  # closed once the violation was logged
    with Peer.connect(server.ttrpc_path) as peer:  # another violation: its first is shown at once
        peer.send(1, REQUEST, SHARED, request_envelope('vyra.ipc.test.EchoService', 'Echo'))
        assert peer.frames_until_closed() == []
    assert lines_with(server, 'ttrpc connection closed: shared-memory flag on a frame of stream 1')
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



def test_a_grpc_only_server_tells_the_held_records_when_it_stops(start_server: StartServer, socket_path: Path,
                                                                  echo: Any) -> None:
    """A server without the fast lane (``ttrpc=False``), 50 calls whose
    handler raises, stopped at once: its log tells all 50, the last of them
    with how many were held back (it ended on the first of the flood: only
    the fast lane's stop told what was held)."""
    server = start_server(socket_path, '--no-ttrpc')
    with grpc.insecure_channel(f'unix:{socket_path}') as channel:
        misbehave = echo.grpc.StatusServiceStub(channel).Misbehave
        for _ in range(50):
            with pytest.raises(grpc.RpcError) as raised:
                misbehave(echo.pb.MisbehaveRequest(how='raise-timeout'), timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNKNOWN
    assert server.stop() == 0
    raised_lines = lines_with(server, 'Unexpected [TimeoutError] raised by servicer method '
                                      '[/vyra.ipc.test.StatusService/Misbehave]')
    assert told(raised_lines) == 50, raised_lines
    assert '[48 more like this in the last' in raised_lines[-1], raised_lines  # (the last, and 48 before it)
    lines = server.log().splitlines()
    assert lines[lines.index(raised_lines[-1]) + 1:] == [f'INFO:vyra_base_ipc.server:IPC server on {socket_path} '
                                                          'stopped'], lines[-5:]


#: HTTP/2's error code CANCEL (RFC 9113, 7), as RST_STREAM's payload.
CANCEL = (8).to_bytes(4, 'big')
#: grpc.aio's ERROR when a message of a call could not be sent, with grpc's traceback.
SEND_FAILED = 'ExecuteBatchError raised in core by servicer method [/vyra.ipc.test.WatchService/Watch]'


def test_clients_leaving_streams_mid_write_are_logged_once_then_counted(start_server: StartServer,
                                                                        socket_path: Path, echo: Any) -> None:
    """20 connections, each opening 10 streams whose messages (100 kB) wait
    for the client's flow-control window, then leaving them all (h2.RST_STREAM
    CANCEL, as a grpc client cancels): grpc.aio logged "ExecuteBatchError
    raised in core by servicer method" and its traceback for most (184 of
    200), at a peer's rate. Now the first, then at most a summary line."""
    server = start_server(socket_path, '--no-ttrpc')
    watch = h2.grpc_message(echo.pb.WatchRequest(tag='leaver', size=100_000).SerializeToString())
    after = h2.grpc_message(echo.pb.EchoRequest(text='after').SerializeToString())
    streams = range(1, 21, 2)
    for _ in range(20):
        with h2.RawConnection(socket_path) as connection:
            connection.send(h2.PREFACE + h2.CLIENT_SETTINGS
                            + b''.join(h2.grpc_call(stream, '/vyra.ipc.test.WatchService/Watch', watch)
                                       for stream in streams))
            started: set[int] = set()
            for kind, _, stream, _ in connection.frames():  # each handler has sent (some of) its first message
                started |= {stream} if kind in (h2.HEADERS, h2.DATA) else set()
                if started >= set(streams):
                    break
            connection.send(b''.join(h2.frame(h2.RST_STREAM, 0, stream, CANCEL) for stream in streams))
            # A call after the leaves, answered (in the connection's window, which the streams took up):
            # the server has taken the leaves in.
            connection.send(h2.frame(h2.WINDOW_UPDATE, 0, 0, (1 << 20).to_bytes(4, 'big'))
                            + h2.grpc_call(101, '/vyra.ipc.test.EchoService/Echo', after))
            assert connection.results({101})[101].grpc_status == 0
    assert server.stop() == 0
    failed = lines_with(server, SEND_FAILED)
    assert told(failed) >= 10, failed  # (a guard: the leaves made grpc log it, as they did)
    assert len(failed) <= 2, failed[:5]
    assert failed[0] == f'ERROR:grpc._cython.cygrpc:{SEND_FAILED}: grpc could not send on the call (its client had ' \
                        'left it, or grpc refused what the handler gave it to send, such as metadata)', failed
    assert len(lines_with(server, 'Traceback')) <= 1


async def _answer_too_large(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b'x' * 2048


@pytest.mark.asyncio
async def test_grpcs_send_failed_records_of_another_grpc_server_in_the_process_are_left_as_they_are(
        socket_dir: Path, caplog: pytest.LogCaptureFixture, echo: Any) -> None:
    """An IPCServer and a plain grpc.aio server in one process and event
    loop, 5 calls each that grpc cannot send (the plain server's answer is
    over its max_message_bytes; ours sends initial metadata whose key grpc
    refuses, as every answer of ours over the
    limit is ended before grpc sees it): grpc's 5 records of the plain server are left as grpc
    logged them (our filter on grpc's logger limited them all: the first
    rewritten, the others held), ours limited as before."""
    from vyra_base_ipc import IPCServer
    from vyra_base_ipc._log_limit import flush_held

    class BadMetadata(echo.grpc.EchoServiceServicer):
        async def Echo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.send_initial_metadata((('not a header', 'x'),))  # (no spaces in a key: grpc refuses)
            return echo.pb.EchoReply()

    plain = grpc.aio.server(options=[('grpc.max_send_message_length', 1024)])
    plain.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        'plain.Service', {'Big': grpc.unary_unary_rpc_method_handler(_answer_too_large)}),))
    plain.add_insecure_port(f'unix:{socket_dir / "plain.sock"}')
    await plain.start()
    ours = IPCServer(socket_dir / 'ours.sock', servicers=[BadMetadata()], ttrpc=False)
    try:
        with caplog.at_level(logging.ERROR, logger='grpc._cython.cygrpc'):
            await ours.start()
            async with grpc.aio.insecure_channel(f'unix:{socket_dir / "plain.sock"}') as channel:
                for _ in range(5):
                    with pytest.raises(grpc.aio.AioRpcError) as raised:
                        await channel.unary_unary('/plain.Service/Big')(b'', timeout=10)
                    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            async with grpc.aio.insecure_channel(f'unix:{socket_dir / "ours.sock"}') as channel:
                for _ in range(5):
                    with pytest.raises(grpc.aio.AioRpcError) as raised:
                        await echo.Stub(channel).Echo(echo.pb.EchoRequest(), timeout=10)
                    assert raised.value.code() == grpc.StatusCode.INTERNAL, raised.value
    finally:
        await ours.stop(0)
        await plain.stop(0)
        flush_held()  # (what the stop told of ours, told again by now: nothing more)
    failed = [record.getMessage() for record in caplog.records if 'ExecuteBatchError' in record.getMessage()]
    theirs = [message for message in failed if '[/plain.Service/Big]' in message]
    assert theirs == ['ExecuteBatchError raised in core by servicer method [/plain.Service/Big]'] * 5, failed
    mine = [message for message in failed if '[/vyra.ipc.test.EchoService/Echo]' in message]
    assert len(mine) <= 2 and told(mine) == 5, failed
    assert mine[0].endswith(': grpc could not send on the call (its client had left it, or grpc refused what the '
                            'handler gave it to send, such as metadata)'), mine


def test_grpcs_other_error_records_are_left_as_they_are(caplog: pytest.LogCaptureFixture) -> None:
    """Only grpc's record of a message it could not send, logged in a
    call of a running IPCServer (above), is limited: its other records,
    and that one logged elsewhere (here: no server, no event loop), pass
    as they are."""
    import vyra_base_ipc  # noqa: F401  (its filter on grpc's logger)

    grpc_logger = logging.getLogger('grpc._cython.cygrpc')
    for _ in range(3):
        grpc_logger.error('Unexpected [ValueError] raised by servicer method [/a.B/C]')
        grpc_logger.error(SEND_FAILED)
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ['Unexpected [ValueError] raised by servicer method [/a.B/C]', SEND_FAILED] * 3


def test_calls_of_many_made_up_methods_grow_no_table(start_server: StartServer, socket_path: Path) -> None:
    """20,000 distinct unknown methods on the fast lane and 300 on the gRPC
    lane (each answered UNIMPLEMENTED) are counted under one
    ``(unknown method)`` a lane, and log nothing (a guard: so it was)."""
    server = start_server(socket_path)
    server.wait_serving(ttrpc=True)
    with Peer.connect(server.ttrpc_path) as peer:
        stream_id = 1
        for batch in range(20):
            for index in range(1000):
                peer.request(stream_id, f'made.up{batch}.Service', f'Method{index}')
                stream_id += 2
            assert {peer.answer().code for _ in range(1000)} == {grpc.StatusCode.UNIMPLEMENTED.value[0]}
    with grpc.insecure_channel(f'unix:{socket_path}') as channel:
        for index in range(300):
            with pytest.raises(grpc.RpcError) as raised:
                channel.unary_unary(f'/made.up.Service{index}/Method')(b'', timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with SyncIPCHandler(socket_path, IntrospectionStub, lane='ttrpc') as introspection:
        methods = introspection.call_method('GetStats', StatsRequest()).methods
    assert {(entry.method, entry.lane): entry.calls for entry in methods
            if entry.method == UNKNOWN_METHOD} == {(UNKNOWN_METHOD, 'ttrpc'): 20000, (UNKNOWN_METHOD, 'grpc'): 300}
    assert not [entry.method for entry in methods if 'made.up' in entry.method]
    assert server.stop() == 0
    assert not lines_with(server, 'made.up')



def test_calls_of_connections_lost_mid_call_leave_nothing_in_flight(start_server: StartServer, socket_path: Path,
                                                                    echo: Any) -> None:
    """50 connections, each closed with 30 calls started (unary, async and
    def streams): the server's count of calls in flight and of connections
    comes back to the introspection call alone (a guard: so it was)."""
    server = start_server(socket_path)
    server.wait_serving(ttrpc=True)
    sleep = echo.pb.SleepRequest(seconds=30).SerializeToString()
    message = echo.pb.EchoRequest(text='x').SerializeToString()
    service = 'vyra.ipc.test.EchoService'
    for _ in range(50):
        peer = Peer.connect(server.ttrpc_path)
        frames = b''
        for stream_id in range(1, 60, 6):
            frames += frame_bytes(stream_id, REQUEST, 0, request_envelope(service, 'Sleep', sleep))
            for offset, method in ((2, 'Chat'), (4, 'ChatSync')):
                frames += frame_bytes(stream_id + offset, REQUEST, REMOTE_OPEN, request_envelope(service, method))
                frames += frame_bytes(stream_id + offset, DATA, 0, message)
        peer.send_raw(frames)
        peer.read_frame()  # a stream's first answer: the calls are running
        peer.close()

    def settled() -> bool:
        with SyncIPCHandler(socket_path, IntrospectionStub, lane='ttrpc') as introspection:
            stats = introspection.call_method('GetStats', StatsRequest())
        in_flight = sum(entry.in_flight for entry in stats.methods if entry.method != UNKNOWN_METHOD)
        return in_flight == 0 and {lane.lane: lane.connections for lane in stats.lanes}['ttrpc'] == 1
    wait_for(settled, 20, 'no calls of the lost connections in flight')


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
