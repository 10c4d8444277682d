"""Flow control of streamed messages: the credit a sender spends and the
window a receiver grants, per stream (vyra_base_ipc's extension, agreed in
the Hello).

Like HTTP/2's, the window counts bytes: each end grants the other a window
per stream (:data:`DEFAULT_STREAM_WINDOW`) and grants again with a
WINDOW_UPDATE frame as the consumer of the stream (the handler, or the
caller iterating) takes messages, once half a window has been taken. A
sender may send while it has credit left, so a message larger than the
window still goes (alone), and a receiver holds at most one window plus one
message per stream, whatever the speed of the two ends. Each message counts
:data:`MESSAGE_OVERHEAD` bytes on top of its own, so that a stream of empty
messages is bounded too.
"""

from __future__ import annotations

import asyncio
import threading

from ._frames import MAX_WINDOW

__all__ = [
    'DEFAULT_STREAM_WINDOW',
    'MESSAGE_OVERHEAD',
    'ReceiveWindow',
    'SendCredit',
    'UNCONTROLLED_WINDOWS',
    'message_cost',
    'validate_stream_window',
]

#: Bytes of streamed messages one end may have in flight to the other, per
#: stream, before the consumer takes some.
DEFAULT_STREAM_WINDOW = 1 << 20
#: What a message counts on top of its size: about what a received message
#: costs its receiver while it waits to be consumed.
MESSAGE_OVERHEAD = 64
_MIN_WINDOW = 1 << 10
#: Windows of streamed messages a receiver holds unconsumed per stream from a
#: sender that did not agree to flow control (a plain ttrpc server), and one
#: message: 64 MiB by default. Unbounded, a server streaming to a caller that
#: does not read made the asyncio client hold all it sent (390 MB of a 384 MB
#: flood, measured).
UNCONTROLLED_WINDOWS = 64


def validate_stream_window(value: object, name: str = 'stream_window') -> int:
    """:raises TypeError, ValueError: unless ``value`` is an int of bytes
    from 1 KiB to 2 GiB - 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'{name} must be an int (bytes), not {type(value).__name__}')
    if not _MIN_WINDOW <= value <= MAX_WINDOW:
        raise ValueError(f'{name} must be between {_MIN_WINDOW} and {MAX_WINDOW} bytes, not {value}')
    return value


def message_cost(size: int) -> int:
    """What a message of ``size`` bytes counts against a window."""
    return size + MESSAGE_OVERHEAD


class SendCredit:
    """What one stream may still send before its receiver grants more.

    Thread-safe. A sender waits while the credit is used up, in a coroutine
    (:meth:`wait`, granted on the waiter's event loop thread) or a thread
    (:meth:`wait_blocking`); :meth:`close` (the stream ended) releases it.
    """

    __slots__ = ('credit', 'closed', '_condition', '_waiter')

    def __init__(self, credit: int) -> None:
        self.credit = credit
        self.closed = False
        self._condition = threading.Condition(threading.Lock())
        self._waiter: asyncio.Future[None] | None = None

    def spend(self, cost: int) -> None:
        """Count a message sent."""
        with self._condition:
            self.credit -= cost

    def grant(self, increment: int) -> None:
        """The receiver granted ``increment`` more bytes (capped at :data:`MAX_WINDOW`)."""
        with self._condition:
            self.credit = min(self.credit + increment, MAX_WINDOW)
            if self.credit > 0:
                self._wake()

    def close(self) -> None:
        """The stream ended: nothing waits for credit any more."""
        with self._condition:
            self.closed = True
            self._wake()

    def _wake(self) -> None:
        # (lock held)
        self._condition.notify_all()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Return once there is credit or the stream ended."""
        while self.credit <= 0 and not self.closed:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def wait_blocking(self, timeout: float | None) -> bool:
        """Block until there is credit or the stream ended (True), or
        ``timeout`` seconds passed (False)."""
        with self._condition:
            return self._condition.wait_for(lambda: self.credit > 0 or self.closed, timeout)


class ReceiveWindow:
    """Counts what the consumer of one stream took, to grant its sender
    more, and what arrived, to hold the sender to its credit.

    One thread calls :meth:`received` (the one reading the connection), one
    :meth:`taken` (the stream's consumer); each writes its own count.

    A sender that did not agree to flow control (a plain ttrpc server:
    ``window`` 0) is granted nothing, and held to a larger bound, as the
    receiver has no way to slow it down: a stream it sends faster than its
    consumer takes fails once past it, instead of the receiver holding all
    it sends.

    :param message_limit: the largest message the receiver accepts: a
        sender with credit left may send one such message.
    :param offered: the window the receiver offered (the unit of the bound
        without flow control).
    """

    __slots__ = ('agreed', '_threshold', '_taken', 'limit', 'overrun', '_received', '_consumed')

    def __init__(self, window: int, message_limit: int, offered: int = DEFAULT_STREAM_WINDOW) -> None:
        #: Whether the sender agreed to flow control (``window`` is not 0).
        self.agreed = window > 0
        # Without it nothing is granted (the sender would not know a
        # WINDOW_UPDATE): only the bound below holds.
        self._threshold = max(window // 2, 1) if window else 1 << 62
        self._taken = 0
        #: What may arrive unconsumed: the window and one message (without
        #: flow control, :data:`UNCONTROLLED_WINDOWS` of the window offered).
        self.limit = (window or UNCONTROLLED_WINDOWS * offered) + message_cost(message_limit)
        #: Set by the receiver once the sender went past :attr:`limit` (or
        #: the stream failed otherwise): what arrives after is dropped.
        self.overrun = False
        self._received = 0
        self._consumed = 0

    def received(self, size: int) -> bool:
        """Count a message of ``size`` bytes that arrived; whether its sender
        is past its credit: more unconsumed than the window and one message
        (what a sender that waits for credit can have sent)."""
        self._received += size + MESSAGE_OVERHEAD
        return self._received - self._consumed > self.limit

    def overrun_reason(self, stream_id: int) -> str:
        """Why the stream fails once its sender went past :attr:`limit`."""
        bound = ('the window and one message it may send' if self.agreed
                 else 'a stream without flow control may hold')
        return (f'the server sent {self.unconsumed()} bytes of stream {stream_id} that were not read: '
                f'more than {bound} ({self.limit})')

    def unconsumed(self) -> int:
        """Bytes (as counted against the window) that arrived and were not taken."""
        return self._received - self._consumed

    def taken(self, size: int) -> int:
        """Count a message of ``size`` bytes consumed; return the increment
        to grant now (once half a window was taken), else 0."""
        cost = size + MESSAGE_OVERHEAD
        self._consumed += cost
        self._taken += cost
        if self._taken < self._threshold:
            return 0
        taken, self._taken = self._taken, 0
        return taken
