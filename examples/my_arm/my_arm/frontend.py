"""A frontend of my_arm (as a FastAPI backend would call it): moves the arm,
watches three joint states, fetches a camera frame and has an image
inspected, printing one JSON line per answer.

    ros2 run my_arm arm_frontend --module my_arm
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Sequence
import zlib

from vyra_base_ipc import IPCError, IPCHandler, SharedBuffer

from .arm_pb2 import FrameRequest, ImageRequest, MoveRequest, WatchRequest
from .arm_pb2_grpc import ArmServiceStub


async def run(module: str, lane: str) -> None:
    """Call each method of the module's ArmService once."""
    async with IPCHandler(module_name=module, service_stub=ArmServiceStub, lane=lane) as arm:
        moved = await arm.call_method('Move', MoveRequest(pose='ready'))
        print(json.dumps({'move': moved.pose, 'reached': moved.reached}))
        async for state in arm.stream_method('WatchJoints', WatchRequest(count=3)):
            print(json.dumps({'joints': list(state.positions), 'sequence': state.sequence}))
        frame = await arm.call_method('GetCameraFrame', FrameRequest())
        print(json.dumps({'frame': [frame.width, frame.height], 'bytes': len(frame.rgb),
                          'lane': arm.lane_in_use}))
        image = bytes(range(256)) * 4096
        # Written once into shared memory; the handler reads these very pages.
        with SharedBuffer.copy_from(image) as buffer:
            stats = await arm.call_method('InspectImage', ImageRequest(image=buffer.ref), buffers=[buffer])
        print(json.dumps({'image': stats.size, 'intact': stats.crc32 == zlib.crc32(image)}))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the calls; exit 1 with the error if one fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--module', default='my_arm', help='the module name (default: my_arm)')
    parser.add_argument('--lane', default='auto', choices=('auto', 'grpc', 'ttrpc'))
    options = parser.parse_args(argv)
    try:
        asyncio.run(run(options.module, options.lane))
    except IPCError as error:
        print(json.dumps({'error': str(error)}))
        return 1
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
