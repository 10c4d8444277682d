"""``grpc.health.v1.Health`` for :class:`~vyra_base_ipc.IPCServer`, whose
watches end when the server shuts down.

It answers as grpc's own asyncio servicer (``grpc_health.v1.health.aio``)
does: the same statuses, NOT_FOUND for a service it does not know, every
status set to NOT_SERVING for good once shutdown begins. grpc's ``Watch``
writes with ``context.write()`` until it is cancelled, so each open watch
kept the gRPC lane's stop waiting for the whole grace, and ended CANCELLED.
This ``Watch`` is an async generator: once shutdown began it sends
NOT_SERVING and ends the stream with UNAVAILABLE "server is shutting
down", as every other response stream does, on both lanes.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ['HealthServicer']

_Response = health_pb2.HealthCheckResponse


class HealthServicer(health_pb2_grpc.HealthServicer):
    """Health statuses per service name (``''``: the server as a whole,
    SERVING from the start). Event-loop thread only."""

    def __init__(self) -> None:
        self._statuses: dict[str, int] = {'': _Response.SERVING}
        self._shutting_down = False
        self._changed: asyncio.Event | None = None  # (made on its loop by the first watch)

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> _Response:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f'unknown service {request.service!r}')
        return _Response(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> AsyncIterator[_Response]:
        last = None
        while True:
            changed = self._changed = self._changed or asyncio.Event()
            status = self._statuses.get(request.service, _Response.SERVICE_UNKNOWN)
            if status != last:
                yield _Response(status=status)  # (written when the generator resumes)
                last = status
                continue  # it may have changed while that was written: NOT_SERVING goes out first
            if self._shutting_down:
                await context.abort(grpc.StatusCode.UNAVAILABLE, 'server is shutting down')
            await changed.wait()

    async def set(self, service: str, status: int) -> None:
        """Set ``service``'s status (ignored once shutdown began)."""
        if not self._shutting_down:
            self._statuses[service] = status
            self._notify()

    async def enter_graceful_shutdown(self) -> None:
        """Set every status to NOT_SERVING for good; watches send it and end."""
        if not self._shutting_down:
            self._shutting_down = True
            self._statuses = dict.fromkeys(self._statuses, _Response.NOT_SERVING)
            self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()
