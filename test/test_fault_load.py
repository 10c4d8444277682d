"""Overload (issue 4, guarantee 7): more calls than workers, streams that
stay open, and a limit on concurrent calls.

A call is either served or, above ``maximum_concurrent_rpcs``, rejected at
once with RESOURCE_EXHAUSTED; it is never left waiting in a queue without
bound. Every call here has a 30 s deadline, so a call that was queued instead
of rejected would fail with ``IPCTimeoutError``, not ``IPCRemoteError``.

Note: the echo server's streaming handlers are ``async def``; they run on the
event loop and hold no worker thread, which is what
:func:`test_open_streams_do_not_starve_other_calls` shows.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
import time

import grpc
import pytest

from conftest import ServerProcess
from vyra_base_ipc import IPCError, IPCHandler, IPCRemoteError, SyncIPCHandler

pytestmark = pytest.mark.fault

LONG = 30.0


class HeldStream:
    """A ``Chat`` (or ``ChatSync``) stream kept open by this test until :meth:`finish`."""

    def __init__(self, client: IPCHandler, echo, name: str, method: str = 'Chat') -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._echo = echo
        self.name = name
        self.replies = client.stream_method(method, self._requests())

    async def _requests(self) -> AsyncIterator[object]:
        while (request := await self._queue.get()) is not None:
            yield request

    async def open(self) -> None:
        """Send one message and wait for its reply: the handler is running."""
        await self._queue.put(self._echo.pb.EchoRequest(text=self.name))
        reply = await self.replies.__anext__()
        assert reply.text == self.name.upper()

    async def finish(self) -> None:
        """End the request stream; the call then ends normally."""
        await self._queue.put(None)
        async for _ in self.replies:
            raise AssertionError('no reply expected after the stream ended')


async def outcome(call: Awaitable[object]) -> object:
    """The reply of ``call``, or the :class:`IPCError` it raised."""
    try:
        return await call
    except IPCError as error:
        return error


def is_rejected(result: object) -> bool:
    return isinstance(result, IPCRemoteError) and result.code is grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.asyncio
async def test_more_sync_calls_than_workers_are_all_served(
        start_server: Callable[..., ServerProcess], socket_path: Path, echo) -> None:
    await asyncio.to_thread(start_server, socket_path, '--max-workers', '2')
    async with IPCHandler(socket_path, echo.Stub, timeout=LONG) as client:
        replies = await asyncio.gather(*(
            client.call_method('EchoSync', echo.pb.EchoRequest(text=str(i))) for i in range(64)))
    assert [reply.text for reply in replies] == [str(i) for i in range(64)]


@pytest.mark.asyncio
async def test_open_streams_do_not_starve_other_calls(
        start_server: Callable[..., ServerProcess], socket_path: Path, echo) -> None:
    await asyncio.to_thread(start_server, socket_path, '--max-workers', '2')
    async with IPCHandler(socket_path, echo.Stub, timeout=LONG) as client:
        streams = [HeldStream(client, echo, f'stream {i}') for i in range(8)]
        await asyncio.gather(*(stream.open() for stream in streams))
        # Four times as many open streams as worker threads, and still:
        replies = await asyncio.gather(*(
            client.call_method(method, echo.pb.EchoRequest(text=method))
            for method in ('EchoSync', 'Echo', 'EchoSync', 'Echo')))
        assert [reply.text for reply in replies] == ['EchoSync', 'Echo', 'EchoSync', 'Echo']
        await asyncio.gather(*(stream.finish() for stream in streams))


@pytest.mark.asyncio
async def test_calls_beyond_the_concurrency_limit_are_rejected_at_once(
        start_server: Callable[..., ServerProcess], socket_path: Path, echo) -> None:
    await asyncio.to_thread(start_server, socket_path, '--maximum-concurrent-rpcs', '4',
                            '--max-workers', '2')
    async with IPCHandler(socket_path, echo.Stub, timeout=LONG) as client:
        streams = [HeldStream(client, echo, f'stream {i}') for i in range(4)]
        await asyncio.gather(*(stream.open() for stream in streams))

        # The limit is reached: every further call is rejected, none waits.
        results = await asyncio.gather(*(
            outcome(client.call_method(method, echo.pb.EchoRequest(text=str(i))))
            for i, method in enumerate(['Echo', 'EchoSync'] * 10)))
        assert all(is_rejected(result) for result in results), results
        assert results[0].details, 'the rejection says why'

        def sync_call() -> object:
            with SyncIPCHandler(socket_path, echo.Stub, timeout=LONG) as sync_client:
                try:
                    return sync_client.call_method('Echo', echo.pb.EchoRequest(text='sync'))
                except IPCError as error:
                    return error
        assert is_rejected(await asyncio.to_thread(sync_call))

        # Load drops: the streams end, and calls are served again.
        await asyncio.gather(*(stream.finish() for stream in streams))
        # The server counts a call as finished a moment after its client saw
        # the end, so the first call after may still be rejected; it must not wait.
        deadline = time.monotonic() + LONG
        again = echo.pb.EchoRequest(text='again')
        while is_rejected(result := await outcome(client.call_method('Echo', again))):
            assert time.monotonic() < deadline, 'still rejected after the load dropped'
            await asyncio.sleep(0.01)
        assert getattr(result, 'text', None) == 'again', result
        replies = await asyncio.gather(*(
            client.call_method('EchoSync', echo.pb.EchoRequest(text=str(i))) for i in range(4)))
        assert [reply.text for reply in replies] == ['0', '1', '2', '3']


@pytest.mark.asyncio
async def test_streams_holding_every_worker_leave_a_bounded_queue_and_fast_rejections(
        start_server: Callable[..., ServerProcess], socket_path: Path, echo, lane: str) -> None:
    await asyncio.to_thread(start_server, socket_path, '--maximum-concurrent-rpcs', '3',
                            '--max-workers', '2')
    async with IPCHandler(socket_path, echo.Stub, timeout=LONG, lane=lane) as client:
        # Two def streams: each holds one of the two worker threads while open.
        streams = [HeldStream(client, echo, f'held {i}', 'ChatSync') for i in range(2)]
        await asyncio.gather(*(stream.open() for stream in streams))
        # A def call now waits for a worker: the one place a call queues, and
        # the concurrency limit bounds it...
        def queue() -> asyncio.Future[object]:
            return asyncio.ensure_future(client.call_method('EchoSync', echo.pb.EchoRequest(text='queued')))
        queued = queue()
        await asyncio.sleep(0)  # let it go out first
        deadline = time.monotonic() + LONG
        # ...so, once it is counted, any further call is rejected at once.
        while not is_rejected(result := await outcome(
                client.call_method('Echo', echo.pb.EchoRequest(text='more')))):
            assert getattr(result, 'text', None) == 'more', result  # not counted yet: served
            if queued.done():  # the probe overtook it and took the last slot: queue it again
                assert is_rejected(await outcome(queued))
                queued = queue()
                await asyncio.sleep(0)
            assert time.monotonic() < deadline, 'the queued call was never counted'
            await asyncio.sleep(0.01)
        assert not queued.done()
        await asyncio.gather(*(stream.finish() for stream in streams))
        assert (await queued).text == 'queued'
        replies = await asyncio.gather(*(
            client.call_method('EchoSync', echo.pb.EchoRequest(text=str(i))) for i in range(3)))
        assert [reply.text for reply in replies] == ['0', '1', '2']


@pytest.mark.asyncio
async def test_a_burst_beyond_the_limit_is_served_or_rejected_never_left_waiting(
        start_server: Callable[..., ServerProcess], socket_path: Path, echo) -> None:
    await asyncio.to_thread(start_server, socket_path, '--maximum-concurrent-rpcs', '8',
                            '--max-workers', '2')
    async with IPCHandler(socket_path, echo.Stub, timeout=LONG) as client:
        burst = [client.call_method('Sleep', echo.pb.SleepRequest(seconds=0.5)) for _ in range(50)]
        burst += [client.call_method('EchoSync', echo.pb.EchoRequest(text=str(i))) for i in range(50)]
        results = await asyncio.gather(*(outcome(call) for call in burst))
        served = [r for r in results if not isinstance(r, BaseException)]
        rejected = [r for r in results if is_rejected(r)]
        # Nothing else: in particular no IPCTimeoutError from a call kept waiting.
        assert len(served) + len(rejected) == len(results), [
            r for r in results if isinstance(r, BaseException) and not is_rejected(r)]
        assert served and rejected
        print(f'burst of {len(results)} against a limit of 8: {len(served)} served, '
              f'{len(rejected)} rejected')
