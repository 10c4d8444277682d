"""``IPCServer.abandon()`` for a server whose event loop ended under it (an
exception escaped the loop, as in a node that hosts it): a real server
process whose loop ends (test/servers/abandoning_server.py), real clients
connected on each lane."""

from __future__ import annotations

import asyncio
from concurrent import futures
import contextlib
import errno
import os
from pathlib import Path
import shutil
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

import grpc
import pytest

from conftest import LONG, ServerProcess, StartServer, unchanged, wait_for
from vyra_base_ipc import IPCHandler, SyncIPCHandler
from vyra_base_ipc import module_service_pb2 as module_pb
from vyra_base_ipc import module_service_pb2_grpc as module_grpc
from vyra_base_ipc._grpc_sockets import count_connections, end_connections
from vyra_base_ipc.exceptions import IPCError

PING = module_pb.CommandRequest(command='ping')
HOLD: Any = module_pb.CommandRequest(command='hold')
#: The deadline of a held call: one that ended before it was ended by the abandon.
DEADLINE = 60.0


@pytest.fixture
def held(tmp_path: Path) -> Path:
    """The file the server appends a line to as it handles each held call."""
    return tmp_path / 'held'


@pytest.fixture
def server(request: pytest.FixtureRequest, start_server: StartServer, socket_path: Path,
           held: Path) -> ServerProcess:
    """The abandoning server; parametrized (indirect) ``'without /proc'``: in a
    mount namespace of its own with an empty ``/proc`` (the machine's untouched);
    ``'poll'``: grpc core polling with poll() instead of epoll."""
    wrapper: list[str] = []
    kind = getattr(request, 'param', 'with /proc')
    if kind == 'without /proc':
        if os.geteuid() != 0 or shutil.which('unshare') is None:
            pytest.skip('needs root and unshare (util-linux) to hide /proc in a mount namespace')
        wrapper = ['unshare', '-m', 'sh', '-c', 'mount -t tmpfs none /proc && exec "$@"', 'sh']
    server = start_server(socket_path, str(held), script='abandoning_server.py', wait=False, wrapper=wrapper,
                          env={'GRPC_POLL_STRATEGY': 'poll'} if kind == 'poll' else None)
    server.wait_serving(ttrpc=True)
    assert bool(os.listdir(f'/proc/{server.pid}/root/proc')) == (not wrapper)  # what the server sees there
    return server


def handled(held: Path) -> int:
    """How many held calls the server has handled (test/servers/abandoning_server.py)."""
    try:
        return held.read_text().count('\n')
    except FileNotFoundError:
        return 0


def open_connections(server: ServerProcess) -> int:
    """Connections the server process holds open on either lane: its sockets
    that are connected (state 03 in /proc/net/unix) and bound at a private path
    beside its socket files (where each lane binds before it publishes)."""
    inodes = set()
    for fd in os.listdir(f'/proc/{server.pid}/fd'):
        with contextlib.suppress(FileNotFoundError):  # (closed meanwhile)
            inodes.add(os.readlink(f'/proc/{server.pid}/fd/{fd}'))
    private = f'{server.socket_path.parent}/.ipc-'
    return sum(1 for line in Path('/proc/net/unix').read_text().splitlines()[1:]
               if len(fields := line.split()) == 8 and fields[5] == '03' and fields[7].startswith(private)
               and f'socket:[{fields[6]}]' in inodes)


def cpu_ticks(server: ServerProcess) -> int:
    """The CPU time the server process has used, in clock ticks (user and system)."""
    fields = Path(f'/proc/{server.pid}/stat').read_text().rpartition(')')[2].split()
    return int(fields[11]) + int(fields[12])


