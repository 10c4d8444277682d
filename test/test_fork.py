"""A child process that inherits a parent's client gets a fresh channel, never
a deadlock (issue 4, guarantee 12)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from conftest import ServerProcess
from vyra_base_ipc import IPCHandler, SyncIPCHandler
from vyra_base_ipc.channel_pool import sync_pool

pytestmark = pytest.mark.fault


def in_child(action) -> int:
    """Run ``action`` in a forked child; its exit status (0 = passed). The
    child is killed by SIGALRM after 20 s, so a deadlock fails, never hangs."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        signal.alarm(20)
        try:
            message = str(action())
            code = 0
        except BaseException as error:
            message, code = f'{type(error).__name__}: {error}', 1
        os.write(write_end, message.encode())
        os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end, 'rb') as result:
        in_child.output = result.read().decode()
    return os.waitstatus_to_exitcode(status)


def test_inherited_sync_client_opens_a_fresh_channel_in_the_child(server: ServerProcess, echo) -> None:
    with SyncIPCHandler(server.socket_path, echo.Stub) as client:
        assert client.call_method('Echo', echo.pb.EchoRequest(text='parent')).text == 'parent'

        def child() -> str:
            reply = client.call_method('Echo', echo.pb.EchoRequest(text='child')).text
            return f'{reply} {sync_pool.open_channels()}'
        assert in_child(child) == 0, in_child.output
        assert in_child.output == 'child 1'  # the child's own channel
        assert client.call_method('Echo', echo.pb.EchoRequest(text='again')).text == 'again'


def test_async_client_in_a_forked_child(server: ServerProcess, echo) -> None:
    handler = IPCHandler(server.socket_path, echo.Stub)

    async def call(text: str) -> str:
        async with handler:
            return (await handler.call_method('Echo', echo.pb.EchoRequest(text=text))).text
    assert asyncio.run(call('parent')) == 'parent'
    assert in_child(lambda: asyncio.run(call('child'))) == 0, in_child.output
    assert in_child.output == 'child'
