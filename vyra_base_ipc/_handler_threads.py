"""The threads ``def`` handlers run in, on both lanes.

Like :class:`concurrent.futures.ThreadPoolExecutor` (threads started on
demand up to ``max_workers``, reused while idle), with one difference: the
threads are daemon threads that nothing joins at interpreter exit. A handler
blocked in I/O (a FIFO, a hung device, a ROS call without timeout) past the
server's grace period can be neither interrupted nor waited for, and
ThreadPoolExecutor's workers would keep a process that embeds the server
(``run(server.serve())``) alive after SIGTERM until that handler returns.
"""

from __future__ import annotations

import asyncio
from concurrent import futures
import os
import queue
import threading
import time
from typing import Any, Callable, TypeVar

__all__ = ['CallEnded', 'HandlerThreads', 'busy_handler_threads']

class CallEnded(Exception):
    """Raised in a handler thread that writes or reads after its call ended
    (the client left, the deadline passed, the server stopped), on either
    lane; it ends the handler, and nothing is sent for it."""


# Threads of every pool running a handler now (for the exit report).
_busy: set[threading.Thread] = set()
_busy_lock = threading.Lock()


def busy_handler_threads() -> list[str]:
    """The names of the handler threads (of every :class:`HandlerThreads`)
    that are running a handler now."""
    with _busy_lock:
        return sorted(thread.name for thread in _busy)

_T = TypeVar('_T')
_IDLE_POLL_SECONDS = 0.01
_WorkItem = tuple[futures.Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class HandlerThreads(futures.Executor):
    """An executor of daemon threads for ``def`` handlers (see the module docstring).

    :param max_workers: threads at most; by default ThreadPoolExecutor's
        ``min(32, cpu_count + 4)``.
    :param thread_name_prefix: threads are called ``<prefix>_<n>``.
    """

    def __init__(self, max_workers: int | None = None, thread_name_prefix: str = 'ipc-handler') -> None:
        if max_workers is None:
            max_workers = min(32, (os.cpu_count() or 1) + 4)
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f'max_workers must be an int >= 1, not {max_workers!r}')
        self.max_workers = max_workers
        self._prefix = thread_name_prefix
        self._work: queue.SimpleQueue[_WorkItem | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._shut_down = False

    @property
    def busy(self) -> int:
        """Threads of this pool running a handler now."""
        with _busy_lock:
            return sum(1 for thread in self._threads if thread in _busy)

    async def wait_idle(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds until no thread of this pool runs a
        handler (looking every 10 ms); how many still do."""
        until = time.monotonic() + timeout
        # Polled: the threads tell the loop nothing it could await, and this
        # runs once, at a stop, within its bound.
        while (busy := self.busy) and time.monotonic() < until:
            await asyncio.sleep(_IDLE_POLL_SECONDS)
        return busy

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> futures.Future[_T]:
        """Run ``fn(*args, **kwargs)`` in one of the threads.

        :raises RuntimeError: after :meth:`shutdown`.
        """
        with self._lock:
            if self._shut_down:
                raise RuntimeError('cannot schedule new futures after shutdown')
            future: futures.Future[_T] = futures.Future()
            self._work.put((future, fn, args, kwargs))
            # An idle thread takes it; else a new one, while there may be more.
            if not self._idle.acquire(blocking=False) and len(self._threads) < self.max_workers:
                thread = threading.Thread(target=self._run, name=f'{self._prefix}_{len(self._threads)}',
                                          daemon=True)
                thread.start()
                self._threads.append(thread)
        return future

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                self._work.put(None)  # for the next thread
                return
            future, fn, args, kwargs = item
            del item
            if future.set_running_or_notify_cancel():
                me = threading.current_thread()
                with _busy_lock:
                    _busy.add(me)
                try:
                    result = fn(*args, **kwargs)
                except BaseException as error:
                    future.set_exception(error)
                else:
                    future.set_result(result)
                finally:
                    with _busy_lock:
                        _busy.discard(me)
            del future, fn, args, kwargs  # hold nothing while idle
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more work; with ``cancel_futures`` cancel what has not
        started; with ``wait`` wait for the threads to finish what runs.
        Idempotent."""
        with self._lock:
            self._shut_down = True
            if cancel_futures:
                while True:
                    try:
                        item = self._work.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            self._work.put(None)
        if wait:
            for thread in self._threads:
                thread.join()
