"""Running a node's process: spinning until a stop signal or ROS shutdown,
the ordered shutdown after it, a whole ``main()`` in one call
(:func:`run_node`), the exit statuses of ``ipc_server``, and its exit past
handlers that outlived the grace period. Public through
:mod:`vyra_base_ipc.node`."""

from __future__ import annotations

from concurrent.futures import thread as futures_thread
import logging
import os
import sys
import threading
from typing import Callable, Sequence

import rclpy
from rclpy.executors import Executor, ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from ._handler_threads import busy_handler_threads
from ._ros_logging import held_records, logging_through_node
from ._stop_signals import StopSignals
from .exceptions import ParameterError

__all__ = [
    'EXIT_BAD_PARAMETER',
    'EXIT_SERVER_FAILED',
    'STOP_LOG_FORMAT',
    'exit_now_if_handlers_remain',
    'run_node',
    'shutdown_node',
    'spin_until_shutdown',
]

_logger = logging.getLogger('vyra_base_ipc.node')

#: Exit status of ``ipc_server`` when a parameter is unusable.
EXIT_BAD_PARAMETER = 2
#: Exit status of ``ipc_server`` when its server's event loop ended under it
#: (something let ``SystemExit`` or ``KeyboardInterrupt`` out of a task).
EXIT_SERVER_FAILED = 1
#: How a node's process logs on stderr once it stops spinning (see run_node):
#: like rcutils' console format, with wall-clock time for the shutdown steps.
STOP_LOG_FORMAT = '[%(levelname)s] [%(created).6f] [%(name)s]: %(message)s'

#: Longest a spin_once() waits before the shutdown check comes round again.
_SPIN_POLL = 0.25


def spin_until_shutdown(executor: Executor, *, poll: float = _SPIN_POLL,
                        alive: Callable[[], bool] | None = None) -> None:
    """Run ``executor`` until its context shuts down (SIGINT/SIGTERM under
    rclpy's signal handlers, or ``rclpy.shutdown()``), or ``alive()`` is
    false (checked as often; ``alive=stop.running`` of a :class:`StopSignals`);
    returns within ``poll`` seconds of either.

    ``executor.spin()`` can miss it: rclpy wakes executors before it shuts the
    context down, and an executor that wakes in between goes back to waiting,
    with nothing left to wake it (seen here on a loaded machine: a SIGINT
    unanswered until the next signal).
    """
    context = executor.context
    while context.ok() and (alive is None or alive()):
        executor.spin_once(timeout_sec=poll)


def shutdown_node(executor: Executor | None, node: Node | None) -> None:
    """The end of a node's ``main()``, for the ``finally`` after
    :func:`spin_until_shutdown`: the executor stops, ``node`` (if made) is
    destroyed (a hosting node's ``destroy_node()`` stops its IPC server within
    the grace period), then ROS shuts down. Either may be ``None``."""
    if executor is not None:
        executor.shutdown(timeout_sec=0)
    if node is not None:
        node.destroy_node()
    rclpy.try_shutdown()


def run_node(make_node: Callable[[], Node], args: Sequence[str] | None = None, *,
             received: list[str] | None = None) -> int:
    """A node's whole ``main()``: under :class:`StopSignals` (no rclpy signal
    handlers), ``rclpy.init(args)``, ``make_node()`` spun until SIGINT,
    SIGTERM, SIGHUP or ROS shutdown, then :func:`shutdown_node`. For a node
    that starts its IPC server in ``__init__`` (:func:`host_ipc_server`).
    While it spins, the process's Python logging goes through the node's
    logger (console, ``/rosout``, its log level), as ``ipc_server``'s does;
    so does what was logged while ``make_node()`` ran, once the node exists.
    As it stops, to the handlers the process had, or to stderr (as
    ``ipc_server``'s) if it had none, at the node's level.

    :param received: the list into which the caller's own handlers noted
        stop signals before this (an entry point that takes them before it
        imports rclpy, as ``vyra_base_ipc_server``'s): if one came, it returns
        0 at once, without starting ROS.
    :returns: 0, or :data:`EXIT_BAD_PARAMETER` after logging a
        :class:`ParameterError` from ``make_node()``.
    """
    with StopSignals(received) as stop:
        if stop.received:
            if not logging.getLogger().handlers:  # nobody configured logging: say it, as ipc_server does
                logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=STOP_LOG_FORMAT)
            _logger.info('%s received while starting: exiting', ', '.join(stop.received))
            return 0
        rclpy.init(args=None if args is None else list(args), signal_handler_options=SignalHandlerOptions.NO)
        executor: SingleThreadedExecutor | None = None
        node: Node | None = None
        try:
            executor = SingleThreadedExecutor()
            # Kept until the node can pass them on (its IPC server's start, say).
            with held_records() as held:
                node = make_node()
            if not logging.getLogger().handlers:
                # Nobody configured logging in this process, whose main() this is: what it
                # logs as it stops (after it spun: the IPC server's stop) goes to stderr, as
                # ipc_server's does, at the node's level; else warnings alone would show.
                logging.basicConfig(stream=sys.stderr, format=STOP_LOG_FORMAT)
            with logging_through_node(node, held):  # (see ipc_server's main())
                executor.add_node(node)
                spin_until_shutdown(executor, alive=stop.running)
        except ParameterError as error:
            _logger.error('%s', error)
            return EXIT_BAD_PARAMETER
        except ExternalShutdownException:
            pass
        finally:
            shutdown_node(executor, node)
    return 0


def exit_now_if_handlers_remain(status: int) -> None:
    """Exit at once if a blocking handler still runs past the grace period.

    Interpreter exit would join those threads, i.e. wait for handlers that
    were already given up on, while ipc_server promises to be gone within the
    grace period.
    """
    main_thread = threading.main_thread()
    # Pool workers of concurrent.futures are joined at exit even when they
    # are daemon threads; the pool module keeps the set it will join. The
    # server's own handler threads are not joined, but they are reported.
    pool_workers = set(getattr(futures_thread, '_threads_queues', {}))
    remaining = sorted({thread.name for thread in threading.enumerate()
                        if thread is not main_thread and thread.is_alive()
                        and (not thread.daemon or thread in pool_workers)} | set(busy_handler_threads()))
    if not remaining:
        return
    _logger.warning('exiting without waiting for %d handler thread(s) still running: %s',
                    len(remaining), ', '.join(remaining))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
