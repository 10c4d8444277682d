"""This package's clients, :class:`SyncIPCHandler` and :class:`IPCHandler`,
against :class:`IPCServer`, with the options of the row's lane."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

__all__ = ['IpcAioDriver', 'IpcSyncDriver', 'SharedBufferDriver']

#: Generous: a 10 MiB call on a loaded 2-core machine must not time out.
_TIMEOUT = 30.0


def _modules() -> tuple[Any, Any]:
    from vyra_bench import bench_pb2, bench_pb2_grpc
    return bench_pb2, bench_pb2_grpc


class IpcSyncDriver:
    """``SyncIPCHandler.call_method('Echo', ...)``."""

    asynchronous = False

    def __init__(self, addresses: dict[str, Any], transport: dict[str, Any]) -> None:
        from vyra_base_ipc import SyncIPCHandler

        self._pb, pb_grpc = _modules()
        self._handler = SyncIPCHandler(addresses['ipc'], pb_grpc.BenchServiceStub,
                                       timeout=_TIMEOUT, **transport.get('options', {}))

    def open(self) -> None:
        self._handler.connect()

    def close(self) -> None:
        self._handler.disconnect()

    def echo(self, payload: bytes) -> Callable[[], int]:
        request = self._pb.Blob(data=payload)
        call_method = self._handler.call_method

        def call() -> int:
            return len(call_method('Echo', request).data)
        return call

    def roundtrip(self, payload: bytes) -> bytes:
        return self._handler.call_method('Echo', self._pb.Blob(data=payload)).data


class IpcAioDriver:
    """``await IPCHandler.call_method('Echo', ...)``."""

    asynchronous = True

    def __init__(self, addresses: dict[str, Any], transport: dict[str, Any]) -> None:
        from vyra_base_ipc import IPCHandler

        self._pb, pb_grpc = _modules()
        self._handler = IPCHandler(addresses['ipc'], pb_grpc.BenchServiceStub,
                                   timeout=_TIMEOUT, **transport.get('options', {}))

    async def open(self) -> None:
        await self._handler.connect()

    async def close(self) -> None:
        await self._handler.disconnect()

    def echo(self, payload: bytes) -> Callable[[], Awaitable[int]]:
        request = self._pb.Blob(data=payload)
        call_method = self._handler.call_method

        async def call() -> int:
            return len((await call_method('Echo', request)).data)
        return call

    async def roundtrip(self, payload: bytes) -> bytes:
        return (await self._handler.call_method('Echo', self._pb.Blob(data=payload))).data


class SharedBufferDriver:
    """The explicit path, per call: a buffer from the pool filled with the
    payload (``SharedBuffer.allocate`` and one write into its view, as a
    camera driver or NumPy would; with ``{'copy_from': True}`` in the
    transport's options, ``SharedBuffer.copy_from(payload)``), ``Mirror`` on
    the fast lane (the handler answers with the buffer it got), and the
    reply's view mapped; its length is the call's result."""

    asynchronous = False

    def __init__(self, addresses: dict[str, Any], transport: dict[str, Any]) -> None:
        from vyra_base_ipc import SyncIPCHandler

        self._pb, pb_grpc = _modules()
        options = dict(transport.get('options', {}))
        self._copy_from = bool(options.pop('copy_from', False))
        self._handler = SyncIPCHandler(addresses['ipc'], pb_grpc.BenchServiceStub,
                                       timeout=_TIMEOUT, **options)

    def open(self) -> None:
        self._handler.connect()

    def close(self) -> None:
        self._handler.disconnect()

    def _fill(self, payload: bytes) -> Any:
        from vyra_base_ipc import SharedBuffer

        if self._copy_from:
            return SharedBuffer.copy_from(payload)
        buffer = SharedBuffer.allocate(len(payload))
        buffer.view()[:] = payload  # the one write, into the pooled pages
        return buffer

    def echo(self, payload: bytes) -> Callable[[], int]:
        from vyra_base_ipc import shared_buffer

        call_method, request_type, fill = self._handler.call_method, self._pb.BufferRequest, self._fill

        def call() -> int:
            with fill(payload) as buffer:
                reply, received = call_method('Mirror', request_type(data=buffer.ref),
                                              buffers=[buffer], return_buffers=True)
                return len(shared_buffer(reply.data, received))
        return call

    def roundtrip(self, payload: bytes) -> bytes:
        from vyra_base_ipc import shared_buffer

        with self._fill(payload) as buffer:
            reply, received = self._handler.call_method(
                'Mirror', self._pb.BufferRequest(data=buffer.ref), buffers=[buffer], return_buffers=True)
            return bytes(shared_buffer(reply.data, received))
