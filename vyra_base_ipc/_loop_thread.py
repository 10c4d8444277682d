"""An asyncio event loop on a thread of its own, for hosts that are not async.

rclpy runs callbacks on its own executor, which is not asyncio; grpc.aio
objects belong to the loop they were created on. So a node that hosts an
:class:`~vyra_base_ipc.server.IPCServer` runs the server on an
:class:`EventLoopThread` and hands it coroutines with :meth:`EventLoopThread.submit`
or :meth:`EventLoopThread.run`; neither side ever waits inside the other's
callbacks.
"""

from __future__ import annotations

import asyncio
from concurrent import futures
import logging
import threading
import time
from typing import Any, Callable, Coroutine, TypeVar

from ._busy_poll import DEFAULT_BUSY_POLL
from ._event_loop import new_event_loop

__all__ = ['EventLoopThread']

_logger = logging.getLogger(__name__)

_T = TypeVar('_T')


class EventLoopThread:
    """Runs one asyncio event loop on a dedicated (daemon) thread.

    The thread and the loop exist from :meth:`start` until :meth:`stop`.
    Blocking work started with :func:`asyncio.to_thread` on this loop runs on
    the loop's own worker pool, which :meth:`stop` shuts down without waiting
    for, so a stuck worker cannot hold up the host.

    Usable as ``with EventLoopThread() as loop_thread:``.

    :param name: name of the thread (shows up in stack dumps and ``ps -L``).
    :param busy_poll: seconds the loop polls before it sleeps
        (:func:`~vyra_base_ipc.new_event_loop`); may be changed
        until :meth:`start`.
    :param on_failure: called with the :attr:`failure` on the loop's thread
        once the loop ended under it, after every coroutine still awaited
        through :meth:`run` or :meth:`submit` failed (a host lets go of what
        only the loop could stop, e.g. a server's socket files); may be
        changed until :meth:`start`.
    :ivar failure: what ended the loop before :meth:`stop`, if anything did:
        asyncio lets ``SystemExit`` and ``KeyboardInterrupt`` out of a task
        and out of the loop (logged as critical; the loop is then no longer
        running); ``None`` otherwise.
    """

    def __init__(self, name: str = 'ipc-event-loop', busy_poll: float = DEFAULT_BUSY_POLL,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        self.name = name
        self.busy_poll = busy_poll
        self.on_failure = on_failure
        # The futures of submitted coroutines not done yet: failed if the loop
        # ends under them, else run() would wait for a dead loop for ever.
        self._pending: set[futures.Future[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._workers: futures.ThreadPoolExecutor | None = None
        self._started = threading.Event()
        self._lock = threading.Lock()
        self._stopped = False
        self.failure: BaseException | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop.

        :raises RuntimeError: before :meth:`start` or after :meth:`stop`.
        """
        if self._loop is None or self._stopped or self.failure is not None:
            ended = f' (it ended: {self.failure!r})' if self.failure is not None else ''
            raise RuntimeError(f'event loop thread {self.name!r} is not running{ended}')
        return self._loop

    @property
    def is_running(self) -> bool:
        """Whether the loop runs: started, not stopped, not ended by a :attr:`failure`."""
        return self._loop is not None and not self._stopped and self.failure is None

    def in_loop_thread(self) -> bool:
        """Whether the caller runs on this loop's thread."""
        return self._thread is not None and threading.current_thread() is self._thread

    def start(self) -> None:
        """Start the thread and return once its loop runs. Idempotent.

        :raises RuntimeError: after :meth:`stop` (a stopped loop thread cannot
            be restarted).
        :raises TypeError, ValueError: :attr:`busy_poll` is not a number of
            seconds from 0 to 0.01.
        """
        with self._lock:
            if self._stopped:
                raise RuntimeError(f'event loop thread {self.name!r} was stopped; create a new one')
            if self._thread is not None:
                return
            self._loop = new_event_loop(self.busy_poll)
            self._workers = futures.ThreadPoolExecutor(thread_name_prefix=f'{self.name}-worker')
            self._loop.set_default_executor(self._workers)
            # A daemon thread: if the host forgets stop(), interpreter exit
            # must not hang on a loop nobody will ever stop.
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        self._started.wait()

    def submit(self, coroutine: Coroutine[Any, Any, _T]) -> futures.Future[_T]:
        """Schedule ``coroutine`` on the loop from any thread; do not wait.

        Cancelling the returned future cancels the coroutine.

        :raises RuntimeError: if the loop is not running (the coroutine is
            closed, so no "never awaited" warning follows).
        """
        try:
            loop = self.loop
            future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        except RuntimeError:
            coroutine.close()
            raise
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)
        if self.failure is not None:  # (it ended between the check and the add)
            self._fail_pending()
        return future

    def _done(self, future: futures.Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def _fail_pending(self) -> None:
        """Fail the futures of coroutines the ended loop will never finish."""
        with self._lock:
            pending, self._pending = self._pending, set()
        for future in pending:
            try:
                future.set_exception(RuntimeError(
                    f'event loop thread {self.name!r} ended ({self.failure!r}) before the coroutine did'))
            except futures.InvalidStateError:  # (done or cancelled meanwhile)
                pass

    def run(self, coroutine: Coroutine[Any, Any, _T], timeout: float | None = None, *,
            interruptible: bool = True) -> _T:
        """Run ``coroutine`` on the loop and block the calling thread for its result.

        :param timeout: seconds to wait; on expiry the coroutine is cancelled.
        :param interruptible: whether a ``KeyboardInterrupt`` while waiting
            cancels the coroutine and is raised; if not, it is logged and the
            wait goes on (a stop that a second Ctrl-C must not cut short).
        :raises TimeoutError: the coroutine did not finish within ``timeout``.
        :raises RuntimeError: if called on the loop's own thread (it would
            wait for itself forever) or the loop is not running.
        :raises BaseException: whatever the coroutine raised.
        """
        if self.in_loop_thread():
            coroutine.close()
            raise RuntimeError('EventLoopThread.run() called on its own loop thread: await instead')
        future = self.submit(coroutine)
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return future.result(None if until is None else max(0.0, until - time.monotonic()))
            except futures.TimeoutError:
                future.cancel()
                raise TimeoutError(f'coroutine on {self.name!r} did not finish within {timeout} s') from None
            except KeyboardInterrupt:
                if interruptible:
                    future.cancel()  # do not leave the coroutine behind
                    raise
                _logger.info('KeyboardInterrupt while waiting for %s on %r: waiting on',
                             getattr(coroutine, '__qualname__', 'a coroutine'), self.name)
            except BaseException:
                future.cancel()
                raise

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what still runs on the loop, stop it, join the thread, close it.

        Idempotent; safe from any thread but the loop's own. Waits at most
        ``timeout`` seconds for cancelled tasks to finish and for the thread to
        end; a thread still running then is logged and left (it is a daemon).

        :raises RuntimeError: if called on the loop's own thread.
        """
        if self.in_loop_thread():
            raise RuntimeError('EventLoopThread.stop() called on its own loop thread')
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            loop, thread, workers = self._loop, self._thread, self._workers
        if loop is None or thread is None:
            return
        if self.failure is not None:  # nothing runs its tasks any more: nothing to wait for
            thread.join(timeout)
            if workers is not None:
                workers.shutdown(wait=False, cancel_futures=True)
            loop.close()
            return
        try:
            asyncio.run_coroutine_threadsafe(_cancel_all(timeout), loop).result(timeout + 1.0)
        except (futures.TimeoutError, futures.CancelledError, RuntimeError):
            _logger.warning('tasks on %s did not finish within %s s of being cancelled', self.name, timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if workers is not None:
            # Blocking handlers cannot be interrupted; do not wait for them.
            workers.shutdown(wait=False, cancel_futures=True)
        if thread.is_alive():
            _logger.warning('event loop thread %s did not end within %s s', self.name, timeout)
            return
        loop.close()

    def __enter__(self) -> 'EventLoopThread':
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._started.set)
        try:
            self._loop.run_forever()
        except BaseException as error:
            # Said here: a thread's SystemExit ends it without a word, and
            # everything the loop served would hang unexplained.
            self.failure = error
            _logger.critical('event loop thread %s ended: %r escaped a task', self.name, error,
                             exc_info=error)
        finally:
            try:
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            except RuntimeError:
                pass
            asyncio.set_event_loop(None)
        if self.failure is not None:
            self._fail_pending()
            if self.on_failure is not None:
                try:
                    self.on_failure(self.failure)
                except Exception:
                    _logger.exception('on_failure of event loop thread %s failed', self.name)


async def _cancel_all(timeout: float) -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)
