"""A servicer for ipc_server tests whose ``Sleep`` blocks the server's event
loop for ``seconds`` (``time.sleep`` in an ``async def`` handler: a mistake a
handler can make), loaded through the ``servicers`` parameter
(``-p "servicers:=['loop_blocker:LoopBlocker']"``)."""

from __future__ import annotations

import time
from typing import Any

from vyra_ipc_test import echo_pb2, echo_pb2_grpc


class LoopBlocker(echo_pb2_grpc.EchoServiceServicer):
    async def Echo(self, request: Any, context: Any) -> Any:
        return echo_pb2.EchoReply(text=request.text)

    async def Sleep(self, request: Any, context: Any) -> Any:
        time.sleep(request.seconds)  # (the fault under test)
        return echo_pb2.SleepReply(was_active=True)
