"""A child forked from a process that used gRPC gets a clear error, never a
deadlock (issue 4, guarantee 12). gRPC skips its fork handlers when another
thread is inside gRPC at fork time, and the child may then hang on its first
call (grpc/grpc#22624): so the rule is deterministic, not timing-dependent."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading

import pytest

from conftest import ServerProcess
from vyra_base_ipc import ForkedProcessError, IPCHandler, IPCServer, SharedBuffer, SyncIPCHandler
from vyra_base_ipc._pool import aio_ttrpc_pool, sync_ttrpc_pool

pytestmark = pytest.mark.fault


def in_child(action) -> tuple[int, str]:
    """Run ``action`` in a forked child; return its exit code and what it said.
    A child still running after 20 s is killed: a deadlock fails, never hangs."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        # pytest-timeout's SIGALRM handler is Python code: it cannot run while
        # the child is stuck in C. The default action kills the process.
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(20)
        try:
            message, code = str(action()), 0
        except BaseException as error:
            message, code = f'{type(error).__name__}: {error}', 1
        os.write(write_end, message.encode())
        os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end, 'rb') as result:
        return os.waitstatus_to_exitcode(status), result.read().decode()


def test_inherited_sync_client_gives_a_clear_error_in_the_child(server: ServerProcess, echo) -> None:
    with SyncIPCHandler(server.socket_path, echo.Stub, lane='grpc') as client:
        assert client.call_method('Echo', echo.pb.EchoRequest(text='parent')).text == 'parent'
        code, said = in_child(lambda: client.call_method('Echo', echo.pb.EchoRequest(text='child')))
        assert code == 1
        assert said.startswith('ForkedProcessError') and 'spawn' in said
        assert client.call_method('Echo', echo.pb.EchoRequest(text='again')).text == 'again'


def test_new_clients_and_servers_in_the_child_give_the_clear_error(server: ServerProcess, echo,
                                                                    socket_dir) -> None:
    handler = IPCHandler(server.socket_path, echo.Stub, lane='grpc')

    async def call(text: str) -> str:
        async with handler:
            return (await handler.call_method('Echo', echo.pb.EchoRequest(text=text))).text
    assert asyncio.run(call('parent')) == 'parent'
    assert in_child(lambda: asyncio.run(call('child')))[1].startswith('ForkedProcessError')
    assert in_child(lambda: SyncIPCHandler(server.socket_path, echo.Stub, lane='grpc').connect())[1] \
        .startswith('ForkedProcessError')
    code, said = in_child(lambda: asyncio.run(IPCServer(socket_dir / 'child.sock').start()))
    assert (code, said.split(':')[0]) == (1, 'ForkedProcessError')
    assert not (socket_dir / 'child.sock').exists()


