"""The gRPC lane's runner of def handlers (vyra_base_ipc/_def_handlers.py,
_sync_context.py) where a call ends under a handler: a real server process
(test/servers/def_server.py) that reports its pending asyncio futures and busy
handler threads, and real grpc clients that leave."""

from __future__ import annotations

from dataclasses import dataclass
import json
from pathlib import Path
import signal
from typing import Any, Iterator

import grpc
import pytest

from conftest import ServerProcess, StartServer, unchanged, wait_for
from vyra_base_ipc import SyncIPCHandler
from vyra_base_ipc import introspection_pb2 as introspection
from vyra_base_ipc import introspection_pb2_grpc as introspection_grpc

#: Calls per case: each left something behind before the fix.
CALLS = 4


@dataclass
class DefServer:
    """A def_server.py process and its journal."""

    process: ServerProcess
    journal: Path

    def stats(self) -> dict[str, Any]:
        """What the server reports on SIGUSR1 (see def_server.py)."""
        path = Path(f'{self.process.socket_path}.stats')
        path.unlink(missing_ok=True)
        self.process.signal(signal.SIGUSR1)
        wait_for(path.exists, 10, "the server's stats")
        return json.loads(path.read_text())

    def journaled(self, event: str) -> dict[str, dict[str, Any]]:
        """What StatusService's handlers journaled as ``event``, by tag."""
        if not self.journal.exists():
            return {}
        lines = self.journal.read_text().split('\n')[:-1]  # (a line being written is not one yet)
        return {entry['tag']: entry for entry in map(json.loads, lines) if entry['event'] == event}

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f'unix:{self.process.socket_path}')


def start_def_server(start: StartServer, directory: Path, name: str, *args: str) -> DefServer:
    journal = directory / f'{name}.jsonl'
    return DefServer(start(directory / f'{name}.sock', str(journal), *args, script='def_server.py'), journal)


@pytest.fixture(scope='module')
def shared(start_module_server: StartServer, module_socket_dir: Path) -> Iterator[DefServer]:
    """One def_server for the module's tests that measure from a baseline of their own."""
    server = start_def_server(start_module_server, module_socket_dir, 'shared')
    yield server
    assert server.process.stop() == 0, server.process.log()


@pytest.mark.parametrize('method', ['MisbehaveSync', 'MisbehaveStreamSync'])
@pytest.mark.parametrize('how', ['abort-after-end', 'metadata-after-end'])
def test_a_def_handler_that_aborts_or_sends_metadata_after_its_client_left_is_told_and_leaves_nothing(
        shared: DefServer, echo: Any, method: str, how: str) -> None:
    # grpc never completes an operation started on a call it has ended: each
    # such abort or send_initial_metadata left a future pending in the server
    # for ever (and the handler got grpc's ExecuteBatchError, or AbortError).
    with shared.channel() as channel:
        stub = echo.grpc.StatusServiceStub(channel)
        echo.Stub(channel).EchoSync(echo.pb.EchoRequest(text='warm up'), timeout=10)
        baseline = shared.stats()['pending_futures']
        tags = [f'{method}-{how}-{number}' for number in range(CALLS)]
        for tag in tags:
            request = echo.pb.MisbehaveRequest(how=how, tag=tag)
            if method == 'MisbehaveSync':
                call = stub.MisbehaveSync.future(request)
            else:
                call = stub.MisbehaveStreamSync(request)
            # (A stream's handler whose call ends while it writes "first" is ended there.)
            wait_for(lambda tag=tag: tag in shared.journaled('waiting'), 10, 'the handler to wait for the end')
            call.cancel()
            wait_for(lambda tag=tag: tag in shared.journaled(how), 10, 'the handler to act after its call ended')
        wait_for(lambda: shared.stats()['pending_futures'] <= baseline, 10,
                 f'the pending futures of the server back to {baseline}')
        acted = shared.journaled(how)
        assert [acted[tag]['raised'] for tag in tags] == ['CallEnded'] * CALLS


def test_a_def_stream_whose_client_stopped_reading_then_left_gives_its_thread_back_at_once(
        start_server: StartServer, socket_dir: Path, echo: Any) -> None:
    # Its thread waited for its message to be written; it found out that the
    # call had ended only at its next look (every 0.1 s, here every 60 s).
    server = start_def_server(start_server, socket_dir, 'one', '--max-workers', '1', '--poll-seconds', '60')
    with server.channel() as channel:
        watch = echo.grpc.WatchServiceStub(channel)
        stream = watch.WatchSync(echo.pb.WatchRequest(tag='stalled', size=256 * 1024))
        next(stream)

        def report() -> Any:
            return watch.Report(echo.pb.WatchRequest(tag='stalled'), timeout=10)
        wait_for(unchanged(lambda: report().sent), 30, 'the handler to wait for the client to read')
        stream.cancel()
        wait_for(lambda: report().ended, 10, 'the handler to end')
        assert (report().how, report().callback_ran) == ('inactive', True)
        # The one handler thread serves the next call.
        assert echo.Stub(channel).EchoSync(echo.pb.EchoRequest(text='next'), timeout=10).text == 'next'
        assert server.stats()['busy'] == []


def test_a_def_handler_aborting_as_grpc_ends_its_call_at_the_deadline_is_told_call_ended(
        start_server: StartServer, socket_dir: Path, echo: Any) -> None:
    # deadline_server.py holds its event loop until the handler's abort,
    # started once the deadline has passed, is queued there: the abort runs
    # before grpc's end of the call reaches the loop. The handler got grpc's
    # ExecuteBatchError (grpc core had ended the call) or AbortError (not yet),
    # and the call was observed as its abort's NOT_FOUND.
    journal = socket_dir / 'deadline.jsonl'
    server = DefServer(start_server(socket_dir / 'deadline.sock', str(journal), script='deadline_server.py'), journal)
    tags = [f'deadline-{number}' for number in range(CALLS)]
    with server.channel() as channel:
        stub = echo.grpc.StatusServiceStub(channel)
        for tag in tags:
            with pytest.raises(grpc.RpcError) as ended:
                stub.MisbehaveSync(echo.pb.MisbehaveRequest(tag=tag), timeout=0.2)
            assert ended.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED

    def observed() -> introspection.MethodStats:
        with SyncIPCHandler(server.process.socket_path, introspection_grpc.IntrospectionStub, lane='grpc',
                            timeout=10) as client:
            stats = client.call_method('GetStats', introspection.StatsRequest())
        return next(entry for entry in stats.methods if entry.method.endswith('/MisbehaveSync'))
    wait_for(lambda: observed().calls == CALLS, 30, 'every call to end on the server')
    assert {tag: entry['raised'] for tag, entry in server.journaled('aborted').items()} == \
        dict.fromkeys(tags, 'CallEnded')
    assert dict(observed().errors) == {'DEADLINE_EXCEEDED': CALLS}
    assert 'ERROR' not in server.process.log(), server.process.log()