def idle_grpc_connection(server: ServerProcess) -> socket.socket:
    """A connection to the gRPC lane that has made HTTP/2's handshake (the
    server's SETTINGS acknowledged: it waits for nothing) and idles, never
    closed by its peer."""
    raw = socket.socket(socket.AF_UNIX)
    raw.settimeout(LONG)
    raw.connect(str(server.socket_path))
    raw.sendall(b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n' + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))  # + SETTINGS
    while True:  # frames: 3 bytes length, type, flags, 4 bytes stream
        header = raw.recv(9, socket.MSG_WAITALL)
        assert len(header) == 9, header
        length, kind, flags = int.from_bytes(header[:3], 'big'), header[3], header[4]
        assert len(raw.recv(length, socket.MSG_WAITALL) if length else b'') == length
        if (kind, flags) == (4, 0):  # the server's SETTINGS: acknowledged
            raw.sendall(bytes([0, 0, 0, 4, 1, 0, 0, 0, 0]))
            return raw


def read_to_the_end(raw: socket.socket) -> None:
    """Read what the server sent until the connection ends (a timeout after LONG if it does not)."""
    while raw.recv(65536):
        pass


def end_the_loop(server: ServerProcess) -> None:
    """Let ``sys.exit()`` out of a callback on the server's loop, and wait until it has abandoned the server."""
    with SyncIPCHandler(server.socket_path, module_grpc.ModuleServiceStub, lane='ttrpc', timeout=LONG) as ender:
        ender.call_method('ExecuteCommand', module_pb.CommandRequest(command='end_loop'))
    # The line abandon() is followed by, not just any line naming it: the
    # loop thread logs its end before abandon() runs, and a call made then
    # on the gRPC lane still found its socket file (the server dead).
    wait_for(lambda: 'ABANDONED' in server.log().splitlines() or not server.running(), LONG,
             'the server to be abandoned')
    assert server.running(), server.log()  # (its exit would close the connections all the same)


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_connected_clients_next_call_after_abandon_is_unavailable(server: ServerProcess, lane: str) -> None:
    # Found on the fast lane: the connection stayed open until the dead loop
    # was collected, and the call waited on a socket nobody read until its
    # deadline (DEADLINE_EXCEEDED). The gRPC lane's client finds the socket
    # file gone before it sends.
    with SyncIPCHandler(server.socket_path, module_grpc.ModuleServiceStub, lane=lane, timeout=LONG) as client:
        assert client.call_method('ExecuteCommand', PING).result == 'pong'
        end_the_loop(server)
        with pytest.raises(IPCError) as error:
            client.call_method('ExecuteCommand', PING)
    assert error.value.code is grpc.StatusCode.UNAVAILABLE, error.value


def test_a_fast_lane_call_in_flight_when_the_loop_ends_is_unavailable_once_abandoned(
        server: ServerProcess, held: Path) -> None:
    with SyncIPCHandler(server.socket_path, module_grpc.ModuleServiceStub, lane='ttrpc', timeout=LONG) as client, \
            futures.ThreadPoolExecutor(1) as caller:
        call = caller.submit(client.call_method, 'ExecuteCommand', HOLD)
        wait_for(held.exists, LONG, 'the call to be handled')
        end_the_loop(server)
        with pytest.raises(IPCError) as error:
            call.result()
    assert error.value.code is grpc.StatusCode.UNAVAILABLE, error.value


# -- the gRPC lane: grpc core's sockets, shut down by abandon() --------------------------------------------------

#: How a held call ended: its status code (None: it did not fail) and when.
Ended = tuple[grpc.StatusCode | None, float]


def sync_handler(path: Path, echo: Any, stream: bool) -> Ended:
    try:
        if stream:
            with SyncIPCHandler(path, echo.Stub, lane='grpc', timeout=DEADLINE) as client:
                for _ in client.stream_method('Count', echo.pb.CountRequest(count=2)):
                    pass
        else:
            with SyncIPCHandler(path, module_grpc.ModuleServiceStub, lane='grpc', timeout=DEADLINE) as module:
                module.call_method('ExecuteCommand', HOLD)
    except IPCError as error:
        return error.code, time.monotonic()
    return None, time.monotonic()


def async_handler(path: Path, echo: Any, stream: bool) -> Ended:
    async def call() -> Ended:
        try:
            async with IPCHandler(path, echo.Stub, lane='grpc', timeout=DEADLINE) as client:
                if stream:
                    async for _ in client.stream_method('Count', echo.pb.CountRequest(count=2)):
                        pass
                else:
                    await client.call_method('EchoSync', echo.pb.EchoRequest(text='held'))
        except IPCError as error:
            return error.code, time.monotonic()
        return None, time.monotonic()
    return asyncio.run(call())


def plain_channel(path: Path, echo: Any, stream: bool) -> Ended:
    # A connection of its own (grpc shares one between channels to one target by default).
    with grpc.insecure_channel(f'unix:{path}', options=[('grpc.use_local_subchannel_pool', 1)]) as channel:
        stub = echo.Stub(channel)
        try:
            if stream:
                for _ in stub.Count(echo.pb.CountRequest(count=2), timeout=DEADLINE):
                    pass
            else:
                stub.EchoSync(echo.pb.EchoRequest(text='held'), timeout=DEADLINE)
        except grpc.RpcError as error:
            return error.code(), time.monotonic()
    return None, time.monotonic()


CLIENTS: dict[str, Callable[[Path, Any, bool], Ended]] = {
    'SyncIPCHandler': sync_handler, 'IPCHandler': async_handler, 'grpc channel': plain_channel}


def abandoned_in_flight(server: ServerProcess, held: Path, echo: Any, calls: list[tuple[str, bool]]
                        ) -> dict[str, list[grpc.StatusCode | None]]:
    """Make ``calls`` (client, stream) on the gRPC lane, wait until the server
    has handled them all, end its loop; how each ended, by its name, once every
    one did (each before its deadline, or the test fails)."""
    with futures.ThreadPoolExecutor(len(calls)) as callers:
        started = time.monotonic()
        made = [(f'{client} {"stream" if stream else "unary"}',
                 callers.submit(CLIENTS[client], server.socket_path, echo, stream)) for client, stream in calls]
        wait_for(lambda: handled(held) == len(calls) or any(call.done() for _, call in made), LONG,
                 'the calls to be handled')
        assert handled(held) == len(calls), [call.result() for _, call in made if call.done()]
        assert open_connections(server) > 0  # (what the tests see closed after)
        end_the_loop(server)
        codes: dict[str, list[grpc.StatusCode | None]] = {}
        for name, call in made:
            code, ended = call.result()
            assert ended < started + DEADLINE, f'{name} ended by its deadline ({code})'
            codes.setdefault(name, []).append(code)
    return codes


@pytest.mark.parametrize('server', ['with /proc', 'without /proc', 'poll'], indirect=True)
def test_grpc_lane_calls_in_flight_when_the_loop_ends_are_unavailable_once_abandoned(
        server: ServerProcess, held: Path, echo: Any) -> None:
    # Found: the fast lane's calls failed at once, but the gRPC lane's waited
    # for their deadlines on connections grpc core kept open (frontends call
    # with long deadlines, or none). Unary calls of an async and of a def
    # handler, response streams after their first reply; from each client.
    # Without /proc the server finds its sockets among descriptor numbers.
    # Found with grpc core's poll() poller: it spun on the listener shut down.
    with idle_grpc_connection(server) as idle:
        calls = [(client, stream) for client in CLIENTS for stream in (False, True)]
        codes = abandoned_in_flight(server, held, echo, calls)
        assert codes == {name: [grpc.StatusCode.UNAVAILABLE] for name in codes}
        # grpc core closed the sockets shut down under it, though a peer
        # keeps its end open: none left in the server; it lives on.
        read_to_the_end(idle)
        wait_for(lambda: open_connections(server) == 0, LONG, "the server's connections to be closed")
    wait_for(unchanged(lambda: cpu_ticks(server)), LONG, 'the server to idle (no poller spinning)')
    assert server.running(), server.log()


def test_fifty_grpc_lane_calls_in_flight_are_unavailable_once_abandoned(
        server: ServerProcess, held: Path, echo: Any) -> None:
    # Fifty calls (of async handlers: def handlers would wait for threads):
    # unary ones on the connection SyncIPCHandlers share, streams on 25
    # connections of their own, all shut down under grpc core at once.
    calls = [('SyncIPCHandler', False)] * 25 + [('grpc channel', True)] * 25
    codes = abandoned_in_flight(server, held, echo, calls)
    assert codes == {name: [grpc.StatusCode.UNAVAILABLE] * len(ended) for name, ended in codes.items()}
    wait_for(lambda: open_connections(server) == 0, LONG, "the server's connections to be closed")
    assert server.running(), server.log()


def test_no_connection_reaches_an_abandoned_grpc_lane(server: ServerProcess, echo: Any) -> None:
    # A client pins the socket file's inode (an O_PATH descriptor: what the
    # clients of this package connect through, README "security model"):
    # with the file gone it still reached grpc core's listener; and a
    # channel's next call went on its open connection and waited for its
    # deadline.
    pinned = os.open(server.socket_path, os.O_PATH)
    try:
        with grpc.insecure_channel(f'unix:{server.socket_path}') as channel:
            stub = echo.Stub(channel)
            assert stub.Echo(echo.pb.EchoRequest(text='up'), timeout=LONG).text == 'up'
            end_the_loop(server)
            with pytest.raises(grpc.RpcError) as error:
                stub.Echo(echo.pb.EchoRequest(text='after'), timeout=DEADLINE)
            assert error.value.code() is grpc.StatusCode.UNAVAILABLE, error.value
        with socket.socket(socket.AF_UNIX) as late, pytest.raises(ConnectionRefusedError):
            late.connect(f'/proc/self/fd/{pinned}')
    finally:
        os.close(pinned)
    assert server.running(), server.log()


def test_end_connections_shuts_down_what_is_bound_at_the_path_and_closes_nothing_it_does_not_own(
        socket_dir: Path) -> None:
    # grpc core's part played by plain sockets of this process: a
    # non-blocking listener, a connection it accepted (the descriptor held
    # as grpc core holds its own), one still waiting in its backlog (a race
    # with grpc core's accept: no server process can hold one there).
    path = socket_dir / 'lane.sock'
    with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as accepted_peer, \
            socket.socket(socket.AF_UNIX) as waiting_peer:
        listener.bind(str(path))
        listener.listen()
        listener.setblocking(False)
        accepted_peer.connect(str(path))
        accepted, _ = listener.accept()
        waiting_peer.connect(str(path))
        others = socket.socketpair()
        owned = {sock.fileno(): os.fstat(sock.fileno()).st_ino for sock in (listener, accepted, *others)}
        try:
            assert end_connections(path) == 2
            for peer in (accepted_peer, waiting_peer):
                peer.settimeout(LONG)
                assert peer.recv(1) == b''  # the connection ended
            # Shut down, not closed: the same sockets behind the same numbers.
            assert {fd: os.fstat(fd).st_ino for fd in owned} == owned
            assert accepted.recv(1) == b''
            with socket.socket(socket.AF_UNIX) as late, pytest.raises(ConnectionRefusedError):
                late.connect(str(path))
            others[0].sendall(b'x')  # a socket bound elsewhere is left alone
            assert others[1].recv(1) == b'x'
        finally:
            accepted.close()
            for sock in others:
                sock.close()


@contextlib.contextmanager
def accepted_at(path: Path) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A listener bound at ``path`` and the socket it accepted from a peer
    connected to it; all three closed after."""
    with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as peer:
        listener.bind(str(path))
        listener.listen()
        peer.connect(str(path))
        accepted, _ = listener.accept()
        with accepted:
            yield listener, accepted


def test_end_connections_leaves_the_blocking_mode_of_the_other_sockets_of_the_process_alone(
        socket_dir: Path) -> None:
    # Found: each socket of the process was inspected through a socket object
    # made on a duplicate of its descriptor; with socket.setdefaulttimeout()
    # set, making one sets O_NONBLOCK, which the duplicate shares with the
    # original: a blocking socket of another part of the process (a thread
    # in recv(), DDS's) turned non-blocking, its next recv() failing EAGAIN.
    path = socket_dir / 'lane.sock'
    with accepted_at(path) as (listener, accepted):
        others = socket.socketpair()
        blocking = (listener, accepted, *others)  # (the lane's own too: grpc core's are made non-blocking)
        before = socket.getdefaulttimeout()
        socket.setdefaulttimeout(LONG)
        try:
            assert all(sock.gettimeout() is None for sock in blocking)
            assert end_connections(path) == 1
            assert [os.get_blocking(sock.fileno()) for sock in blocking] == [True] * len(blocking)
        finally:
            socket.setdefaulttimeout(before)
            for sock in others:
                sock.close()


#: A child script's lines that accept a connection from a listener at argv[1]
#: (``listener``, ``peer``, ``accepted``), for the scripts below.
ACCEPTED = """
listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[1])
listener.listen()
peer = socket.socket(socket.AF_UNIX)
peer.connect(sys.argv[1])
accepted, _ = listener.accept()
"""


#: A process, in a mount namespace of its own, that holds a descriptor of a
#: FUSE file system that never answers (mounted with mount(2) on /dev/fuse,
#: which nobody reads), and a connection accepted from a listener at argv[1];
#: then ends it with end_connections() and prints how many it ended.
HUNG_FUSE = """
import ctypes, os, socket, sys, tempfile
from vyra_base_ipc._grpc_sockets import end_connections
libc = ctypes.CDLL(None, use_errno=True)
mount_point, fuse = tempfile.mkdtemp(), os.open('/dev/fuse', os.O_RDWR)
options = f'fd={fuse},rootmode=40000,user_id=0,group_id=0'.encode()
if libc.mount(b'none', mount_point.encode(), b'fuse', 0, options) != 0:
    sys.exit('cannot mount: ' + os.strerror(ctypes.get_errno()))
