"""A client process for the soak test: connects, calls, disconnects, again.

Makes CALLS calls to the echo server on SOCKET_PATH in sessions of
``--session`` calls. Each session opens a new handler, alternately a
SyncIPCHandler (calls from four threads at once) and an IPCHandler in a
fresh event loop (eight calls at once), on the gRPC lane and on the fast
lane in turn, and closes it at the end; no other
handler of the socket is open in this process then, so every session is a
new connection. Every reply is checked. Prints one JSON line
``{"calls": N, "sessions": S}`` and exits 0; any failure exits non-zero.

Usage: fault_soak_client.py SOCKET_PATH CALLS [--session N]
"""

from __future__ import annotations

import argparse
import asyncio
from concurrent.futures import ThreadPoolExecutor
import json
from typing import Any

from vyra_ipc_test import echo_pb2, echo_pb2_grpc

from vyra_base_ipc import IPCHandler, SyncIPCHandler
from vyra_base_ipc._pool import aio_pool, sync_pool

TIMEOUT = 30.0


def plan(first: int, count: int) -> list[tuple[str, Any, Any]]:
    """Calls ``first .. first+count-1``: (method, request, expected check value)."""
    calls = []
    for number in range(first, first + count):
        text = f'soak {number}'
        kind = number % 10
        if kind < 5:
            calls.append(('Echo', echo_pb2.EchoRequest(text=text, payload=b'p' * (number % 512)), text))
        elif kind < 8:
            calls.append(('EchoSync', echo_pb2.EchoRequest(text=text), text))
        elif kind == 8:
            calls.append(('Count', echo_pb2.CountRequest(count=3), [0, 1, 2]))
        else:
            calls.append(('Collect', [echo_pb2.EchoRequest(text=text), echo_pb2.EchoRequest(text='x')],
                          f'{text},x'))
    return calls


def check(method: str, reply: Any, expected: Any) -> None:
    got = [r.index for r in reply] if method == 'Count' else reply.text
    if got != expected:
        raise AssertionError(f'{method}: expected {expected!r}, got {got!r}')


def sync_session(socket_path: str, calls: list[tuple[str, Any, Any]], lane: str) -> None:
    with SyncIPCHandler(socket_path, echo_pb2_grpc.EchoServiceStub, timeout=TIMEOUT, lane=lane) as client:
        def one(call: tuple[str, Any, Any]) -> None:
            method, request, expected = call
            if method == 'Count':
                reply = list(client.stream_method(method, request))
            elif method == 'Collect':
                reply = client.call_method(method, iter(request))
            else:
                reply = client.call_method(method, request)
            check(method, reply, expected)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, calls))
    assert sync_pool.open_connections() == 0


async def async_session(socket_path: str, calls: list[tuple[str, Any, Any]], lane: str) -> None:
    async with IPCHandler(socket_path, echo_pb2_grpc.EchoServiceStub, timeout=TIMEOUT,
                          lane=lane) as client:
        async def one(call: tuple[str, Any, Any]) -> None:
            method, request, expected = call
            if method == 'Count':
                reply = [r async for r in client.stream_method(method, request)]
            elif method == 'Collect':
                reply = await client.call_method(method, iter(request))
            else:
                reply = await client.call_method(method, request)
            check(method, reply, expected)
        for start in range(0, len(calls), 8):
            await asyncio.gather(*(one(call) for call in calls[start:start + 8]))
    assert aio_pool.open_connections() == 0


def run_sessions(socket_path: str, total: int, *, first: int = 0, session: int = 200) -> int:
    """Make ``total`` calls in sessions of ``session`` calls; return the number
    of sessions. Sessions take turns: sync and async, on both lanes."""
    done = sessions = 0
    while done < total:
        calls = plan(first + done, min(session, total - done))
        lane = ('grpc', 'ttrpc')[(sessions // 2) % 2]
        if sessions % 2 == 0:
            sync_session(socket_path, calls, lane)
        else:
            asyncio.run(async_session(socket_path, calls, lane))
        done += len(calls)
        sessions += 1
    return sessions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('socket_path')
    parser.add_argument('calls', type=int)
    parser.add_argument('--session', type=int, default=200)
    options = parser.parse_args()
    sessions = run_sessions(options.socket_path, options.calls, session=options.session)
    print(json.dumps({'calls': options.calls, 'sessions': sessions}))


if __name__ == '__main__':
    main()
