"""What an :class:`~vyra_base_ipc.IPCServer`'s process logs besides the
server's own lines: this package's INFO lines on stderr while
:meth:`~vyra_base_ipc.IPCServer.serve` runs in a process that configured no
logging, and grpc.aio's ERROR of a message it could not send, limited.

grpc.aio logs "ExecuteBatchError raised in core by servicer method [...]",
with a traceback of its own code, when a send of a call fails before it has
seen the call end: a client that left a stream while the server wrote (184
of 200 streams left with RST_STREAM CANCEL, as a grpc client cancels,
logged it; grpc logs nothing when it sees the end first), and what grpc
refuses to send, such as a metadata key with a space in it. (A message
larger than ``max_message_bytes`` logged it too; every answer, the tools'
included, is checked before, and said so, by
:mod:`~vyra_base_ipc._answer_size`.) The record cannot tell which, so it is not dropped: it goes through
:func:`~._log_limit.log_limited`, one kind for every method (a peer names
the method of a call no handler has), the first at once with grpc's
traceback, the others counted.

The filter is on grpc's logger, which every grpc.aio server of the process
logs to, so it limits only the records of a call of a running
:class:`~vyra_base_ipc.IPCServer`'s gRPC lane: grpc.aio logs the record in
the call's own task (``HandleExceptions[<method>]``, where its interceptors
ran too), which that server's :class:`~._grpc_streams.CallTasks` holds from
its interceptor until the task ends; each server's is known here from its
``start()`` to the end of its stop (:func:`serving_calls`). The records of
another grpc.aio server in the process (on the same event loop or not),
and those of a stopped server's calls still ending, pass as grpc logged
them (before, the first of every server's was rewritten, the others held).
No call pays for it: a record is looked up only when grpc logs one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any, Container, Iterator

from ._log_limit import log_limited

__all__ = ['logged_to_stderr', 'serving_calls']

#: grpc.aio's words (grpc/_cython/_cygrpc/aio/server.pyx.pxi, ``_handle_exceptions``).
_SEND_FAILED = 'ExecuteBatchError raised in core by servicer method'
_GRPC_LOGGER = logging.getLogger('grpc._cython.cygrpc')
#: What it means, after grpc's words.
_WHY = ('grpc could not send on the call (its client had left it, or grpc refused what the handler '
        'gave it to send, such as metadata)')


#: The call tasks of each running IPCServer's gRPC lane; replaced, never
#: changed, so that a filter in any thread reads one whole (under the GIL).
_serving: tuple[Container[asyncio.Task[Any]], ...] = ()
_serving_lock = threading.Lock()


def serving_calls(calls: Container[asyncio.Task[Any]], serving: bool) -> None:
    """The tasks of a server's calls (those in ``calls``) are, from now
    on, a running server's (``serving``) or no longer; idempotent."""
    global _serving
    with _serving_lock:
        others = tuple(known for known in _serving if known is not calls)
        _serving = (*others, calls) if serving else others


def _ours() -> bool:
    """Whether the record being logged comes from a call of a running
    IPCServer: logged in the task of one of its calls."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # (no event loop runs in this thread)
        return False
    return task is not None and any(task in calls for calls in _serving)


def _limit_send_failed(record: logging.LogRecord) -> bool:
    """Pass every record of grpc's logger but its :data:`_SEND_FAILED` ones
    of our servers' calls, which are logged again through
    :func:`~._log_limit.log_limited`, saying what they mean (as ``'%s: %s'``:
    those, and the summaries of the held ones, then pass here)."""
    if not (isinstance(record.msg, str) and record.msg.startswith(_SEND_FAILED)) or not _ours():
        return True
    log_limited(_GRPC_LOGGER, record.levelno, 'grpc send failed', '%s: %s', record.getMessage(), _WHY,
                exc_info=record.exc_info)
    return False


_GRPC_LOGGER.addFilter(_limit_send_failed)


@contextlib.contextmanager
def logged_to_stderr() -> Iterator[None]:
    """INFO lines of this package to stderr, unless logging is configured."""
    package = logging.getLogger(__name__.rpartition('.')[0])
    if package.hasHandlers() or logging.getLogger().level != logging.WARNING:
        yield  # the process configured logging: its choice
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter('[%(levelname)s] [%(asctime)s] [%(name)s]: %(message)s'))
    level = package.level
    package.addHandler(handler)
    package.setLevel(min(level or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
