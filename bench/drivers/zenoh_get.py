"""eclipse-zenoh: ``Session.get`` with the payload, answered by the
server's queryable with the same payload, over a unix socket (the client
session connects to the server's listening one; no scouting). Large payloads
travel in zenoh's shared memory, which its default configuration uses by
itself."""

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

    def open(self) -> None:
        import zenoh

        from ..peer_servers import zenoh_config

        self._session = zenoh.open(zenoh_config(self._path, 'client'))

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def _replies(self, payload: bytes) -> list[Any]:
        from ..peer_servers import ZENOH_KEY

        replies = list(self._session.get(ZENOH_KEY, payload=payload, timeout=_TIMEOUT))
        if len(replies) != 1 or replies[0].ok is None:
            raise RuntimeError(f'zenoh get: expected one good reply, got {replies}')
        return replies

    def echo(self, payload: bytes) -> Callable[[], int]:
        from ..peer_servers import ZENOH_KEY

        get = self._session.get

        def call() -> int:
            length = -1
            for reply in get(ZENOH_KEY, payload=payload, timeout=_TIMEOUT):
                length = len(reply.ok.payload)
            return length
        return call

    def roundtrip(self, payload: bytes) -> bytes:
        return bytes(self._replies(payload)[0].ok.payload.to_bytes())
