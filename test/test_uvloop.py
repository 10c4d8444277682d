"""IPCHandler on uvloop (what uvicorn runs): the fast lane's asyncio client
is first-class there too. Every call shape, deadlines, leaving and
cancelling calls, concurrent calls, against a real server process.

uvloop implements the loop in C (libuv), so what the client relies on of
a loop (``add_reader`` on its own socket, futures, timers, ``sock_connect``)
is exercised here on a second implementation.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, TypeVar

import grpc
import pytest

from conftest import ServerProcess
from vyra_base_ipc import IPCHandler, IPCTimeoutError

uvloop = pytest.importorskip('uvloop')

_T = TypeVar('_T')


def on_uvloop(main: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``main()`` on a new uvloop loop; assert it is one."""
    loop = uvloop.new_event_loop()
    try:
        async def checked() -> _T:
            assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
            return await main()
        return loop.run_until_complete(checked())
    finally:
        loop.close()


def test_every_call_shape_on_the_fast_lane(server: ServerProcess, echo: Any) -> None:
    async def main() -> tuple[Any, ...]:
        async with IPCHandler(server.socket_path, echo.Stub, lane='ttrpc') as ipc:
            unary = await ipc.call_method('Echo', echo.pb.EchoRequest(text='hello'), timeout=10)
            counted = [reply.index async for reply in ipc.stream_method('Count', echo.pb.CountRequest(count=5))]

            async def requests() -> Any:
                for text in ('a', 'b', 'c'):
                    yield echo.pb.EchoRequest(text=text)
            collected = await ipc.call_method('Collect', requests())
            chat = [(reply.text, reply.index) async for reply in ipc.stream_method(
                'Chat', iter([echo.pb.EchoRequest(text='x'), echo.pb.EchoRequest(text='y')]))]
            return unary.text, counted, (collected.text, collected.index), chat, ipc.lane_in_use

    assert on_uvloop(main) == ('hello', [0, 1, 2, 3, 4], ('a,b,c', 3), [('X', 0), ('Y', 1)], 'ttrpc')


def test_deadline_and_the_next_call(server: ServerProcess, echo: Any) -> None:
    async def main() -> tuple[Any, str]:
        async with IPCHandler(server.socket_path, echo.Stub, lane='ttrpc') as ipc:
            with pytest.raises(IPCTimeoutError) as error:
                await ipc.call_method('Sleep', echo.pb.SleepRequest(seconds=5), timeout=0.2)
            after = await ipc.call_method('Echo', echo.pb.EchoRequest(text='after'), timeout=10)
            return error.value.code, after.text

    assert on_uvloop(main) == (grpc.StatusCode.DEADLINE_EXCEEDED, 'after')


def test_leaving_a_stream_and_cancelling_a_call(server: ServerProcess, echo: Any) -> None:
    async def main() -> tuple[int, bool, str]:
        async with IPCHandler(server.socket_path, echo.Stub, lane='ttrpc') as ipc:
            async for reply in ipc.stream_method('Count', echo.pb.CountRequest(count=1_000_000)):  # noqa: B007 (read after the loop)
                break
            task = asyncio.ensure_future(ipc.call_method('Sleep', echo.pb.SleepRequest(seconds=30)))
            await asyncio.sleep(0.05)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            after = await ipc.call_method('Echo', echo.pb.EchoRequest(text='next'), timeout=10)
            return reply.index, task.cancelled(), after.text

    assert on_uvloop(main) == (0, True, 'next')


def test_concurrent_calls_share_one_connection(server: ServerProcess, echo: Any) -> None:
    async def main() -> list[str]:
        async with IPCHandler(server.socket_path, echo.Stub, lane='ttrpc') as ipc:
            replies = await asyncio.gather(*(
                ipc.call_method('Echo', echo.pb.EchoRequest(text=f'call-{index}'), timeout=10)
                for index in range(64)))
            return [reply.text for reply in replies]

    assert on_uvloop(main) == [f'call-{index}' for index in range(64)]
