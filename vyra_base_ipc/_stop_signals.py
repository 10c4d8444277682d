"""SIGINT, SIGTERM and SIGHUP noted instead of acted on, for the ``main()`` of
a node that serves IPC (:class:`StopSignals`)."""

from __future__ import annotations

import logging
import signal
from types import TracebackType

from vyra_base_ipc_server import STOP_SIGNALS

__all__ = ['StopSignals']

_logger = logging.getLogger('vyra_base_ipc.node')


class StopSignals:
    """Python-level SIGINT/SIGTERM/SIGHUP handlers that only note the signal,
    in place of rclpy's (``rclpy.init(..., signal_handler_options=
    SignalHandlerOptions.NO)``) and Python's (``KeyboardInterrupt``, death).

    Spinning ends on the first one (``spin_until_shutdown(executor,
    alive=stop.running)``); the node then stops its IPC server, within its
    grace period, and ROS shuts down, in that order. No signal interrupts that
    path half-way, however many arrive: in a terminal, Ctrl-C reaches a node
    directly and again through ``ros2 launch`` or ``ros2 run``, and under
    rclpy's handlers that second SIGINT is a ``KeyboardInterrupt`` in the
    middle of the stop (a traceback, exit status -2, calls in flight cut off).

    As a context manager: installed on entry, ignored from the exit on (the
    interpreter, as it exits, would put back the default handlers, and a late
    signal would then kill a process that stopped cleanly). From the main
    thread only, as :func:`signal.signal`.
    """

    SIGNALS = STOP_SIGNALS

    def __init__(self, received: list[str] | None = None) -> None:
        #: Names of the signals noted, oldest first (the list given, e.g. one
        #: shared with handlers this one replaces).
        self.received: list[str] = [] if received is None else received

    def running(self) -> bool:
        """Whether no stop signal came yet (an ``alive`` for :func:`spin_until_shutdown`)."""
        return not self.received

    def install(self) -> None:
        """Note the stop signals from now on."""
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)

    def ignore(self) -> None:
        """Ignore the stop signals from now on."""
        for signum in self.SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.ignore()

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        _logger.info('%s received: %s', name, 'already stopping' if self.received else 'stopping')
        self.received.append(name)
