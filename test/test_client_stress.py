"""The clients under concurrency: many threads or tasks on one handler, with
disconnect() and cancellation racing their calls. Every answer belongs to
its own call; every failure is a documented error; the process survives.

Bounded: each test makes a few hundred calls against one server process."""

from __future__ import annotations

import asyncio
import collections
from concurrent.futures import ThreadPoolExecutor
import json
import random
import subprocess
import sys
from typing import Any

import pytest

from conftest import LONG, ServerProcess
from vyra_base_ipc import IPCError, IPCHandler, IPCUnavailableError, SyncIPCHandler

#: A process whose four threads call Echo on one SyncIPCHandler (lane argv[2],
#: server argv[1]) while its main thread disconnects that handler 300 times;
#: prints (JSON) what the calls ended with (each may have failed: a connect can
#: take longer than the 1 ms between disconnects), the answers that were not
#: their own call's, and the answer to one more call.
CALLS_RACING_DISCONNECT = """
import json, sys, threading
from vyra_base_ipc import IPCUnavailableError, SyncIPCHandler
from vyra_ipc_test import echo_pb2, echo_pb2_grpc

ipc = SyncIPCHandler(sys.argv[1], echo_pb2_grpc.EchoServiceStub, lane=sys.argv[2], timeout=10)
stop = threading.Event()
outcomes, wrong = set(), []

def calls(index):
    for round_ in range(100_000):
        if stop.is_set():
            return
        token = f'{index}.{round_}'
        try:
            text = ipc.call_method('Echo', echo_pb2.EchoRequest(text=token)).text
        except IPCUnavailableError as error:
            outcomes.add('closed' if 'was closed' in str(error) else str(error))
        else:
            outcomes.add('answered')
            if text != token:
                wrong.append((token, text))
threads = [threading.Thread(target=calls, args=(index,)) for index in range(4)]
for thread in threads:
    thread.start()
for _ in range(300):
    stop.wait(0.001)
    ipc.disconnect()
stop.set()
for thread in threads:
    thread.join()
print(json.dumps({'outcomes': sorted(outcomes), 'wrong': wrong,
                  'last': ipc.call_method('Echo', echo_pb2.EchoRequest(text='last')).text}))
ipc.disconnect()
"""


