"""The arm's web frontend: a FastAPI app that calls the arm's node over IPC.

    ros2 run my_arm arm_web --port 8000
    uvicorn my_arm.web:app --port 8000 --timeout-graceful-shutdown 5     # the same

One :class:`~vyra_base_ipc.IPCHandler` per app, made in the lifespan and
shared by every request (it connects on demand, so the app may start before
the arm's node, and heals when the node restarts). It finds the node's socket
as every client does: ``VYRA_IPC_SOCKET`` if set, else the module name
(``VYRA_MODULE_NAME``, default ``my_arm``). A failed call becomes what
grpc-gateway makes of a gRPC status: its HTTP status, and a body of the
``google.rpc.Status`` as JSON (``code``, ``message``: the error's text,
``details``: its status details).

A stop (Ctrl-C, SIGTERM) lets the requests in flight end, for
:data:`SHUTDOWN_GRACE` seconds at most, then cancels those left, which ends
their IPC calls and streams on the node too.
"""

from __future__ import annotations

import argparse
import base64
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
import json
import math
import os
from typing import Annotated, Sequence

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.protobuf import any_pb2, json_format
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2  # noqa: F401  (registers BadRequest, ErrorInfo, ... for _detail)
import grpc
from pydantic import BaseModel
import uvicorn

from vyra_base_ipc import IPCError, IPCHandler, keep_freed_memory

from .arm_pb2 import CameraFrame, FrameRequest, JointState, MoveReply, MoveRequest, WatchRequest
from .arm_pb2_grpc import ArmServiceStub

#: grpc-gateway's mapping of gRPC status codes to HTTP (runtime/errors.go);
#: anything else is 500.
HTTP_STATUS = {
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
}

#: The largest value of a proto ``uint32`` (protobuf raises ``ValueError`` beyond it).
UINT32_MAX = 2**32 - 1

#: The deadline of the frontend's IPC calls, in seconds.
CALL_TIMEOUT = 5.0

#: How long a stop waits for the requests in flight before it cancels them
#: (uvicorn's ``timeout_graceful_shutdown``): the calls' deadline, so that only
#: endless streams (``/joints?count=0``) are cut. Without it uvicorn waits for
#: every open response to end, and a browser watching the joints kept the
#: frontend running, its lifespan's ``disconnect()`` not reached, for as long
#: as it watched. Whole seconds, as uvicorn takes it, rounded up.
SHUTDOWN_GRACE = math.ceil(CALL_TIMEOUT)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Make the app's IPC client at start-up; close it at shutdown."""
    module = os.environ.get('VYRA_MODULE_NAME', 'my_arm')
    # Every camera frame is a fresh 6 MiB block for protobuf: reuse freed
    # memory for the next one instead of faulting in new pages each time.
    keep_freed_memory()
    # Not `async with`, which connects: the app starts even while the node is
    # down, and calls connect on demand once it is up.
    app.state.arm = IPCHandler(module_name=module, service_stub=ArmServiceStub, timeout=CALL_TIMEOUT)
    try:
        yield
    finally:
        await app.state.arm.disconnect()


app = FastAPI(title='my_arm', lifespan=lifespan)


@app.exception_handler(IPCError)
async def ipc_error(request: Request, error: IPCError) -> JSONResponse:
    """A failed call as grpc-gateway answers it: the HTTP status of its gRPC
    status, and that status as JSON: ``code`` (its number), ``message`` (the
    error's text, which names the method and the cause) and ``details``."""
    body = {'code': error.code.value[0], 'message': str(error),
            'details': [_detail(detail) for detail in error.status_details]}
    return JSONResponse(body, status_code=HTTP_STATUS.get(error.code, 500))


class BadRequest(ValueError):
    """A request the method's message cannot hold: answered as grpc-gateway
    answers a body it cannot make the message of, INVALID_ARGUMENT (400)."""


@app.exception_handler(BadRequest)
async def bad_request(request: Request, error: BadRequest) -> JSONResponse:
    """A :class:`BadRequest` as grpc-gateway answers it: 400, ``code`` 3."""
    body = {'code': grpc.StatusCode.INVALID_ARGUMENT.value[0], 'message': str(error), 'details': []}
    return JSONResponse(body, status_code=400)


