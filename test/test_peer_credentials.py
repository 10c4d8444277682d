"""Who is at the other end (issue 15, item 2): clients refuse a server run by
an untrusted user on either lane before sending anything; the fast-lane
server refuses peers that may not connect even where the socket file's mode
was loosened; handlers see who called."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes.util
import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import threading
from typing import Callable, Iterator

import grpc
import pytest

from conftest import NOBODY, OTHER_UID, ServerProcess, wait_for
from vyra_base_ipc import (
    ClientCall,
    ClientInterceptor,
    IPCHandler,
    IPCTimeoutError,
    SyncIPCHandler,
    UntrustedServerError,
)

pytestmark = pytest.mark.fault

#: A user and group id above 2**31 (valid: uid_t and gid_t are unsigned 32-bit).
HIGH_ID = 3_000_000_000


def needs_second_uid() -> None:
    if os.geteuid() != 0:
        pytest.skip('needs root to run a process as another uid')
    if shutil.which('setpriv') is None:
        pytest.skip('setpriv (util-linux) is not installed')


def as_user(uid: int, gid: int, script: str, *args: str, groups: str = '') -> list[str]:
    """The command running ``script`` in the system interpreter as ``uid``:``gid``
    (the test's own interpreter may live under a home only root can read)."""
    group_option = [f'--groups={groups}'] if groups else ['--clear-groups']
    return ['setpriv', f'--reuid={uid}', f'--regid={gid}', *group_option, '/usr/bin/python3', '-c',
            script, *args]


#: A squatter: binds a Unix socket at argv[1], says "ready", then accepts
#: connections and prints "connection: N bytes" for each until stdin closes.
SQUATTER = r"""
import os, select, socket, sys
path = sys.argv[1]
if sys.argv[2:] == ['later']:  # up first, bound when told: binding then takes no process start
    print('started', flush=True)
    sys.stdin.readline()
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
os.chmod(path, 0o777)
listener.listen(16)
print('ready', flush=True)
connections = {}
while True:
    ready, _, _ = select.select([listener, sys.stdin, *connections], [], [], 30)
    if not ready:
        break
    for item in ready:
        if item is sys.stdin:
            if not sys.stdin.readline():
                for connection, count in connections.items():
                    print(f'connection: {count} bytes', flush=True)
                sys.exit(0)
        elif item is listener:
            connection, _ = listener.accept()
            connections[connection] = 0
        else:
            data = item.recv(65536)
            connections[item] += len(data)
            if not data:
                print(f'connection: {connections.pop(item)} bytes', flush=True)
                item.close()
"""


class Squatter:
    """Another user's process listening on a socket path."""

    def __init__(self, path: Path, later: bool = False, uid: int = OTHER_UID) -> None:
        """Bound and listening on ``path`` at once, or (``later``) once :meth:`bind` says so;
        run as ``uid`` (its group too)."""
        self.path = path
        self.popen = subprocess.Popen(as_user(uid, uid, SQUATTER, str(path), *(['later'] * later)),
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      env={'PATH': '/usr/bin:/bin'})
        assert self.popen.stdout is not None
        assert self.popen.stdout.readline().strip() == ('started' if later else 'ready')

    def bind(self) -> None:
        """Bind and listen now (a squatter made ``later``)."""
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write('bind\n')
        self.popen.stdin.flush()
        assert self.popen.stdout.readline().strip() == 'ready'

    def connections(self) -> list[str]:
        """Stop it; one line per connection it accepted, with what it received."""
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.close()
        output = self.popen.stdout.read()
        self.popen.stdout.close()
        assert self.popen.wait(timeout=30) == 0
        return [line for line in output.splitlines() if line.startswith('connection:')]

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def shared_dir(socket_dir: Path) -> Path:
    """A directory like /tmp: root's, sticky, writable by everyone."""
    socket_dir.chmod(0o755)
    shared = socket_dir / 'shared'
    shared.mkdir()
    shared.chmod(0o1777)
    return shared


@pytest.fixture
def squatter_on(shared_dir: Path) -> Iterator[Callable[..., Squatter]]:
    """Factory: a :class:`Squatter` on a path (killed at teardown)."""
    needs_second_uid()
    started: list[Squatter] = []

    def start(path: Path, later: bool = False, uid: int = OTHER_UID) -> Squatter:
        started.append(Squatter(path, later, uid))
        return started[-1]
    yield start
    for squatter in started:
        squatter.kill()


# -- clients --------------------------------------------------------------------------


def test_a_squatter_on_the_fast_lane_socket_gets_nothing_and_auto_takes_the_grpc_lane(
        start_server, shared_dir: Path, squatter_on, echo) -> None:
    """The review's finding: a real server with its fast lane off, another user
    bound its fast-lane path; a root client in lane='auto' sent it the request."""
    server = start_server(shared_dir / 'x_ipc.sock', '--no-ttrpc')
    squatter = squatter_on(shared_dir / 'x_ipc.ttrpc.sock')
    with SyncIPCHandler(server.socket_path, echo.Stub) as ipc:
        assert ipc.call_method('Echo', echo.pb.EchoRequest(text='secret')).text == 'secret'
        assert ipc.lane_in_use == 'grpc'
    forced = SyncIPCHandler(server.socket_path, echo.Stub, lane='ttrpc')
    with pytest.raises(UntrustedServerError) as error:
        forced.call_method('Echo', echo.pb.EchoRequest(text='secret'))
    forced.disconnect()
    message = str(error.value)
    assert str(squatter.path) in message and f'uid {OTHER_UID}' in message and 'uid 0' in message
    assert 'nothing was sent' in message
    received = squatter.connections()
    assert received and all(line == 'connection: 0 bytes' for line in received)


@pytest.mark.asyncio
async def test_the_async_client_refuses_a_fast_lane_squatter_too(start_server, shared_dir: Path,
                                                                 squatter_on, echo) -> None:
    server = start_server(shared_dir / 'y_ipc.sock', '--no-ttrpc')
    squatter = squatter_on(shared_dir / 'y_ipc.ttrpc.sock')
    async with IPCHandler(server.socket_path, echo.Stub) as ipc:
        assert (await ipc.call_method('Echo', echo.pb.EchoRequest(text='x'))).text == 'x'
        assert ipc.lane_in_use == 'grpc'
    forced = IPCHandler(server.socket_path, echo.Stub, lane='ttrpc')
    with pytest.raises(UntrustedServerError, match=f'uid {OTHER_UID}'):
        await forced.call_method('Echo', echo.pb.EchoRequest(text='x'))
    await forced.disconnect()
    assert all(line == 'connection: 0 bytes' for line in squatter.connections())


@pytest.mark.parametrize('handler', [SyncIPCHandler, IPCHandler])
def test_a_squatter_on_the_grpc_socket_is_never_connected_to(shared_dir: Path, squatter_on, echo,
                                                             handler: type) -> None:
    squatter = squatter_on(shared_dir / 'z_ipc.sock')
    ipc = handler(shared_dir / 'z_ipc.sock', echo.Stub, lane='grpc')

    async def call_async() -> None:
        try:
            await ipc.call_method('Echo', echo.pb.EchoRequest(text='secret'))
        finally:
            await ipc.disconnect()

    with pytest.raises(UntrustedServerError) as error:
        if handler is SyncIPCHandler:
            try:
                ipc.call_method('Echo', echo.pb.EchoRequest(text='secret'))
            finally:
                ipc.disconnect()
        else:
            asyncio.run(call_async())
    assert f'the socket file {str(squatter.path)!r} belongs to uid {OTHER_UID}' in str(error.value)
    assert squatter.connections() == []


@pytest.mark.parametrize('lane', ['grpc', 'auto'])
@pytest.mark.parametrize('handler', [SyncIPCHandler, IPCHandler])
def test_a_call_waiting_for_its_server_never_connects_to_a_squatter_that_binds_meanwhile(
        shared_dir: Path, squatter_on, echo, handler: type, lane: str) -> None:
    """The audit's finding: with wait_for_ready (or an idempotent retry, or
    a resend) grpc waited for the missing socket itself and connected to
    whatever appeared: another user's socket got the request, and the
    channel stayed connected to it. The call now waits for the file outside
    grpc and checks it first."""
    path = shared_dir / 'w_ipc.sock'
    started = threading.Event()

    class Started(ClientInterceptor):
        def call_started(self, call: ClientCall) -> None:
            started.set()
    # It waits until its deadline (the squatter's socket never becomes a trusted server's):
    # 3 s, the squatter's process started before, so that binding is all it does meanwhile.
    squatter = squatter_on(path, later=True)
    ipc = handler(path, echo.Stub, lane=lane, wait_for_ready=True, timeout=3, interceptors=[Started()])

    def call() -> object:
        try:
            if handler is SyncIPCHandler:
                try:
                    return ipc.call_method('Echo', echo.pb.EchoRequest(text='secret'))
                finally:
                    ipc.disconnect()

            async def call_async() -> object:
                try:
                    return await ipc.call_method('Echo', echo.pb.EchoRequest(text='secret'))
                finally:
                    await ipc.disconnect()
            return asyncio.run(call_async())
        except Exception as error:
            return error
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(call)
        assert started.wait(10)
        squatter.bind()
        outcome = waiting.result(timeout=30)
    assert isinstance(outcome, UntrustedServerError), repr(outcome)
    assert f'belongs to uid {OTHER_UID}' in str(outcome)
    assert squatter.connections() == []


@pytest.mark.parametrize('handler', [SyncIPCHandler, IPCHandler])
def test_a_channel_never_reconnects_to_a_squatter_bound_where_its_server_was(
        start_server, shared_dir: Path, squatter_on, echo, handler: type) -> None:
    """The window the check before every call left: grpc reconnects by
    itself (after a connection broke, while a call waits for the server), to
    what is at the path by then. Here the window is made as wide as it gets:
    after a call, the server stops (its socket file goes), another user binds
    the path, and the channel is used as grpc's own reconnect would use it,
    without the check. Before, that reached the squatter."""
    server = start_server(shared_dir / 'v_ipc.sock', '--no-ttrpc')
    ipc = handler(server.socket_path, echo.Stub, lane='grpc')

    def raw_call() -> object:
        """A call on the client's channel, past the client's check."""
        return ipc._grpc_lane(False)._channel.unary_unary(
            '/vyra.ipc.test.EchoService/Echo', request_serializer=echo.pb.EchoRequest.SerializeToString,
            response_deserializer=echo.pb.EchoReply.FromString)(echo.pb.EchoRequest(text='secret'), timeout=2)

    def stopped() -> None:
        assert server.stop() == 0 and not server.socket_path.exists()
        squatters.append(squatter_on(server.socket_path))

    async def in_async() -> None:
        try:
            assert (await ipc.call_method('Echo', echo.pb.EchoRequest(text='hi'))).text == 'hi'
            stopped()
            await raw_call()  # type: ignore[misc]
        finally:
            await ipc.disconnect()

    squatters: list[Squatter] = []
    with pytest.raises(grpc.RpcError) as failed:
        if handler is SyncIPCHandler:
            try:
                assert ipc.call_method('Echo', echo.pb.EchoRequest(text='hi')).text == 'hi'
                stopped()
                raw_call()
            finally:
                ipc.disconnect()
        else:
            asyncio.run(in_async())
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert squatters[0].connections() == []


@pytest.mark.parametrize('handler', [SyncIPCHandler, IPCHandler])
def test_a_waiting_call_reaches_the_server_that_replaces_a_dead_ones_socket(
        start_server, socket_dir: Path, echo, handler: type) -> None:
    """A channel pinned to a socket whose server died (SIGKILL: its file
    stays, nobody listens) follows the socket a new server puts in its
    place: a call that waits for its server, made before the new one
    started, reaches it (grpc, left to wait, would wait for the dead one)."""
    path = socket_dir / 'p_ipc.sock'
    first = start_server(path, '--no-ttrpc')
    first_done, killed, waiting = threading.Event(), threading.Event(), threading.Event()

    class Waiting(ClientInterceptor):
        def call_started(self, call: ClientCall) -> None:
            if first_done.is_set():
                waiting.set()
    ipc = handler(path, echo.Stub, lane='grpc', wait_for_ready=True, timeout=30, interceptors=[Waiting()])

    def calls() -> list[str]:
        if handler is SyncIPCHandler:
            try:
                texts = [ipc.call_method('Echo', echo.pb.EchoRequest(text='first')).text]
                first_done.set()
                assert killed.wait(30)
                return texts + [ipc.call_method('Echo', echo.pb.EchoRequest(text='second')).text]
            finally:
                ipc.disconnect()

        async def in_async() -> list[str]:
            try:
                texts = [(await ipc.call_method('Echo', echo.pb.EchoRequest(text='first'))).text]
                first_done.set()
                assert await asyncio.get_running_loop().run_in_executor(None, killed.wait, 30)
                return texts + [(await ipc.call_method('Echo', echo.pb.EchoRequest(text='second'))).text]
            finally:
                await ipc.disconnect()
        return asyncio.run(in_async())

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(calls)
        assert first_done.wait(30)
        first.kill()
        assert path.exists()  # (left by the dead server)
        killed.set()
        assert waiting.wait(30)
        start_server(path, '--no-ttrpc')
        assert outcome.result(timeout=60) == ['first', 'second']


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_symbolic_link_another_user_made_at_the_socket_path_is_not_followed(
        start_server, socket_dir: Path, echo, lane: str) -> None:
    """The audit's finding: another user's links from module a's socket
    paths to module b's running server sent a's calls to b, on both lanes.
    In a directory that is not sticky the kernel follows such links,
    whatever fs.protected_symlinks says."""
    needs_second_uid()
    socket_dir.chmod(0o755)
    other = socket_dir / 'other'
    other.mkdir()
    server_b = start_server(other / 'b_ipc.sock').wait_serving(ttrpc=True)
    other.chmod(0o777)
    link = 'import os, sys; os.symlink(sys.argv[1], sys.argv[2]); os.symlink(sys.argv[3], sys.argv[4])'
    subprocess.run(as_user(OTHER_UID, OTHER_UID, link, 'b_ipc.sock', str(other / 'a_ipc.sock'),
                           'b_ipc.ttrpc.sock', str(other / 'a_ipc.ttrpc.sock')), check=True, timeout=30)
    other.chmod(0o755)  # (b's socket then passes the gRPC lane's directory check)
    named = other / ('a_ipc.ttrpc.sock' if lane == 'ttrpc' else 'a_ipc.sock')
    with pytest.raises(UntrustedServerError) as error:
        with SyncIPCHandler(other / 'a_ipc.sock', echo.Stub, lane=lane) as ipc:
            ipc.call_method('Echo', echo.pb.EchoRequest(text='for a'))
    assert (f'the symbolic link {str(named)!r} belongs to uid {OTHER_UID}' in str(error.value)
            and 'nothing was sent' in str(error.value)), error.value
    with SyncIPCHandler(server_b.socket_path, echo.Stub, lane=lane) as ipc:  # b itself is served
        assert ipc.call_method('Echo', echo.pb.EchoRequest(text='for b')).text == 'for b'


def test_a_socket_in_a_directory_others_may_write_is_not_trusted(server: ServerProcess, echo) -> None:
    server.socket_path.parent.chmod(0o777)  # loosened after the server started
    try:
        ipc = SyncIPCHandler(server.socket_path, echo.Stub, lane='grpc')
        with pytest.raises(UntrustedServerError, match='mode 0777.*lets other users replace'):
            ipc.call_method('Echo', echo.pb.EchoRequest(text='x'))
        ipc.disconnect()
    finally:
        server.socket_path.parent.chmod(0o700)


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_server_uid_names_the_one_user_trusted(server: ServerProcess, echo, lane: str) -> None:
    other = SyncIPCHandler(server.socket_path, echo.Stub, lane=lane, server_uid=OTHER_UID)
    with pytest.raises(UntrustedServerError, match=f'belongs to uid {os.geteuid()}, not to the '
                                                   f'expected server user \\(uid {OTHER_UID}\\)'):
        other.call_method('Echo', echo.pb.EchoRequest(text='x'))
    other.disconnect()
    with SyncIPCHandler(server.socket_path, echo.Stub, lane=lane, server_uid=os.geteuid()) as ipc:
        assert ipc.call_method('Echo', echo.pb.EchoRequest(text='x')).text == 'x'


def test_server_uid_names_a_user_above_2_to_the_31(shared_dir: Path, squatter_on, echo) -> None:
    # uid_t is unsigned: a uid from 2**31 up is a user like any other, not a
    # negative number that matches no one (decoded as one, it was refused).
    fast_lane = squatter_on(shared_dir / 'h_ipc.ttrpc.sock', uid=HIGH_ID)
    ipc = SyncIPCHandler(shared_dir / 'h_ipc.sock', echo.Stub, lane='ttrpc', server_uid=HIGH_ID)
    with pytest.raises(IPCTimeoutError):  # trusted, sent the call; this "server" never answers
        ipc.call_method('Echo', echo.pb.EchoRequest(text='x'), timeout=1)
    ipc.disconnect()
    received = fast_lane.connections()
    assert received and all(line != 'connection: 0 bytes' for line in received)


def test_server_uid_is_checked(socket_path: Path, echo) -> None:
    with pytest.raises(ValueError, match='server_uid must be a uid from 0 to 4294967295, not -1'):
        SyncIPCHandler(socket_path, echo.Stub, server_uid=-1)
    with pytest.raises(TypeError, match='server_uid must be an int'):
        SyncIPCHandler(socket_path, echo.Stub, server_uid='root')
    with pytest.raises(ValueError, match='server_uid must be a uid from 0 to 4294967295, not 1099511627776'):
        SyncIPCHandler(socket_path, echo.Stub, server_uid=2**40)


# -- the server -----------------------------------------------------------------------

#: Connects to argv[1], sends a ttrpc request for grpc.health.v1.Health/Check
#: and prints "answered" when a response frame comes, "closed" when the
#: server closes the connection instead.
HEALTH_CHECK = r"""
import socket, struct, sys
def field(number, value):
    return bytes([number << 3 | 2, len(value)]) + value
request = field(1, b'grpc.health.v1.Health') + field(2, b'Check')
s = socket.socket(socket.AF_UNIX)
s.settimeout(20)
try:
    s.connect(sys.argv[1])
except OSError as error:  # e.g. PermissionError: the socket's mode says no
    print(type(error).__name__)
    sys.exit(0)
try:
    s.sendall(struct.pack('>IIBB', len(request), 1, 1, 0) + request)
    header = s.recv(10)
except ConnectionError:  # closed by the server before or after our request arrived
    header = b''
print('answered' if len(header) == 10 and header[8] == 2 else 'closed')
"""


def health_check_as(uid: int, gid: int, path: Path, groups: str = '') -> str:
    result = subprocess.run(as_user(uid, gid, HEALTH_CHECK, str(path), groups=groups), capture_output=True,
                            text=True, timeout=60, env={'PATH': '/usr/bin:/bin'})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()



def test_the_fast_lane_refuses_a_peer_the_socket_mode_was_loosened_for(start_server, open_dir: Path) -> None:
    needs_second_uid()
    server = start_server(open_dir / 'l_ipc.sock')
    fast_lane = open_dir / 'l_ipc.ttrpc.sock'
    assert health_check_as(os.getuid(), os.getgid(), fast_lane) == 'answered'
    assert health_check_as(OTHER_UID, OTHER_UID, fast_lane) == 'PermissionError'
    fast_lane.chmod(0o666)  # a mistake by hand: the kernel lets anyone connect now
    assert health_check_as(OTHER_UID, OTHER_UID, fast_lane) == 'closed'
    wait_for(lambda: f'uid {OTHER_UID} gid {OTHER_UID} is not an allowed peer' in server.log(), 20,
             'the refusal in the server log')
    assert health_check_as(os.getuid(), os.getgid(), fast_lane) == 'answered'


def assert_only_members_get_in(fast_lane: Path, group: int) -> None:
    """Members of ``group`` by their primary group and by a supplementary one
    (SO_PEERCRED carries only the first) answered; another user not let in."""
    assert health_check_as(OTHER_UID, group, fast_lane) == 'answered'
    assert health_check_as(OTHER_UID, OTHER_UID, fast_lane, groups=str(group)) == 'answered'
    assert health_check_as(OTHER_UID, OTHER_UID, fast_lane) == 'PermissionError'


# gid_t is unsigned: a group from 2**31 up is a group like any other.
@pytest.mark.parametrize('group', [NOBODY, HIGH_ID], ids=['nogroup', 'above-2-to-the-31'])
def test_members_of_the_socket_group_are_allowed_peers(start_server, open_dir: Path, group: int) -> None:
    needs_second_uid()
    start_server(open_dir / 'g_ipc.sock', '--socket-group', str(group))
    assert_only_members_get_in(open_dir / 'g_ipc.ttrpc.sock', group)


def test_a_member_of_the_socket_group_among_hundreds_of_groups_is_allowed(start_server, open_dir: Path) -> None:
    needs_second_uid()
    server = start_server(open_dir / 'm_ipc.sock', '--socket-group', 'nogroup')
    fast_lane = open_dir / 'm_ipc.ttrpc.sock'
    fast_lane.chmod(0o666)  # so that the server's own check decides, not the file's mode
    # More than the 256 groups Python's getsockopt() can read (the socket group last).
    many = ','.join(str(gid) for gid in range(60_000, 60_300))
    assert health_check_as(OTHER_UID, OTHER_UID, fast_lane, groups=f'{many},{NOBODY}') == 'answered'
    assert health_check_as(OTHER_UID, OTHER_UID, fast_lane, groups=many) == 'closed'
    wait_for(lambda: f'uid {OTHER_UID} gid {OTHER_UID} is not an allowed peer' in server.log(), 20,
             'the refusal in the server log')


def test_a_server_without_proc_knows_the_socket_groups_members_by_their_supplementary_groups(
        start_server, open_dir: Path) -> None:
    # The groups the peer had when it connected come from the kernel with the
    # connection (SO_PEERGROUPS), not from /proc/<pid>: no process can stand
    # in for the peer by taking its pid, and a server without /proc knows them.
    needs_second_uid()
    if shutil.which('unshare') is None:
        pytest.skip('unshare (util-linux) is not installed')
    # A mount namespace of its own (private: the machine's /proc is untouched), /proc emptied.
    hide_proc = ['unshare', '-m', 'sh', '-c', 'mount -t tmpfs none /proc && exec "$@"', 'sh']
    server = start_server(open_dir / 'p_ipc.sock', '--socket-group', 'nogroup', wait=False,
                          wrapper=hide_proc).wait_serving(ttrpc=True)
    assert os.listdir(f'/proc/{server.pid}/root/proc') == []  # what the server sees there
    assert_only_members_get_in(open_dir / 'p_ipc.ttrpc.sock', NOBODY)


#: Runs argv[2:] where getsockopt(SO_PEERGROUPS) fails with ENOPROTOOPT (argv[1] 'refuse'), as on
#: a kernel before 4.13, or kills the process that asks (argv[1] 'kill'): a seccomp filter, kept across exec.
NO_PEERGROUPS = r"""
import ctypes, errno, os, sys
action = {'refuse': 0x00050000 | errno.ENOPROTOOPT, 'kill': 0x80000000}[sys.argv[1]]  # SCMP_ACT_ERRNO, _KILL_PROCESS
class Compare(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [('arg', ctypes.c_uint), ('op', ctypes.c_int), ('a', ctypes.c_uint64), ('b', ctypes.c_uint64)]
lib = ctypes.CDLL('libseccomp.so.2')
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                       ctypes.POINTER(Compare)]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
context = lib.seccomp_init(ctypes.c_uint32(0x7fff0000))  # SCMP_ACT_ALLOW
optname_is_peergroups = (Compare * 1)(Compare(2, 4, 59, 0))  # argument 2 (optname) == 59 (SCMP_CMP_EQ)
assert lib.seccomp_rule_add_array(context, action, lib.seccomp_syscall_resolve_name(b'getsockopt'), 1,
                                  optname_is_peergroups) == 0
assert lib.seccomp_load(context) == 0
os.execv(sys.argv[2], sys.argv[2:])
"""


def needs_seccomp() -> None:
    if ctypes.util.find_library('seccomp') is None:
        pytest.skip('libseccomp is not installed')


def test_a_server_whose_kernel_does_not_tell_the_peers_groups_says_so_when_it_refuses(
        start_server, open_dir: Path) -> None:
    needs_second_uid()
    needs_seccomp()
    server = start_server(open_dir / 's_ipc.sock', '--socket-group', 'nogroup',
                          wrapper=['/usr/bin/python3', '-c', NO_PEERGROUPS, 'refuse'])
    fast_lane = open_dir / 's_ipc.ttrpc.sock'
    assert health_check_as(OTHER_UID, NOBODY, fast_lane) == 'answered'  # by SO_PEERCRED's gid
    # A member only through a supplementary group cannot be told from a non-member:
    # refused, and the log says why rather than that it is no member.
    assert health_check_as(OTHER_UID, OTHER_UID, fast_lane, groups=str(NOBODY)) == 'closed'
    wait_for(lambda: f'uid {OTHER_UID} gid {OTHER_UID} is not an allowed peer' in server.log(), 20,
             'the refusal in the server log')
    assert 'the kernel did not tell its supplementary groups (SO_PEERGROUPS' in server.log()


#: Calls Echo on the fast lane of the server at argv[1] with the blocking
#: (argv[2] 'sync') or the asyncio client ('async'); prints the answer.
FAST_LANE_CLIENT = r"""
import asyncio, sys
from vyra_base_ipc import IPCHandler, SyncIPCHandler
from vyra_ipc_test.echo_pb2 import EchoRequest
from vyra_ipc_test.echo_pb2_grpc import EchoServiceStub
path, kind = sys.argv[1:]
if kind == 'sync':
    with SyncIPCHandler(path, EchoServiceStub, lane='ttrpc') as ipc:
        print(ipc.call_method('Echo', EchoRequest(text=kind)).text)
else:
    async def call():
        async with IPCHandler(path, EchoServiceStub, lane='ttrpc') as ipc:
            print((await ipc.call_method('Echo', EchoRequest(text=kind))).text)
    asyncio.run(call())
"""


def test_clients_check_their_servers_uid_without_reading_its_groups(start_server, socket_dir: Path,
                                                                     child_env: dict[str, str]) -> None:
    """A client checks only its server's uid (the CLI's list only its pid):
    it does not ask the kernel for the server's groups, one getsockopt() per
    connection for nothing. Shown in processes that die if they ask."""
    needs_seccomp()
    server = start_server(socket_dir / 'c_ipc.sock').wait_serving(ttrpc=True)

    def run_where_asking_kills(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(['/usr/bin/python3', '-c', NO_PEERGROUPS, 'kill', *command], env=child_env,
                              capture_output=True, text=True, timeout=60)
    # The filter bites: a process that asks is killed (SIGSYS).
    asks = 'import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.getsockopt(1, 59, 1024)'
    assert run_where_asking_kills(sys.executable, '-c', asks, str(server.ttrpc_path)).returncode == -signal.SIGSYS
    for kind in ('sync', 'async'):
        called = run_where_asking_kills(sys.executable, '-c', FAST_LANE_CLIENT, str(server.socket_path), kind)
        assert (called.returncode, called.stdout) == (0, f'{kind}\n'), (kind, called)
    listed = run_where_asking_kills(sys.executable, '-m', 'vyra_base_ipc', 'list', str(socket_dir), '--json')
    assert listed.returncode == 0, listed
    assert [entry['pid'] for entry in json.loads(listed.stdout)] == [server.pid], listed.stdout


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_handlers_see_who_called_on_the_fast_lane(server: ServerProcess, echo, lane: str) -> None:
    with SyncIPCHandler(server.socket_path, echo.Stub, lane=lane) as ipc:
        reply = ipc.call_method('Inspect', echo.pb.InspectRequest())
    if lane == 'ttrpc':
        assert reply.has_peer
        assert (reply.peer_pid, reply.peer_uid, reply.peer_gid) == (os.getpid(), os.geteuid(), os.getegid())
        assert set(reply.peer_groups) == set(os.getgroups())
    else:
        assert not reply.has_peer  # grpc.aio does not tell (grpc/grpc#28755)
