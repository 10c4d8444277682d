"""The timing loops: a fixed number of calls after a fixed warm-up, each call
timed on its own with ``perf_counter_ns``.

A call is a function (or coroutine function) taking no arguments that makes
one round trip and returns the length of the reply's payload; every reply is
checked against the request's length, so a transport that drops or truncates
data fails the run instead of looking fast.
"""

from __future__ import annotations

import asyncio
import gc
from time import perf_counter_ns
from typing import Awaitable, Callable

from .stats import Sample

__all__ = ['measure_async', 'measure_sync']

SyncCall = Callable[[], int]
AsyncCall = Callable[[], Awaitable[int]]


def _check(length: int, expected: int) -> None:
    if length != expected:
        raise RuntimeError(f'reply carried {length} bytes, expected {expected}')


def measure_sync(call: SyncCall, expected: int, calls: int, warmup: int) -> Sample:
    """Run ``warmup`` untimed calls, then ``calls`` timed ones, one at a time."""
    for _ in range(warmup):
        _check(call(), expected)
    # Start every row from the same heap state; a collection that falls
    # inside the timed calls is part of what Python clients really pay.
    gc.collect()
    latencies = [0] * calls
    begin = perf_counter_ns()
    for index in range(calls):
        start = perf_counter_ns()
        length = call()
        latencies[index] = perf_counter_ns() - start
        _check(length, expected)
    return Sample(latencies, perf_counter_ns() - begin)


async def measure_async(call: AsyncCall, expected: int, calls: int, warmup: int,
                        concurrency: int = 1) -> Sample:
    """Run ``warmup`` untimed calls, then ``calls`` timed ones with
    ``concurrency`` of them in flight at any time (each of ``concurrency``
    tasks makes calls back to back until the count is used up)."""
    if concurrency < 1:
        raise ValueError(f'concurrency must be at least 1, not {concurrency}')
    await _run(call, expected, warmup, concurrency, None)
    gc.collect()
    latencies: list[int] = []
    begin = perf_counter_ns()
    await _run(call, expected, calls, concurrency, latencies)
    return Sample(latencies, perf_counter_ns() - begin)


async def _run(call: AsyncCall, expected: int, calls: int, concurrency: int,
               latencies: list[int] | None) -> None:
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = perf_counter_ns()
            length = await call()
            if latencies is not None:
                latencies.append(perf_counter_ns() - start)
            _check(length, expected)

    if concurrency == 1:
        await worker()  # no task switch on the sequential path
    else:
        await asyncio.gather(*(worker() for _ in range(min(concurrency, max(calls, 1)))))