def _detail(detail: any_pb2.Any) -> dict[str, object]:
    """A status detail in protobuf's JSON for ``Any``: ``{"@type": ..., fields}``;
    ``{"@type": ..., "value": <base64>}`` for a type this process does not know."""
    try:
        return json_format.MessageToDict(detail)
    except (TypeError, KeyError, json_format.Error, DecodeError):  # a type unknown here, or bad bytes
        return {'@type': detail.type_url, 'value': base64.b64encode(detail.value).decode()}


class Move(BaseModel):
    """Where to move the arm, and how fast (0: the arm's default speed)."""

    pose: str
    speed: float = 0.0


@app.post('/move')
async def move(body: Move, request: Request) -> dict[str, object]:
    """Move the arm to a named pose and say whether it got there."""
    arm: IPCHandler = request.app.state.arm
    try:
        move_request = MoveRequest(pose=body.pose, speed=body.speed)
    except ValueError as error:
        # JSON allows a lone surrogate ("\ud800"), protobuf's strings (UTF-8) do not: it was a 500, and
        # FastAPI's own 422 could not be sent (it echoes the input, which no UTF-8 encodes).
        raise BadRequest(f'pose: {error}') from None
    reply = await arm.call_method('Move', move_request, response_type=MoveReply)
    return {'pose': reply.pose, 'reached': reply.reached}


@app.get('/joints')
async def joints(request: Request,
                 count: Annotated[int, Query(ge=0, le=UINT32_MAX)] = 10) -> StreamingResponse:
    """``count`` joint states as they come, one JSON line each (NDJSON); 0:
    until the browser leaves (or the frontend stops). A count the request's
    ``uint32`` cannot hold is refused (422), as one that is no number.

    A client that disconnects early ends the stream on the node too: the
    response's generator is closed, and with it the IPC stream.
    """
    arm: IPCHandler = request.app.state.arm
    # No overall deadline (the call timeout would cut a watch off after 5 s, mid-body):
    # it lives while the browser reads, and fails if the node sends nothing for that long.
    states = arm.stream_method('WatchJoints', WatchRequest(count=count), timeout=None,
                               idle_timeout=CALL_TIMEOUT, response_type=JointState)
    try:
        # The first state before the response starts: a stream that cannot
        # start is then an HTTP error, not a 200 with a broken body.
        first = await anext(states, None)
    except BaseException:
        await states.aclose()
        raise

    async def lines() -> AsyncIterator[str]:
        async with aclosing(states):
            if first is not None:
                yield _joint_line(first)
            async for state in states:
                yield _joint_line(state)

    return StreamingResponse(lines(), media_type='application/x-ndjson')


def _joint_line(state: JointState) -> str:
    return json.dumps({'sequence': state.sequence, 'positions': list(state.positions)}) + '\n'


@app.get('/frame')
async def frame(request: Request) -> Response:
    """The camera's current frame, raw RGB (6 MiB by default: it comes from
    the node as shared memory on the fast lane)."""
    arm: IPCHandler = request.app.state.arm
    image = await arm.call_method('GetCameraFrame', FrameRequest(), response_type=CameraFrame)
    return Response(image.rgb, media_type='application/octet-stream',
                    headers={'X-Width': str(image.width), 'X-Height': str(image.height),
                             'X-Lane': str(arm.lane_in_use)})


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the app with uvicorn until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--host', default='127.0.0.1', help='address to listen on (default: 127.0.0.1)')
    parser.add_argument('--port', type=int, default=8000, help='TCP port (default: 8000)')
    parser.add_argument('--uds', help='listen on this Unix socket instead of host and port')
    parser.add_argument('--loop', default='auto', choices=('auto', 'asyncio', 'uvloop'),
                        help="the event loop (default: auto, uvicorn's choice: uvloop where installed)")
    options = parser.parse_args(argv)
    uvicorn.run(app, host=options.host, port=options.port, uds=options.uds, loop=options.loop,
                timeout_graceful_shutdown=SHUTDOWN_GRACE)


if __name__ == '__main__':
    main()
