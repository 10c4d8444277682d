"""The documented example BackendService, with plain ``def`` handlers (they
run in the server's thread pool, beside the ``async def`` ModuleService)."""

from __future__ import annotations

import time
from typing import Any

from vyra_base_ipc import backend_service_pb2 as backend_pb
from vyra_base_ipc import backend_service_pb2_grpc as backend_grpc
from vyra_base_ipc import module_service_pb2 as module_pb

__all__ = ['BackendService']


class BackendService(backend_grpc.BackendServiceServicer):
    """Reports its uptime; ``ProcessData`` returns the data upper-cased."""

    def __init__(self) -> None:
        self._started = time.monotonic()

    def GetStatus(self, request: backend_pb.StatusRequest, context: Any) -> backend_pb.StatusResponse:
        """``running``, and the seconds since this servicer was created."""
        return backend_pb.StatusResponse(status='running', uptime_seconds=time.monotonic() - self._started)

    def ProcessData(self, request: module_pb.DataRequest, context: Any) -> module_pb.DataResponse:
        """``data`` upper-cased, under the request's ``key``."""
        return module_pb.DataResponse(key=request.key, result=request.data.upper(),
                                      content_type='application/octet-stream')
