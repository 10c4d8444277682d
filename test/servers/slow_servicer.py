"""A servicer for ipc_server tests, loaded through the ``servicers`` parameter
(``-p "servicers:=['slow_servicer:SlowEchoService']"`` with this directory and
the compiled test protos on PYTHONPATH).

``Sleep`` waits on the event loop; ``EchoSync`` blocks a handler thread for
``float(text)`` seconds. Each call appends its method name to
``<socket_path>.calls`` when it begins, so tests can wait until a call is in
flight instead of sleeping.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
import time
from typing import Any

from vyra_ipc_test import echo_pb2, echo_pb2_grpc


class SlowEchoService(echo_pb2_grpc.EchoServiceServicer):
    def __init__(self) -> None:
        self.calls_file: Path | None = None

    def attach_ipc_host(self, host: Any) -> None:
        self.calls_file = Path(f'{host.config.socket_path}.calls')

    def _began(self, method: str) -> None:
        assert self.calls_file is not None
        with open(self.calls_file, 'a', encoding='utf-8') as calls:
            calls.write(f'{method}\n')

    async def Echo(self, request: Any, context: Any) -> Any:
        return echo_pb2.EchoReply(text=request.text)

    async def Sleep(self, request: Any, context: Any) -> Any:
        self._began('Sleep')
        await asyncio.sleep(request.seconds)
        return echo_pb2.SleepReply(time_remaining=context.time_remaining() or 0.0, was_active=True)

    def EchoSync(self, request: Any, context: Any) -> Any:
        self._began('EchoSync')
        time.sleep(float(request.text))
        return echo_pb2.EchoReply(text=request.text)
