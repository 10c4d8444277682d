"""pyzmq: a REQ socket over ``ipc://`` to the REP echo server. With
``{"copy": false}`` in the transport's options (the large payloads) the
request is sent and the reply received without copies (``copy=False``: the
reply stays a ``zmq.Frame``); otherwise plain ``send(bytes)``/``recv()``,
what small messages are sent with."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ['ZmqDriver']

#: Send and receive limit, in milliseconds: a dead server fails the row.
_TIMEOUT_MS = 30_000


class ZmqDriver:
    """One context, one REQ socket."""

    asynchronous = False

    def __init__(self, addresses: dict[str, Any], transport: dict[str, Any]) -> None:
        self._address = addresses[transport['server']]
        self._copy = transport.get('options', {}).get('copy', True)
        self._context: Any = None

    def open(self) -> None:
        import zmq

        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.REQ)
        self._socket.setsockopt(zmq.RCVTIMEO, _TIMEOUT_MS)
        self._socket.setsockopt(zmq.SNDTIMEO, _TIMEOUT_MS)
        self._socket.connect(self._address)

    def close(self) -> None:
        if self._context is not None:
            self._socket.close(linger=0)
            self._context.term()
            self._context = None

    def echo(self, payload: bytes) -> Callable[[], int]:
        send, recv = self._socket.send, self._socket.recv
        if self._copy:
            def call() -> int:
                send(payload)
                return len(recv())
            return call

        def call_without_copies() -> int:
            send(payload, copy=False)
            return len(recv(copy=False))
        return call_without_copies

    def roundtrip(self, payload: bytes) -> bytes:
        self._socket.send(payload, copy=self._copy)
        return bytes(self._socket.recv(copy=self._copy))
