"""Time to the first successful call from a cold client: every run a fresh
process that imports its client, connects (IPC: channel and health check;
ROS 2: init, node, discovery via ``wait_for_service``) and makes one 64-byte
call.

Child: ``python -m bench.coldstart SPEC`` (``{"transport", "addresses"}``)
prints the ``time.monotonic()`` of each step, a clock shared by all
processes of the machine, so the parent can add the interpreter's own start.
"""

import time

_STARTED = time.monotonic()  # before any other import: the child's own start

import asyncio  # noqa: E402 - after the clock on purpose
import json  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

__all__ = ['COLD_START_CLIENTS', 'main', 'summarize_runs']

#: Transports measured from a cold start (one of each client kind).
COLD_START_CLIENTS = ('socket-uds', 'grpc-aio-uds', 'ipc-sync-grpc', 'ipc-aio-grpc', 'ipc-sync-ttrpc',
                      'ipc-aio-ttrpc', 'rclpy-dds')


def _measure(spec: dict[str, Any]) -> dict[str, float]:
    from bench.drivers import load_driver
    from bench.payloads import make_payload

    transport = spec['transport']
    payload = make_payload(64)
    driver = load_driver(transport['client'])(spec['addresses'], transport)
    marks = {'started': _STARTED, 'imported': time.monotonic()}

    async def run_async() -> bytes:
        await driver.open()
        marks['connected'] = time.monotonic()
        try:
            return await driver.roundtrip(payload)
        finally:
            marks['replied'] = time.monotonic()
            await driver.close()

    if driver.asynchronous:
        reply = asyncio.run(run_async())
    else:
        driver.open()
        marks['connected'] = time.monotonic()
        try:
            reply = driver.roundtrip(payload)
        finally:
            marks['replied'] = time.monotonic()
            driver.close()
    if reply != payload:
        raise RuntimeError(f'{transport["key"]}: the first reply differs from the request')
    return marks


def summarize_runs(key: str, spawned: list[float], marks: list[dict[str, float]]) -> dict[str, Any]:
    """Median and worst of each phase over the runs of one transport, in ms.

    ``total_ms`` runs from ``Popen`` to the first reply (interpreter start and
    imports included); ``first_reply_ms`` from a constructed client to its first
    reply (connect or discovery, plus the call).
    """
    def phase(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {'p50': round(ordered[(len(ordered) - 1) // 2] * 1e3, 1),
                'max': round(ordered[-1] * 1e3, 1)}
    return {
        'transport': key,
        'runs': len(marks),
        'total_ms': phase([m['replied'] - s for s, m in zip(spawned, marks, strict=True)]),
        'import_ms': phase([m['imported'] - m['started'] for m in marks]),
        'connect_ms': phase([m['connected'] - m['imported'] for m in marks]),
        'first_reply_ms': phase([m['replied'] - m['imported'] for m in marks]),
    }


def main() -> None:
    """The child: connect and call as the JSON spec in ``sys.argv[1]`` says,
    print the time of each step as one JSON line."""
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(json.dumps(_measure(json.loads(sys.argv[1]))), flush=True)


if __name__ == '__main__':
    main()
