"""WatchService: streams whose handlers report what they did (see echo.proto)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, AsyncIterator, Iterator

from vyra_ipc_test import echo_pb2, echo_pb2_grpc

_PAGE = os.sysconf('SC_PAGE_SIZE')


class _Record:
    def __init__(self) -> None:
        self.sent = 0
        self.taken = 0
        self.started = False
        self.ended = False
        self.how = ''
        self.callback_ran = False

    def report(self) -> echo_pb2.WatchReport:
        with open('/proc/self/statm') as statm:
            rss = int(statm.read().split()[1]) * _PAGE
        return echo_pb2.WatchReport(sent=self.sent, taken=self.taken, started=self.started, ended=self.ended,
                                    how=self.how, callback_ran=self.callback_ran, rss_bytes=rss)


class WatchService(echo_pb2_grpc.WatchServiceServicer):
    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}
        self._releases: dict[str, asyncio.Event] = {}

    def _begin(self, tag: str, context: Any) -> _Record:
        record = self._records[tag] = _Record()
        record.started = True

        def callback(*_: Any) -> None:
            record.callback_ran = True
        if hasattr(context, 'add_callback'):  # the fast lane's contexts, and def handlers' on the gRPC lane
            context.add_callback(callback)
        else:  # async def handlers on the gRPC lane (grpc.aio.ServicerContext)
            context.add_done_callback(callback)
        return record

    async def Watch(self, request: echo_pb2.WatchRequest, context: Any) -> AsyncIterator[echo_pb2.WatchEvent]:
        record = self._begin(request.tag, context)
        payload = b'w' * request.size
        try:
            index = 0
            while not request.count or index < request.count:
                yield echo_pb2.WatchEvent(index=index, payload=payload, sent_at=time.monotonic())
                record.sent = index = index + 1
                if request.interval:
                    await asyncio.sleep(request.interval)
            if request.hold:
                await asyncio.Event().wait()
            record.how = 'finished'
        except asyncio.CancelledError:
            record.how = 'cancelled'  # while awaiting something
            raise
        except GeneratorExit:
            record.how = 'closed'  # while it had yielded: as grpc.aio, the generator is closed
            raise
        finally:
            record.ended = True

    def WatchSync(self, request: echo_pb2.WatchRequest, context: Any) -> Iterator[echo_pb2.WatchEvent]:
        record = self._begin(request.tag, context)
        payload = b'w' * request.size
        try:
            index = 0
            while (not request.count or index < request.count) and context.is_active():
                yield echo_pb2.WatchEvent(index=index, payload=payload, sent_at=time.monotonic())
                record.sent = index = index + 1
                if request.interval:
                    time.sleep(request.interval)
            while request.hold and context.is_active():
                time.sleep(0.01)
            record.how = 'finished' if context.is_active() else 'inactive'
        except GeneratorExit:
            record.how = 'inactive'  # a write to the ended call stopped the generator
            raise
        finally:
            record.ended = True

    async def Converse(self, request_iterator: Any, context: Any) -> AsyncIterator[echo_pb2.WatchEvent]:
        record = None
        try:
            async for request in request_iterator:
                if record is None:
                    record = self._begin(request.tag, context)
                yield echo_pb2.WatchEvent(index=request.index, payload=request.payload, sent_at=time.monotonic())
                record.sent += 1
            if record is not None:
                record.how = 'finished'
        except asyncio.CancelledError:
            if record is not None:
                record.how = 'cancelled'
            raise
        except GeneratorExit:
            if record is not None:
                record.how = 'closed'  # left while it had yielded, as Watch says
            raise
        finally:
            if record is not None:
                record.ended = True

    async def Hold(self, request: echo_pb2.WatchRequest, context: Any) -> echo_pb2.WatchEvent:
        record = self._begin(request.tag, context)
        try:
            if request.interval:
                await asyncio.sleep(request.interval)
            else:
                await asyncio.Event().wait()
            record.how = 'finished'
            return echo_pb2.WatchEvent(sent_at=time.monotonic())
        except asyncio.CancelledError:
            record.how = 'cancelled'
            raise
        finally:
            record.ended = True

    async def Absorb(self, request_iterator: Any, context: Any) -> echo_pb2.WatchEvent:
        record: _Record | None = None
        in_order = True
        try:
            async for request in request_iterator:
                if record is None:
                    record = self._begin(request.tag, context)
                    release = self._releases.setdefault(request.tag, asyncio.Event())
                in_order = in_order and request.index == record.taken
                record.taken += 1
                if record.taken == request.count:
                    await release.wait()
                    if request.hold:
                        break  # answer now, the rest of the stream unread
            if record is not None:
                record.how = 'finished'
            return echo_pb2.WatchEvent(index=record.taken if record else 0, in_order=in_order)
        except asyncio.CancelledError:
            if record is not None:
                record.how = 'cancelled'
            raise
        finally:
            if record is not None:
                record.ended = True

    async def Release(self, request: echo_pb2.WatchRequest, context: Any) -> echo_pb2.WatchEvent:
        self._releases.setdefault(request.tag, asyncio.Event()).set()
        return echo_pb2.WatchEvent()

    async def Report(self, request: echo_pb2.WatchRequest, context: Any) -> echo_pb2.WatchReport:
        record = self._records.get(request.tag)
        return record.report() if record is not None else _Record().report()