hung = os.open(mount_point, os.O_PATH)
""" + ACCEPTED + """
print('ended', end_connections(sys.argv[1]))
"""


def test_end_connections_asks_no_file_system_about_the_descriptors_it_passes_over(socket_dir: Path) -> None:
    # Found: each descriptor of the process was fstat()ed to find the sockets;
    # fstat() of a file on a FUSE (or network) mount that does not answer
    # waits for it: abandon() hung for ever. /proc's links say which are sockets.
    if os.geteuid() != 0 or shutil.which('unshare') is None or not os.path.exists('/dev/fuse'):
        pytest.skip('needs root, unshare (util-linux) and /dev/fuse to mount a FUSE file system')
    result = subprocess.run(['unshare', '-m', sys.executable, '-c', HUNG_FUSE, str(socket_dir / 'lane.sock')],
                            capture_output=True, text=True, timeout=LONG)
    assert (result.returncode, result.stdout) == (0, 'ended 1\n'), result.stderr


#: A process with a connection accepted from a listener at argv[1] that uses
#: up its open-file limit, then ends the connection with end_connections()
#: and prints how many it ended.
AT_THE_FILE_LIMIT = """
import logging, os, resource, socket, sys
from vyra_base_ipc._grpc_sockets import end_connections
logging.basicConfig(format='%(levelname)s %(message)s')
""" + ACCEPTED + """
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
spare = []
try:
    while True:
        spare.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
print('ended', end_connections(sys.argv[1]))
"""


def test_end_connections_at_the_open_file_limit_says_so_once(socket_dir: Path) -> None:
    # Found: the listener's scan and the connections' each logged that the
    # descriptors could not be inspected: two warnings for one failure.
    result = subprocess.run([sys.executable, '-c', AT_THE_FILE_LIMIT, str(socket_dir / 'lane.sock')],
                            capture_output=True, text=True, timeout=LONG)
    assert (result.returncode, result.stdout) == (0, 'ended 0\n'), result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith('WARNING')]
    assert len(warnings) == 1, result.stderr
    assert 'lane.sock' in warnings[0] and os.strerror(errno.EMFILE) in warnings[0], warnings


def test_count_connections_counts_each_accepted_socket_once(socket_dir: Path) -> None:
    # What GetStats reports where /proc is not mounted: a socket held under
    # two descriptors (dup(), as a library may) is one connection.
    path = socket_dir / 'lane.sock'
    with accepted_at(path) as (_, accepted):
        duplicate = os.dup(accepted.fileno())
        try:
            assert count_connections(path) == 1
        finally:
            os.close(duplicate)
