"""iceoryx2 request-response with byte slices: loan a request slice, write
the payload into it, send; the server copies it into a response slice. The
reply is read where it lies, in shared memory (its length; its bytes once per
row, to check them).

Two ways to wait, by the server's ``mode`` (see :mod:`bench.peer_servers`):
``event`` notifies the server after sending and sleeps on an event listener
until the server's notification; ``spin`` busy-loops on the pending
response, and wakes the server before each block of calls
(:meth:`Iceoryx2Driver.begin_block`, with one untimed call) and parks it after
(:meth:`Iceoryx2Driver.end_block`).
"""

from __future__ import annotations

import ctypes
import time
from typing import Any, Callable

__all__ = ['Iceoryx2Driver']

#: Limit of one round trip, in seconds: a dead server fails the row.
_TIMEOUT = 30.0
#: A spinning wait looks at the clock once in this many tries.
_SPINS_PER_CLOCK_CHECK = 4096


class Iceoryx2Driver:
    """One node with one client port and its two event ports."""

    asynchronous = False

    def __init__(self, addresses: dict[str, Any], transport: dict[str, Any]) -> None:
        self._where = addresses[transport['server']]
        self._spin = self._where['mode'] == 'spin'
        self._endpoint: Any = None

    def open(self) -> None:
        from ..iceoryx2_service import Endpoint

        self._endpoint = Endpoint(self._where, 'client')

    def close(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None

    def begin_block(self) -> None:
        if self._spin:
            self._endpoint.notifier.notify()
            # One untimed call: the blocks then measure a server that is
            # already spinning, as one that never stops would be (waking it
            # is this benchmark's doing, not part of a spinning setup).
            if self._exchange(b'w', keep=False)[0] != 1:
                raise RuntimeError('iceoryx2: the spinning server did not answer the wake-up call')

    def end_block(self) -> None:
        if self._spin:
            from ..iceoryx2_service import PARK

            if self._exchange(b'', keep=False)[0] != PARK:
                raise RuntimeError('iceoryx2: the spinning server did not confirm parking')

    def _waiter(self) -> Callable[[Any], Any]:
        """A function that waits for a pending response and returns it."""
        if self._spin:
            def spin(pending: Any) -> Any:
                receive, spins, deadline = pending.receive, 0, time.monotonic() + _TIMEOUT
                while (response := receive()) is None:
                    spins += 1
                    if not spins % _SPINS_PER_CLOCK_CHECK and time.monotonic() > deadline:
                        raise TimeoutError(f'iceoryx2: no response in {_TIMEOUT} s')
                return response
            return spin

        import iceoryx2 as iox2

        notify, timed_wait = self._endpoint.notifier.notify, self._endpoint.listener.timed_wait
        wait = iox2.Duration.from_secs_f64(_TIMEOUT)

        def sleep(pending: Any) -> Any:
            notify()
            deadline = time.monotonic() + _TIMEOUT
            while (response := pending.receive()) is None:
                # A wait may also end early with no event (seen once: a whole
                # quick run of 18 s failed with this): only the clock says the time is up.
                if not timed_wait(wait) and time.monotonic() > deadline:
                    raise TimeoutError(f'iceoryx2: no response in {_TIMEOUT} s')
            return response
        return sleep

    def echo(self, payload: bytes) -> Callable[[], int]:
        loan, memmove, wait = self._endpoint.port.loan_slice_uninit, ctypes.memmove, self._waiter()
        size = len(payload)

        def call() -> int:
            request = loan(size)
            memmove(request.payload_ptr, payload, size)
            pending = request.assume_init().send()
            response = wait(pending)
            length = response.payload().len()
            response.delete()
            pending.delete()
            return int(length)
        return call

    def _exchange(self, payload: bytes, keep: bool) -> tuple[int, bytes]:
        request = self._endpoint.port.loan_slice_uninit(len(payload))
        ctypes.memmove(request.payload_ptr, payload, len(payload))
        pending = request.assume_init().send()
        response = self._waiter()(pending)
        reply = response.payload()
        result = (reply.len(), bytes(reply.as_memory_view()) if keep else b'')
        del reply
        response.delete()
        pending.delete()
        return result

    def roundtrip(self, payload: bytes) -> bytes:
        self.begin_block()
        try:
            return self._exchange(payload, True)[1]
        finally:
            self.end_block()
