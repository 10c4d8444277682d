"""The servicer of ``my_arm.ArmService`` (protos/my_arm/arm.proto)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator
import zlib

from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
import grpc
import grpc.aio
from grpc_status import rpc_status

from vyra_base_ipc import shared_buffer

from .arm_pb2 import (
    CameraFrame,
    FrameRequest,
    ImageRequest,
    ImageStats,
    JointState,
    MoveReply,
    MoveRequest,
    WatchRequest,
)
from .arm_pb2_grpc import ArmServiceServicer

#: Poses Move knows.
POSES = {'home': (0.0, 0.0, 0.0), 'ready': (0.0, -0.5, 1.2), 'stow': (1.5, -1.0, 2.0)}


class ArmService(ArmServiceServicer):
    """Serves the arm: ``async def`` handlers run on the server's event loop,
    the ``def`` one in its thread pool. Their contexts are typed with grpc's
    classes: a type checker then lets through what both lanes provide."""

    def __init__(self) -> None:
        self.positions = POSES['home']

    async def Move(self, request: MoveRequest,
                   context: grpc.aio.ServicerContext[MoveRequest, MoveReply]) -> MoveReply:
        """Go to a known pose; INVALID_ARGUMENT names the known ones, in its
        text and in a ``google.rpc.BadRequest`` detail (gRPC's richer error
        model: a client reads it from ``IPCError.status_details``)."""
        if request.pose not in POSES:
            known = ', '.join(sorted(POSES))
            violation = error_details_pb2.BadRequest.FieldViolation(
                field='pose', description=f'{request.pose!r} is not one of: {known}')
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
            await context.abort_with_status(rpc_status.to_status(status_pb2.Status(
                code=code_pb2.INVALID_ARGUMENT, message=f'unknown pose {request.pose!r}; known: {known}',
                details=[detail])))
        self.positions = POSES[request.pose]
        return MoveReply(reached=True, pose=request.pose)

    async def WatchJoints(self, request: WatchRequest,
                          context: grpc.aio.ServicerContext[WatchRequest, JointState]
                          ) -> AsyncIterator[JointState]:
        """Joint states every ``period`` seconds, ``count`` of them (0: until the caller leaves)."""
        sequence = 0
        while request.count == 0 or sequence < request.count:
            yield JointState(sequence=sequence, positions=self.positions)
            sequence += 1
            await asyncio.sleep(request.period or 0.01)

    async def GetCameraFrame(self, request: FrameRequest,
                             context: grpc.aio.ServicerContext[FrameRequest, CameraFrame]) -> CameraFrame:
        """A test pattern of ``width`` x ``height`` RGB pixels (default 2048 x 1024: 6 MiB)."""
        width, height = request.width or 2048, request.height or 1024
        if width * height * 3 > 16 * 1024 * 1024:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f'{width}x{height} is over 16 MiB')
        row = bytes(range(256)) * (width * 3 // 256 + 1)
        return CameraFrame(width=width, height=height, rgb=row[:width * 3] * height)

    def InspectImage(self, request: ImageRequest, context: grpc.ServicerContext) -> ImageStats:
        """The size and CRC-32 of the image the caller shared."""
        # The image's bytes as the client wrote them: its shared memory on the
        # fast lane (no copy), the inline bytes on the gRPC lane.
        image = shared_buffer(request.image, context)
        return ImageStats(size=len(image), crc32=zlib.crc32(image))
