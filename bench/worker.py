"""A measuring client process: ``python -m bench.worker SPEC``.

``SPEC`` is JSON: ``{"transport": {...}, "addresses": {...}, "cases":
[{"payload_bytes", "concurrency", "calls", "warmup"}, ...]}``. The worker
opens one client of the transport's driver, checks once per payload that the
reply equals the request, measures every case in order, and prints one JSON
line: ``{"results": [case + summary, ...]}``. Failures go to stderr with a
non-zero exit status.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from .drivers import load_driver
from .measure import measure_async, measure_sync
from .payloads import make_payload
from .stats import summarize

__all__ = ['main', 'run_spec']


def _verify(payload: bytes, reply: bytes, key: str) -> None:
    if reply != payload:
        raise RuntimeError(f'{key}: reply of {len(reply)} bytes differs from the '
                           f'{len(payload)}-byte request')


def _run_sync(driver: Any, key: str, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    driver.open()
    try:
        for case in cases:
            if case['concurrency'] != 1:
                raise ValueError(f'{key} is synchronous: concurrency must be 1')
            payload = make_payload(case['payload_bytes'])
            _verify(payload, driver.roundtrip(payload), key)
            sample = measure_sync(driver.echo(payload), len(payload), case['calls'], case['warmup'])
            results.append({**case, **summarize(sample, len(payload))})
    finally:
        driver.close()
    return results


async def _run_async(driver: Any, key: str, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    await driver.open()
    try:
        for case in cases:
            payload = make_payload(case['payload_bytes'])
            _verify(payload, await driver.roundtrip(payload), key)
            sample = await measure_async(driver.echo(payload), len(payload), case['calls'],
                                         case['warmup'], case['concurrency'])
            results.append({**case, **summarize(sample, len(payload))})
    finally:
        await driver.close()
    return results


def run_spec(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Measure every case of ``spec`` in this process; see the module docstring."""
    transport = spec['transport']
    driver = load_driver(transport['client'])(spec['addresses'], transport)
    if driver.asynchronous:
        return asyncio.run(_run_async(driver, transport['key'], spec['cases']))
    return _run_sync(driver, transport['key'], spec['cases'])


def main() -> None:
    """``python -m bench.worker SPEC``, as the module docstring says."""
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(json.dumps({'results': run_spec(json.loads(sys.argv[1]))}), flush=True)


if __name__ == '__main__':
    main()
