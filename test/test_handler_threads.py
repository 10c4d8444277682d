"""The threads def handlers run in: a ThreadPoolExecutor that never holds up
interpreter exit (see vyra_base_ipc._handler_threads)."""

from __future__ import annotations

import threading

import pytest

from vyra_base_ipc._handler_threads import HandlerThreads


def test_threads_start_on_demand_up_to_max_workers_are_daemon_and_are_reused() -> None:
    pool = HandlerThreads(2, thread_name_prefix='t')
    release = threading.Event()
    try:
        busy = [pool.submit(release.wait, 20) for _ in range(3)]  # two run, one waits
        release.set()
        assert all(future.result(timeout=20) for future in busy)
        ran_in = {pool.submit(lambda: threading.current_thread()).result(timeout=20) for _ in range(20)}
        assert len(ran_in) <= 2 and all(thread.daemon for thread in ran_in)
        assert {thread.name for thread in ran_in} <= {'t_0', 't_1'}
    finally:
        pool.shutdown(wait=True)


def test_results_and_exceptions_reach_the_future() -> None:
    with HandlerThreads(1) as pool:
        assert pool.submit(sum, [1, 2, 3]).result(timeout=20) == 6
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result(timeout=20)


def test_shutdown_cancels_what_has_not_started_and_refuses_more() -> None:
    pool = HandlerThreads(1)
    release = threading.Event()
    running = pool.submit(release.wait, 20)
    queued = pool.submit(lambda: 'never')
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match='after shutdown'):
        pool.submit(lambda: None)
    release.set()
    assert running.result(timeout=20) is True
    pool.shutdown(wait=True)  # idempotent


def test_max_workers_is_checked() -> None:
    with pytest.raises(ValueError, match='max_workers must be an int >= 1'):
        HandlerThreads(0)
