"""Client drivers: one per kind of client the benchmark measures.

Every driver class has the same interface (documented here once):

- ``Driver(addresses, transport)``: a client for the running servers'
  ``addresses``, as the ``transport`` (a JSON object) describes it.
- ``asynchronous``: ``True`` for async drivers, whose ``open``, ``close``
  and ``roundtrip`` and calls are coroutine functions; ``False`` for sync
  drivers.
- ``open()``, ``close()``: connect the client, and disconnect it.
- ``echo(payload)``: the *call* for ``payload``: a function (sync drivers) or
  coroutine function (async drivers) without arguments that makes one round
  trip and returns the reply's payload length.
- ``roundtrip(payload)``: one round trip; returns the reply's bytes, to check
  once per row that the payload came back intact.
- ``begin_block()``, ``end_block()`` (optional, sync drivers): called around
  every block of calls of the interleaved sections (:mod:`bench.peers`); a
  spinning peer wakes its server in one and parks it in the other, so that it
  spins only through its own blocks.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ['DRIVERS', 'load_driver']

#: Driver name -> (module in this package, class name).
DRIVERS: dict[str, tuple[str, str]] = {
    'socket': ('socket_echo', 'SocketDriver'),
    'grpc-sync': ('grpc_stub', 'GrpcSyncDriver'),
    'grpc-aio': ('grpc_stub', 'GrpcAioDriver'),
    'ipc-sync': ('ipc', 'IpcSyncDriver'),
    'ipc-aio': ('ipc', 'IpcAioDriver'),
    'rclpy': ('ros', 'RclpyDriver'),
    'rclpy-trigger': ('ros', 'RclpyTriggerDriver'),
    'ipc-sync-shared-buffer': ('ipc', 'SharedBufferDriver'),
    'ipc-sync-shared-buffer-copy': ('ipc', 'SharedBufferDriver'),
    'zmq': ('zmq_req', 'ZmqDriver'),
    'iceoryx2': ('iceoryx2_rr', 'Iceoryx2Driver'),
    'zenoh': ('zenoh_get', 'ZenohDriver'),
    'ttrpc-minimal': ('ttrpc_minimal', 'MinimalTtrpcDriver'),
    'ttrpc-minimal-aio': ('ttrpc_minimal', 'MinimalTtrpcAioDriver'),
    'protobuf-alone': ('protobuf_alone', 'ProtobufAloneDriver'),
}


def load_driver(name: str) -> Any:
    """The driver class called ``name``; imports only that driver's module.

    :raises ValueError: for an unknown name.
    """
    try:
        module, attribute = DRIVERS[name]
    except KeyError:
        raise ValueError(f'unknown driver {name!r}; known: {", ".join(DRIVERS)}') from None
    return getattr(importlib.import_module(f'{__name__}.{module}'), attribute)
