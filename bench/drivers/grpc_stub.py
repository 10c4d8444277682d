"""Bare grpcio: the generated stub on a channel of its own, no wrapper; the
message size limit raised to 16 MiB as 10 MiB payloads need. No deadline
unless the transport's options give one (``{"timeout": seconds}``), so the
cost of a deadline can be measured on its own."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import grpc

__all__ = ['GrpcAioDriver', 'GrpcSyncDriver']

_OPTIONS = (('grpc.max_send_message_length', 16 * 1024 * 1024),
            ('grpc.max_receive_message_length', 16 * 1024 * 1024))


def _target(addresses: dict[str, Any], transport: dict[str, Any]) -> str:
    if transport.get('address') == 'tcp':
        return addresses['tcp']
    return f'unix:{addresses["grpc"]}'


def _modules() -> tuple[Any, Any]:
    from vyra_bench import bench_pb2, bench_pb2_grpc
    return bench_pb2, bench_pb2_grpc


class GrpcSyncDriver:
    """``grpc.insecure_channel`` and ``BenchServiceStub``, blocking calls."""

    asynchronous = False

    def __init__(self, addresses: dict[str, Any], transport: dict[str, Any]) -> None:
        self._target = _target(addresses, transport)
        self._timeout = transport.get('options', {}).get('timeout')
        self._pb, self._pb_grpc = _modules()
        self._channel: grpc.Channel | None = None

    def open(self) -> None:
        self._channel = grpc.insecure_channel(self._target, options=_OPTIONS)
        grpc.channel_ready_future(self._channel).result(timeout=10)
        self._stub = self._pb_grpc.BenchServiceStub(self._channel)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def echo(self, payload: bytes) -> Callable[[], int]:
        request = self._pb.Blob(data=payload)
        method = self._stub.Echo
        timeout = self._timeout
        if timeout is not None:
            def call_with_deadline() -> int:
                return len(method(request, timeout=timeout).data)
            return call_with_deadline

        def call() -> int:
            return len(method(request).data)
        return call

    def roundtrip(self, payload: bytes) -> bytes:
        return self._stub.Echo(self._pb.Blob(data=payload)).data


class GrpcAioDriver:
    """``grpc.aio.insecure_channel`` and ``BenchServiceStub``, awaited calls."""

    asynchronous = True

    def __init__(self, addresses: dict[str, Any], transport: dict[str, Any]) -> None:
        self._target = _target(addresses, transport)
        self._timeout = transport.get('options', {}).get('timeout')
        self._pb, self._pb_grpc = _modules()
        self._channel: grpc.aio.Channel | None = None

    async def open(self) -> None:
        self._channel = grpc.aio.insecure_channel(self._target, options=_OPTIONS)
        await self._channel.channel_ready()
        self._stub = self._pb_grpc.BenchServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def echo(self, payload: bytes) -> Callable[[], Awaitable[int]]:
        request = self._pb.Blob(data=payload)
        method = self._stub.Echo
        timeout = self._timeout
        if timeout is not None:
            async def call_with_deadline() -> int:
                return len((await method(request, timeout=timeout)).data)
            return call_with_deadline

        async def call() -> int:
            return len((await method(request)).data)
        return call

    async def roundtrip(self, payload: bytes) -> bytes:
        return (await self._stub.Echo(self._pb.Blob(data=payload))).data
