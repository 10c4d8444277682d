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

from typing import Any

from ._methods import Method, request_type_error

__all__ = ['RequestStream']


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
