"""Client drivers: one per kind of client the benchmark measures.

A driver opens its client against the addresses of the running servers, and
turns a payload into a *call*: a function (sync drivers) or coroutine function
(async drivers) without arguments that makes one round trip and returns the
reply's payload length. :meth:`roundtrip` returns the reply's bytes, to check
once per row that the payload came back intact.
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
