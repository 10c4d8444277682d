"""A caller's request stream as the lanes take it (client- and
bidirectional-streaming methods).

Every message is checked to be the method's request type as it is taken,
as a unary request is before its call: protobuf serializes a message of
another type silently (the server then parses it with its fields lost) and
fails anything else deep inside. The first exception the stream raises,
the caller's own iterator's or that check's, is kept, so that the lane
raises it to the caller as it is: grpc only logs it and fails the call as
UNKNOWN or cancelled, as if the server or the connection had.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, TypeVar

import grpc

from ._deadline import Deadline, within
from ._methods import Method, request_type_error

__all__ = ['SEND_FAILED', 'AioRequestSender', 'RequestStream', 'server_status']

_T = TypeVar('_T')

#: grpc.aio's details of the INTERNAL status it sets when a message of a
#: request stream cannot be written (the call ended under the write, or the
#: connection broke); no server says INTERNAL so.
SEND_FAILED = 'Internal error from Core'


class RequestStream:
    """``requests`` (an iterable, or an async iterable for the asyncio
    client) of ``method``, checked message by message; iterate it either way.

    :raises TypeError: ``requests`` is not iterable (a single message given
        to a streaming method, say).
    """

    __slots__ = ('_method', '_items', '_async', '_index', 'error')

    def __new__(cls, method: Method, requests: Any) -> RequestStream:
        if requests.__class__ is cls:
            return requests  # (checked once: a handler's, then its lane's)
        return super().__new__(cls)

    def __init__(self, method: Method, requests: Any) -> None:
        if requests is self:
            return
        self._method = method
        self._async = hasattr(requests, '__aiter__')
        try:
            self._items = requests.__aiter__() if self._async else iter(requests)
        except TypeError:
            raise TypeError(f'{method.name} streams its requests: give it an iterable of '
                            f'{method.request_type or "request"} messages, not {type(requests).__qualname__}'
                            ) from None
        self._index = 0
        #: The first exception the stream raised; ``None`` while it raised none.
        self.error: BaseException | None = None

    def __iter__(self) -> RequestStream:
        return self

    def __next__(self) -> Any:
        try:
            if self._async:
                raise TypeError(f'{self._method.name}: an async iterable of requests needs the asyncio '
                                'client (IPCHandler); give the blocking one an iterable')
            return self._checked(next(self._items))
        except StopIteration:
            raise
        except Exception as error:
            self.error = error
            raise

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Any:
        try:
            if self._async:
                return self._checked(await self._items.__anext__())
            return self._checked(next(self._items))
        except (StopIteration, StopAsyncIteration):
            raise StopAsyncIteration from None
        except Exception as error:
            self.error = error
            raise

    def _checked(self, message: Any) -> Any:
        wrong = request_type_error(self._method, message, self._index)
        if wrong is not None:
            raise wrong
        self._index += 1
        return message


def _not_the_callers(record: logging.LogRecord) -> bool:
    """Whether grpc's log ``record`` is of anything but an exception a
    :class:`RequestStream` raised: the lane raises that one to the caller
    (:attr:`RequestStream.error`), so grpc's ERROR of it, "Exception
    iterating requests!" with its traceback, only said it twice."""
    error = record.exc_info[1] if record.exc_info else None
    trace = None if error is None else error.__traceback__
    while trace is not None:
        if trace.tb_frame.f_code is _NEXT:
            return False
        trace = trace.tb_next
    return True


_NEXT = RequestStream.__next__.__code__
# The blocking channel's request thread logs what the iterator raised (grpc.aio's is not used).
logging.getLogger('grpc._channel').addFilter(_not_the_callers)


class AioRequestSender:
    """Writes ``requests`` to the grpc.aio ``call`` in a task, then
    half-closes it, until the call ends (the caller then calls :meth:`stop`).
    (grpc.aio's own task, given the iterator, outlives a call that ended
    first, waiting on the caller's iterator for ever, and never closes it.)
    A failing iterator cancels the call; ``requests.error``
    tells the caller why.

    It keeps the status the server ended the call with: a write under which
    the server ends the call (refused by an interceptor, aborted by its
    handler) fails, and grpc.aio then sets the call's status to INTERNAL
    :data:`SEND_FAILED`, before the server's arrives or over it. The
    caller took that for a lost connection (2 of 20 rejected bidi calls);
    :meth:`server_status` gives the server's.
    """

    __slots__ = ('_call', '_task', '_status', '_arrived')

    def __init__(self, call: Any, requests: RequestStream) -> None:
        self._call = call
        self._status: tuple[grpc.StatusCode, str] | None = None
        self._arrived = asyncio.Event()
        call.add_done_callback(self._ended)  # (called each time grpc.aio sets the status)
        self._task = asyncio.get_running_loop().create_task(self._send(requests))

    async def _send(self, requests: RequestStream) -> None:
        call = self._call
        try:
            async for message in requests:
                if call.done():
                    return  # ended: its caller learns how from the call
                await call.write(message)
            await call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass  # the call ended: its caller learns how from the call
        except Exception:
            call.cancel()

    def _ended(self, call: Any) -> None:
        # The status is set now: code() and details() answer without waiting.
        code, details = _at_once(call.code()), _at_once(call.details())
        if code is None or (code is grpc.StatusCode.INTERNAL and details == SEND_FAILED):
            return
        if self._status is None:
            self._status = (code, details or '')
            self._arrived.set()

    async def server_status(self, wait: float) -> tuple[grpc.StatusCode, str] | None:
        """The status the call ended with but grpc.aio's own :data:`SEND_FAILED`,
        waited for up to ``wait`` seconds; ``None`` if none came."""
        if self._status is None:
            try:
                await within(self._arrived.wait(), wait)
            except TimeoutError:
                pass
        return self._status

    def stop(self) -> None:
        self._task.cancel()


def _at_once(awaitable: Awaitable[_T]) -> _T | None:
    """What ``awaitable`` gives if it gives it without waiting; else ``None``."""
    steps = awaitable.__await__()
    try:
        steps.send(None)
    except StopIteration as done:
        return done.value
    steps.close()
    return None


#: How long a call whose request message could not be written waits for the
#: server's status at most (grpc core gives it as the call ends, at once).
_STATUS_WAIT = 5.0


async def server_status(error: grpc.RpcError, sender: AioRequestSender | None,
                        deadline: Deadline | None) -> grpc.RpcError:
    """``error``; but for grpc.aio's INTERNAL :data:`SEND_FAILED` (a request
    message could not be written) the status the server ended the call
    with, if it gives one (see :class:`AioRequestSender`)."""
    if sender is None or error.code() is not grpc.StatusCode.INTERNAL or error.details() != SEND_FAILED:
        return error
    wait = _STATUS_WAIT if deadline is None else max(0.0, min(_STATUS_WAIT, deadline.remaining()))
    status = await sender.server_status(wait)
    if status is None:
        return error
    return grpc.aio.AioRpcError(status[0], grpc.aio.Metadata(), grpc.aio.Metadata(), status[1])
