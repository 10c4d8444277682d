"""eclipse-zenoh: ``Session.get`` with the payload, answered by the
server's queryable with the same payload, over a unix socket (the client
session connects to the server's listening one; no scouting). Large payloads
travel in zenoh's shared memory, which its default configuration uses by
itself; with ``{'shm': True}`` in the transport's options the client writes
each payload into a buffer of zenoh's explicit shared-memory provider
(``ShmProvider.alloc``, one write) and sends that, as this package's
``SharedBuffer.allocate`` row does."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ['ZenohDriver']

#: Per-query limit, in seconds.
_TIMEOUT = 30.0


class ZenohDriver:
    """One client session."""

    asynchronous = False

    def __init__(self, addresses: dict[str, Any], transport: dict[str, Any]) -> None:
        self._path = addresses[transport['server']]
        self._session: Any = None
        self._shm = bool(transport.get('options', {}).get('shm', False))
        # Providers by payload size: one must outlive the buffers it gave out.
        self._providers: dict[int, Any] = {}

    def open(self) -> None:
        import zenoh

        from ..peer_servers import zenoh_config

        self._session = zenoh.open(zenoh_config(self._path, 'client'))

    def close(self) -> None:
        self._providers.clear()
        if self._session is not None:
            self._session.close()
            self._session = None

    def _replies(self, payload: Any) -> list[Any]:
        from ..peer_servers import ZENOH_KEY

        replies = list(self._session.get(ZENOH_KEY, payload=payload, timeout=_TIMEOUT))
        if len(replies) != 1 or replies[0].ok is None:
            raise RuntimeError(f'zenoh get: expected one good reply, got {replies}')
        return replies

    def _payload(self, payload: bytes) -> Callable[[], Any]:
        """What each call sends: the bytes, or a new buffer of the
        shared-memory provider (made for this size: room for a few in flight)
        holding them."""
        if not self._shm:
            return lambda: payload
        from zenoh.shm import BlockOn, GarbageCollect, ShmProvider

        size = len(payload)
        provider = self._providers.get(size)
        if provider is None:
            provider = self._providers[size] = ShmProvider.default_backend(4 * size + (1 << 20))
        policy = BlockOn(GarbageCollect())

        def fill() -> Any:
            buffer = provider.alloc(size, policy=policy)
            buffer[:] = payload  # the one write
            return buffer
        return fill

    def echo(self, payload: bytes) -> Callable[[], int]:
        from ..peer_servers import ZENOH_KEY

        get, fill = self._session.get, self._payload(payload)

        def call() -> int:
            length = -1
            for reply in get(ZENOH_KEY, payload=fill(), timeout=_TIMEOUT):
                length = len(reply.ok.payload)
            return length
        return call

    def roundtrip(self, payload: bytes) -> bytes:
        return bytes(self._replies(self._payload(payload)())[0].ok.payload.to_bytes())