def test_sync_calls_racing_disconnect_on_the_grpc_lane_answer_or_fail_as_closed(
        server: ServerProcess, child_env: dict[str, str]) -> None:
    # Found: the process died of SIGSEGV within a second. A thread's first
    # call on a channel made grpc (1.85) make the method's callable, which
    # crashes on a channel that disconnect() in another thread had closed.
    result = subprocess.run([sys.executable, '-c', CALLS_RACING_DISCONNECT, str(server.socket_path), 'grpc'],
                            capture_output=True, text=True, timeout=LONG, env=child_env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert set(report['outcomes']) <= {'answered', 'closed'} and report['wrong'] == [], report
    assert report['last'] == 'last'  # (and the handler still works)


# -- cross-talk under cancellation ------------------------------------------------------

#: Calls per test, and how many run at once.
CALLS, AT_ONCE = 600, 60


class Tally:
    """What the calls of a run ended with; ``wrong``: answers or stream
    messages that were not their own call's (must stay empty)."""

    def __init__(self) -> None:
        self.wrong: list[tuple[str, object]] = []
        self.ended: collections.Counter[str] = collections.Counter()

    def check(self, expected: object, got: object) -> None:
        if got != expected:
            self.wrong.append((str(expected), got))

    def failed(self, error: BaseException) -> None:
        """A call's failure: documented (an IPCError) or not (kept as wrong)."""
        if isinstance(error, IPCError):
            self.ended[type(error).__name__] += 1
        else:
            self.wrong.append(('an IPCError', repr(error)))


async def _one_async_call(ipc: IPCHandler, echo: Any, token: str, kind: int, tally: Tally) -> None:
    if kind == 0:
        reply = await ipc.call_method('Echo', echo.pb.EchoRequest(text=token), timeout=10)
        tally.check(token, reply.text)
    elif kind == 1:  # a tiny deadline: answered or timed out
        reply = await ipc.call_method('EchoSync', echo.pb.EchoRequest(text=token), timeout=0.002)
        tally.check(token, reply.text)
    elif kind == 2:  # a bidirectional stream, left after its third answer
        texts = [f'{token}-{index}' for index in range(6)]
        stream = ipc.stream_method('Chat', iter(echo.pb.EchoRequest(text=text) for text in texts), timeout=10)
        index = 0
        async for reply in stream:
            tally.check(texts[index].upper(), reply.text)
            index += 1
            if index == 3:
                break
        await stream.aclose()
    elif kind == 3:  # a response stream read to its end
        stream = ipc.stream_method('Count', echo.pb.CountRequest(count=int(token.rpartition('.')[2]) % 9 + 1),
                                   timeout=10)
        tally.check(list(range(int(token.rpartition('.')[2]) % 9 + 1)), [reply.index async for reply in stream])
    else:  # a client stream
        texts = [f'{token}-{index}' for index in range(4)]
        reply = await ipc.call_method('Collect', iter(echo.pb.EchoRequest(text=text) for text in texts), timeout=10)
        tally.check(','.join(texts), reply.text)


@pytest.mark.asyncio
@pytest.mark.parametrize('lane', ['auto', 'grpc', 'ttrpc'])
async def test_concurrent_async_calls_cancelled_at_random_points_get_only_their_own_answers(
        server: ServerProcess, echo: Any, lane: str) -> None:
    """Calls, streams left early and client streams from 60 tasks at once on
    one handler, a third of them cancelled after a random number of loop
    passes (before sending, while sending, waiting or reading): every answer
    and stream message is its own call's, every failure an IPCError, and the
    handler serves on."""
    rng = random.Random(7)  # the same mix and cancel points every run
    tally = Tally()
    async with IPCHandler(server.socket_path, echo.Stub, lane=lane) as ipc:
        async def one(index: int) -> None:
            call = asyncio.ensure_future(_one_async_call(ipc, echo, f'{lane}.{index}', index % 5, tally))
            cancel_after = rng.randrange(12) if rng.random() < 0.33 else None
            for _ in range(cancel_after or 0):
                await asyncio.sleep(0)
            if cancel_after is not None:
                call.cancel()
            try:
                await call
            except asyncio.CancelledError:
                if cancel_after is None:
                    tally.wrong.append(('not cancelled', index))
                tally.ended['cancelled'] += 1
            except Exception as error:
                tally.failed(error)
            else:
                tally.ended['answered'] += 1
        for first in range(0, CALLS, AT_ONCE):
            await asyncio.wait_for(asyncio.gather(*(one(index) for index in range(first, first + AT_ONCE))), LONG)
        assert (await ipc.call_method('Echo', echo.pb.EchoRequest(text='after'))).text == 'after'
    assert tally.wrong == [], tally.wrong[:10]
    assert tally.ended['answered'] > 0 and tally.ended['cancelled'] > 0, tally.ended


def _one_sync_call(ipc: SyncIPCHandler, echo: Any, token: str, kind: int, tally: Tally) -> None:
    try:
        if kind == 0:
            tally.check(token, ipc.call_method('Echo', echo.pb.EchoRequest(text=token), timeout=10).text)
        elif kind == 1:  # a tiny deadline: answered or timed out
            tally.check(token, ipc.call_method('EchoSync', echo.pb.EchoRequest(text=token), timeout=0.002).text)
        elif kind == 2:  # a bidirectional stream, left after its third answer
            texts = [f'{token}-{index}' for index in range(6)]
            stream = ipc.stream_method('Chat', iter(echo.pb.EchoRequest(text=text) for text in texts), timeout=10)
            for index, reply in enumerate(stream):
                tally.check(texts[index].upper(), reply.text)
                if index == 2:
                    break
            stream.close()
        elif kind == 3:  # a response stream with a deadline that may pass while it is read
            stream = ipc.stream_method('Count', echo.pb.CountRequest(count=20), timeout=0.005)
            tally.check(list(range(20)), [reply.index for reply in stream])
        else:  # a client stream
            texts = [f'{token}-{index}' for index in range(4)]
            reply = ipc.call_method('Collect', iter(echo.pb.EchoRequest(text=text) for text in texts), timeout=10)
            tally.check(','.join(texts), reply.text)
    except Exception as error:
        tally.failed(error)
    else:
        tally.ended['answered'] += 1


@pytest.mark.parametrize('lane', ['auto', 'grpc', 'ttrpc'])
def test_concurrent_sync_calls_with_tiny_deadlines_get_only_their_own_answers(
        server: ServerProcess, echo: Any, lane: str) -> None:
    """One SyncIPCHandler shared by 16 threads (readers hand answers to each
    other on the fast lane), with deadlines that pass mid-call and streams
    left early: every answer and stream message is its own call's, every
    failure an IPCError, and the handler serves on."""
    tally = Tally()
    ipc = SyncIPCHandler(server.socket_path, echo.Stub, lane=lane)
    try:
        with ThreadPoolExecutor(16) as threads:
            list(threads.map(lambda index: _one_sync_call(ipc, echo, f'{lane}.{index}', index % 5, tally),
                             range(CALLS), timeout=LONG))
        assert ipc.call_method('Echo', echo.pb.EchoRequest(text='after')).text == 'after'
    finally:
        ipc.disconnect()
    assert tally.wrong == [], tally.wrong[:10]
    assert tally.ended['answered'] > 0, tally.ended


@pytest.mark.asyncio
@pytest.mark.parametrize('shape', ['call', 'stream'])
async def test_an_async_grpc_lane_call_on_a_channel_disconnect_closed_fails_as_closed(
        server: ServerProcess, echo: Any, shape: str) -> None:
    # Found in a stress run (200 tasks, disconnect() among them): a response
    # stream whose first attempt failed as the server came back is started
    # again on the lane it had (see GrpcLane.stream); disconnect() by another
    # task had closed its channel meanwhile, and grpc.aio's UsageError
    # "Channel is closed." reached the caller. Here the lane is taken, as a
    # call does, then closed under it.
    ipc = IPCHandler(server.socket_path, echo.Stub, lane='grpc')
    lane = await ipc._lane(None, False)  # what a call holds between its attempts
    await ipc.disconnect()
    info = ipc._method('Count' if shape == 'stream' else 'Echo', response_streaming=shape == 'stream')
    with pytest.raises(IPCUnavailableError, match='was closed'):
        if shape == 'stream':
            async for _ in lane.stream(info, echo.pb.CountRequest(count=1), timeout=None):
                pass
        else:
            await lane.call(info, echo.pb.EchoRequest(text='closed'), timeout=None)
    assert (await ipc.call_method('Echo', echo.pb.EchoRequest(text='again'))).text == 'again'
    await ipc.disconnect()