def test_a_child_forked_before_any_grpc_use_may_use_ipc(server: ServerProcess, test_protos_dir) -> None:
    # A fresh interpreter forks before it touches gRPC: the child is fine.
    script = (
        'import os, sys\n'
        'from vyra_base_ipc import SyncIPCHandler\n'
        'from vyra_ipc_test import echo_pb2, echo_pb2_grpc\n'
        'pid = os.fork()\n'
        'with SyncIPCHandler(sys.argv[1], echo_pb2_grpc.EchoServiceStub, lane="grpc") as c:\n'
        '    reply = c.call_method("Echo", echo_pb2.EchoRequest(text="child" if pid == 0 else "parent"))\n'
        '    os.write(1, (reply.text + "\\n").encode())\n'
        'if pid: os.waitpid(pid, 0)\n')
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(test_protos_dir), os.environ.get('PYTHONPATH', '')])}
    result = subprocess.run([sys.executable, '-c', script, str(server.socket_path)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == ['child', 'parent']


def test_inherited_client_on_the_fast_lane_connects_anew_in_the_child(server: ServerProcess, echo) -> None:
    # The fast lane is plain sockets, not gRPC core: safe after fork.
    with SyncIPCHandler(server.socket_path, echo.Stub, lane='ttrpc') as client:
        assert client.call_method('Echo', echo.pb.EchoRequest(text='parent')).text == 'parent'
        code, said = in_child(lambda: client.call_method('Echo', echo.pb.EchoRequest(text='child')).text)
        assert (code, said) == (0, 'child')
        assert client.call_method('Echo', echo.pb.EchoRequest(text='again')).text == 'again'


@pytest.mark.parametrize('lock', ['handler', 'sync pool', 'asyncio pool'])
def test_a_child_forked_while_a_thread_of_the_parent_held_a_lock_of_the_clients_does_not_hang(
        server: ServerProcess, echo, lock: str) -> None:
    # A thread of the parent inside a call's first steps or disconnect() at
    # fork() time holds a lock that the child's first call takes: the thread
    # does not exist in the child, so the lock would be held there for ever
    # (seen once in 500 forks of a process whose threads called and
    # disconnected). Here a thread holds it for sure.
    request = echo.pb.EchoRequest
    with SyncIPCHandler(server.socket_path, echo.Stub, lane='ttrpc', timeout=10) as client:
        assert client.call_method('Echo', request(text='parent')).text == 'parent'
        held = {'handler': client._keys_lock, 'sync pool': sync_ttrpc_pool._lock,
                'asyncio pool': aio_ttrpc_pool._lock}[lock]
        taken, done = threading.Event(), threading.Event()

        def hold() -> None:
            with held:
                taken.set()
                done.wait(60)
        holder = threading.Thread(target=hold)
        holder.start()

        async def call_async() -> str:
            async with IPCHandler(server.socket_path, echo.Stub, lane='ttrpc', timeout=10) as handler:
                return (await handler.call_method('Echo', request(text='child'))).text
        try:
            assert taken.wait(60)
            code, said = in_child(lambda: asyncio.run(call_async()) if lock == 'asyncio pool'
                                  else client.call_method('Echo', request(text='child')).text)
        finally:
            done.set()
            holder.join()
        assert (code, said) == (0, 'child')
        assert client.call_method('Echo', request(text='again')).text == 'again'


def test_a_forked_child_names_its_buffers_apart_from_its_parent() -> None:
    # Handles come from a generator of the package's own (no system call per
    # buffer): a child must not repeat the parent's sequence, or a message
    # could carry a buffer of each with the same handle.
    def handles() -> list[int]:
        made = []
        for _ in range(4):
            with SharedBuffer.allocate(1) as buffer:
                made.append(buffer.handle)
        return made

    code, child_handles = in_child(handles)
    assert code == 0, child_handles
    assert set(map(int, child_handles.strip('[]').split(', '))).isdisjoint(handles())


def test_a_pooled_buffer_inherited_through_fork_is_refused_and_the_parents_free_segments_are_closed() -> None:
    # The parent writes a pooled segment again once it lets go of it, and a
    # child's write would land in the parent's buffer: neither may happen
    # silently. The child's copies of the parent's free segments (descriptors,
    # mappings) are closed at once.
    from vyra_base_ipc._segment_pool import segment_pool

    frame = SharedBuffer.allocate(1 << 20)
    frame.view()[:4] = b'PPPP'
    with SharedBuffer.allocate(2 << 20):  # returned at once: a free segment of the parent
        pass
    free = [(segment.fd, segment.key) for segments in segment_pool()._free.values() for segment in segments]
    assert free

    def memfd_of(fd: int) -> tuple[int, int] | None:
        try:
            status = os.fstat(fd)
        except OSError:
            return None
        return status.st_dev, status.st_ino

    def in_the_child() -> str:
        still_open = [fd for fd, key in free if memfd_of(fd) == key]
        try:
            frame.view()[:4] = b'CHLD'
        except ForkedProcessError as error:
            frame.close()  # allowed: this process's descriptor only
            with SharedBuffer.allocate(1 << 20) as own:  # its own pool works
                own.view()[:4] = b'MINE'
            return f'{still_open} {error}'
        return 'written'

    code, said = in_child(in_the_child)
    assert code == 0, said
    assert said.startswith('[] ') and 'is shared memory of the parent of process' in said, said
    assert bytes(frame.view()[:4]) == b'PPPP'
    frame.close()
