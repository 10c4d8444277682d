"""Python :mod:`logging` through a ROS 2 node's logger, for the ``ipc_server``
process and nodes run by ``run_node``: what this package (and anything else
in the process) logs shows on the console in ROS's format, on ``/rosout``
(rqt_console, bags), and obeys ``--ros-args --log-level``, as a node's own
messages do.

Each record goes to rcutils under ``<node's logger>.<record's logger>``
(``ipc_server.vyra_base_ipc.server``), a child of the node's logger (so the
node's level applies to it, and it is published on the node's ``/rosout``
publisher), with the record's own file, function and line. What is logged
while the node is being made (:func:`held_records`: a node that starts its
IPC server in ``__init__``) goes the same way once it exists.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from rclpy.impl.implementation_singleton import rclpy_implementation
from rclpy.impl.rcutils_logger import RcutilsLogger
from rclpy.node import Node

__all__ = ['HeldRecords', 'held_records', 'logging_through_node']

_rclpy = rclpy_implementation
_logger = logging.getLogger(__name__)


def _severity(level: int) -> int:
    """The rcutils severity of a :mod:`logging` level (the same numbers:
    DEBUG 10 ... FATAL 50; levels between go down to the one below)."""
    if level >= logging.CRITICAL:
        return logging.CRITICAL
    return max(logging.DEBUG, level - level % 10)


class _ThroughNode(logging.Handler):
    """Hands each record to rcutils as a message of the node's child logger
    named after the record's logger; once :meth:`close` ran, to ``fallback``
    (the handlers that were there before)."""

    def __init__(self, node: Node, fallback: list[logging.Handler]) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter('%(message)s'))  # (the traceback, if any, follows it)
        self._node_logger: RcutilsLogger = node.get_logger()
        self._fallback = fallback
        # The children made so far: each keeps its /rosout registration while it lives.
        self._children: dict[str, RcutilsLogger] | None = {}

    def emit(self, record: logging.LogRecord) -> None:
        # Runs under this handler's lock (Handler.handle), as close() does.
        children = self._children
        if children is None:
            for handler in self._fallback:
                if record.levelno >= handler.level:
                    handler.handle(record)
            return
        try:
            child = children.get(record.name)
            if child is None:
                child = children[record.name] = (self._node_logger if record.name == 'root'
                                                  else self._node_logger.get_child(record.name))
            severity = _severity(record.levelno)
            if child.is_enabled_for(severity):
                _rclpy.rclpy_logging_rcutils_log(severity, child.name, self.format(record), record.funcName,
                                                 record.pathname, record.lineno)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        """From now on, records go to the handlers that were there before;
        the node's child loggers let go of their /rosout registrations.
        Waits for a record being handed to rcutils on another thread."""
        self.acquire()
        try:
            self._children = None  # (their registrations end as they are collected)
        finally:
            self.release()
        super().close()


class HeldRecords(logging.Handler):
    """Keeps the records it is handed (the first :attr:`LIMIT`; the rest are
    counted in :attr:`dropped`, and :meth:`report_dropped` says how many)."""

    #: Records kept at most: a node's start logs a few.
    LIMIT = 1000

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.LIMIT:
            self.records.append(record)
        else:
            self.dropped += 1

    def report_dropped(self) -> None:
        """Log how many records were dropped (a WARNING, after the kept ones
        were passed on), if any were."""
        if self.dropped:
            _logger.warning('%d more records logged while the node was made are not shown (the first %d are)',
                            self.dropped, self.LIMIT)


@contextlib.contextmanager
def held_records() -> Iterator[HeldRecords]:
    """While the block runs, the root logger's records are kept, at every
    level, instead of handled (the node that will pass them on to ROS is
    being made; its level is not known yet). Hand them to
    :func:`logging_through_node` afterwards. If the block raises, they go to
    the root's handlers as they would have gone, at the levels set before;
    so does the count of those not kept (:meth:`HeldRecords.report_dropped`).
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    held = HeldRecords()
    for handler in handlers:
        root.removeHandler(handler)
    root.addHandler(held)
    root.setLevel(logging.DEBUG)
    failed = False
    try:
        yield held
    except BaseException:
        failed = True
        raise
    finally:
        root.removeHandler(held)
        root.setLevel(level)
        for handler in handlers:
            root.addHandler(handler)
        if failed:
            for record in held.records:  # those their loggers let through before
                if logging.getLogger(record.name).isEnabledFor(record.levelno):
                    root.handle(record)
            held.report_dropped()


@contextlib.contextmanager
def logging_through_node(node: Node, held: HeldRecords | None = None) -> Iterator[None]:
    """While the block runs, the root logger's records go through ``node``'s
    logger (see the module); afterwards, to the root's handlers as they
    were. The root logger takes the level the node's logger has, and keeps
    it afterwards: ``--log-level debug`` lets this package's debug messages
    through, and ``--log-level error`` keeps what is logged as the node
    stops to errors too.

    Leave the block before ROS shuts down or the node is destroyed, on the
    same thread: records of other threads then no longer reach rcl (rcl's
    logger crashed a process logging on one thread while ROS shut down on
    another).

    :param held: records logged before (:func:`held_records`), passed on
        first, at the node's level, with the count of those not kept.
    """
    root = logging.getLogger()
    handlers = list(root.handlers)
    # Without handlers, logging prints warnings and worse through its last resort: so do we.
    fallback = handlers if handlers or logging.lastResort is None else [logging.lastResort]
    through = _ThroughNode(node, fallback)
    for handler in handlers:
        root.removeHandler(handler)
    root.addHandler(through)
    root.setLevel(int(node.get_logger().get_effective_level()))
    if held is not None:
        for record in held.records:
            through.handle(record)
        held.report_dropped()
    try:
        yield
    finally:
        through.close()
        root.removeHandler(through)
        for handler in handlers:
            root.addHandler(handler)
