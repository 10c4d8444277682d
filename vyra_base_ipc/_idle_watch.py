"""Watches that cancel a blocking gRPC call grpc would not end itself (for
:class:`~vyra_base_ipc._lanes.SyncGrpcLane`): :class:`IdleWatch`, a
stream's ``idle_timeout``; :class:`OverdueWatch`, a call past its deadline."""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ['IdleWatch', 'OverdueWatch']


class IdleWatch:
    """Cancels a blocking gRPC stream when its caller waited ``seconds``
    for a message (grpc's iterator has no timeout of its own); the time
    the caller spends on a message does not count. One thread per stream."""

    def __init__(self, call: Any, seconds: float) -> None:
        self._call = call
        self._seconds = seconds
        self._changed = threading.Condition(threading.Lock())
        self._waits = 0  # the caller's waits for a message so far
        self._waiting = self._stopped = False
        self.expired = False
        threading.Thread(target=self._run, name='ipc-idle-watch', daemon=True).start()

    def waiting(self) -> None:
        """The caller begins to wait for the next message."""
        with self._changed:
            self._waits += 1
            self._waiting = True
            self._changed.notify()

    def message(self) -> None:
        """The caller got its message."""
        with self._changed:
            self._waiting = False
            self._changed.notify()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()

    def _run(self) -> None:
        with self._changed:
            while not self._stopped:
                if not self._waiting:
                    self._changed.wait()
                    continue
                wait, ends = self._waits, time.monotonic() + self._seconds
                while not self._stopped and self._waiting and self._waits == wait:
                    remaining = ends - time.monotonic()
                    if remaining <= 0:
                        self.expired = True
                        self._call.cancel()
                        return
                    self._changed.wait(remaining)


class OverdueWatch:
    """Cancels a blocking gRPC call still running ``seconds`` from now (its
    deadline and a margin): grpc core keeps one whose request it is still
    writing past its deadline while the server does not read. One timer
    thread per call; :attr:`expired` tells that it cancelled the call."""

    def __init__(self, call: Any, seconds: float) -> None:
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire, (call,))
        self._timer.daemon = True
        self._timer.start()

    def _expire(self, call: Any) -> None:
        self.expired = True
        call.cancel()

    def stop(self) -> None:
        """The call ended: nothing to cancel."""
        self._timer.cancel()
